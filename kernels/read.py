"""Fused Triton reads of the memory: RMSNorm-gamma logits, online softmax over [sink, cache, own block],
and the combination with the state output, in one pass.

`prefill_read`: every query block of a prompt against its cache (a gathered list of M candidates) and
the causal part of its own block. `decode_read`: one query per sequence against the cache tensors and
the block buffer of the memory state, normalising the stored keys in the kernel.

Both run compiled on CUDA (autotuned) and under TRITON_INTERPRET=1 on CPU tensors (no autotune).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'


def _autotune(configs, key):
    """triton.autotune, except under the interpreter (autotune needs a GPU driver)."""
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)


_CONFIGS = [triton.Config({'BN': bn, 'BV': bv}, num_warps=w, num_stages=s)
            for bn in (32, 64) for bv in (64, 128) for w in (4, 8) for s in (2, 3)]


@_autotune(_CONFIGS, key=['K', 'V', 'BQ', 'BK'])
@triton.jit
def _prefill_read_kernel(Q, KC, VC, IDX, QS, QE, CB, OST, OUT, SINK, GATE,
                         L, NC, NB, M, OFF_NEW, scale,
                         K: tl.constexpr, V: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                         BN: tl.constexpr, BV: tl.constexpr, SHARED: tl.constexpr, READ_BLOCK: tl.constexpr,
                         PREC: tl.constexpr):
    j, h, iv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HV = tl.num_programs(1)
    qs = tl.load(QS + j)
    qe = tl.load(QE + j)
    cb = tl.load(CB + j)
    rq = qs + tl.arange(0, BQ)
    mq = rq < qe
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    mv = rv < V
    q = tl.load(Q + (h * L + rq[:, None]) * K + rk[None, :], mask=mq[:, None] & (rk[None, :] < K), other=0.)
    sink = tl.load(SINK + h).to(tl.float32)
    m_i = tl.zeros([BQ], dtype=tl.float32) + sink
    l_i = tl.zeros([BQ], dtype=tl.float32) + 1.0
    acc = tl.zeros([BQ, BV], dtype=tl.float32)
    # the cache of this block: a gathered list of candidate indices (-1 = empty)
    for t in range(0, M, BN):
        rn = t + tl.arange(0, BN)
        idx = tl.load(IDX + (h * NB + j) * M + rn, mask=rn < M, other=-1)
        valid = idx >= 0
        safe = tl.where(valid, idx, 0)
        k = tl.load(KC + (h * NC + safe[:, None]) * K + rk[None, :], mask=valid[:, None] & (rk[None, :] < K), other=0.)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        s = tl.where(valid[None, :], s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(VC + (h * NC + safe[:, None]) * V + rv[None, :], mask=valid[:, None] & mv[None, :], other=0.)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    if READ_BLOCK:
        # the own block, causal: candidates cb .. OFF_NEW + row
        last = OFF_NEW + qe  # one past the last visible candidate of the block
        for t in range(0, BQ + BQ, BN):  # the own block spans at most BQ existing + BQ new candidates
            rn = cb + t + tl.arange(0, BN)
            inb = rn < last
            k = tl.load(KC + (h * NC + rn[:, None]) * K + rk[None, :], mask=inb[:, None] & (rk[None, :] < K),
                        other=0.)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
            vis = inb[None, :] & (rn[None, :] <= (OFF_NEW + rq)[:, None])
            s = tl.where(vis, s, float('-inf'))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            v = tl.load(VC + (h * NC + rn[:, None]) * V + rv[None, :], mask=inb[:, None] & mv[None, :], other=0.)
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PREC)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
    w0 = tl.exp(sink - m_i) / l_i
    read = acc / l_i[:, None] * scale
    ost = tl.load(OST + (rq[:, None] * HV + h) * V + rv[None, :], mask=mq[:, None] & mv[None, :], other=0.).to(tl.float32)
    if SHARED:
        o = w0[:, None] * ost + read
    else:
        o = ost + tl.sigmoid(tl.load(GATE + h).to(tl.float32)) * read
    tl.store(OUT + (rq[:, None] * HV + h) * V + rv[None, :], o, mask=mq[:, None] & mv[None, :])


def _empty(*shape, device) -> torch.Tensor:
    """Output buffer; NaN-filled when HOLA_POISON=1 (tests: an element the kernel misses stays NaN)."""
    if os.environ.get('HOLA_POISON') == '1':
        return torch.full(shape, float('nan'), dtype=torch.float32, device=device)
    return torch.empty(*shape, dtype=torch.float32, device=device)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def prefill_read(q_t: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, q_start: torch.Tensor,
                 q_end: torch.Tensor, cand_start: torch.Tensor, off_new: int, o_state: torch.Tensor,
                 sink: torch.Tensor, gate: torch.Tensor, scale: float, shared: bool, block_size: int,
                 read_block: bool = True) -> torch.Tensor:
    """q_t [HV, L, K] float32 (gamma_q * rms(q) / sqrt(K)); k_t [HV, NC, K] float32 (gamma_k * rms(k));
    v [HV, NC, V]; idx [HV, NB, M]; per query block j: rows [q_start, q_end), own-block candidates from
    cand_start; new tokens start at candidate `off_new`. o_state [L, HV, V]. Returns [L, HV, V] float32."""
    HV, L, K = q_t.shape
    NC, V = v.shape[1], v.shape[2]
    NB, M = idx.shape[1], idx.shape[2]
    out = _empty(L, HV, V, device=q_t.device)
    BQ, BK = _pow2(block_size), _pow2(K)
    extra = {} if not INTERPRET else {'BN': 32, 'BV': _pow2(min(V, 64))}
    grid = lambda meta: (NB, HV, triton.cdiv(V, meta['BV']))  # noqa: E731
    _prefill_read_kernel[grid](q_t.contiguous(), k_t.contiguous(), v.contiguous(), idx.to(torch.int32).contiguous(),
                               q_start.to(torch.int32), q_end.to(torch.int32), cand_start.to(torch.int32),
                               o_state.contiguous(), out, sink.float().contiguous(), gate.float().contiguous(),
                               L, NC, NB, M, off_new, scale, K=K, V=V, BQ=BQ, BK=BK, SHARED=shared,
                               READ_BLOCK=read_block, PREC='ieee' if v.dtype == torch.float32 else 'tf32', **extra)
    return out


_DCONFIGS = [triton.Config({'BN': bn, 'BV': bv}, num_warps=w) for bn in (32, 64, 128) for bv in (64, 128) for w in (2, 4)]


@_autotune(_DCONFIGS, key=['K', 'V', 'M', 'C'])
@triton.jit
def _decode_read_kernel(Q, CK, CV, CP, BKT, BVL, FILL, OST, OUT, QG, KG, SINK, GATE, eps, scale,
                        K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                        BN: tl.constexpr, BV: tl.constexpr, SHARED: tl.constexpr):
    n, h, iv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HV = tl.num_programs(1)
    rk = tl.arange(0, BK)
    mk = rk < K
    rv = iv * BV + tl.arange(0, BV)
    mv = rv < V
    nh = n * HV + h
    q = tl.load(Q + nh * K + rk, mask=mk, other=0.).to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q, 0) / K + eps) * tl.load(QG + h * K + rk, mask=mk, other=0.).to(tl.float32)
    q = q / tl.sqrt(K * 1.0)
    kg = tl.load(KG + h * K + rk, mask=mk, other=0.).to(tl.float32)
    sink = tl.load(SINK + h).to(tl.float32)
    fill = tl.load(FILL + n)  # entries of the block buffer visible to this query (the query included)
    m_i = sink
    l_i = sink * 0.0 + 1.0
    acc = tl.zeros([BV], dtype=tl.float32)
    for t in range(0, M + C, BN):
        rn = t + tl.arange(0, BN)
        in_cache = rn < M
        rb = rn - M
        in_block = (rn >= M) & (rb < fill)
        valid_c = in_cache & (tl.load(CP + nh * M + rn, mask=in_cache, other=-1) >= 0)
        kc = tl.load(CK + (nh * M + rn[:, None]) * K + rk[None, :], mask=valid_c[:, None] & mk[None, :], other=0.)
        kb = tl.load(BKT + (nh * C + rb[:, None]) * K + rk[None, :], mask=in_block[:, None] & mk[None, :], other=0.)
        k = (kc + kb).to(tl.float32)
        k = k * tl.rsqrt(tl.sum(k * k, 1) / K + eps)[:, None] * kg[None, :]
        s = tl.sum(k * q[None, :], 1)
        valid = valid_c | in_block
        s = tl.where(valid, s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        vc = tl.load(CV + (nh * M + rn[:, None]) * V + rv[None, :], mask=valid_c[:, None] & mv[None, :], other=0.)
        vb = tl.load(BVL + (nh * C + rb[:, None]) * V + rv[None, :], mask=in_block[:, None] & mv[None, :], other=0.)
        acc = acc * alpha + tl.sum(p[:, None] * (vc + vb).to(tl.float32), 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    w0 = tl.exp(sink - m_i) / l_i
    read = acc / l_i * scale
    ost = tl.load(OST + nh * V + rv, mask=mv, other=0.).to(tl.float32)
    if SHARED:
        o = w0 * ost + read
    else:
        o = ost + tl.sigmoid(tl.load(GATE + h).to(tl.float32)) * read
    tl.store(OUT + nh * V + rv, o, mask=mv)


def decode_read(q: torch.Tensor, mem: dict, fill: torch.Tensor, o_state: torch.Tensor, params: dict,
                eps: float, scale: float, shared: bool, read_block: bool) -> torch.Tensor:
    """q [N, HV, K] unit-L2 queries (one per sequence); mem: the memory state with the current token already
    in its block buffer; fill [N] visible block entries. o_state [N, HV, V]. Returns [N, HV, V] float32."""
    N, HV, K = q.shape
    V = o_state.shape[-1]
    M, C = mem['cache_k'].shape[2], mem['block_k'].shape[2]
    out = _empty(N, HV, V, device=q.device)
    fill = (fill if read_block else torch.zeros_like(fill)).to(torch.int32).contiguous()
    extra = {} if not INTERPRET else {'BN': 32, 'BV': _pow2(min(V, 64))}
    grid = lambda meta: (N, HV, triton.cdiv(V, meta['BV']))  # noqa: E731
    _decode_read_kernel[grid](q.contiguous(), mem['cache_k'], mem['cache_v'], mem['cache_pos'], mem['block_k'],
                              mem['block_v'], fill, o_state.contiguous(), out, params['q_gamma'].contiguous(),
                              params['k_gamma'].contiguous(), params['sink'].contiguous(),
                              params['gate'].contiguous(), eps, scale, K=K, V=V, M=M, C=C, BK=_pow2(K), SHARED=shared,
                              **extra)
    return out
