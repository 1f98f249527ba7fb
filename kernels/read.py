"""Fused Triton kernels of the memory: RMSNorm-gamma logits, softmax over [sink, cache, own block], and the
combination with the state output, in one pass.

`prefill_read`: every query block of a prompt against its cache (a gathered list of candidates from
`select.py`) and the causal part of its own block, reading raw q/k/v in place: queries are normalised in the
kernel, keys scaled by a factor from their L2-norm rstd (the model passes fla's; the loop then loads each key
tile only for the dot, so Triton pipelines the gathers as asynchronous copies). The softmax max is a fixed
per-row bound of the logits where that is numerically safe (no running max, no rescale), else the online
(flash-attention) max, in a second launch for the blocks the first one flags.
`decode_step`: one token per sequence in one launch: the recurrent step of the state (GDN or DeltaNet, in
place, with the write score) by value tiles, the write into the block buffer, the read by entry parts; the last
program of each head (an atomic ticket) combines, stores the score and, at a block end, merges into the cache.

Both run compiled on CUDA (autotuned unless HOLA_AUTOTUNE=0) and under TRITON_INTERPRET=1 on CPU
tensors (fixed tiles, float32 dots: the interpreter's bf16 dot is wrong in Triton 3.9).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'
TUNE = not INTERPRET and os.environ.get('HOLA_AUTOTUNE', '1') != '0'


def _autotune(configs, key, **kw):
    """triton.autotune, except under the interpreter (autotune needs a GPU driver) or with HOLA_AUTOTUNE=0
    (fixed tiles: fast compiles for tests)."""
    if not TUNE:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key, **kw)


@triton.jit
def _unit_rms(s2, eps_l2, eps, K: tl.constexpr):
    """The factor f with rms(l2_normalize(x)) = f * x, from s2 = sum(x^2) (fla's L2 norm, then RMSNorm)."""
    r1 = tl.rsqrt(s2 + eps_l2)
    return r1 * tl.rsqrt(s2 * r1 * r1 / K + eps)


@triton.jit
def _key_factor(r, eps_l2, eps, K: tl.constexpr):
    """The factor f with rms(l2_normalize(x)) = f * x, from r = 1 / sqrt(sum(x^2) + eps_l2), the L2 norm's
    rstd (fla's l2norm_fwd returns it): the unit vector has sum of squares 1 - eps_l2 r^2."""
    return r * tl.rsqrt((1.0 - eps_l2 * r * r) / K + eps)


@triton.jit
def _rows(OLD, NEW, h, hn, rows, NO, s_t, s_h, cols, D: tl.constexpr, HAS_OLD: tl.constexpr):
    """Pointers to candidate rows [len(rows), len(cols)]: index < NO in OLD [HV, NO, D], else row index - NO
    of NEW (token stride s_t, head hn at offset hn * s_h). One load through these pointers (not one per
    source) keeps the loop's loads pipelinable (asynchronous copies into shared memory)."""
    p = NEW + (rows - NO)[:, None] * s_t + hn * s_h + cols[None, :]
    if HAS_OLD:
        p = tl.where((rows < NO)[:, None], OLD + (h * NO + rows[:, None]) * D + cols[None, :], p)
    return p


@triton.jit
def _rstd(RO, RN, h, hn, rows, NO, s_t, HAS_OLD: tl.constexpr):
    """Pointers to the rstd of candidate rows: RO [HV, NO] for index < NO, else RN [L, H] (token stride s_t)."""
    p = RN + (rows - NO) * s_t + hn
    if HAS_OLD:
        p = tl.where(rows < NO, RO + h * NO + rows, p)
    return p


@triton.jit
def _candidates(KO, VO, KN, VN, RO, RN, h, hk, rows, NO, sk_t, sk_h, sv_t, sv_h, sr_t, rk, rv, eps_l2, eps,
                K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_OLD: tl.constexpr):
    """Keys [len(rows), BK], values [len(rows), BV] and key factors of candidate rows. Every row must be a valid
    candidate index: the loops mask the padding rows of a tile in the softmax, not in the loads (no per-row
    predicates), and mask columns only where K, V are not whole tiles."""
    pk = _rows(KO, KN, h, hk, rows, NO, sk_t, sk_h, rk, K, HAS_OLD)
    pv = _rows(VO, VN, h, h, rows, NO, sv_t, sv_h, rv, V, HAS_OLD)
    if K == BK:
        k = tl.load(pk)
    else:
        k = tl.load(pk, mask=(rk < K)[None, :], other=0.)
    if V % BV == 0:
        v = tl.load(pv)
    else:
        v = tl.load(pv, mask=(rv < V)[None, :], other=0.)
    kf = _key_factor(tl.load(_rstd(RO, RN, h, hk, rows, NO, sr_t, HAS_OLD)), eps_l2, eps, K)
    return k, v, kf


@triton.jit
def _attend(q, k, v, kf, mask, m_i, l_i, acc, PREC: tl.constexpr, ONLINE: tl.constexpr):
    """One softmax step (base 2) of queries q [BQ, BK] over keys k [BN, BK] with their factors kf [BN] and values
    v [BN, BV]. m_i: a fixed upper bound of every logit of its row, or (ONLINE) the running max, updated here
    with the flash-attention rescale."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * kf[None, :]
    if ONLINE:
        m_new = tl.maximum(m_i, tl.max(tl.where(mask, s, float('-inf')), 1))
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    p = tl.where(mask, tl.exp2(s - m_i[:, None]), 0.)
    return m_i, l_i + tl.sum(p, 1), tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision=PREC)


@triton.jit
def _params(W, h, sw, rk, mk, K: tl.constexpr):
    """The memory parameters of value head h from the packed weight W [HV, 2K + 2] (row stride sw):
    gamma_q * gamma_k [BK], sink, gate logit, in float32."""
    gq = tl.load(W + h * sw + rk, mask=mk, other=0.).to(tl.float32)
    gk = tl.load(W + h * sw + K + rk, mask=mk, other=0.).to(tl.float32)
    return gq * gk, tl.load(W + h * sw + 2 * K).to(tl.float32), tl.load(W + h * sw + 2 * K + 1).to(tl.float32)


@triton.jit
def _state_tile(Q, KL, VS, HS, GS, OUT, rq, mq, hk, h, j, HV, sq_t, sq_h, skl_t, skl_h, svs_t, svs_h, sh_c, sh_h, sg_t,
                eps_l2, scale, rv, mv, K: tl.constexpr, V: tl.constexpr, BQ: tl.constexpr, BV: tl.constexpr,
                BKS: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr, V_FIRST: tl.constexpr,
                USE_G: tl.constexpr):
    """The state output of rows rq (chunk j), value columns rv, value head h, stored to OUT [L, HV, V]: fla's
    `chunk_fwd_o` math, o = scale (2^g_i q_i S_j + sum_{i' <= i in the chunk} 2^(g_i - g_i') (q_i . k_i') v_new_i'),
    from the chunk's starting state S_j (HS: [V, K] if V_FIRST else [K, V]), the unit-L2 keys KL, the corrected
    values VS (fla's v_new) and the chunk-local cumulative log2 decay GS. q_i = raw Q rows over their L2 norm
    (applied to the products: row scaling commutes with them)."""
    dt = KL.dtype.element_ty if LOWP else tl.float32
    acc = tl.zeros([BQ, BV], dtype=tl.float32)
    a = tl.zeros([BQ, BQ], dtype=tl.float32)
    s2 = tl.zeros([BQ], dtype=tl.float32)
    # q's squared norms in a loop of their own: where the pipelined loop below also read q's tile into registers,
    # Triton 3.6 gave that tile one shared-memory buffer, overwritten by the next tile's copy while the products
    # still read it (wrong outputs in about a fifth of the tiles at 32k tokens on an H100, different every run)
    for kk in tl.range(0, K, BKS, num_stages=1):
        rk = kk + tl.arange(0, BKS)
        qi = tl.load(Q + rq[:, None] * sq_t + hk * sq_h + rk[None, :], mask=mq[:, None] & (rk < K)[None, :], other=0.)
        s2 += tl.sum(qi.to(tl.float32) * qi.to(tl.float32), 1)
    for kk in range(0, K, BKS):
        rk = kk + tl.arange(0, BKS)
        mk = rk < K
        qi = tl.load(Q + rq[:, None] * sq_t + hk * sq_h + rk[None, :], mask=mq[:, None] & mk[None, :], other=0.)
        kl = tl.load(KL + rq[:, None] * skl_t + hk * skl_h + rk[None, :], mask=mq[:, None] & mk[None, :], other=0.)
        a = tl.dot(qi.to(dt), tl.trans(kl.to(dt)), a, input_precision=PREC)
        if V_FIRST:
            s = tl.load(HS + j * sh_c + h * sh_h + rv[:, None] * K + rk[None, :], mask=mv[:, None] & mk[None, :],
                        other=0.)
            acc = tl.dot(qi.to(dt), tl.trans(s.to(dt)), acc, input_precision=PREC)
        else:
            s = tl.load(HS + j * sh_c + h * sh_h + rk[:, None] * V + rv[None, :], mask=mk[:, None] & mv[None, :],
                        other=0.)
            acc = tl.dot(qi.to(dt), s.to(dt), acc, input_precision=PREC)
    f = tl.rsqrt(s2 + eps_l2) * scale
    ri = tl.arange(0, BQ)
    if USE_G:
        g = tl.load(GS + rq * sg_t + h, mask=mq, other=0.).to(tl.float32)
        acc = acc * (f * tl.exp2(g))[:, None]
        a = tl.where((ri[:, None] >= ri[None, :]) & mq[None, :], a * tl.exp2(g[:, None] - g[None, :]), 0.)
    else:
        acc = acc * f[:, None]
        a = tl.where((ri[:, None] >= ri[None, :]) & mq[None, :], a, 0.)
    vs = tl.load(VS + rq[:, None] * svs_t + h * svs_h + rv[None, :], mask=mq[:, None] & mv[None, :], other=0.)
    acc = tl.dot((a * f[:, None]).to(dt), vs.to(dt), acc, input_precision=PREC)
    tl.store(OUT + (rq[:, None] * HV + h) * V + rv[None, :], acc.to(OUT.dtype.element_ty),
             mask=mq[:, None] & mv[None, :])


# the four fastest of 9 configs of the fixed-max kernel at 32k tokens, M 512, on an H100 (bench/read_kernel.py,
# docs/notes.md)
_CONFIGS = [triton.Config({'BN': bn, 'BV': bv}, num_warps=w, num_stages=st)
            for bn, bv, w, st in ((32, 256, 4, 2), (16, 256, 4, 3), (32, 512, 8, 2), (64, 512, 8, 2))]
LOG2E = tl.constexpr(1.4426950408889634)


# tuning runs the kernel many times: in place on OUT (restored each run) and on tickets (zeroed each run)
@_autotune(_CONFIGS, key=['K', 'V', 'M', 'BQ', 'BK', 'G', 'HAS_OLD', 'STATE', 'NB_KEY'], restore_value=['OUT'],
           reset_to_zero=['READY'])
@triton.jit
def _prefill_read_kernel(Q, KO, VO, KN, VN, RO, RN, IDX, CNT, OST, OUT, W, FLAG, READY, KL, VS, HS, GS, NO, NBS, M, L,
                         b0, seen0, CB0, J0, C, sw, NB_KEY, HV, NB, LEAD, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sr_t,
                         skl_t, skl_h, svs_t, svs_h, sh_c, sh_h, sg_t, eps_l2, eps, scale,
                         G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                         BN: tl.constexpr, BV: tl.constexpr, SHARED: tl.constexpr, READ_BLOCK: tl.constexpr,
                         PREC: tl.constexpr, LOWP: tl.constexpr, HAS_OLD: tl.constexpr, ONLINE: tl.constexpr,
                         STATE: tl.constexpr, V_FIRST: tl.constexpr, USE_G: tl.constexpr, BKS: tl.constexpr):
    """Tile (iv, j, h): the rows of query block j (J0 + the grid's second index), value head h, value columns
    iv * BV ... (the tiles of one block and head run side by side and share its key rows in L2). A launch with
    ONLINE=False uses a fixed softmax max where that is safe and flags the blocks where it is not (FLAG [NB, HV]); a
    second launch with ONLINE=True reads those blocks alone, with the online max, in place on OUT.

    STATE: the state output is computed in the same launch, by programs of their own (`_state_tile`, into OUT):
    their loads stream while the read programs wait on gathers. A program takes a ticket (READY[0]) and the ticket
    order interleaves the two kinds, each tile's state LEAD or more tickets before its read, which waits for
    READY[1 + tile] before it loads the state output. Waiting only on earlier tickets (running or done programs)
    cannot deadlock."""
    NV: tl.constexpr = (V + BV - 1) // BV
    is_state = False
    if STATE:
        t = tl.atomic_add(READY, 1)
        tl.debug_barrier()  # every thread has the ticket (handed out through shared memory) before that is reused
        LEAD = tl.minimum(LEAD, NB * HV * NV)
        u = t - LEAD
        tail = 2 * (NB * HV * NV - LEAD)  # tickets of the alternating stretch after the lead
        is_state = (t < LEAD) | ((u < tail) & (u % 2 == 1))
        w = tl.where(t < LEAD, t, tl.where(u < tail, tl.where(u % 2 == 1, LEAD + u // 2, u // 2), t - NB * HV * NV))
        iv, j, h = w % NV, (w // NV) % NB, w // (NV * NB)
    else:
        iv, j, h = tl.program_id(0), J0 + tl.program_id(1), tl.program_id(2)
        w = 0
    go = is_state == False  # noqa: E712 (a tensor when STATE)
    if ONLINE:
        go = tl.load(FLAG + j * HV + h) != 0
    if is_state:
        qs = j * C  # this chunk's rows of the input (seen0 % C == 0)
        rq = qs + tl.arange(0, BQ)
        rv = iv * BV + tl.arange(0, BV)
        _state_tile(Q, KL, VS, HS, GS, OUT, rq, rq < tl.minimum(qs + C, L), h // G, h, j, HV, sq_t, sq_h, skl_t,
                    skl_h, svs_t, svs_h, sh_c, sh_h, sg_t, eps_l2, scale, rv, rv < V, K, V, BQ, BV, BKS, PREC, LOWP,
                    V_FIRST, USE_G)
        tl.debug_barrier()  # every thread's stores before the release
        tl.atomic_xchg(READY + 1 + w, 1, sem='release')
    if go:
        hk = h // G  # the q/k head of this value head
        qs = tl.maximum((b0 + j) * C - seen0, 0)  # this block's rows of the input
        qe = tl.minimum((b0 + j + 1) * C - seen0, L)
        rq = qs + tl.arange(0, BQ)
        mq = rq < qe
        rk = tl.arange(0, BK)
        mk = rk < K
        rv = iv * BV + tl.arange(0, BV)
        mv = rv < V
        gqk, sink, gate = _params(W, h, sw, rk, mk, K)
        sink = sink * LOG2E  # logits in base 2: exp2 in the softmax
        # queries: l2 norm, RMSNorm, gamma_q * gamma_k, 1/sqrt(K) and log2(e) folded in; keys: raw, times their
        # factor from the L2 norm's rstd
        q = tl.load(Q + rq[:, None] * sq_t + hk * sq_h + rk[None, :], mask=mq[:, None] & mk[None, :], other=0.)
        q = q.to(tl.float32)
        q = q * (_unit_rms(tl.sum(q * q, 1), eps_l2, eps, K) * (LOG2E / tl.sqrt(K * 1.0)))[:, None] * gqk[None, :]
        if LOWP:  # bf16/fp16 operands for both dots, float32 accumulation (flash-attention style)
            q = q.to(VN.dtype.element_ty)
        if ONLINE:
            m_i = tl.zeros([BQ], dtype=tl.float32) + sink
        else:
            # every logit of a row is at most |q| sqrt(K) (the key factor gives each key RMS 1). With m = that
            # bound - 60 (at least the sink) as the softmax max, every term is at most 2^60 (no overflow) and,
            # where m exceeds the sink by at most 100, the sink's term 2^(sink - m) >= 2^-100 keeps the sum exact
            # to float32 precision: then m is fixed (no running max, no rescale); else the block is flagged
            qf = q.to(tl.float32)
            m_i = tl.maximum(tl.sqrt(tl.sum(qf * qf, 1) * K) - 60.0, sink)
            flagged = tl.max(m_i, 0) - sink > 100.0
            tl.store(FLAG + j * HV + h, flagged.to(tl.int8))  # every iv writes the same value
            go = flagged == 0
        if go:
            l_i = tl.exp2(sink - m_i)
            acc = tl.zeros([BQ, BV], dtype=tl.float32)
            # the cache of this block: a gathered list of candidate indices
            n_cache = tl.load(CNT + h * NBS + j)
            for t in range(0, n_cache, BN):
                rn = t + tl.arange(0, BN)
                valid = rn < n_cache
                idx = tl.load(IDX + (h * NBS + j) * M + rn, mask=valid, other=0)  # padding rows: candidate 0
                k, v, kf = _candidates(KO, VO, KN, VN, RO, RN, h, hk, idx, NO, sk_t, sk_h, sv_t, sv_h, sr_t, rk, rv,
                                       eps_l2, eps, K, V, BK, BV, HAS_OLD)
                m_i, l_i, acc = _attend(q, k, v, kf, valid[None, :], m_i, l_i, acc, PREC, ONLINE)
            if READ_BLOCK:
                # the own block, causal: earlier candidates of the block (the partial block, first block only),
                # then the new tokens up to the row itself
                cb = tl.where(j == 0, CB0, NO + qs)
                last = NO + qe  # one past the last visible candidate of the block
                for t in range(0, last - cb, BN):
                    rn = cb + t + tl.arange(0, BN)
                    k, v, kf = _candidates(KO, VO, KN, VN, RO, RN, h, hk, tl.minimum(rn, last - 1), NO, sk_t, sk_h,
                                           sv_t, sv_h, sr_t, rk, rv, eps_l2, eps, K, V, BK, BV, HAS_OLD)
                    vis = (rn < last)[None, :] & (rn[None, :] <= (NO + rq)[:, None])
                    m_i, l_i, acc = _attend(q, k, v, kf, vis, m_i, l_i, acc, PREC, ONLINE)
            w0 = tl.exp2(sink - m_i) / l_i
            read = acc / l_i[:, None] * scale
            io = (rq[:, None] * HV + h) * V + rv[None, :]
            if STATE:  # this tile's state output, from its own program (an earlier ticket), past L1
                while tl.atomic_add(READY + 1 + w, 0, sem='acquire') == 0:
                    pass
                tl.debug_barrier()  # likewise for the flag
                ost = tl.load(OST + io, mask=mq[:, None] & mv[None, :], other=0., cache_modifier='.cg')
            else:
                ost = tl.load(OST + io, mask=mq[:, None] & mv[None, :], other=0., eviction_policy='evict_first')
            ost = ost.to(tl.float32)
            if SHARED:
                o = w0[:, None] * ost + read
            else:
                o = ost + tl.sigmoid(gate) * read
            tl.store(OUT + io, o, mask=mq[:, None] & mv[None, :], eviction_policy='evict_first')


def _empty(*shape, device) -> torch.Tensor:
    """Output buffer; NaN-filled when HOLA_POISON=1 (tests: an element the kernel misses stays NaN)."""
    if os.environ.get('HOLA_POISON') == '1':
        return torch.full(shape, float('nan'), dtype=torch.float32, device=device)
    return torch.empty(*shape, dtype=torch.float32, device=device)


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors (1 off CUDA): the STATE launch's lead of state tickets is twice this."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == 'cuda' else 1


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def rstd(x: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(sum(x^2) + 1e-6) over the last dimension, float32: the L2 norm's rstd, as fla's l2norm_fwd
    returns it (the model's prefill passes fla's own; callers without one compute it here)."""
    return x.float().square().sum(-1).add_(1e-6).rsqrt_()


def _state_args(state: dict, out: torch.Tensor, n_chunks: int):
    """The state path's pieces (see prefill_read) as the kernels take them: pointers, then their strides."""
    hs, vs, kl, gs = state['h'], state['v_new'], state['k'], state['g']
    assert hs.shape[0] == n_chunks and hs[0, 0].is_contiguous() and vs.stride(-1) == kl.stride(-1) == 1
    assert out.is_contiguous() and (gs is None or gs.stride(-1) == 1)
    st = dict(KL=kl, VS=vs, HS=hs, GS=out if gs is None else gs)
    return st, (kl.stride(0), kl.stride(1), vs.stride(0), vs.stride(1), hs.stride(0), hs.stride(1),
                0 if gs is None else gs.stride(0))


@triton.jit
def _state_kernel(Q, KL, VS, HS, GS, OUT, L, HV, sq_t, sq_h, skl_t, skl_h, svs_t, svs_h, sh_c, sh_h, sg_t, eps_l2,
                  scale, C: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BQ: tl.constexpr,
                  BV: tl.constexpr, BKS: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
                  V_FIRST: tl.constexpr, USE_G: tl.constexpr):
    """Tile (iv, j, h): the state output of chunk j's rows, value columns iv * BV ..., value head h (`_state_tile`)."""
    iv, j, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rq = j * C + tl.arange(0, BQ)
    rv = iv * BV + tl.arange(0, BV)
    _state_tile(Q, KL, VS, HS, GS, OUT, rq, rq < tl.minimum(j * C + C, L), h // G, h, j, HV, sq_t, sq_h, skl_t, skl_h,
                svs_t, svs_h, sh_c, sh_h, sg_t, eps_l2, scale, rv, rv < V, K, V, BQ, BV, BKS, PREC, LOWP, V_FIRST,
                USE_G)


def state_output(q: torch.Tensor, state: dict, out: torch.Tensor, scale: float, chunk_size: int) -> torch.Tensor:
    """The state output of L tokens into out [L, HV, V] from the state path's pieces (prefill_read's `state`; its
    chunks of chunk_size tokens start at row 0), raw q [L, H, K]: fla's `chunk_fwd_o`, as the read launch computes
    it for a fresh prompt, alone (a prompt selected in pieces computes each piece's state output as it arrives)."""
    L, H, K = q.shape
    HV, V = out.shape[1:]
    C = chunk_size
    st, strides = _state_args(state, out, triton.cdiv(L, C))
    assert q.stride(-1) == 1 and _pow2(C) == C
    BV = _pow2(min(V, 64)) if INTERPRET else 256  # H100: 4 warps, 2 stages (docs/notes.md, session 10)
    lowp = state['v_new'].dtype != torch.float32 and not INTERPRET
    _state_kernel[(triton.cdiv(V, BV), triton.cdiv(L, C), HV)](
        q, st['KL'], st['VS'], st['HS'], st['GS'], out, L, HV, q.stride(0), q.stride(1), *strides, 1e-6, scale, C=C,
        G=HV // H, K=K, V=V, BQ=C, BV=BV, BKS=min(_pow2(K), 64), LOWP=lowp,
        PREC='ieee' if state['v_new'].dtype == torch.float32 else 'tf32',
        V_FIRST=state['v_first'], USE_G=state['g'] is not None,
        **({} if INTERPRET else dict(num_warps=4, num_stages=2)))
    return out


def prefill_read(q: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 idx: torch.Tensor, cnt: torch.Tensor, seen0: int, o_state: torch.Tensor | None, weight: torch.Tensor,
                 scale: float, shared: bool, block_size: int, read_block: bool = True, eps: float = 1e-6,
                 out: torch.Tensor | None = None, cb0: int | None = None, r_new: torch.Tensor | None = None,
                 config: dict | None = None, state: dict | None = None,
                 blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """The read of L new tokens at positions seen0 .. seen0 + L - 1 of one sequence, block by block.

    Raw queries q [L, H, K] and new keys k_new [L, H, K] (before the L2 norm; value head h reads q/k head
    h // (HV / H)), new values v_new [L, HV, V]; the earlier candidates k_old [HV, NO, K] (unit-L2), v_old
    [HV, NO, V] (NO = 0: none, a fresh memory); candidate i >= NO is new token i - NO. r_new [L, H]: the new
    keys' L2-norm rstd (`rstd`; computed here when not given). idx [HV, NBS, M] and cnt [HV, NBS]
    from select_caches, row j for the block of position (seen0 // C + j) * C; the own-block read of the first
    block starts at candidate cb0 (default NO: no earlier candidates of that block). weight [HV, 2K + 2]: the
    packed memory parameters (MemoryParams.weight). o_state [L, HV, V]; `out` (default: a new float32 tensor;
    may be o_state itself) gets the output. `config` (e.g. {'BN': 32, 'BV': 256, 'num_warps': 4, 'num_stages': 2}):
    explicit tiles and launch options instead of autotuning (benchmarks).

    `state`: compute the state output in the same launch (the math of fla's `chunk_fwd_o`) instead of reading
    o_state (then None): {'h': the state at the start of each chunk, [NC, HV, V, K] ('v_first') or [NC, HV, K, V],
    'v_new': [L, HV, V] fla's corrected values, 'k': [L, H, K] the unit-L2 keys, 'g': [L, HV] the chunk-local
    cumulative log2 decay or None (DeltaNet), 'v_first': bool}. The chunks are the query blocks: seen0 % C == 0
    and the state path's chunk size is C.

    `blocks` (j0, j1): read query blocks j0 .. j1 - 1 alone (rows of idx, as above; o_state path only): a prompt read in
    parts, each as soon as its caches and state output are ready."""
    L, H, K = q.shape
    HV, NO = k_old.shape[0], k_old.shape[1]
    V = v_new.shape[-1]
    C, M = block_size, idx.shape[2]
    NB = (seen0 + L - 1) // C - seen0 // C + 1  # query blocks
    j0, j1 = (0, NB) if blocks is None else blocks
    assert 0 <= j0 < j1 <= NB and (blocks is None or state is None)
    r_new = rstd(k_new) if r_new is None else r_new
    r_old = rstd(k_old) if NO else r_new  # never read without earlier candidates
    assert q.stride(-1) == k_new.stride(-1) == v_new.stride(-1) == weight.stride(-1) == r_new.stride(-1) == 1
    assert k_old.is_contiguous() and v_old.is_contiguous()
    assert k_old.dtype == k_new.dtype and v_old.dtype == v_new.dtype  # one load serves both sources
    out = _empty(L, HV, V, device=q.device) if out is None else out
    if state is None:
        assert o_state.is_contiguous()
        st, st_strides = dict(KL=out, VS=out, HS=out, GS=out), (0,) * 7
    else:  # the state output goes to `out` first: the reads combine in place
        assert seen0 % block_size == 0 and _pow2(block_size) == block_size, 'state output: blocks must be chunks'
        o_state = out
        st, st_strides = _state_args(state, out, NB)
    BQ, BK = _pow2(block_size), _pow2(K)
    prec = 'ieee' if v_new.dtype == torch.float32 else 'tf32'
    # Triton 3.9's interpreter computes bf16 dots wrongly (numpy has no bf16): float32 dots there
    lowp = v_new.dtype != torch.float32 and not INTERPRET
    untuned = {'BN': 32, 'BV': _pow2(min(V, 64))} if INTERPRET else dict(BN=32, BV=256, num_warps=4, num_stages=2)
    # two launches: a fixed softmax max where it is safe (nearly always: the kernel says why), then the online max
    # for the blocks the first flags (the second launch's programs exit at once when none is flagged)
    flag = torch.empty(NB, HV, dtype=torch.int8, device=q.device)
    # STATE: READY[0] the ticket counter, READY[1 + tile] set once the tile's state output is in `out`
    ready = (torch.zeros(1 + NB * HV * triton.cdiv(V, 16), dtype=torch.int32, device=q.device) if state is not None
             else torch.empty(1, dtype=torch.int32, device=q.device))  # not read
    if TUNE and config is None and q.is_cuda and torch.cuda.is_current_stream_capturing():
        config = untuned  # the autotuner cannot time its candidates inside a CUDA graph capture
    for online in (False, True):
        kernel, extra = _prefill_read_kernel, ({} if TUNE else untuned)
        if config is not None or online:  # explicit tiles; the online launch (rarely any work) is not tuned
            kernel = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
            extra = untuned if online else config
        with_state = state is not None and not online  # the online launch reads the state output in place
        if with_state:
            grid = lambda meta: (2 * triton.cdiv(V, meta['BV']) * NB * HV,)  # noqa: E731
        else:
            grid = lambda meta: (triton.cdiv(V, meta['BV']), j1 - j0, HV)  # noqa: E731
        kernel[grid](q, k_old, v_old, k_new, v_new, r_old, r_new, idx, cnt, o_state, out, weight, flag, ready,
                     st['KL'], st['VS'], st['HS'], st['GS'], NO, idx.shape[1], M, L, seen0 // C, seen0,
                     NO if cb0 is None else cb0, j0, C, weight.stride(0),
                     min(triton.next_power_of_2(j1 - j0), 1024),  # autotune key, with M: prompt length bucket
                     HV, NB, 2 * _sm_count(q.device),
                     q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
                     r_new.stride(0), *st_strides, 1e-6, eps, scale, G=HV // H, K=K, V=V, BQ=BQ, BK=BK,
                     SHARED=shared, READ_BLOCK=read_block, PREC=prec, LOWP=lowp, HAS_OLD=NO > 0, ONLINE=online,
                     STATE=with_state, V_FIRST=state is not None and state['v_first'],
                     USE_G=state is not None and state['g'] is not None, BKS=min(BK, 64), **extra)
    return out


@triton.jit
def _beats(sa, pa, sb, pb, SURPRISE: tl.constexpr):
    """Priority a > b: (score desc, position asc), or position desc for recency."""
    if SURPRISE:
        return (sa > sb) | ((sa == sb) & (pa < pb))
    return pa > pb


@triton.jit
def _token(Q, W, n, h, hk, sw, sq_n, sq_h, rk, mk, eps_l2, eps, K: tl.constexpr):
    """The decoded token's raw q of value head h, its sum of squares, its read vector (RMSNorm, gamma, 1/sqrt(K)),
    and the memory parameters."""
    gqk, sink, gate = _params(W, h, sw, rk, mk, K)
    q_raw = tl.load(Q + n * sq_n + hk * sq_h + rk, mask=mk, other=0.).to(tl.float32)
    q2 = tl.sum(q_raw * q_raw, 0)
    return q_raw, q2, q_raw * _unit_rms(q2, eps_l2, eps, K) / tl.sqrt(K * 1.0) * gqk, sink, gate


@triton.jit
def _decode_kernel(Q, KR, VR, ST, BETA, A_RAW, A_LOG, DT_BIAS, SEEN, CK, CV, CP, BKT, BVL, PART, OST, PM, PL, PACC,
                   W, SC, OUT, CS, BS, RANK, TICKET, sw, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, ss_n, ss_h, ss_v, ss_k, sp,
                   so, eps_l2, eps, scale, NVT, NS,
                   G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, C: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, BVF: tl.constexpr, E: tl.constexpr, BC: tl.constexpr,
                   BT: tl.constexpr, BP: tl.constexpr, TAIL: tl.constexpr, SHARED: tl.constexpr,
                   SURPRISE: tl.constexpr, READ_BLOCK: tl.constexpr, STEP: tl.constexpr, NEG: tl.constexpr,
                   GIVEN: tl.constexpr):
    """Program (sequence, value head, p). p = iv < NVT: (the recurrent step of the state's value rows iv BV ...,)
    and, iv = 0, the token's write into the block buffer. p = NVT + s: the softmax parts of entries [s E, s E + E)
    of [cache, block so far] (flash-decoding): max PM, sum PL and the weighted values PACC [N, HV, NS, V].
    The head's last program (TICKET[nh], zero between steps) then runs `_finish`: it adds the sink and the token,
    combines with the state output, stores the token's score and merges a block that ends into the cache; the
    sequence's last such program (TICKET[N HV + n]) advances SEEN[n].

    STEP 0: the state output OST is given (and the score, to `_finish`). 1: GDN's recurrent step on the state
    (strided, value/key strides given), in place: S <- alpha S + k u^T with u = beta (v - alpha S^T k),
    alpha = exp(-exp(A_log) softplus(a + dt_bias)), beta = sigmoid(b) (x2 with NEG), score ||u||, state output
    scale * S^T q (q, k unit-L2; fla's fused recurrent step): the tile's part of ||u||^2 goes to PART [N, HV, NVT].
    2: the same for DeltaNet (alpha 1, beta given). GIVEN: the score is given in SC all the same (eviction 'novelty')."""
    n, h, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    iv, s = pid, pid - NVT
    HV = tl.num_programs(1)
    nh = n * HV + h
    hk = h // G
    rk = tl.arange(0, BK)
    mk = rk < K
    # each program issues its loads at once (no address depends on a loaded value), then computes
    if iv < NVT:
        rt = iv * BV + tl.arange(0, BV)
        mt = rt < V
        if STEP > 0:
            ps = ST + n * ss_n + h * ss_h + rt[:, None] * ss_v + rk[None, :] * ss_k
            s_t = tl.load(ps, mask=mt[:, None] & mk[None, :], other=0.).to(tl.float32)
            v_t = tl.load(VR + n * sv_n + h * sv_h + rt, mask=mt, other=0.).to(tl.float32)
            beta = tl.load(BETA + nh).to(tl.float32)
            if STEP == 1:
                x = tl.load(A_RAW + nh).to(tl.float32) + tl.load(DT_BIAS + h).to(tl.float32)
                a_log = tl.load(A_LOG + h).to(tl.float32)
        seen = tl.load(SEEN + n)
        fill = (seen % C).to(tl.int32)
        q_raw, q2, q, sink, gate = _token(Q, W, n, h, hk, sw, sq_n, sq_h, rk, mk, eps_l2, eps, K)
        k = tl.load(KR + n * sk_n + hk * sk_h + rk, mask=mk, other=0.).to(tl.float32)
        ku = k * tl.rsqrt(tl.sum(k * k, 0) + eps_l2)  # the key as the state path uses it (unit L2)
        if iv == 0:  # the token joins its block
            rvf = tl.arange(0, BVF)
            tl.store(BKT + (nh * C + fill) * K + rk, ku, mask=mk)
            tl.store(BVL + (nh * C + fill) * V + rvf,
                     tl.load(VR + n * sv_n + h * sv_h + rvf, mask=rvf < V, other=0.).to(tl.float32), mask=rvf < V)
        if STEP > 0:
            if STEP == 1:
                softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))
                s_t *= tl.exp(-tl.exp(a_log) * softplus)
                beta = tl.sigmoid(beta)
                if NEG:
                    beta = beta * 2.0
            u = beta * (v_t - tl.sum(s_t * ku[None, :], 1))
            s_t += u[:, None] * ku[None, :]
            tl.store(ps, s_t.to(ST.dtype.element_ty), mask=mt[:, None] & mk[None, :])
            qu = q_raw * tl.rsqrt(q2 + eps_l2) * scale
            tl.store(OST + nh * so + rt, tl.sum(s_t * qu[None, :], 1), mask=mt)
            tl.store(PART + nh * sp + iv, tl.sum(tl.where(mt, u * u, 0.), 0))
    else:
        # entries [s E, s E + E) of [the cache [0, M), the block's earlier tokens [M, M + fill)]. The loads are
        # masked by position only; validity applies after them (empty cache slots hold zeros, the block's rows
        # past fill older values: both finite, and replaced below)
        rv = tl.arange(0, BVF)
        mv = rv < V
        rn = s * E + tl.arange(0, E)
        in_cache = rn < M
        in_block = (rn >= M) & (rn < M + C)
        if not READ_BLOCK:
            in_block = rn < 0
        cp = tl.load(CP + nh * M + rn, mask=in_cache, other=-1)
        row_k = tl.where(in_cache, CK + (nh * M + rn) * K, BKT + (nh * C + rn - M) * K)  # each row's own buffer
        row_v = tl.where(in_cache, CV + (nh * M + rn) * V, BVL + (nh * C + rn - M) * V)
        mr = in_cache | in_block
        kk = tl.load(row_k[:, None] + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.)
        vv = tl.load(row_v[:, None] + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.)
        seen = tl.load(SEEN + n)
        fill = (seen % C).to(tl.int32)
        _, _, q, sink, gate = _token(Q, W, n, h, hk, sw, sq_n, sq_h, rk, mk, eps_l2, eps, K)
        valid = (in_cache & (cp >= 0)) | (in_block & (rn < M + fill))
        kk = tl.where(valid[:, None], kk.to(tl.float32), 0.)
        sc = tl.where(valid, tl.sum(kk * q[None, :], 1) * _unit_rms(tl.sum(kk * kk, 1), eps_l2, eps, K), float('-inf'))
        m_i = tl.maximum(tl.max(sc, 0), -1e30)  # finite: an all-empty part has weight 0 in the merge
        pr = tl.exp(sc - m_i)
        tl.store(PM + nh * sp + s, m_i)
        tl.store(PL + nh * sp + s, tl.sum(pr, 0))
        tl.store(PACC + nh * sp + s * V + rv, tl.sum(pr[:, None] * tl.where(valid[:, None], vv.to(tl.float32), 0.), 0),
                 mask=mv)
    tl.debug_barrier()  # every thread's loads and stores are issued before the ticket (release)
    last = tl.atomic_add(TICKET + nh, 1, sem='acq_rel') == NVT + NS - 1  # the head's last program
    tl.debug_barrier()  # every thread has the ticket (handed out through shared memory) before that is reused
    if last:
        tl.store(TICKET + nh, 0)
        _finish(n, h, nh, seen, q, KR + n * sk_n + hk * sk_h, sink, gate, VR, SC, PART, OST, PM, PL, PACC, OUT, CK,
                CV, CS, CP, BKT, BVL, BS, RANK, sv_n, sv_h, sp, so, eps_l2, eps, scale, NVT, NS, K, V, M, C, BK, BVF,
                BC, BT, BP, TAIL, SHARED, READ_BLOCK, SURPRISE, STEP, GIVEN)
        # the sequence's last head advances its position: every program of the sequence has read it by now
        tl.debug_barrier()
        last = tl.atomic_add(TICKET + tl.num_programs(0) * HV + n, 1, sem='acq_rel') == HV - 1
        tl.debug_barrier()
        if last:
            tl.store(TICKET + tl.num_programs(0) * HV + n, 0)
            tl.store(SEEN + n, seen + 1)


@triton.jit
def _finish(n, h, nh, seen, q, KT, sink, gate, VR, SC, PART, OST, PM, PL, PACC, OUT, CK, CV, CS, CP, BKT, BVL, BS,
            RANK, sv_n, sv_h, sp, so, eps_l2, eps, scale, NVT, NS, K: tl.constexpr,
            V: tl.constexpr, M: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            BC: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, TAIL: tl.constexpr, SHARED: tl.constexpr,
            READ_BLOCK: tl.constexpr, SURPRISE: tl.constexpr, STEP: tl.constexpr, GIVEN: tl.constexpr):
    """The last program of head (n, h) in `_decode_kernel`: the softmax over [sink, the parts, the token itself],
    the combination with the state output into OUT; the token's write score (given in SC, or the root of the value
    tiles' parts of ||u||^2) into the block buffer; at a block end the block merges into the cache. Other programs'
    outputs are loaded past L1 (.cg)."""
    rk = tl.arange(0, BK)
    mk = rk < K
    rv = tl.arange(0, BV)
    mv = rv < V
    fill = (seen % C).to(tl.int32)
    # the other programs' outputs, issued with the parts' loads below (one round trip)
    ost = tl.load(OST + nh * so + rv, mask=mv, other=0., cache_modifier='.cg').to(tl.float32)
    if STEP == 0 or GIVEN:
        score = tl.load(SC + nh)
    else:
        rt = tl.arange(0, BT)
        score = tl.sqrt(tl.sum(tl.load(PART + nh * sp + rt, mask=rt < NVT, other=0., cache_modifier='.cg'), 0))
    m = sink
    if READ_BLOCK:  # the token itself
        k = tl.load(KT + rk, mask=mk, other=0.).to(tl.float32)
        s_self = tl.sum(k * q, 0) * _unit_rms(tl.sum(k * k, 0), eps_l2, eps, K)
        m = tl.maximum(m, s_self)
        p_self = tl.exp(s_self - m)
        l_i = tl.exp(sink - m) + p_self
        acc = p_self * tl.load(VR + n * sv_n + h * sv_h + rv, mask=mv, other=0.).to(tl.float32)
    else:
        l_i = tl.exp(sink - m)
        acc = tl.zeros([BV], dtype=tl.float32)
    # the parts, BP at a time (and TAIL more, loaded with them: each step is a round trip), online softmax
    for c in range(0, NS, BP + TAIL):
        rp = c + tl.arange(0, BP)
        pm = tl.load(PM + nh * sp + rp, mask=rp < NS, other=-1e30, cache_modifier='.cg')
        pl = tl.load(PL + nh * sp + rp, mask=rp < NS, other=0., cache_modifier='.cg')
        pacc = tl.load(PACC + nh * sp + rp[:, None] * V + rv[None, :], mask=(rp < NS)[:, None] & mv[None, :],
                       other=0., cache_modifier='.cg')
        m_new = tl.maximum(m, tl.max(pm, 0))
        if TAIL > 0:
            rq = c + BP + tl.arange(0, TAIL)
            pm2 = tl.load(PM + nh * sp + rq, mask=rq < NS, other=-1e30, cache_modifier='.cg')
            pl2 = tl.load(PL + nh * sp + rq, mask=rq < NS, other=0., cache_modifier='.cg')
            pacc2 = tl.load(PACC + nh * sp + rq[:, None] * V + rv[None, :], mask=(rq < NS)[:, None] & mv[None, :],
                            other=0., cache_modifier='.cg')
            m_new = tl.maximum(m_new, tl.max(pm2, 0))
        a = tl.exp(m - m_new)
        wp = tl.exp(pm - m_new)
        l_i = l_i * a + tl.sum(pl * wp, 0)
        acc = acc * a + tl.sum(pacc * wp[:, None], 0)
        if TAIL > 0:
            wq = tl.exp(pm2 - m_new)
            l_i += tl.sum(pl2 * wq, 0)
            acc += tl.sum(pacc2 * wq[:, None], 0)
        m = m_new
    w0 = tl.exp(sink - m) / l_i
    read = acc / l_i * scale
    if SHARED:
        o = w0 * ost + read
    else:
        o = ost + tl.sigmoid(gate) * read
    tl.store(OUT + nh * V + rv, o, mask=mv)
    tl.store(BS + nh * C + fill, score)
    if M > 0:
        if fill == C - 1:
            # the block ends: new cache = top-M of [cache, block] by priority. The cache is kept in priority
            # order, so entry i moves to slot i + (block entries beating it) >= i: move tiles from the last.
            tl.debug_barrier()  # the score stored above is visible to every thread
            start = seen + 1 - C
            rc = tl.arange(0, BC)
            bs = tl.load(BS + nh * C + rc, mask=rc < C, other=float('-inf'))
            bp = tl.where(rc < C, start + rc, -1)
            # each block entry's new slot: the cache entries and block entries beating it (before anything moves)
            rank = tl.sum((_beats(bs[None, :], bp[None, :], bs[:, None], bp[:, None], SURPRISE)
                           & (rc < C)[None, :]).to(tl.int32), 1)
            for t in range(0, M, 16):
                r = t + tl.arange(0, 16)
                mr = r < M
                cs = tl.load(CS + nh * M + r, mask=mr, other=float('-inf'))
                cp = tl.load(CP + nh * M + r, mask=mr, other=-1)
                rank += tl.sum((_beats(cs[:, None], cp[:, None], bs[None, :], bp[None, :], SURPRISE)
                                & mr[:, None]).to(tl.int32), 0)
            tl.store(RANK + nh * sp + rc, rank, mask=rc < C)
            tl.debug_barrier()
            NT: tl.constexpr = (M + 15) // 16
            for i in range(0, NT):
                r = (NT - 1 - i) * 16 + tl.arange(0, 16)
                mr = r < M
                cs = tl.load(CS + nh * M + r, mask=mr, other=float('-inf'))
                cp = tl.load(CP + nh * M + r, mask=mr, other=-1)
                ck = tl.load(CK + (nh * M + r[:, None]) * K + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.)
                cv = tl.load(CV + (nh * M + r[:, None]) * V + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.)
                beaten = _beats(bs[None, :], bp[None, :], cs[:, None], cp[:, None], SURPRISE) & (rc < C)[None, :]
                dst = r + tl.sum(beaten.to(tl.int32), 1)
                keep = mr & (dst < M)
                tl.debug_barrier()  # every thread has loaded this tile before any slot of it is overwritten
                tl.store(CS + nh * M + dst, cs, mask=keep)
                tl.store(CP + nh * M + dst, cp, mask=keep)
                tl.store(CK + (nh * M + dst[:, None]) * K + rk[None, :], ck, mask=keep[:, None] & mk[None, :])
                tl.store(CV + (nh * M + dst[:, None]) * V + rv[None, :], cv, mask=keep[:, None] & mv[None, :])
            for jb in range(0, BC, 16):
                rj = jb + tl.arange(0, 16)
                mj = rj < C
                sj = tl.load(BS + nh * C + rj, mask=mj, other=float('-inf'))
                pj = start + rj
                dst = tl.load(RANK + nh * sp + rj, mask=mj, other=M)
                keep = mj & (dst < M)
                bk = tl.load(BKT + (nh * C + rj[:, None]) * K + rk[None, :], mask=mj[:, None] & mk[None, :], other=0.,
                             cache_modifier='.cg')  # row `fill`: written by program 0 of this launch
                bv = tl.load(BVL + (nh * C + rj[:, None]) * V + rv[None, :], mask=mj[:, None] & mv[None, :], other=0.,
                             cache_modifier='.cg')
                tl.debug_barrier()
                tl.store(CS + nh * M + dst, sj, mask=keep)
                tl.store(CP + nh * M + dst, pj.to(tl.int64), mask=keep)
                tl.store(CK + (nh * M + dst[:, None]) * K + rk[None, :], bk, mask=keep[:, None] & mk[None, :])
                tl.store(CV + (nh * M + dst[:, None]) * V + rv[None, :], bv, mask=keep[:, None] & mv[None, :])
            tl.debug_barrier()
            tl.store(BS + nh * C + rc, tl.full([BC], float('-inf'), tl.float32), mask=rc < C)


# the decode launch's tiles on the GPU: value rows per state program, entries per read part, parts per step of
# the head's last program (and at most TAIL more in that step: M 512 + C 64 is 36 parts of 16)
DECODE_TILES = dict(BV=32, E=16, BP=32, TAIL=4, num_warps=4)


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem: dict, weight: torch.Tensor, eps: float,
                scale: float, shared: bool, read_block: bool, eviction: str, score: torch.Tensor | None = None,
                o_state: torch.Tensor | None = None, state: dict | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """One token for every sequence, in one launch: raw q, k [N, H, K] (before the L2 norm), v [N, HV, V];
    weight [HV, 2K + 2] the packed memory parameters. Either `score` [N, HV] and `o_state` [N, HV, V] are
    given, or `state` (and optionally `score`, else the step's ||u||) holds the recurrent step's inputs: kind ('gdn' or 'deltanet'), S (the state before this
    token in fla's layout, updated in place; None: zero, then state['S'] gets the new state), beta ([N, HV];
    GDN: raw, before the sigmoid), and for GDN a, A_log, dt_bias, allow_neg_eigval. Writes the token into the
    block buffer, reads, combines, merges a block that ends into the cache and advances mem['seen'] (the
    tickets: mem['ticket']). Returns out [N, HV, V] (default: new, v's dtype)."""
    N, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    M, C = mem['cache_k'].shape[2], mem['block_k'].shape[2]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == weight.stride(-1) == 1
    out = torch.empty(N, HV, V, dtype=v.dtype, device=v.device) if out is None else out
    # programs: the state's value rows in tiles of BV, the read's entries in parts of E (flash-decoding)
    tiles = dict(BV=16, E=16, BP=2, TAIL=1, num_warps=4) if INTERPRET else DECODE_TILES
    BV, E = _pow2(min(V, tiles['BV'])), tiles['E']
    NVT, NS = triton.cdiv(V, BV), triton.cdiv(M + (C if read_block else 0), E)
    BP = min(_pow2(NS, 2), tiles['BP'])
    TAIL = _pow2(NS - BP, 1) if 0 < NS - BP <= tiles['TAIL'] else 0  # parts past BP loaded in the same step
    # the kernels' scratch in one allocation (host time: decode is host-bound): the value tiles' parts of the
    # score, the entry parts' max, sum and values, the block merge's ranks, and the state output where computed
    sizes = [NVT, NS, NS, NS * V, C] + ([] if state is None else [V])
    scratch = torch.empty(N, HV, sum(sizes), device=q.device).split(sizes, -1)
    part, pm, pl, pacc, rank = scratch[:5]
    rank = rank.view(torch.int32)
    if state is None:
        assert o_state.is_contiguous()
        step, S, beta, a, a_log, dt_bias, neg = 0, score.float().contiguous(), score, score, score, score, False
        s_strides = (0, 0, 0, 0)
    else:
        gdn = state['kind'] == 'gdn'
        step, S, beta = (1 if gdn else 2), state['S'], state['beta'].reshape(N, HV)
        o_state = scratch[5]  # the kernel's scratch: not `out`, read and written
        if S is None:  # no earlier token: the state is zero
            S = state['S'] = torch.zeros((N, HV, V, K) if gdn else (N, HV, K, V), device=q.device)
        s_strides = (S.stride(0), S.stride(1), S.stride(2), S.stride(3)) if gdn else \
            (S.stride(0), S.stride(1), S.stride(3), S.stride(2))
        a, a_log, dt_bias = ((state['a'].reshape(N, HV), state['A_log'], state['dt_bias']) if gdn else (beta,) * 3)
        neg = gdn and state['allow_neg_eigval']
    given = state is not None and score is not None
    if state is not None:
        score = score.float().contiguous() if given else beta  # beta: not read
    strides = (weight.stride(0), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    sps = (part.stride(1), o_state.stride(1))  # rows [N, HV] of the scratch and of the state output
    common = dict(G=HV // H, K=K, V=V, M=M, C=C, BK=_pow2(K), READ_BLOCK=read_block, STEP=step)
    # [N, HV] the heads' tickets, then [N] the sequences': zero between steps (the last program resets each)
    ticket = mem.get('ticket')
    if ticket is None or ticket.numel() != N * (HV + 1):
        ticket = mem['ticket'] = torch.zeros(N * (HV + 1), dtype=torch.int32, device=q.device)
    _decode_kernel[(N, HV, NVT + NS)](
        q, k, v, S, beta, a, a_log, dt_bias, mem['seen'], mem['cache_k'], mem['cache_v'], mem['cache_pos'],
        mem['block_k'], mem['block_v'], part, o_state, pm, pl, pacc, weight, score, out, mem['cache_score'],
        mem['block_score'], rank, ticket, *strides, *s_strides, *sps, 1e-6, eps, scale, NVT, NS, BV=BV,
        BVF=_pow2(V), E=E, BC=_pow2(C), BT=_pow2(NVT, 2), BP=BP, TAIL=TAIL, SHARED=shared,
        SURPRISE=eviction != 'recency', NEG=neg, GIVEN=given, **common, num_warps=tiles['num_warps'])
    return out
