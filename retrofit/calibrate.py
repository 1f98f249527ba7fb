"""Brief PEFT calibration of the memory: train `attn.mem` (gamma of q and k, sink, gate) with everything
else frozen, optionally with LoRA on the mixer projections; one device or many through accelerate.

PEFT methods: memory only -> LN-tuning on the `mem` modules (a trained copy of each, merged back);
with `lora_r > 0` -> LoRA on the patched mixers' q/k/v/o projections, `mem` as `modules_to_save`.
Output (written to a temporary folder, moved into place when complete):
    OUT/               merged model (from_pretrained-ready, tokenizer included, model card)
    OUT/peft_adapter/  the PEFT adapter (PeftModel.from_pretrained(retrofitted model, OUT/peft_adapter))
    OUT/calibration.json, OUT/loss.png
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import OutputExistsError, RetrofitError

PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'o_proj')


def peft_config(model, lora_r: int = 0, lora_alpha: int | None = None):
    from peft import LNTuningConfig, LoraConfig

    from ..adapters.mixers import memory_layers
    if not memory_layers(model):
        raise RetrofitError("the model has no memory layers: convert it with `hola-retrofit convert` first")
    if lora_r <= 0:
        return LNTuningConfig(target_modules=['mem'])
    layers = '|'.join(str(i) for i in model.hola_layers)
    return LoraConfig(r=lora_r, lora_alpha=lora_alpha or 2 * lora_r, lora_dropout=0.0,
                      target_modules=rf'.*layers\.({layers})\.attn\.({"|".join(PROJECTIONS)})',
                      modules_to_save=['mem'])


def text_windows(tok, text: str, seq_len: int) -> torch.Tensor:
    ids = tok(text, add_special_tokens=False).input_ids
    n = len(ids) // seq_len
    if n < 1:
        raise RetrofitError(f"the data has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


def calibrate(model_path: str, data: str, out: str | os.PathLike, *, steps: int = 200, lr: float = 1e-2,
              lora_r: int = 0, batch_size: int = 4, seq_len: int = 512, seed: int = 0, force: bool = False,
              eval_lengths: list[int] | None = None, progress: bool = True) -> dict:
    from accelerate import Accelerator
    from peft import get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..adapters.state import gdn_backward_problem

    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    if not Path(data).is_file():
        raise RetrofitError(f"{data}: no such data file")
    if steps < 1 or lr <= 0 or batch_size < 1 or seq_len < 8:
        raise RetrofitError("need steps >= 1, lr > 0, batch size >= 1, seq len >= 8")
    torch.manual_seed(seed)
    accelerator = Accelerator()
    try:
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise RetrofitError(f"cannot load {model_path}: {e}") from None
    if not hasattr(model.config, 'hola'):
        raise RetrofitError(f"{model_path} is not memory-augmented: convert it with `hola-retrofit convert` first")
    problem = gdn_backward_problem() if accelerator.device.type == 'cuda' else None
    if problem and model.config.model_type == 'hola_gated_deltanet':
        accelerator.print(f"note: {problem}")

    windows = text_windows(tok, Path(data).read_text(), seq_len)
    n_eval = max(1, len(windows) // 10) if len(windows) > 1 else 0
    held_out, train = windows[:n_eval], windows[n_eval:] if n_eval else windows
    before = _evaluate(model, tok, held_out, eval_lengths, accelerator) if accelerator.is_main_process else None

    pmodel = get_peft_model(model, peft_config(model, lora_r))
    trainable = [p for p in pmodel.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=len(train) > batch_size)
    pmodel, opt, loader = accelerator.prepare(pmodel, opt, loader)
    pmodel.train()
    losses, it = [], iter(loader)
    bar = tqdm(range(steps), desc='calibrating', disable=not (progress and accelerator.is_main_process))
    for _ in bar:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        loss = pmodel(input_ids=batch, labels=batch, use_cache=False).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = accelerator.gather(loss.detach()[None]).mean().item()
        if not math.isfinite(value):
            raise RetrofitError(f"the loss became {value} at step {len(losses)}; lower --lr")
        losses.append(value)
        bar.set_postfix(loss=f'{value:.4f}')
    accelerator.wait_for_everyone()
    result = {'steps': steps, 'lr': lr, 'lora_r': lora_r, 'batch_size': batch_size, 'seq_len': seq_len,
              'trainable_parameters': n_trainable, 'losses': losses, 'before': before, 'gdn_backward': problem}
    if not accelerator.is_main_process:
        return result
    pmodel = accelerator.unwrap_model(pmodel)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', suffix='.partial', dir=out.parent))
    try:
        pmodel.eval()
        pmodel.save_pretrained(tmp / 'peft_adapter')
        merged = pmodel.merge_and_unload()
        result['after'] = _evaluate(merged, tok, held_out, eval_lengths, accelerator)
        merged.config.hola_calibration = {k: result[k] for k in ('steps', 'lr', 'lora_r', 'seq_len')} | {
            'data': Path(data).name}
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / 'calibration.json').write_text(json.dumps(result, indent=1))
        _plot_loss(losses, tmp / 'loss.png')
        from .card import write_model_card
        write_model_card(tmp, merged.config, name=out.name)
        from .convert import _replace
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


@torch.no_grad()
def _evaluate(model, tok, held_out, eval_lengths, accelerator) -> dict:
    """Held-out loss (and, with eval_lengths, needle recall through the eval API)."""
    model = model.to(accelerator.device).eval()
    res = {}
    if len(held_out):
        losses = [model(input_ids=w[None].to(accelerator.device), labels=w[None].to(accelerator.device),
                        use_cache=False).loss.item() for w in held_out]
        res['held_out_loss'] = sum(losses) / len(losses)
        res['held_out_ppl'] = math.exp(res['held_out_loss'])
    if eval_lengths:
        from ..evals.runner import evaluate_recall
        r = evaluate_recall(model, tok, 'niah', eval_lengths, [0.0, 0.5, 1.0], trials=2, progress=False)
        res['niah'] = {str(L): sum(v.values()) / len(v) for L, v in r['scores'].items()}
    model.train()
    return res


def _plot_loss(losses, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel('step'), ax.set_ylabel('training loss'), ax.set_title('hola-retrofit calibration')
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)
