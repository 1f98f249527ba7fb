"""What the memory buys on a trained checkpoint: base, the uniform memory and the recipe (and its ablations), in one run.

Needle recall (two phrasings, 11 depths, one case per depth and length), copying [X, filler, X] by filler length, and
perplexity, all on held-out Python source: the standard-library modules whose names start with n-z (`--split dev`,
a-m, is the set the recipe was developed on). The recipe itself is fitted on the text shipped with the package.

    python bench/recall.py ../shared/checkpoints/gdn-ref --lengths 2k,4k,8k,16k --out bench/results/recall.json
    python bench/recall.py MODEL --variants ablation --lengths 2k,8k,32k --device cuda   # each part of the recipe off
"""

from __future__ import annotations

import argparse
import copy
import datetime
import glob
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import hola_retrofit  # noqa: F401
from hola_retrofit import MemoryConfig, retrofit_model
from hola_retrofit.evals.runner import compare
from hola_retrofit.evals.tasks import DEPTHS, Templates, parse_length
from hola_retrofit.retrofit.recipe import ABSTAIN, RECIPE_FILE, Recipe, apply_recipe

VARIANTS = {
    'main': ['base', 'uniform', 'recipe'],
    'ablation': ['base', 'recipe', 'no-heads', 'no-fit', 'no-budget', 'surprise'],
}
WHAT = {
    'base': 'the checkpoint, no memory',
    'uniform': 'every head reads, gamma 2, sink 28, M entries in every layer, surprise eviction (--no-recipe)',
    'recipe': 'convert default: retrieval heads read with fitted tau/sink, budget in their layers, novelty eviction',
    'no-heads': 'recipe, but every head reads (non-retrieval heads with gamma 2 / sink 28)',
    'no-fit': 'recipe, but the reading heads use gamma 2 / sink 28 instead of the fitted tau / sink',
    'no-budget': 'recipe, but M entries in every layer instead of the budget in the reading layers',
    'surprise': 'recipe, but entries chosen by surprise beta*||e|| instead of key novelty',
}


def stdlib_text(split: str, chars: int = 2_000_000) -> str:
    """Concatenated standard-library modules of this Python, by name: a-m ('dev') or n-z ('test')."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'], '*.py')))
    files = [f for f in files if (os.path.basename(f)[0].lower() < 'n') == (split == 'dev')]
    out, n = [], 0
    for f in files:
        out.append(Path(f).read_text(errors='replace'))
        n += len(out[-1])
        if n > chars:
            break
    return '\n'.join(out)


def variants(names, src: str, cache: int, device, dtype, progress: bool) -> dict:
    """name -> model. 'recipe' is the output of `hola-retrofit convert` (the real path); the ablations change one part."""
    from transformers import AutoModelForCausalLM
    from hola_retrofit.retrofit.convert import convert

    load = dict(dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(src, **load).to(device).eval()
    out, rec, recipe_model = {}, None, None
    if any(n not in ('base', 'uniform') for n in names):
        with tempfile.TemporaryDirectory() as tmp:
            path = convert(src, Path(tmp) / 'hola', MemoryConfig(cache_size=cache), progress=progress,
                           device=str(device))
            recipe_model = AutoModelForCausalLM.from_pretrained(path, **load).to(device).eval()
            rec = Recipe.from_dict(json.loads((path / RECIPE_FILE).read_text()))
    for name in names:
        if name == 'base':
            out[name] = base
        elif name == 'uniform':
            out[name] = retrofit_model(base, MemoryConfig(cache_size=cache)).eval()
        elif name == 'recipe':
            out[name] = recipe_model
        else:
            m = copy.deepcopy(recipe_model)
            cfg = m.config.memory_config
            if name == 'no-heads':  # every head reads: the recipe's heads as fitted, the others with the defaults
                r = copy.deepcopy(rec)
                r.cache_sizes = [cache] * len(r.cache_sizes)
                apply_recipe(m, r)
                for layer in hola_retrofit.memory_layers(m):
                    w, K = layer.mem.weight, layer.mem.k
                    with torch.no_grad():
                        off = w[:, 2 * K] == ABSTAIN
                        w[off, :2 * K], w[off, 2 * K] = cfg.gamma_init, cfg.sink_init
            elif name == 'no-fit':
                for layer in hola_retrofit.memory_layers(m):
                    w, K = layer.mem.weight, layer.mem.k
                    with torch.no_grad():
                        on = w[:, 2 * K] != ABSTAIN
                        w[on, :2 * K], w[on, 2 * K] = cfg.gamma_init, cfg.sink_init
            elif name == 'no-budget':
                m.set_memory_config(replace(cfg, cache_sizes=[cache] * len(cfg.cache_sizes)))
            elif name == 'surprise':
                m.set_memory_config(replace(cfg, eviction='surprise'))
            out[name] = m
    return out, rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('model')
    ap.add_argument('--variants', choices=list(VARIANTS), default='main')
    ap.add_argument('--lengths', default='2k,4k,8k,16k')
    ap.add_argument('--copy-lengths', default=None, help='filler lengths of the copy task (default: --lengths)')
    ap.add_argument('--ppl-lengths', default='2k,8k')
    ap.add_argument('--phrasings', default='secret,locker')
    ap.add_argument('--cache', type=int, default=512)
    ap.add_argument('--split', choices=['test', 'dev'], default='test')
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--dtype', default=None, help='default: float32 on CPU, the checkpoint\'s on CUDA')
    ap.add_argument('--out', required=True)
    ap.add_argument('-q', '--quiet', action='store_true')
    a = ap.parse_args()
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float32 if a.device == 'cpu' else None)
    lengths = [parse_length(x) for x in a.lengths.split(',')]
    copy_lengths = [parse_length(x) for x in (a.copy_lengths or a.lengths).split(',')]
    ppl_lengths = [parse_length(x) for x in a.ppl_lengths.split(',')] if a.ppl_lengths else []
    text = stdlib_text(a.split)
    tok = AutoTokenizer.from_pretrained(a.model)
    t0 = time.time()
    models, rec = variants(VARIANTS[a.variants], a.model, a.cache, torch.device(a.device), dtype, not a.quiet)
    device_name = torch.cuda.get_device_name() if a.device.startswith('cuda') else platform.processor() or 'cpu'
    report = {'command': ' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              'date': datetime.date.today().isoformat(), 'device': device_name,
              'python': platform.python_version(), 'torch': torch.__version__, 'split': a.split,
              'variants': {n: WHAT[n] for n in models}, 'recipe': rec.to_dict() if rec else None, 'results': []}

    def save():
        report['seconds'] = round(time.time() - t0, 1)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1, default=str))

    common = dict(trials=1, seed=a.seed, haystack=text, text=text, progress=not a.quiet)
    for p in a.phrasings.split(','):
        report['results'].append(compare(models, tok, 'niah', lengths, DEPTHS, templates=Templates.phrasing(p),
                                         phrasing=p, **common))
        save()
    report['results'].append(compare(models, tok, 'copy', copy_lengths, (0.0,), **dict(common, trials=4)))
    save()
    if ppl_lengths:
        report['results'].append(compare(models, tok, 'ppl', ppl_lengths, **common))
    save()
    print(table(report))


def table(report: dict) -> str:
    """Markdown: one row per variant; recall per phrasing and length (mean over depths), copy, ppl."""
    cols, rows = [], {n: [] for n in report['variants']}
    for res in report['results']:
        label = res['task'] + (f" {res['phrasing']}" if res.get('phrasing') else '')
        for L in res['lengths']:
            cols.append(f"{label} {L // 1024 if L >= 1024 else L}{'k' if L >= 1024 else ''}")
            for n in rows:
                r = res['models'][n]
                if res['task'] == 'ppl':
                    rows[n].append(f"{r[L]['ppl']:.2f}" if r[L]['ppl'] else 'n/a')
                else:
                    s = r['scores'][L]
                    rows[n].append(f"{sum(s.values()) / len(s):.2f}")
    head = '| variant | ' + ' | '.join(cols) + ' |'
    return '\n'.join([head, '|' + '---|' * (len(cols) + 1)] + [f"| {n} | " + ' | '.join(v) + ' |'
                                                               for n, v in rows.items()])


if __name__ == '__main__':
    main()
