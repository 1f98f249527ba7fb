"""Cache selection for every block of a prompt at once (no Python loop over blocks).

Candidates of one sequence and value head are the current cache entries, the current partial block and
the new tokens, each with a static score and an absolute position. With priority = (score desc,
position asc), the cache a query of block b reads is the top-M by priority among candidates in blocks
< b. Walking candidates in priority order, a candidate belongs to cache_b iff it lies in a block < b and
fewer than M earlier-priority candidates do: one cumulative sum per block column. Columns are handled
in chunks so memory stays O(candidates x chunk).
"""

from __future__ import annotations

import torch


def priority_order(score: torch.Tensor, pos: torch.Tensor, eviction: str) -> torch.Tensor:
    """[HV, N] candidate indices sorted by (key desc, position asc); empty candidates (pos < 0) last."""
    key = score.double() if eviction == 'surprise' else pos.double()
    key = torch.where(pos >= 0, key, float('-inf'))
    by_pos = torch.argsort(torch.where(pos >= 0, pos, torch.iinfo(torch.long).max), dim=-1, stable=True)
    order = torch.argsort(key.gather(-1, by_pos), dim=-1, descending=True, stable=True)
    return by_pos.gather(-1, order)


def select_caches(score: torch.Tensor, pos: torch.Tensor, blocks: torch.Tensor, M: int, C: int,
                  eviction: str = 'surprise', chunk: int = 128) -> torch.Tensor:
    """score, pos [HV, N]; blocks [B] block indices b. Returns idx [HV, B, M] (int64, -1 = empty):
    the candidates in the cache read by queries of block b, in priority order."""
    HV, N = score.shape
    out = torch.full((HV, len(blocks), M), -1, dtype=torch.long, device=score.device)
    if M == 0 or N == 0:
        return out
    order = priority_order(score, pos, eviction)                  # [HV, N]
    cand_block = torch.where(pos >= 0, pos // C, torch.iinfo(torch.long).max).gather(-1, order)  # [HV, N]
    for s in range(0, len(blocks), chunk):
        b = blocks[s:s + chunk]
        eligible = cand_block[:, :, None] < b[None, None, :]      # [HV, N, b]
        slot = eligible.int().cumsum(1) - 1                       # rank among eligible, in priority order
        h, r, col = torch.nonzero(eligible & (slot < M), as_tuple=True)  # members only: no colliding writes
        out[h, s + col, slot[h, r, col].long()] = order[h, r]
    return out
