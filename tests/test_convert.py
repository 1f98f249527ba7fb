"""`hola-retrofit convert` / `info` / push, on tiny checkpoints in temp folders and a local HF cache."""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hubcache import put_in_hf_cache
from transformers import AutoModelForCausalLM

from hola_retrofit import HolaCache
from hola_retrofit.cli.main import main
from hola_retrofit.retrofit.example import make_example_checkpoint


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline local Hugging Face cache holding org/tiny-{gdn,deltanet,hybrid}."""
    import huggingface_hub.constants as c
    cache = tmp_path / 'hf-cache'
    monkeypatch.setattr(c, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(c, 'HF_HUB_OFFLINE', True)
    commits = {}
    for arch in ('gdn', 'deltanet', 'hybrid'):
        src = make_example_checkpoint(tmp_path / f'src-{arch}', arch, hidden=32)
        commits[arch] = put_in_hf_cache(src, cache, f'org/tiny-{arch}')
    return commits


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r


def tree_hash(folder):
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob('*')):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode()), h.update(p.read_bytes())
    return h.hexdigest()


def leftovers(parent):
    return [p.name for p in Path(parent).iterdir() if '.partial' in p.name or '.old-' in p.name]


@pytest.mark.parametrize('arch', ['gdn', 'deltanet', 'hybrid'])
def test_convert_hub_id_then_load_and_generate(hub, tmp_path, arch):
    out = tmp_path / 'out'
    r = cli('convert', f'org/tiny-{arch}', '--cache', 16, '--block', 16, '--out', out, '-q', '--no-recipe')
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__.startswith('Hola')
    assert model.config.hola_base == {'model_id': f'org/tiny-{arch}', 'revision': hub[arch], 'local': False}
    assert model.config.hola['cache_size'] == 16
    for layer in model.hola_layers:
        assert model.model.layers[layer].attn.mem(None)['sink'].tolist() == [28.0] * 2
    if arch == 'hybrid':
        assert model.hola_layers == [0, 2]
    ids = torch.randint(3, 200, (2, 40))
    with torch.no_grad():
        out_ids = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=HolaCache())
    assert out_ids.shape == (2, 46)
    for f in ('tokenizer.json', 'generation_config.json', 'README.md', 'configuration_hola.py'):
        assert (out / f).is_file()


@pytest.mark.parametrize('arch', ['gdn', 'deltanet'])
def test_memory_off_conversion_reproduces_base_logits(hub, tmp_path, arch):
    out = tmp_path / 'off'
    assert cli('convert', f'org/tiny-{arch}', '--cache', 0, '--no-block-read', '--out', out, '-q', '--no-recipe').exit_code == 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / f'src-{arch}').eval()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 200, (2, 33))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_save_pretrained_round_trip_and_remote_code(hub, tmp_path):
    out = tmp_path / 'out'
    assert cli('convert', 'org/tiny-gdn', '--cache', 8, '--block', 16, '--sink', 1.5, '--out', out, '-q', '--no-recipe').exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        model.model.layers[0].attn.mem.weight.add_(0.25)  # a changed memory parameter must survive the round trip
    model.save_pretrained(tmp_path / 'again')
    again = AutoModelForCausalLM.from_pretrained(tmp_path / 'again').eval()
    ids = torch.randint(3, 200, (1, 50))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert again.config.hola == model.config.hola
    for folder in (out, tmp_path / 'again'):  # converted, and re-saved with save_pretrained
        remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(remote).__name__ == 'HolaGatedDeltaNetForCausalLM'


def test_dtype_cast_keeps_decay_params_fp32(hub, tmp_path):
    out = tmp_path / 'bf16'
    assert cli('convert', 'org/tiny-gdn', '--cache', 4, '--dtype', 'bfloat16', '--out', out, '-q', '--no-recipe').exit_code == 0
    from safetensors import safe_open
    dtypes = {}
    for f in out.glob('model-*.safetensors'):
        with safe_open(str(f), 'pt') as s:
            dtypes.update({k: s.get_tensor(k).dtype for k in s.keys()})
    assert dtypes['model.layers.0.attn.q_proj.weight'] == torch.bfloat16
    assert dtypes['model.layers.0.attn.A_log'] == torch.float32
    assert json.loads((out / 'config.json').read_text())['dtype'] == 'bfloat16'


def test_converted_model_is_refused(hub, tmp_path):
    out = tmp_path / 'out'
    assert cli('convert', 'org/tiny-gdn', '--cache', 4, '--out', out, '-q').exit_code == 0
    r = cli('convert', out, '--cache', 4, '--out', tmp_path / 'twice')
    assert r.exit_code == 4 and 'already memory-augmented' in r.output
    assert not (tmp_path / 'twice').exists()


def _bad_sources(tmp_path):
    good = tmp_path / 'src-gdn'
    cases = {}
    d = tmp_path / 'llama'
    shutil.copytree(good, d)
    cfg = json.loads((d / 'config.json').read_text())
    cfg['model_type'] = 'llama'
    (d / 'config.json').write_text(json.dumps(cfg))
    cases['llama'] = (d, 4, 'unsupported model type')
    d = tmp_path / 'noconfig'
    shutil.copytree(good, d)
    (d / 'config.json').unlink()
    cases['noconfig'] = (d, 3, 'no config.json')
    d = tmp_path / 'noweights'
    shutil.copytree(good, d)
    (d / 'model.safetensors').unlink()
    cases['noweights'] = (d, 3, 'no weights')
    d = tmp_path / 'corrupt'
    shutil.copytree(good, d)
    data = (d / 'model.safetensors').read_bytes()
    (d / 'model.safetensors').write_bytes(data[:len(data) // 2])
    cases['corrupt'] = (d, 3, 'corrupt')
    d = tmp_path / 'badjson'
    shutil.copytree(good, d)
    (d / 'config.json').write_text('{"model_type": ')
    cases['badjson'] = (d, 3, 'not valid JSON')
    d = tmp_path / 'mismatch'
    shutil.copytree(good, d)
    cfg = json.loads((d / 'config.json').read_text())
    cfg['hidden_size'] = 48
    (d / 'config.json').write_text(json.dumps(cfg))
    cases['mismatch'] = (d, 3, 'shape')
    return cases


def test_bad_input_gives_one_error_line_and_writes_nothing(hub, tmp_path):
    src_hash = tree_hash(tmp_path / 'src-gdn')
    out = tmp_path / 'never'
    for name, (src, code, msg) in _bad_sources(tmp_path).items():
        r = cli('convert', src, '--cache', 4, '--out', out, '-q')
        assert r.exit_code == code, (name, r.output)
        assert msg in r.output, (name, r.output)
        assert r.output.strip().count('\n') == 0, (name, r.output)
        assert not out.exists() and not leftovers(tmp_path), name
    for args, code, msg in [
        (['org/tiny-gdn', '--cache', '-3'], 2, 'x>=0'),
        (['org/tiny-gdn', '--cache', '4', '--block', '48'], 2, 'block size the kernels allow'),
        (['org/tiny-gdn', '--cache', '4', '--read', 'magic'], 2, 'magic'),
        (['org/not-cached', '--cache', '4'], 3, 'not in the local Hugging Face cache and HF_HUB_OFFLINE is set'),
        (['org/tiny-gdn@v9', '--cache', '4'], 3, "revision 'v9'"),
        ([str(tmp_path / 'missing-folder'), '--cache', '4'], 3, ''),
    ]:
        r = cli('convert', *args, '--out', out, '-q')
        assert r.exit_code == code and msg in r.output, (args, r.output)
        assert not out.exists() and not leftovers(tmp_path)
    r = cli('convert', 'org/tiny-gdn', '--cache', 4)
    assert r.exit_code == 2 and '--out' in r.output
    r = cli('convert', tmp_path / 'src-gdn', '--cache', 4, '--out', tmp_path / 'src-gdn' / 'inside', '-q')
    assert r.exit_code == 1 and 'inside the source' in r.output
    assert tree_hash(tmp_path / 'src-gdn') == src_hash


def test_existing_output_needs_force(hub, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    r = cli('convert', 'org/tiny-gdn', '--cache', 4, '--out', out, '-q')
    assert r.exit_code == 5 and 'exists' in r.output
    assert (out / 'keep.txt').read_text() == 'mine'
    assert cli('convert', 'org/tiny-gdn', '--cache', 4, '--out', out, '--force', '-q').exit_code == 0
    assert not (out / 'keep.txt').exists() and (out / 'config.json').is_file()
    assert not leftovers(tmp_path)


def test_failure_midway_leaves_nothing(hub, tmp_path, monkeypatch):
    import hola_retrofit.retrofit.convert as conv

    def boom(*a, **k):
        raise RuntimeError('disk full')
    monkeypatch.setattr(conv, 'write_model_card', boom)
    r = cli('convert', 'org/tiny-gdn', '--cache', 4, '--out', tmp_path / 'out', '-q')
    assert r.exit_code != 0
    assert not (tmp_path / 'out').exists() and not leftovers(tmp_path)


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records calls, 'uploads' into a local folder."""
    calls = []
    remote = None
    fail = False

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, private=None, exist_ok=False):
        FakeHub.calls.append(('create_repo', repo_id, private))

    def create_branch(self, repo_id, branch, exist_ok=False):
        FakeHub.calls.append(('create_branch', repo_id, branch))

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None):
        FakeHub.calls.append(('upload_folder', repo_id, revision, commit_message))
        if FakeHub.fail:
            raise ConnectionError('network unreachable')
        shutil.copytree(folder_path, FakeHub.remote)

        class Info:
            commit_url = f'https://huggingface.co/{repo_id}/commit/abc'
        return Info()


def test_push_to_hub_uploads_exactly_a_loadable_folder(hub, tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeHub)
    FakeHub.calls, FakeHub.remote, FakeHub.fail = [], tmp_path / 'remote', False
    r = cli('convert', 'org/tiny-deltanet', '--cache', 8, '--no-recipe', '--push-to-hub', 'me/tiny-hola', '--private',
            '--revision', 'v1', '--commit-message', 'first', '-q')
    assert r.exit_code == 0, r.output
    assert FakeHub.calls == [('create_repo', 'me/tiny-hola', True), ('create_branch', 'me/tiny-hola', 'v1'),
                             ('upload_folder', 'me/tiny-hola', 'v1', 'first')]
    card = (FakeHub.remote / 'README.md').read_text()
    assert 'base_model: org/tiny-deltanet' in card and '`cache_size` | `8`' in card and 'me/tiny-hola' in card
    # what was uploaded loads through the Hub code path: put it in the cache as me/tiny-hola
    import huggingface_hub.constants as c
    put_in_hf_cache(FakeHub.remote, Path(c.HF_HUB_CACHE), 'me/tiny-hola', branch='v1')
    model = AutoModelForCausalLM.from_pretrained('me/tiny-hola', revision='v1')
    assert type(model).__name__ == 'HolaDeltaNetForCausalLM'
    assert not list(Path(tempfile.gettempdir()).glob('hola-*/model'))


def test_failed_upload_is_reported_and_keeps_local_output(hub, tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeHub)
    FakeHub.calls, FakeHub.remote, FakeHub.fail = [], tmp_path / 'remote', True
    out = tmp_path / 'out'
    r = cli('convert', 'org/tiny-gdn', '--cache', 8, '--out', out, '--push-to-hub', 'me/x', '-q')
    assert r.exit_code == 6 and 'upload to me/x failed' in r.output and 'network unreachable' in r.output
    assert (out / 'config.json').is_file() and not FakeHub.remote.exists()


def test_info_reports_layers_and_exact_memory_bytes(hub, tmp_path):
    out = tmp_path / 'out'
    assert cli('convert', 'org/tiny-hybrid', '--cache', 16, '--block', 16, '--out', out, '-q', '--no-recipe').exit_code == 0
    r = cli('info', out, '--json')
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d['patched_layers'] == [0, 2] and d['layers'][1]['mixer'] == 'Attention'
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    cache = HolaCache()
    with torch.no_grad():
        model(torch.randint(3, 200, (1, 77)), past_key_values=cache, use_cache=True)
    assert cache.memory_nbytes() == d['memory_bytes_total']
    text = cli('info', out).output
    assert 'memory in 2: [0, 2]' in text and 'layer 1: Attention (left alone)' in text
    base = cli('info', 'org/tiny-gdn', '--cache', 32)
    assert base.exit_code == 0 and 'values for a conversion' in base.output
    assert cli('info', 'org/nothing').exit_code == 3


def test_recipe_is_fitted_and_stored_by_default(hub, tmp_path):
    """convert fits the memory on the model (here a random one: no head reads copies back, so no layer keeps
    entries); the recipe and its statistics are stored; a calibration text too short for it is refused cleanly."""
    out = tmp_path / 'out'
    r = cli('convert', 'org/tiny-gdn', '--cache', 8, '--block', 16, '--out', out, '-q')
    assert r.exit_code == 0, r.output
    assert 'recipe: no head of this model reads copies back' in r.output
    rec = json.loads((out / 'recipe.json').read_text())
    assert len(rec['heads']) == 2 * 2 and rec['cache_sizes'] == [0, 0]
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['hola']['cache_sizes'] == [0, 0] and cfg['hola']['eviction'] == 'novelty'
    assert 'hit_rate' in (out / 'README.md').read_text()
    short = tmp_path / 'short.txt'
    short.write_text('too short for copies of a long filler')
    never = tmp_path / 'never'
    r = cli('convert', 'org/tiny-gdn', '--cache', 8, '--calibration-text', short, '--out', never, '-q')
    assert r.exit_code == 1 and 'calibration text has' in r.output and r.output.strip().count('\n') == 0, r.output
    assert not never.exists() and not leftovers(tmp_path)
