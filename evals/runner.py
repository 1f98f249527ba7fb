"""Run evaluation cases on models: recall by exact match (teacher forcing), copying, perplexity by windows.

Scoring: a recall case counts 1 iff the model's greedy continuation of the prompt is exactly the
answer, checked in one forward pass over prompt + answer (greedy decoding produces the answer iff
every answer token is the argmax given the correct prefix). A copy case scores the share of the second
copy's tokens that are the argmax given the correct prefix.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from tqdm.auto import tqdm

from .tasks import DEPTHS, Templates, default_text, make_case

RECALL_TASKS = ('niah', 'multikey', 'kv', 'copy')


@contextlib.contextmanager
def memory_off(model):
    """Temporarily run a retrofitted model as its base (cache 0, no block read): bit-identical to base."""
    from ..adapters.config import MemoryConfig
    from ..adapters.mixers import attach_memory, memory_layers
    layers = memory_layers(model)
    saved = [m.hola for m in layers]
    attach_memory(model, MemoryConfig(cache_size=0, read_block=False))
    try:
        yield model
    finally:
        for m, cfg in zip(layers, saved):
            m.hola = cfg


def _device(model):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device('cpu')


@torch.no_grad()
def score_case(model, case) -> dict:
    dev = _device(model)
    ids = torch.tensor([case.prompt + case.answer[:-1]], device=dev)
    n = len(case.answer)
    logits = model(input_ids=ids, logits_to_keep=n, use_cache=False).logits[0, -n:]
    pred = logits.argmax(-1).tolist()
    if case.task == 'copy':
        return {'correct': sum(p == a for p, a in zip(pred, case.answer)) / n, 'pred': pred}
    return {'correct': float(pred == case.answer), 'pred': pred}


def evaluate_recall(model, tok, task: str, lengths: list[int], depths: list[float], trials: int = 1,
                    seed: int = 0, templates: Templates | None = None, haystack: str | None = None,
                    progress: bool = True, desc: str = '') -> dict:
    """{'scores': {length: {depth: mean exact match}}, 'cases': [...]} for one model."""
    scores, cases = {}, []
    total = len(lengths) * len(depths) * trials
    bar = tqdm(total=total, desc=desc or task, disable=not progress)
    for L in lengths:
        scores[L] = {}
        for d in depths:
            hits = []
            for t in range(trials):
                case = make_case(tok, task, L, d, t, seed, templates, haystack)
                t0 = time.time()
                r = score_case(model, case)
                hits.append(r['correct'])
                cases.append({'length': L, 'depth': d, 'trial': t, 'tokens': len(case.prompt),
                              'correct': r['correct'], 'seconds': round(time.time() - t0, 3), **case.meta})
                bar.update(1)
            scores[L][d] = sum(hits) / len(hits)
    bar.close()
    return {'scores': scores, 'cases': cases}


@torch.no_grad()
def evaluate_ppl(model, tok, lengths: list[int], text: str | None = None, max_windows: int = 8,
                 progress: bool = True, desc: str = 'ppl') -> dict:
    """Perplexity of `text` cut into non-overlapping windows of each length (all tokens of a window scored).
    A length the text cannot fill once is not measured: {'ppl': None, 'skipped': why} (a shorter window
    would be reported under a length it does not have)."""
    ids = tok(text or default_text(), add_special_tokens=False).input_ids
    if len(ids) < 2:
        raise ValueError("the perplexity text is shorter than two tokens")
    dev = _device(model)
    out = {}
    for L in tqdm(lengths, desc=desc, disable=not progress):
        if L > len(ids):
            out[L] = {'ppl': None, 'skipped': f'the text has {len(ids)} tokens; pass a longer --text'}
            continue
        nll, count = 0.0, 0
        for w in range(min(max_windows, len(ids) // L)):
            window = torch.tensor([ids[w * L:(w + 1) * L]], device=dev)
            logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction='sum').item()
            count += window.shape[1] - 1
        out[L] = {'ppl': math.exp(nll / count), 'tokens': count, 'window': L}
    return out


def compare(models: dict, tok, task: str, lengths, depths=DEPTHS, trials=1, seed=0, templates=None, haystack=None,
            text=None, progress=True, phrasing: str | None = None) -> dict:
    """Run one task on several models (name -> model, or name -> (model, context manager factory)).
    `phrasing` names the needle phrasing (`tasks.PHRASINGS`) for the record; `templates` hold it."""
    results = {'task': task, 'lengths': list(lengths), 'depths': list(depths), 'trials': trials, 'seed': seed,
               'models': {}}
    if phrasing:
        results['phrasing'] = phrasing
    for name, entry in models.items():
        model, ctx = entry if isinstance(entry, tuple) else (entry, contextlib.nullcontext)
        with ctx(model):
            if task == 'ppl':
                results['models'][name] = evaluate_ppl(model, tok, list(lengths), text, progress=progress,
                                                       desc=f'{name} ppl')
            else:
                results['models'][name] = evaluate_recall(model, tok, task, list(lengths), list(depths), trials,
                                                          seed, templates, haystack, progress, f'{name} {task}')
    return results


def summary_table(results: dict) -> str:
    """One row per length, one column per model: mean recall over depths, or perplexity."""
    names = list(results['models'])
    head = f"{'length':>8} | " + ' | '.join(f'{n:>12}' for n in names)
    title = results['task'] + (f" ({results['phrasing']})" if results.get('phrasing') else '')
    lines = [f"task: {title}", head, '-' * len(head)]
    for L in results['lengths']:
        cells = []
        for n in names:
            r = results['models'][n]
            if results['task'] == 'ppl':
                cells.append(f"{r[L]['ppl']:12.3f}" if r[L]['ppl'] is not None else f"{'not run':>12}")
            else:
                row = r['scores'][L]
                cells.append(f"{sum(row.values()) / len(row):12.3f}")
        lines.append(f"{L:>8} | " + ' | '.join(cells))
    skipped = {r[L]['skipped'] for r in results['models'].values() for L in results['lengths']
               if isinstance(r.get(L), dict) and r[L].get('skipped')}
    return '\n'.join(lines + [f'not run: {s}' for s in sorted(skipped)])
