"""Speed and memory of the retrofit against the base fla model and PyTorch SDPA attention, one table.

    python bench/bench.py                                  # on the GPU: 2k, 8k, 32k; M in {64, 512}
    python bench/bench.py --small --lengths 256,512 --cache 16   # CPU dry run (PyTorch paths only)

Rows: prefill tokens/s and decode ms/token for the base model, the retrofit with the PyTorch memory
(HOLA_KERNELS=0) and with the fused kernels, every figure also as a ratio to the base measured in the
same run; on CUDA also the prefill and one decode step replayed as CUDA graphs (the device's time, free of
host launch overhead; a long fresh prompt runs in pieces there, `kernels.memory.prompt_pieces`); peak memory;
a 24-layer SDPA causal attention stack (hidden 1024, 8 heads x 128) as the full-attention reference; then the
read kernel's achieved bandwidth and FLOP/s against the device's measured copy bandwidth and bf16 matmul rate.
Random weights (speed only). Prints the machine first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import hola_retrofit  # noqa: F401
from hola_retrofit import MemoryConfig, retrofit_model


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps, all_times=None, warm=True):
    """Median wall time of `reps` calls after one warm-up (CUDA-synchronised); `all_times` gets every one."""
    if warm:
        fn()
        sync()
    times = [] if all_times is None else all_times
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_base(small, dev, dtype):
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    kw = (dict(hidden_size=64, head_dim=16, num_heads=2, num_hidden_layers=2, vocab_size=512) if small else
          dict(hidden_size=1024, head_dim=256, num_heads=4, num_hidden_layers=24, vocab_size=32000))
    torch.manual_seed(0)
    return GatedDeltaNetForCausalLM(GatedDeltaNetConfig(expand_v=2, **kw)).to(dev, dtype).eval(), kw


def graph_ms(fn, reps):
    """Median ms of `reps` replays of fn captured in a CUDA graph (CUDA events): the device's own time for the
    work, without the host's launch overhead (which bounds eager prefill on some machines)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    sync()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    del g
    return statistics.median(times)


@torch.no_grad()
def measure(model, T, dev, reps, decode_steps, vocab, graphs=True):
    ids = torch.randint(3, vocab, (1, T), device=dev)
    # prefill and decode compile and autotune (their buffers) outside the peak
    out = model(ids, use_cache=True, logits_to_keep=1)
    model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    del out
    sync()
    if dev == 'cuda':
        torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    reps_s = []
    t_prefill = timed(lambda: model(ids, use_cache=True, logits_to_keep=1), reps, reps_s, warm=False)
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    nxt = ids[:, -1:]
    step_times = []
    for _ in range(decode_steps + 1):
        sync()
        t0 = time.perf_counter()
        out = model(nxt, past_key_values=cache, use_cache=True)
        sync()
        step_times.append(time.perf_counter() - t0)
        cache = out.past_key_values
    peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20 if dev == 'cuda' else float('nan')
    r = dict(prefill_tok_s=T / t_prefill, prefill_ms=t_prefill * 1e3,
             prefill_ms_each=[round(t * 1e3, 1) for t in reps_s],
             decode_ms=statistics.median(step_times[1:]) * 1e3, peak_MiB=peak)
    if dev == 'cuda' and graphs:  # after the peak: the graph's memory pool is not the model's
        del out, cache
        try:
            r['prefill_graph_ms'] = graph_ms(lambda: model(ids, use_cache=True, logits_to_keep=1), max(reps, 5))
        except RuntimeError as e:  # a model that cannot be captured: say so in its row
            r['prefill_graph_error'] = f'{type(e).__name__}: {str(e)[:200]}'
        torch.cuda.empty_cache()
        # one decode step after the prompt, replayed: each replay steps the state again (the memory's position
        # advances too: a block merge every C replays, which the median leaves out)
        cache = model(ids, use_cache=True, logits_to_keep=1).past_key_values
        try:
            r['decode_graph_ms'] = graph_ms(lambda: model(nxt, past_key_values=cache, use_cache=True), 20)
        except RuntimeError as e:
            r['decode_graph_error'] = f'{type(e).__name__}: {str(e)[:200]}'
        del cache
        torch.cuda.empty_cache()
    return r


@torch.no_grad()
def decode_ab(models, T, dev, steps, vocab):
    """Median decode ms/token of several models after a T-token prefill, their steps interleaved
    (a, b, a, b, ...) so that host noise, which dominates a decode step, hits all of them alike."""
    ids = torch.randint(3, vocab, (1, T), device=dev)
    caches = [m(ids, use_cache=True, logits_to_keep=1).past_key_values for m in models]
    nxt = ids[:, -1:]
    times = [[] for _ in models]
    for step in range(steps + 2):
        for i, m in enumerate(models):
            sync()
            t0 = time.perf_counter()
            caches[i] = m(nxt, past_key_values=caches[i], use_cache=True).past_key_values
            sync()
            if step >= 2:
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


@torch.no_grad()
def sdpa_stack(T, dev, dtype, reps, layers=24, heads=8, dim=128):
    q, k, v = (torch.randn(1, heads, T, dim, device=dev, dtype=dtype) for _ in range(3))
    f = lambda: [torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) for _ in range(layers)]  # noqa: E731
    return timed(f, reps)


def ceilings(dev):
    """Measured copy bandwidth (bytes read + written per s) and bf16 matmul FLOP/s."""
    if dev != 'cuda':
        return None, None
    x = torch.empty(2**28, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), 20)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    tm = timed(lambda: a @ b, 10)
    return 2 * x.numel() / t, 2 * 8192**3 / tm


@torch.no_grad()
def read_kernel_roofline(T, M, dev, reps):
    """The memory of one 340M-shaped layer (4 value heads, K 256, V 512, bf16, C 64) at T tokens, on
    read_kernel.py's inputs, CUDA-event timed (triton's do_bench, median): the selection, the autotuned prefill
    read kernel alone (in place on the bf16 state output, as the model calls it), the read launch that also
    computes the state output (as for a fresh prompt; random chunk states) beside the base model's output kernel
    (fla's chunk_fwd_o) on the same inputs, and the whole fused prefill (selection + read + state update); then its
    error against the reference."""
    import triton
    from fla.ops.common.chunk_o import chunk_fwd_o
    from read_kernel import (HV, K, V, launch, layer_inputs, min_flops, params, reference, rel,  # bench/: script dir
                             state_inputs)
    from hola_retrofit.adapters.reference import empty_memory
    from hola_retrofit.kernels.memory import memory_prefill_fused, packed_weight
    from hola_retrofit.kernels.select import select_caches
    C = 64
    cfg = MemoryConfig(cache_size=M, block_size=C)
    x = layer_inputs(T, M, C, dev)
    quiet = params(28.0, 2.0, dev)  # the defaults
    weight, out = packed_weight(quiet), x['ost'].clone()
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=max(reps, 1) * 100, return_mode='median')  # noqa: E731
    t_sel = bench(lambda: select_caches(x['score'].t(), None, 0, T // C, M, C))
    t = bench(lambda: launch(x, weight, C, None, out))
    st = state_inputs(T, C, dev)
    t_state = bench(lambda: launch(x, weight, C, None, out, state=st))
    qn = torch.nn.functional.normalize(x['q'].float(), dim=-1).bfloat16()[None]
    t_fla_o = bench(lambda: chunk_fwd_o(q=qn, k=st['k'][None], v=st['v_new'][None], h=st['h'][None],
                                        g=st['g'][None], scale=K ** -0.5, state_v_first=True, chunk_size=C))
    t_all = bench(lambda: memory_prefill_fused(empty_memory(1, HV, K, V, cfg, torch.bfloat16, torch.device(dev)), 0,
                                               x['q'], x['k'], x['v'], x['score'], out, quiet, cfg, K ** -0.5, out=out,
                                               fresh=True, k_rstd=x['r']))
    # the autotuned kernels against the reference on the first 4096 tokens, with an active memory (sink 2)
    n = min(T, 4096)
    act = params(2.0, 1.5, dev)
    xs = {key: x[key][:n] for key in ('q', 'k', 'v', 'score', 'ost')}
    fused = memory_prefill_fused(empty_memory(1, HV, K, V, cfg, torch.bfloat16, torch.device(dev)), 0, xs['q'],
                                 xs['k'], xs['v'], xs['score'], xs['ost'], act, cfg, K ** -0.5, fresh=True)
    ref = reference(x, n, M, C, act)
    flops = min_flops(x, T, C)
    # fewest bytes: q, k, v and the state output (read and written) once (gathered rows are re-read from L2)
    bytes_ = 2 * T * HV * (2 * K + 3 * V)
    return dict(read_ms=t, read_with_state_output_ms=t_state, fla_chunk_fwd_o_ms=t_fla_o, select_ms=t_sel,
                memory_prefill_ms=t_all, flops=flops / t * 1e3,
                bytes_per_s=bytes_ / t * 1e3, rel_err_vs_reference_4k=rel(fused, ref))


def host_profile(models, T, dev, vocab, steps=10):
    """cProfile of `steps` decode steps of each model (name -> model): where the host time goes."""
    import cProfile
    import io
    import pstats
    ids = torch.randint(3, vocab, (1, T), device=dev)
    for name, m in models.items():
        cache = m(ids, use_cache=True, logits_to_keep=1).past_key_values
        nxt = ids[:, -1:]
        for _ in range(3):
            cache = m(nxt, past_key_values=cache, use_cache=True).past_key_values
        sync()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(steps):
            cache = m(nxt, past_key_values=cache, use_cache=True).past_key_values
        sync()
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats('tottime').print_stats(25)
        print(f'--- host profile, {steps} decode steps of {name}\n' + buf.getvalue(), flush=True)


@torch.no_grad()
def profile(model, T, dev, vocab, base=None):
    """torch.profiler tables for one prefill of T tokens and 8 decode steps (where the time goes), the base
    model's prefill table for comparison, and cProfile of the decode steps of both."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    import traceback
    import warnings
    ids = torch.randint(3, vocab, (1, T), device=dev)
    model(ids, use_cache=True, logits_to_keep=1)  # warm
    if dev == 'cuda':  # where the host waits for the device, and how long the host alone takes
        torch.cuda.set_sync_debug_mode('warn')
        seen = {}
        with warnings.catch_warnings():
            warnings.simplefilter('always')
            orig = warnings.showwarning
            warnings.showwarning = lambda *a, **k: seen.setdefault(''.join(traceback.format_stack(limit=6)[:-1]), 0)
            model(ids, use_cache=True, logits_to_keep=1)
            warnings.showwarning = orig
        torch.cuda.set_sync_debug_mode(0)
        print(f'--- {len(seen)} distinct synchronizing call sites in one prefill', flush=True)
        for s in list(seen)[:6]:
            print(s, flush=True)
        sync()
        t0 = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        sync()
        from hola_retrofit.kernels import read
        print('--- tuned:', {n: str(getattr(getattr(read, n), 'best_config', None))
                             for n in ('_prefill_read_kernel',)}, flush=True)
        print(f'--- prefill: host returns after {(t1 - t0) * 1e3:.1f} ms, device done after '
              f'{(time.perf_counter() - t0) * 1e3:.1f} ms', flush=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == 'cuda' else [])
    sort = 'self_cuda_time_total' if dev == 'cuda' else 'self_cpu_time_total'
    with prof(activities=acts) as p:
        out = model(ids, use_cache=True, logits_to_keep=1)
        sync()
    print(f'--- prefill {T} tokens\n' + p.key_averages().table(sort_by=sort, row_limit=25), flush=True)
    if base is not None:
        base(ids, use_cache=True, logits_to_keep=1)
        with prof(activities=acts) as p:
            base(ids, use_cache=True, logits_to_keep=1)
            sync()
        print(f'--- base prefill {T} tokens\n' + p.key_averages().table(sort_by=sort, row_limit=30), flush=True)
        host_profile({'base': base, 'retrofit': model}, min(T, 2048), dev, vocab)
    cache, nxt = out.past_key_values, ids[:, -1:]
    for _ in range(3):
        cache = model(nxt, past_key_values=cache, use_cache=True).past_key_values
    with prof(activities=acts) as p:
        for _ in range(8):
            cache = model(nxt, past_key_values=cache, use_cache=True).past_key_values
        sync()
    print('--- 8 decode steps\n' + p.key_averages().table(sort_by='self_cpu_time_total', row_limit=20), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--lengths', default='2048,8192,32768')
    ap.add_argument('--cache', default='64,512')
    ap.add_argument('--block', type=int, default=64)
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--decode-steps', type=int, default=20)
    ap.add_argument('--torch-max', type=int, default=8192, help='longest length for the PyTorch-memory rows')
    ap.add_argument('--small', action='store_true')
    ap.add_argument('--out', default=None)
    ap.add_argument('--profile', action='store_true', help='then profile the retrofit (largest M) at the longest length')
    ap.add_argument('--no-kernel-rows', action='store_true', help='skip the kernel-level roofline rows')
    args = ap.parse_args()
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    dtype = torch.bfloat16 if dev == 'cuda' else torch.float32
    machine = dict(device=torch.cuda.get_device_name() if dev == 'cuda' else platform.processor() or 'cpu',
                   torch=torch.__version__, triton=__import__('triton').__version__,
                   switches={k: v for k, v in os.environ.items() if k.startswith('HOLA_')})
    print(json.dumps(machine), flush=True)
    base, kw = build_base(args.small, dev, dtype)
    rows = []

    def emit(r):
        rows.append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            with open(args.out, 'a') as f:
                f.write(json.dumps(r) + '\n')
    lengths = [int(x) for x in args.lengths.split(',')]
    for T in lengths:
        b = measure(base, T, dev, args.reps, args.decode_steps, kw['vocab_size'])
        emit(dict(T=T, model='base fla', **b))
        if dev == 'cuda':
            t_sdpa = sdpa_stack(T, dev, dtype, args.reps)
            emit(dict(T=T, model='SDPA causal x24 (attention only)', prefill_ms=t_sdpa * 1e3,
                      prefill_tok_s=T / t_sdpa, prefill_vs_base=t_sdpa * 1e3 / b['prefill_ms']))
        for M in (int(m) for m in args.cache.split(',')):
            hola = retrofit_model(base, MemoryConfig(cache_size=M, block_size=args.block)).eval()
            variants = [('kernels', '1')] if dev == 'cuda' else []
            if T <= args.torch_max:
                variants.append(('pytorch', '0'))
            for name, flag in variants:
                os.environ['HOLA_KERNELS'] = flag
                # the PyTorch memory syncs with the host: no CUDA graph (a failed capture would also break the RNG)
                r = measure(hola, T, dev, args.reps if flag == '1' else 1, args.decode_steps, kw['vocab_size'],
                            graphs=flag == '1')
                if flag == '1':  # decode: both models stepped in turn
                    base_ms, r['decode_ms'] = decode_ab([base, hola], T, dev, args.decode_steps, kw['vocab_size'])
                    r['base_decode_ms_interleaved'] = base_ms
                emit(dict(T=T, model=f'retrofit M={M} {name}', **r,
                          prefill_vs_base=b['prefill_ms'] and r['prefill_ms'] / b['prefill_ms'],
                          prefill_graph_vs_base=(r['prefill_graph_ms'] / b['prefill_graph_ms']
                                                 if 'prefill_graph_ms' in r and 'prefill_graph_ms' in b else None),
                          decode_vs_base=r['decode_ms'] / r.get('base_decode_ms_interleaved', b['decode_ms']),
                          decode_graph_vs_base=(r['decode_graph_ms'] / b['decode_graph_ms']
                                                if 'decode_graph_ms' in r and 'decode_graph_ms' in b else None),
                          peak_vs_base=r['peak_MiB'] / b['peak_MiB'] if dev == 'cuda' else None))
            del hola
    if dev == 'cuda' and not args.no_kernel_rows:
        bw, fl = ceilings(dev)
        emit(dict(ceiling_copy_GBps=bw / 1e9, ceiling_bf16_TFLOPs=fl / 1e12))
        for M in (int(m) for m in args.cache.split(',')):
            k = read_kernel_roofline(32768, M, dev, args.reps)
            emit(dict(kernel='prefill_read', T=32768, M=M,
                      **{x: k[x] for x in ('read_ms', 'read_with_state_output_ms', 'fla_chunk_fwd_o_ms', 'select_ms',
                                           'memory_prefill_ms', 'rel_err_vs_reference_4k')},
                      TFLOPs=k['flops'] / 1e12, GBps=k['bytes_per_s'] / 1e9,
                      frac_flops=k['flops'] / fl, frac_bw=k['bytes_per_s'] / bw))
    print('\n' + table(rows), flush=True)
    if args.profile:
        M = max(int(m) for m in args.cache.split(','))
        os.environ['HOLA_KERNELS'] = '1' if dev == 'cuda' else '0'
        profile(retrofit_model(base, MemoryConfig(cache_size=M, block_size=args.block)).eval(), lengths[-1], dev,
                kw['vocab_size'], base=base)


def table(rows):
    out = [f"{'T':>6} {'model':<34} {'prefill tok/s':>14} {'x base':>7} {'graph ms':>9} {'x base':>7} "
           f"{'decode ms':>10} {'x base':>7} {'graph ms':>9} {'x base':>7} {'peak MiB':>9}"]
    nan = float('nan')
    for r in rows:
        if 'model' not in r:
            continue
        x = lambda key: 1.0 if r['model'] == 'base fla' else (r.get(key) or nan)  # noqa: E731
        out.append(f"{r['T']:>6} {r['model']:<34} {r.get('prefill_tok_s', nan):>14.0f} {x('prefill_vs_base'):>7.3f} "
                   f"{r.get('prefill_graph_ms', nan):>9.2f} {x('prefill_graph_vs_base'):>7.3f} "
                   f"{r.get('decode_ms', nan):>10.2f} {x('decode_vs_base'):>7.3f} "
                   f"{r.get('decode_graph_ms', nan):>9.3f} {x('decode_graph_vs_base'):>7.3f} {r.get('peak_MiB', nan):>9.0f}")
    return '\n'.join(out)


if __name__ == '__main__':
    main()
