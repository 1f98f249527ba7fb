"""`hola-retrofit calibrate`: PEFT training of the memory (and optional LoRA) on CPU."""

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hola_retrofit.cli.main import main
from hola_retrofit.evals.tasks import default_text
from hola_retrofit.retrofit.calibrate import calibrate
from hola_retrofit.retrofit.errors import OutputExistsError, RetrofitError
from hola_retrofit.retrofit.example import make_example_checkpoint


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('calib')
    src = make_example_checkpoint(tmp / 'src', 'gdn', hidden=32)
    r = CliRunner().invoke(main, ['convert', str(src), '--cache', '8', '--block', '16', '--sink', '2', '--no-recipe',
                                  '--out', str(tmp / 'hola'), '-q'])
    assert r.exit_code == 0, r.output
    data = tmp / 'data.txt'
    data.write_text(default_text() * 3)
    return tmp, tmp / 'hola', data


def _state(path):
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def _check_adapter_round_trip(hola, out):
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hola), out / 'peft_adapter').eval()
    ids = torch.randint(3, 200, (1, 70))
    with torch.no_grad():
        a, b = merged(ids).logits, with_adapter(ids).logits
        c = with_adapter.merge_and_unload()(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4) and torch.allclose(a, c, atol=1e-4, rtol=1e-4)


def test_lora_calibration_lowers_loss_and_changes_only_memory_and_lora_targets(setup):
    tmp, hola, data = setup
    out = tmp / 'lora'
    res = calibrate(str(hola), str(data), out, steps=12, lr=0.03, lora_r=4, batch_size=2, seq_len=64, progress=False)
    losses = res['losses']
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses
    assert res['after']['held_out_loss'] < res['before']['held_out_loss']
    before, after = _state(hola), _state(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    allowed = {k for k in before if '.mem.' in k or any(f'attn.{p}.' in k for p in ('q_proj', 'k_proj', 'v_proj', 'o_proj'))}
    assert changed and changed <= allowed, changed - allowed
    assert any('.mem.' in k for k in changed) and any('q_proj' in k for k in changed)
    _check_adapter_round_trip(hola, out)
    assert (out / 'loss.png').read_bytes()[:4] == b'\x89PNG'
    assert AutoModelForCausalLM.from_pretrained(out).config.hola_calibration['lora_r'] == 4


def test_memory_only_calibration_changes_only_the_memory(setup):
    tmp, hola, data = setup
    out = tmp / 'memonly'
    res = calibrate(str(hola), str(data), out, steps=6, lr=0.05, batch_size=2, seq_len=64, progress=False)
    assert res['trainable_parameters'] == sum(p.numel() for n, p in AutoModelForCausalLM.from_pretrained(hola)
                                              .named_parameters() if '.mem.' in n)
    before, after = _state(hola), _state(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if '.mem.' in k}
    _check_adapter_round_trip(hola, out)


def test_calibration_refuses_bad_input(setup, tmp_path):
    tmp, hola, data = setup
    with pytest.raises(RetrofitError, match='not memory-augmented'):
        calibrate(str(tmp / 'src'), str(data), tmp_path / 'x', steps=1, seq_len=64, progress=False)
    with pytest.raises(RetrofitError, match='fewer than one window'):
        short = tmp_path / 'short.txt'
        short.write_text('tiny')
        calibrate(str(hola), str(short), tmp_path / 'x', steps=1, seq_len=64, progress=False)
    (tmp_path / 'exists').mkdir()
    with pytest.raises(OutputExistsError):
        calibrate(str(hola), str(data), tmp_path / 'exists', steps=1, seq_len=64, progress=False)
    r = CliRunner().invoke(main, ['calibrate', str(hola), '--data', str(tmp_path / 'nope.txt'), '--out', 'x'])
    assert r.exit_code == 2
    assert not (tmp_path / 'x').exists()


def test_calibration_through_accelerate_launch_two_processes(setup, tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP over gloo): one merged model, written once."""
    import json
    import subprocess
    import sys
    tmp, hola, data = setup
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--cpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '-m', 'hola_retrofit.cli.main', 'calibrate', str(hola),
           '--data', str(data), '--steps', '3', '--seq-len', '64', '--batch-size', '2', '--out', str(out), '-q']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('wrote ') == 1
    res = json.loads((out / 'calibration.json').read_text())
    assert len(res['losses']) == 3 and all(x == x for x in res['losses'])
    assert AutoModelForCausalLM.from_pretrained(out).config.hola_calibration['steps'] == 3
