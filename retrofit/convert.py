"""Convert an fla GDN / DeltaNet checkpoint into a memory-augmented one, shard by shard.

The output folder holds the base tensors unchanged (optionally cast to `dtype`), one more shard with
the memory parameters, a config with `model_type` `hola_*`, `hola` (memory settings) and `hola_base`
(where the weights came from), the tokenizer and generation files, a model card, and two small
remote-code shims so `trust_remote_code=True` also loads it. Everything is written to a temporary
folder beside the output and moved into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..adapters.config import MemoryConfig
from ..adapters.mixers import MemoryParams
from ..adapters.modeling import (
    HOLA_TYPES,
    SUPPORTED_BASE_TYPES,
    hola_config_from_base,
    meta_model,
    write_remote_code,
)
from .card import write_model_card
from .errors import OutputExistsError, RetrofitError, SourceError, UnsupportedModelError
from .progress import transformers_bars
from .source import Source, resolve_source

INDEX = 'model.safetensors.index.json'
WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.h5', '.msgpack', '.ckpt', '.gguf')
SKIP_FILES = {'config.json', 'README.md', '.gitattributes', INDEX, 'pytorch_model.bin.index.json'}
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

def read_base_config(src: Source) -> dict:
    path = src.path / 'config.json'
    if not path.is_file():
        raise SourceError(f"{src.name}: no config.json")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{src.name}: config.json is not valid JSON ({e})") from None
    model_type = cfg.get('model_type')
    if model_type in HOLA_TYPES:
        base = cfg.get('hola_base', {}).get('model_id', '?')
        raise UnsupportedModelError(f"{src.name} is already memory-augmented ({model_type}, from {base}); "
                                    "convert its base checkpoint instead")
    if model_type not in SUPPORTED_BASE_TYPES:
        raise UnsupportedModelError(f"{src.name}: unsupported model type {model_type!r}; supported: "
                                    f"{', '.join(SUPPORTED_BASE_TYPES)}")
    return cfg


def weight_files(src: Source) -> list[Path]:
    st = sorted(src.path.glob('*.safetensors'))
    if st:
        return st
    bins = sorted(src.path.glob('pytorch_model*.bin'))
    if bins:
        return bins
    raise SourceError(f"{src.name}: no weights (*.safetensors or pytorch_model*.bin)")


def _iter_tensors(path: Path):
    """(name, tensor) pairs of one weight file, one tensor at a time for safetensors."""
    try:
        if path.suffix == '.safetensors':
            from safetensors import safe_open
            with safe_open(str(path), framework='pt') as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(str(path), map_location='cpu', weights_only=True).items()
    except Exception as e:  # safetensors and torch.load raise many types for a damaged file
        raise SourceError(f"{path.name} is unreadable or corrupt: {type(e).__name__}: {e}") from None


def expected_parameters(config) -> tuple[dict, dict, set]:
    """Names and shapes of base tensors, and the memory tensors with their initial values,
    read off the model built on the meta device (no memory is allocated)."""
    model = meta_model(config)
    mem = model.config.memory_config
    base, memory = {}, {}
    for name, p in model.state_dict().items():
        if '.mem.' in name:
            memory[name] = MemoryParams.initial(p.shape[0], (p.shape[1] - 2) // 2, mem)
        else:
            base[name] = p.shape
    tied = set(getattr(model, '_tied_weights_keys', None) or {}) if config.tie_word_embeddings else set()
    return base, memory, tied


def convert(source: str, out: str | os.PathLike | None, mem: MemoryConfig, *, revision: str | None = None,
            dtype: str | None = None, force: bool = False, progress: bool = True, recipe: bool = True,
            calibration_text: str | os.PathLike | None = None, device: str | None = None) -> Path:
    """Write the memory-augmented checkpoint of `source` to `out` and return its path. With `recipe` (default), the
    memory is fitted on the model itself (`recipe.py`) with `calibration_text` (a file; default: the text shipped
    with the package), on `device` (default: CUDA if available)."""
    if dtype is not None and dtype not in DTYPES:
        raise RetrofitError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    src = resolve_source(source, revision)
    src_dir, out_dir = src.path.resolve(), out.resolve()
    if src_dir == out_dir or out_dir in src_dir.parents or src_dir in out_dir.parents:
        raise RetrofitError("the output folder must not be, contain, or lie inside the source")
    base_cfg = read_base_config(src)
    files = weight_files(src)
    text = read_calibration_text(calibration_text) if recipe else None

    from transformers import AutoConfig
    base_config = AutoConfig.for_model(**base_cfg)
    config = hola_config_from_base(base_config, mem, src.info())
    base_shapes, mem_tensors, tied = expected_parameters(config)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', suffix='.partial', dir=out.parent))
    try:
        weight_map = _write_weights(files, tmp, base_shapes, tied, mem_tensors, DTYPES.get(dtype), src.name, progress)
        (tmp / INDEX).write_text(json.dumps({'metadata': {'format': 'pt'}, 'weight_map': weight_map}, indent=2))
        if dtype is not None:
            config.dtype = dtype
        write_remote_code(tmp, config)
        config.save_pretrained(tmp)
        for f in sorted(src.path.iterdir()):
            if f.is_file() and f.name not in SKIP_FILES and not f.name.endswith(WEIGHT_SUFFIXES):
                shutil.copyfile(f, tmp / f.name)
        if recipe:
            with transformers_bars(progress):
                config.hola = _fit_memory(tmp, weight_map, text, calibration_text, mem, device, progress)
            config.save_pretrained(tmp)
        write_model_card(tmp, config, name=out.name)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_calibration_text(path: str | os.PathLike | None) -> str:
    if path is None:
        from importlib import resources
        return resources.files('hola_retrofit.retrofit').joinpath('data/calibration.txt').read_text()
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RetrofitError(f"cannot read the calibration text {path}: {e}") from None


def _fit_memory(folder: Path, weight_map: dict, text: str, text_path, mem: MemoryConfig, device, progress):
    """Load the converted model from `folder`, fit the recipe, write back its memory shard and `recipe.json`, and
    return the memory settings it gives (the config's `hola`)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .recipe import RECIPE_FILE, apply_recipe, fit_recipe
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise RetrofitError(f"the recipe needs the checkpoint's tokenizer ({e}); pass --no-recipe") from None
    dtype = torch.float32 if device == 'cpu' else None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    name = Path(text_path).name if text_path else 'the text shipped with hola-retrofit'
    rec = fit_recipe(model, tok, text, mem.cache_size, text_name=name, progress=progress)
    apply_recipe(model, rec)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items() if '.mem.' in k}
    shard = {weight_map[k] for k in state}
    assert len(shard) == 1, shard
    save_file(state, str(folder / shard.pop()), metadata={'format': 'pt'})
    (folder / RECIPE_FILE).write_text(json.dumps(rec.to_dict(), indent=1))
    return model.config.hola


def _write_weights(files, tmp, base_shapes, tied, mem_tensors, dtype, name, progress):
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    weight_map, seen = {}, set()
    n = len(files) + 1  # the memory is the last shard; no plain model.safetensors, so the index is read
    names = [f'model-{i:05d}-of-{n:05d}.safetensors' for i in range(1, n + 1)]
    bar = tqdm(total=n, desc='copying shards', unit='shard', disable=not progress)
    for path, out_name in zip(files, names):
        shard = {}
        for key, tensor in _iter_tensors(path):
            if key not in base_shapes:
                raise SourceError(f"{name}: unexpected tensor {key!r} in {path.name}; is this an fla checkpoint?")
            if tuple(tensor.shape) != tuple(base_shapes[key]):
                raise SourceError(f"{name}: {key} has shape {tuple(tensor.shape)}, config expects "
                                  f"{tuple(base_shapes[key])}")
            if dtype is not None and tensor.is_floating_point() and key.rsplit('.', 1)[-1] not in ('A_log', 'dt_bias'):
                tensor = tensor.to(dtype)  # A_log and dt_bias stay float32, as fla keeps them
            shard[key] = tensor.contiguous()
            seen.add(key)
        save_file(shard, str(tmp / out_name), metadata={'format': 'pt'})
        weight_map.update({k: out_name for k in shard})
        del shard
        bar.update(1)
    missing = set(base_shapes) - seen - tied
    if missing:
        raise SourceError(f"{name}: weights missing from the checkpoint: {', '.join(sorted(missing)[:5])}"
                          + (' ...' if len(missing) > 5 else ''))
    memory = mem_tensors
    save_file(memory, str(tmp / names[-1]), metadata={'format': 'pt'})
    weight_map.update({k: names[-1] for k in memory})
    bar.update(1)
    bar.close()
    return weight_map


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an existing `out` (with --force) is removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f'.{out.name}.old-{os.getpid()}')
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
