"""The write side of the memory on the GPU: the write score from the state path, and the memory state a
prompt leaves behind (the cache at its last block boundary and the trailing partial block), each one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_norm_kernel(X, OUT, R, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.arange(0, BD)
    x = tl.load(X + r[:, None] * D + c[None, :], mask=(r < R)[:, None] & (c < D)[None, :], other=0.).to(tl.float32)
    tl.store(OUT + r, tl.sqrt(tl.sum(x * x, 1)), mask=r < R)


def row_norm(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """||x|| over the last dimension in float32, one pass over x (the write score m = ||beta e|| from fla's
    v_new = beta e), into `out` (contiguous, x.shape[:-1]) if given. torch.linalg.vector_norm(dtype=float32) first
    casts the whole tensor."""
    x = x.contiguous()
    D = x.shape[-1]
    if out is None:
        out = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    assert out.shape == x.shape[:-1] and out.is_contiguous() and out.dtype == torch.float32
    R = out.numel()
    BD = triton.next_power_of_2(D)
    BR = max(1, 4096 // BD)
    _row_norm_kernel[(triton.cdiv(R, BR),)](x, out, R, D=D, BR=BR, BD=BD)
    return out


@triton.jit
def _store_kernel(IDX, KO, VO, SO, PO, KN, VN, SN, CK, CV, CS, CP, BKT, BVL, BS, SEEN,
                  s_idx, NO, s_old, M, L, seen0, seen1, start, first, fill1, NCB, sk_t, sk_h, sv_t, sv_h, ss_t, ss_h,
                  G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, BR: tl.constexpr, RESET: tl.constexpr):
    """Program (p, h). p < NCB: cache rows [p BR, p BR + BR) take the candidates IDX[h] (-1: empty; index < NO:
    earlier candidate, else new token index - NO). Otherwise: block slots [start, fill1) take new tokens
    first, first + 1, ...; with RESET (a block ended) the scores of slots >= fill1 are cleared."""
    p, h = tl.program_id(0), tl.program_id(1)
    hk = h // G
    rk = tl.arange(0, BK)
    mk = rk < K
    rv = tl.arange(0, BV)
    mv = rv < V
    if p < NCB:
        r = p * BR + tl.arange(0, BR)
        mr = r < M
        src = tl.load(IDX + h * s_idx + r, mask=mr, other=-1).to(tl.int32)
        old = mr & (src >= 0) & (src < NO)
        new = mr & (src >= NO)
        t = src - NO
        ko = tl.load(KO + (h * NO + src[:, None]) * K + rk[None, :], mask=old[:, None] & mk[None, :], other=0.)
        kn = tl.load(KN + t[:, None] * sk_t + hk * sk_h + rk[None, :], mask=new[:, None] & mk[None, :],
                     other=0.).to(tl.float32)
        kn = kn * tl.rsqrt(tl.sum(kn * kn, 1) + 1e-6)[:, None]
        k = tl.where(new[:, None], kn, ko.to(tl.float32))
        vo = tl.load(VO + (h * NO + src[:, None]) * V + rv[None, :], mask=old[:, None] & mv[None, :], other=0.)
        vn = tl.load(VN + t[:, None] * sv_t + h * sv_h + rv[None, :], mask=new[:, None] & mv[None, :], other=0.)
        v = tl.where(new[:, None], vn.to(tl.float32), vo.to(tl.float32))
        s = tl.where(new, tl.load(SN + t * ss_t + h * ss_h, mask=new, other=0.),
                     tl.load(SO + h * s_old + src, mask=old, other=float('-inf')))
        pos = tl.where(new, seen0 + t, tl.load(PO + h * s_old + src, mask=old, other=-1))
        tl.store(CK + (h * M + r[:, None]) * K + rk[None, :], k.to(CK.dtype.element_ty), mask=mr[:, None] & mk[None, :])
        tl.store(CV + (h * M + r[:, None]) * V + rv[None, :], v.to(CV.dtype.element_ty), mask=mr[:, None] & mv[None, :])
        tl.store(CS + h * M + r, s, mask=mr)
        tl.store(CP + h * M + r, pos.to(tl.int64), mask=mr)
    else:
        r = (p - NCB) * BR + tl.arange(0, BR)
        w = (r >= start) & (r < fill1)
        ws = w
        if RESET:  # a block ended: the slots after fill1 are cleared
            ws = w | ((r >= fill1) & (r < C))
        t = first + r - start
        k = tl.load(KN + t[:, None] * sk_t + hk * sk_h + rk[None, :], mask=w[:, None] & mk[None, :], other=0.)
        k = k.to(tl.float32)
        k = k * tl.rsqrt(tl.sum(k * k, 1) + 1e-6)[:, None]
        v = tl.load(VN + t[:, None] * sv_t + h * sv_h + rv[None, :], mask=w[:, None] & mv[None, :], other=0.)
        v = v.to(tl.float32)
        tl.store(BKT + (h * C + r[:, None]) * K + rk[None, :], k.to(BKT.dtype.element_ty),
                 mask=ws[:, None] & mk[None, :])
        tl.store(BVL + (h * C + r[:, None]) * V + rv[None, :], v.to(BVL.dtype.element_ty),
                 mask=ws[:, None] & mv[None, :])
        s = tl.load(SN + t * ss_t + h * ss_h, mask=w, other=float('-inf'))
        tl.store(BS + h * C + r, s, mask=ws)
    if (p == 0) & (h == 0):
        tl.store(SEEN, seen1)


def store_state(mem: dict, n: int, idx: torch.Tensor | None, k_old, v_old, s_old, p_old, k, v, score,
                seen0: int) -> None:
    """The memory state of sequence n after L new tokens (positions seen0 ..): the cache of the last block
    boundary crossed, from the selection row idx [HV, M] (None: no boundary crossed), and the trailing partial
    block; then seen. Earlier candidates: k_old/v_old [HV, NO, D], their scores and positions s_old/p_old
    [HV, >= NO] (row-strided); new tokens: raw keys k [L, H, K], values v [L, HV, V], scores [L, HV]."""
    HV, M, K = mem['cache_k'].shape[1:]
    C, V = mem['block_k'].shape[2], mem['cache_v'].shape[3]
    L, NO = k.shape[0], k_old.shape[1]
    seen1 = seen0 + L
    b0, b1, fill1 = seen0 // C, seen1 // C, seen1 % C
    start = 0 if b1 > b0 else seen0 % C       # buffer slots [start, fill1) take the last fill1 - start tokens
    BR = 16
    ncb = triton.cdiv(M, BR) if (idx is not None and M) else 0
    _store_kernel[(ncb + triton.cdiv(C, BR), HV)](
        idx if idx is not None else torch.empty(0, dtype=torch.int32, device=k.device), k_old, v_old, s_old, p_old, k, v, score,
        mem['cache_k'][n], mem['cache_v'][n], mem['cache_score'][n], mem['cache_pos'][n],
        mem['block_k'][n], mem['block_v'][n], mem['block_score'][n], mem['seen'][n:],
        idx.stride(0) if idx is not None else 0, NO, s_old.stride(0), M, L, seen0, seen1, start, L - (fill1 - start), fill1, ncb,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), score.stride(0), score.stride(1),
        G=HV // k.shape[1], K=K, V=V, C=C, BK=triton.next_power_of_2(K), BV=triton.next_power_of_2(V), BR=BR,
        RESET=b1 > b0)
