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

BIG = 2**30  # block index of an empty candidate: never eligible


def priority_order(score: torch.Tensor, pos: torch.Tensor, eviction: str,
                   by_pos: torch.Tensor | None = None) -> torch.Tensor:
    """[HV, N] candidate indices sorted by (key desc, position asc); empty candidates (pos < 0) last.

    Candidates are put in position order first (`by_pos`, when the caller knows it), then a stable
    descending sort by the key keeps the earlier token first among ties."""
    if by_pos is None:
        by_pos = torch.argsort(torch.where(pos >= 0, pos, torch.iinfo(torch.long).max), dim=-1, stable=True)
    if eviction == 'surprise':
        key = torch.where(pos >= 0, score.float(), float('-inf'))
    else:
        key = pos
    order = torch.argsort(key.gather(-1, by_pos), dim=-1, descending=True, stable=True)
    return by_pos.gather(-1, order)


@triton.jit
def _select_kernel(BLK, ORD, BLOCKS, OUT, CNT, N, NB, M, BT: tl.constexpr):
    j, h = tl.program_id(0), tl.program_id(1)
    b = tl.load(BLOCKS + j)
    cnt = tl.program_id(0) * 0
    t = tl.program_id(0) * 0
    while (cnt < M) & (t < N):
        r = t + tl.arange(0, BT)
        el = tl.load(BLK + h * N + r, mask=r < N, other=2**30) < b
        slot = cnt + tl.cumsum(el.to(tl.int32), 0) - 1
        keep = el & (slot < M)
        tl.store(OUT + (h * NB + j) * M + slot, tl.load(ORD + h * N + r, mask=keep, other=-1), mask=keep)
        cnt += tl.sum(el.to(tl.int32), 0)
        t += BT
    tl.store(CNT + h * NB + j, tl.minimum(cnt, M))


def select_caches(score: torch.Tensor, pos: torch.Tensor, blocks: torch.Tensor, M: int, C: int,
                  eviction: str = 'surprise', by_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """score, pos [HV, N]; blocks [B] block indices b. Returns idx [HV, B, M] (int32, -1 = empty): the
    candidates in the cache read by queries of block b, in priority order, and their count [HV, B].
    `by_pos` [HV, N]: the candidates in position order, if known (saves a sort)."""
    HV, N = score.shape
    out = torch.full((HV, len(blocks), M), -1, dtype=torch.int32, device=score.device)
    cnt = torch.zeros(HV, len(blocks), dtype=torch.int32, device=score.device)
    if M == 0 or N == 0 or len(blocks) == 0:
        return out, cnt
    order = priority_order(score, pos, eviction, by_pos)                # [HV, N]
    blk = torch.where(pos >= 0, pos // C, BIG).gather(-1, order)
    _select_kernel[(len(blocks), HV)](blk.to(torch.int32).contiguous(), order.to(torch.int32).contiguous(),
                                      blocks.to(torch.int32).contiguous(), out, cnt, N, len(blocks), M, BT=512)
    return out, cnt
