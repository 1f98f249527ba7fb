"""The prefill read kernel alone, on one 340M-shaped layer (4 value heads, K 256, V 512, bf16, C 64): every tile
config given is timed (CUDA events, median; in place on the bf16 state output, as the model calls it), checked
against the first config, and the first against the float32 PyTorch reference on the first 4096 tokens (float32
output); then the selection (sort + walk). Prints a table last.

    python bench/read_kernel.py --tokens 32768 --cache 512                  # the default config sweep
    python bench/read_kernel.py --configs 32,256,4,2 --reps 1               # one config (e.g. under ncu)

A config is BN,BV,num_warps,num_stages[,maxnreg]. Random inputs; sink 28 and gamma 2 (the defaults) for the
timings, an active memory (sink 2, gamma 1.5) for the accuracy check.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

import hola_retrofit  # noqa: F401
from hola_retrofit import MemoryConfig
from hola_retrofit.adapters.fallbacks import l2_normalize
from hola_retrofit.adapters.reference import empty_memory, memory_forward
from hola_retrofit.kernels import read
from hola_retrofit.kernels.memory import packed_weight
from hola_retrofit.kernels.select import priority_order, select_caches

SWEEP = '32,256,4,2 32,256,4,3 16,256,4,2 16,256,4,3 64,256,4,2 64,256,8,2 32,512,8,2 32,128,4,2'
HV, K, V = 4, 256, 512


def layer_inputs(T: int, M: int, C: int, dev: str, seed: int = 0):
    g = torch.Generator(device=dev).manual_seed(seed)
    bf = torch.bfloat16
    q, k = (torch.randn(T, HV, K, device=dev, generator=g).to(bf) for _ in range(2))
    v = torch.randn(T, HV, V, device=dev, generator=g).to(bf)
    score = torch.rand(T, HV, device=dev, generator=g)
    ost = (torch.randn(T, HV, V, device=dev, generator=g) * 0.3).to(bf)
    idx, cnt = select_caches(score.t(), None, 0, T // C, M, C)
    return dict(q=q, k=k, v=v, score=score, ost=ost, idx=idx, cnt=cnt, r=read.rstd(k))


def state_inputs(T: int, C: int, dev: str, seed: int = 1) -> dict:
    """Random pieces of the state path for the read launch that also computes the state output (a fresh prompt):
    chunk states h (GDN's value-first layout), v_new, unit-L2 keys and a chunk-local log2 decay cumsum."""
    g = torch.Generator(device=dev).manual_seed(seed)
    decay = -0.05 * torch.rand(T, HV, device=dev, generator=g)
    return dict(h=(torch.randn(T // C, HV, V, K, device=dev, generator=g) * 0.05).bfloat16(),
                v_new=(torch.randn(T, HV, V, device=dev, generator=g) * 0.3).bfloat16(),
                k=torch.nn.functional.normalize(torch.randn(T, HV, K, device=dev, generator=g), dim=-1).bfloat16(),
                g=torch.cat([c.cumsum(0) for c in decay.split(C)]), v_first=True)


def params(sink: float, gamma: float, dev: str) -> dict:
    return {'q_gamma': torch.full((HV, K), gamma, device=dev), 'k_gamma': torch.full((HV, K), gamma, device=dev),
            'sink': torch.full((HV,), sink, device=dev), 'gate': torch.zeros(HV, device=dev)}


def launch(x: dict, weight: torch.Tensor, C: int, cfg: tuple | None, out: torch.Tensor, state: dict | None = None):
    """The read kernel of a fresh prompt with one explicit tile config (None: autotuned). `out` bf16: in place, as
    the model calls it (out is the state output, read and overwritten); float32: x['ost'] is read. `state`
    (`state_inputs`): the launch computes the state output itself, as the model's fresh prompts do."""
    config = None if cfg is None else dict(BN=cfg[0], BV=cfg[1], num_warps=cfg[2], num_stages=cfg[3],
                                           **({'maxnreg': cfg[4]} if len(cfg) > 4 else {}))
    empty = x['k'].new_empty(HV, 0, K), x['v'].new_empty(HV, 0, V)
    ost = None if state is not None else out if out.dtype == x['ost'].dtype else x['ost']
    read.prefill_read(x['q'], *empty, x['k'], x['v'], x['idx'], x['cnt'], 0, ost, weight, K ** -0.5, True, C,
                      out=out, r_new=x['r'], config=config, state=state)


def min_flops(x: dict, T: int, C: int) -> float:
    """The read's fewest FLOPs: per query its cache (fewer in the first blocks) and on average half of its own
    block, each entry a K-wide dot and a V-wide product."""
    return 2 * HV * T * (x['cnt'].float().mean().item() + (C + 1) / 2) * (K + V)


def reference(x: dict, n: int, M: int, C: int, p: dict) -> torch.Tensor:
    """The float32 PyTorch memory (the specification) on the first n tokens of a fresh prompt, parameters p."""
    cfg = MemoryConfig(cache_size=M, block_size=C)
    dev = x['q'].device
    return memory_forward(empty_memory(1, HV, K, V, cfg, torch.float32, dev), 0, l2_normalize(x['q'][:n]),
                          l2_normalize(x['k'][:n]), x['v'][:n].float(), x['score'][:n], x['ost'][:n].float(), p, cfg,
                          K ** -0.5)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float('nan') if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--tokens', type=int, default=32768)
    ap.add_argument('--cache', type=int, default=512)
    ap.add_argument('--block', type=int, default=64)
    ap.add_argument('--configs', default=SWEEP, help='space-separated BN,BV,warps,stages[,maxnreg]')
    ap.add_argument('--reps', type=int, default=200, help='do_bench repetition time, ms')
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    dev, T, M, C = 'cuda', args.tokens, args.cache, args.block
    cfgs = [tuple(int(p) for p in c.split(',')) for c in args.configs.split()]
    x = layer_inputs(T, M, C, dev)
    quiet = packed_weight(params(28.0, 2.0, dev))
    active = params(2.0, 1.5, dev)
    flops_min = min_flops(x, T, C)
    rows, first = [], None
    for cfg in cfgs:
        out = torch.full_like(x['ost'], float('nan'), dtype=torch.float32)
        try:
            launch(x, quiet, C, cfg, out)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001  (out of resources: a config that does not fit is reported)
            rows.append(dict(config=cfg, error=f'{type(e).__name__}: {str(e)[:120]}'))
            print(json.dumps(rows[-1]), flush=True)
            continue
        if first is None:
            first = out.clone()
            n = min(T, 4096)
            xa = dict(x, idx=x['idx'][:, :n // C].contiguous(), cnt=x['cnt'][:, :n // C].contiguous(), q=x['q'][:n],
                      k=x['k'][:n], v=x['v'][:n], ost=x['ost'][:n], r=x['r'][:n])
            got = torch.full_like(xa['ost'], float('nan'), dtype=torch.float32)
            launch(xa, packed_weight(active), C, cfg, got)
            err_ref = rel(got, reference(x, n, M, C, active))
        inplace = x['ost'].clone()
        ms = triton.testing.do_bench(lambda: launch(x, quiet, C, cfg, inplace), warmup=25, rep=args.reps,
                                     return_mode='median')
        rows.append(dict(config=cfg, ms=ms, tflops_min=flops_min / ms / 1e9, rel_vs_first=rel(out, first)))
        if len(rows) == 1 or 'error' in rows[0]:
            rows[-1]['rel_vs_fp32_reference_4k_active'] = err_ref
        print(json.dumps(rows[-1]), flush=True)
    # the selection as memory_prefill_fused runs it for a fresh prompt: the sort, then the walk
    s = x['score'].t().contiguous()
    t_sort = triton.testing.do_bench(lambda: priority_order(s, None, 'surprise'), return_mode='median')
    t_sel = triton.testing.do_bench(lambda: select_caches(s, None, 0, T // C, M, C), return_mode='median')
    sel = dict(sort_ms=t_sort, select_with_sort_ms=t_sel)
    print(json.dumps(sel), flush=True)
    machine = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, T=T, M=M,
                   C=C, HV=HV, K=K, V=V, min_GFLOP=flops_min / 1e9)
    if args.out:
        with open(args.out, 'a') as f:
            for r in [machine, *rows, sel]:
                f.write(json.dumps(r) + '\n')
    print(json.dumps(machine))
    print(f"{'config BN,BV,w,st[,reg]':<24} {'ms':>8} {'TFLOP/s':>8} {'rel vs first':>12}")
    for r in rows:
        c = ','.join(map(str, r['config']))
        print(f"{c:<24} " + (f"{r['ms']:8.3f} {r['tflops_min']:8.1f} {r['rel_vs_first']:12.2e}" if 'ms' in r
                             else r['error']))
    print(f"sort {t_sort:.3f} ms; selection incl. sort {t_sel:.3f} ms")


if __name__ == '__main__':
    os.environ.setdefault('HOLA_KERNELS', '1')
    main()
