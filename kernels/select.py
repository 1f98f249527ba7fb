"""Cache selection for every block of a prompt at once (no Python loop over blocks), as one Triton kernel.

Candidates of one sequence and value head are the current cache entries, the current partial block and
the new tokens, each with a static score and an absolute position. With priority = (score desc,
position asc), the cache a query of block b reads is the top-M by priority among candidates in blocks
< b. Walking candidates in priority order, a candidate belongs to cache_b iff it lies in a block < b and
fewer than M earlier-priority candidates do. One program per (block, value head) walks the sorted list
with a running count (a prefix sum per tile) and stops once M members are found.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def priority_order(score: torch.Tensor, pos: torch.Tensor | None, eviction: str,
                   by_pos: torch.Tensor | None = None) -> torch.Tensor:
    """[HV, N] candidate indices sorted by (key desc, position asc); empty candidates (pos < 0) last.

    pos=None: candidate i is at position i (a fresh prompt): one sort. Otherwise candidates are put in
    position order first (`by_pos`, when the caller knows it), then a stable descending sort by the key
    keeps the earlier token first among ties."""
    if pos is None:
        if eviction == 'surprise':
            return torch.argsort(score, dim=-1, descending=True, stable=True)
        return torch.arange(score.shape[-1] - 1, -1, -1, device=score.device).expand(score.shape)
    if by_pos is None:
        by_pos = torch.argsort(torch.where(pos >= 0, pos, torch.iinfo(torch.long).max), dim=-1, stable=True)
    if eviction == 'surprise':
        key = torch.where(pos >= 0, score.float(), float('-inf'))
    else:
        key = pos
    order = torch.argsort(key.gather(-1, by_pos), dim=-1, descending=True, stable=True)
    return by_pos.gather(-1, order)


@triton.jit
def _positions(POS, h, o, r, N, HAS_POS: tl.constexpr):
    """The positions of candidates o (sorted entries r of head h)."""
    if HAS_POS:
        return tl.load(POS + h * N + o, mask=r < N, other=-1)
    return o


TILE = 2048  # sorted entries per step of the walk (tests set it smaller)


@triton.jit
def _select_kernel(ORD, POS, OUT, CNT, s_oh, s_on, N, NB, b0, M, C, HAS_POS: tl.constexpr, BT: tl.constexpr,
                   BM: tl.constexpr):
    """Program (j, h): the members of the cache of block b0 + j, in priority order, then -1 up to M."""
    j, h = tl.program_id(0), tl.program_id(1)
    b = b0 + j
    cnt = tl.program_id(0) * 0
    t = tl.program_id(0) * 0
    r = tl.arange(0, BT)
    o = tl.load(ORD + h * s_oh + r * s_on, mask=r < N, other=0)
    p = _positions(POS, h, o, r, N, HAS_POS)
    while (cnt < M) & (t < N):
        rn = r + BT  # the next tile's load in flight while this one is counted
        o_next = tl.load(ORD + h * s_oh + rn * s_on, mask=rn < N, other=0)
        el = (r < N) & (p >= 0) & (p < b * C)
        slot = cnt + tl.cumsum(el.to(tl.int32), 0) - 1
        keep = el & (slot < M)
        tl.store(OUT + (h * NB + j) * M + slot, o.to(tl.int32), mask=keep)
        cnt += tl.sum(el.to(tl.int32), 0)
        t += BT
        r, o = rn, o_next
        p = _positions(POS, h, o, r, N, HAS_POS)
    cnt = tl.minimum(cnt, M)
    tl.store(CNT + h * NB + j, cnt)
    for s in range(0, M, BM):  # the empty slots
        rs = s + tl.arange(0, BM)
        tl.store(OUT + (h * NB + j) * M + rs, tl.full([BM], -1, tl.int32), mask=(rs >= cnt) & (rs < M))


def select_caches(score: torch.Tensor, pos: torch.Tensor | None, b0: int, n_blocks: int, M: int, C: int,
                  eviction: str = 'surprise', by_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """score [HV, N]; pos [HV, N] absolute positions (-1: empty), or None for candidate i at position i.
    Returns idx [HV, n_blocks, M] (int32, -1 = empty): the candidates in the cache read by queries of block
    b0 + j, in priority order, and their count [HV, n_blocks]. `by_pos` [HV, N]: the candidates in position
    order, if known (saves a sort)."""
    HV, N = score.shape
    out = torch.empty(HV, n_blocks, M, dtype=torch.int32, device=score.device)
    cnt = torch.empty(HV, n_blocks, dtype=torch.int32, device=score.device)
    if M == 0 or n_blocks == 0:
        return out, cnt.zero_()
    order = priority_order(score, pos, eviction, by_pos)                # [HV, N]
    pos = pos.contiguous() if pos is not None else order
    _select_kernel[(n_blocks, HV)](order, pos, out, cnt, order.stride(0), order.stride(1), N, n_blocks, b0, M, C,
                                   HAS_POS=pos is not order, BT=TILE, BM=128, num_warps=8)  # H100 A/Bs: docs/notes.md
    return out, cnt
