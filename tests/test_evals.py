"""Evaluation harness: deterministic cases, scoring checked with models that copy or never copy."""

import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from hola_retrofit.cli.main import main
from hola_retrofit.evals.runner import compare, summary_table
from hola_retrofit.evals.tasks import make_case
from hola_retrofit.evals.runner import memory_off
from hola_retrofit.retrofit.example import byte_tokenizer, make_example_checkpoint

TOK = byte_tokenizer()


class InductionLM(torch.nn.Module):
    """A real next-token model: predicts the token that followed the latest earlier occurrence of the last
    `n` tokens (an induction head written as code). It copies a needle when asked for it."""

    def __init__(self, vocab=len(TOK), n=12):
        super().__init__()
        self.vocab, self.n = vocab, n
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, logits_to_keep=0, **_):
        ids = input_ids[0].tolist()
        T = len(ids)
        keep = range(T - logits_to_keep, T) if logits_to_keep else range(T)
        logits = torch.full((1, len(keep), self.vocab), -10.0)
        for row, t in enumerate(keep):
            pred = 0
            for n in range(min(self.n, t + 1), 0, -1):  # longest suffix that occurred before
                suffix = ids[t - n + 1:t + 1]
                hit = next((s for s in range(t - 1, n - 2, -1) if ids[s - n + 1:s + 1] == suffix), None)
                if hit is not None:
                    pred = ids[hit + 1]
                    break
            logits[0, row, pred] = 10.0
        return SimpleNamespace(logits=logits)


class ConstantLM(InductionLM):
    """Never copies: always predicts the same token."""

    def forward(self, input_ids, logits_to_keep=0, **_):
        T = input_ids.shape[1]
        logits = torch.full((1, logits_to_keep or T, self.vocab), -10.0)
        logits[..., TOK.convert_tokens_to_ids('A')] = 10.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize('task', ['niah', 'multikey', 'kv'])
def test_cases_are_deterministic_and_sized(task):
    a = make_case(TOK, task, 600, 0.5, 1, seed=7)
    b = make_case(TOK, task, 600, 0.5, 1, seed=7)
    c = make_case(TOK, task, 600, 0.5, 1, seed=8)
    assert a.prompt == b.prompt and a.answer == b.answer
    assert a.prompt != c.prompt
    assert 500 <= len(a.prompt) <= 610
    text = TOK.decode(a.prompt)
    assert a.meta['key'] in text and TOK.decode(a.answer).strip() in text


@pytest.mark.parametrize('task', ['niah', 'multikey', 'kv', 'copy'])
def test_copying_model_scores_one_and_constant_model_zero(task):
    hay = ' '.join(f'w{i}' for i in range(600)) if task == 'copy' else None  # X found once: no repeats
    res = compare({'copy': InductionLM(), 'never': ConstantLM()}, TOK, task, [300, 500], [0.0, 0.5, 1.0], trials=2,
                  seed=3, progress=False, haystack=hay)
    for L in (300, 500):
        assert all(v == 1.0 for v in res['models']['copy']['scores'][L].values()), res['models']['copy']['scores']
        assert all(v == 0.0 for v in res['models']['never']['scores'][L].values())
    assert '1.000' in summary_table(res) and '0.000' in summary_table(res)


@pytest.mark.parametrize('phrasing', ['secret', 'locker'])
def test_phrasings_name_the_needle_and_ask_for_it(phrasing):
    from hola_retrofit.evals.tasks import Templates
    case = make_case(TOK, 'niah', 700, 0.3, 0, templates=Templates.phrasing(phrasing))
    text = TOK.decode(case.prompt)
    word = {'secret': 'secret number', 'locker': 'locker combination'}[phrasing]
    assert text.count(f"{word} for {case.meta['name']}" if phrasing == 'secret' else
                      f"{word} of {case.meta['name']}") == 3  # the needle, the question and its repeat
    assert f"{case.meta['key']}." in text and TOK.decode(case.answer) == ' ' + case.meta['key']
    with pytest.raises(ValueError, match='phrasings'):
        Templates.phrasing('nope')


def test_copy_case_is_x_filler_x_scored_after_its_prefix():
    hay = ' '.join(f'word{i}' for i in range(400))
    case = make_case(TOK, 'copy', 300, 0.0, 0, haystack=hay)
    x = case.prompt[:128]
    assert len(case.prompt) == 128 + 300 + 8 and case.prompt[-8:] == x[:8] and case.answer == x[8:]


def test_needle_depth_is_where_asked():
    for d in (0.0, 0.5, 1.0):
        case = make_case(TOK, 'niah', 1000, d, 0)
        text = TOK.decode(case.prompt)
        pos = text.index('The pass key is') / len(text)
        assert abs(pos - d) < 0.1, (d, pos)


def test_memory_off_context_restores_settings():
    import hola_retrofit as A
    from conftest import tiny_base
    model = A.retrofit_model(tiny_base('gdn'), A.MemoryConfig(cache_size=8, block_size=4))
    with memory_off(model):
        assert all(not m.hola.enabled for m in A.memory_layers(model))
    assert all(m.hola.cache_size == 8 for m in A.memory_layers(model))


def test_eval_cli_writes_table_json_and_plots(tmp_path):
    src = make_example_checkpoint(tmp_path / 'src', 'gdn', hidden=32)
    r = CliRunner().invoke(main, ['convert', str(src), '--cache', '16', '--block', '16', '--out', str(tmp_path / 'h'),
                                  '--no-recipe', '-q'])
    assert r.exit_code == 0, r.output
    out = tmp_path / 'ev'
    r = CliRunner().invoke(main, ['eval', str(tmp_path / 'h'), '--task', 'niah', '--task', 'ppl', '--lengths', '128,256',
                                  '--depths', '0,1', '--trials', '1', '--out', str(out), '-q'])
    assert r.exit_code == 0, r.output
    assert 'retrofit' in r.output and 'base' in r.output
    data = json.loads((out / 'results.json').read_text())
    assert [d['task'] for d in data] == ['niah', 'ppl']
    ppl = data[1]['models']
    assert ppl['base']['128']['ppl'] > 1 and ppl['retrofit']['128']['ppl'] > 1
    assert data[0]['phrasing'] == 'passkey'
    for f in ('niah-passkey_heatmap.png', 'niah-passkey_vs_length.png', 'ppl_vs_length.png'):
        assert (out / f).read_bytes()[:4] == b'\x89PNG'
    bad = CliRunner().invoke(main, ['eval', str(tmp_path / 'h'), '--lengths', '2k,x'])
    assert bad.exit_code == 2 and 'lengths like' in bad.output


def test_ppl_longer_than_the_text_is_not_run_rather_than_shortened():
    from hola_retrofit.evals.runner import evaluate_ppl
    text = 'the quick brown fox jumps over the lazy dog. ' * 3  # 135 byte tokens
    r = evaluate_ppl(ConstantLM(), TOK, [64, 4096], text, progress=False)
    assert r[64]['window'] == 64 and r[64]['tokens'] == 2 * 63 and r[64]['ppl'] > 1
    assert r[4096]['ppl'] is None and '135 tokens' in r[4096]['skipped']
    table = summary_table({'task': 'ppl', 'lengths': [64, 4096], 'models': {'base': r}})
    assert 'not run' in table.splitlines()[-2] and 'longer --text' in table
