"""GPU checks of the memory-augmented mixers (issue: mixers + reference), one command on the lent GPU.

1. Equivalence: a 340M-shaped GDN mixer (hidden 1024, 4 heads x 256, expand_v 2) and a DeltaNet mixer
   (hidden 1024, 8 heads x 128) on CUDA (fla's kernels + PyTorch memory), fp32 and bf16, against the
   same weights on CPU (float32 reference), at T tokens.
2. Prefill vs split prefill + step-by-step decode on CUDA.
3. Peak GPU memory of prefill and of one decode step, whole 24-layer model, base vs retrofit.

    python bench/gpu_check.py --tokens 32768            # on the GPU
    python bench/gpu_check.py --tokens 300 --small      # dry run on CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import hola_retrofit  # noqa: F401
from fla.layers.delta_net import DeltaNet
from fla.layers.gated_deltanet import GatedDeltaNet
from fla.models.cache_utils import Cache
from hola_retrofit import MemoryConfig, retrofit_model
from hola_retrofit.adapters.mixers import MEMORY_KEY, HolaDeltaNet, HolaGatedDeltaNet
from hola_retrofit.adapters.modeling import tensor_nbytes


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return float('nan')
    return ((a - b).norm() / b.norm()).item()


def make_layer(kind, small, mem):
    torch.manual_seed(0)
    if kind == 'gdn':
        kw = dict(hidden_size=64, head_dim=16, num_heads=2) if small else dict(hidden_size=1024, head_dim=256, num_heads=4)
        layer = GatedDeltaNet(expand_v=2, layer_idx=0, **kw)
        with torch.no_grad():
            layer.A_log.uniform_(-4, 0)  # decays in (0.98, 1): a long-memory state, the hard case
        layer.__class__ = HolaGatedDeltaNet
    else:
        kw = dict(hidden_size=64, num_heads=4) if small else dict(hidden_size=1024, num_heads=8)
        layer = DeltaNet(layer_idx=0, **kw)
        layer.__class__ = HolaDeltaNet
    layer._init_memory(mem)
    return layer.eval()


def run_layer(layer, x, splits):
    cache, outs, i = Cache(), [], 0
    for L in splits:
        outs.append(layer(x[:, i:i + L], past_key_values=cache, use_cache=True)[0])
        i += L
    return torch.cat(outs, 1), cache[0][MEMORY_KEY]


def same_set(a, b):
    a, b = a.cpu(), b.cpu()
    hits = sum(len(set(a[0, h].tolist()) & set(b[0, h].tolist())) for h in range(a.shape[1]))
    return hits / a[0].numel()


@torch.no_grad()
def equivalence(kind, T, small, dev, mem, emit):
    layer = make_layer(kind, small, mem)
    x = torch.randn(1, T, layer.hidden_size)
    t0 = time.time()
    ref, ref_mem = run_layer(layer, x, [T])
    t_cpu = time.time() - t0
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        lay = make_layer(kind, small, mem).to(dev, dtype)
        torch.cuda.synchronize() if dev == 'cuda' else None
        t0 = time.time()
        out, m = run_layer(lay, x.to(dev, dtype), [T])
        torch.cuda.synchronize() if dev == 'cuda' else None
        rows.append(dict(check='equivalence', kind=kind, T=T, dtype=str(dtype).split('.')[-1],
                         rel_err_vs_cpu_fp32=rel(out.float(), ref), cache_overlap=same_set(m['cache_pos'], ref_mem['cache_pos']),
                         score_rel_err=rel(m['cache_score'].float(), ref_mem['cache_score'])
                         if torch.equal(m['cache_pos'].cpu(), ref_mem['cache_pos']) else None,
                         seconds=round(time.time() - t0, 2), cpu_ref_seconds=round(t_cpu, 1)))
        emit(rows[-1:])
        # split prefill + decode on the device, against the device's own full prefill
        n_dec = min(64, T // 4)
        splits = [T // 2 + 3, T - (T // 2 + 3) - n_dec] + [1] * n_dec
        out2, m2 = run_layer(lay, x.to(dev, dtype), splits)
        rows.append(dict(check='prefill_vs_decode', kind=kind, T=T, dtype=str(dtype).split('.')[-1],
                         splits=f"{splits[0]}+{splits[1]}+1x{n_dec}", rel_err=rel(out2.float(), out.float()),
                         same_cache=bool(torch.equal(m2['cache_pos'], m['cache_pos'])),
                         decode_rel_err=rel(out2[:, -n_dec:].float(), out[:, -n_dec:].float())))
        emit(rows[-1:])
        del lay
    return rows


@torch.no_grad()
def peak_memory(T, small, dev, mem):
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    kw = (dict(hidden_size=64, head_dim=16, num_heads=2, num_hidden_layers=2, vocab_size=1000) if small else
          dict(hidden_size=1024, head_dim=256, num_heads=4, num_hidden_layers=24, vocab_size=32000))
    torch.manual_seed(0)
    base = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(expand_v=2, **kw)).to(dev, torch.bfloat16).eval()
    rows = []
    for name in ('base', 'hola'):
        model = base if name == 'base' else retrofit_model(base, mem).eval()
        ids = torch.randint(3, 1000, (1, T), device=dev)
        for phase in ('prefill', 'decode'):
            if dev == 'cuda':
                torch.cuda.synchronize(), torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            t0 = time.time()
            if phase == 'prefill':
                out = model(ids, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
            else:
                out = model(ids[:, -1:], past_key_values=cache, use_cache=True)
            torch.cuda.synchronize() if dev == 'cuda' else None
            sec = time.time() - t0
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if dev == 'cuda' else None
            mem_b = cache.memory_nbytes() if hasattr(cache, 'memory_nbytes') else 0
            rows.append(dict(check='peak_memory', model=name, phase=phase, T=T, peak_extra_MiB=peak,
                             cache_MiB=round(tensor_nbytes(list(cache)) / 2**20, 2),
                             memory_MiB=round(mem_b / 2**20, 2), seconds=round(sec, 3)))
        if name == 'hola':
            del model
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--tokens', type=int, default=32768)
    ap.add_argument('--small', action='store_true')
    ap.add_argument('--cache', type=int, default=512)
    ap.add_argument('--block', type=int, default=64)
    ap.add_argument('--out', default=None)
    ap.add_argument('--skip', default='')
    args = ap.parse_args()
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    # an active memory (low sink) so the checks exercise reads, not just the abstaining path
    mem = MemoryConfig(cache_size=args.cache, block_size=args.block, sink_init=2.0, gamma_init=1.5)
    print(json.dumps(dict(device=torch.cuda.get_device_name() if dev == 'cuda' else platform.processor(),
                          torch=torch.__version__, mem=mem.to_dict())))
    def emit(rows):  # one JSON line per result, written as soon as it exists
        for r in rows:
            print(json.dumps(r), flush=True)
            if args.out:
                with open(args.out, 'a') as f:
                    f.write(json.dumps(r) + '\n')

    if 'peak' not in args.skip:
        emit(peak_memory(args.tokens, args.small, dev, mem))
    for kind in ('gdn', 'deltanet'):
        if kind not in args.skip:
            equivalence(kind, args.tokens, args.small, dev, mem, emit)


if __name__ == '__main__':
    main()
