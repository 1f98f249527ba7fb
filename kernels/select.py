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
        if eviction != 'recency':
            return torch.argsort(score, dim=-1, descending=True, stable=True)
        return torch.arange(score.shape[-1] - 1, -1, -1, device=score.device).expand(score.shape)
    if by_pos is None:
        by_pos = torch.argsort(torch.where(pos >= 0, pos, torch.iinfo(torch.long).max), dim=-1, stable=True)
    if eviction != 'recency':
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
    """Program (j, h): the members of the cache of block b0 + j, in priority order, then -1 up to M. NB: OUT's and
    CNT's head stride in blocks."""
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
    _walk(order, pos, out, cnt, b0, n_blocks, M, C)
    return out, cnt


def _walk(order, pos, out, cnt, b0, n_blocks, M, C):
    """The caches of blocks b0 .. b0 + n_blocks - 1 from the candidates' priority order, into out [HV, >= n_blocks,
    M] and cnt [HV, >= n_blocks] (row j: block b0 + j; views of larger buffers allowed)."""
    assert out.stride(1) == M and out.stride(2) == 1 and cnt.stride(0) * M == out.stride(0) and cnt.stride(1) == 1
    _select_kernel[(n_blocks, order.shape[0])](order, pos, out, cnt, order.stride(0), order.stride(1), order.shape[1],
                                               cnt.stride(0), b0, M, C, HAS_POS=pos is not order,
                                               BT=TILE, BM=128, num_warps=8)  # H100 A/Bs: docs/notes.md


@triton.jit
def _count_before(KEYS, base, s, lo, hi, STRICT: tl.constexpr, NIT: tl.constexpr, INDIRECT: tl.constexpr, SC,
                  s_sc):
    """For each key s: the number of entries of a non-increasing list in [lo, hi) that come before it, i.e. greater
    than s (STRICT) or at least s; binary search, NIT >= log2(hi - lo + 1) steps. The list is KEYS[base + i], or
    (INDIRECT) SC[KEYS[base + i] * s_sc] (scores of the positions KEYS holds)."""
    for _ in range(NIT):
        mid = (lo + hi) // 2
        go = lo < hi
        x = tl.load(KEYS + base + mid, mask=go, other=0)
        if INDIRECT:
            x = tl.load(SC + x * s_sc, mask=go, other=0.)
        before = (x > s) if STRICT else (x >= s)
        lo = tl.where(go & before, mid + 1, lo)
        hi = tl.where(go & (before == 0), mid, hi)
    return lo


SORT_CHUNK = 1024  # tokens a program of `sort_piece` sorts (tests set it smaller)


@triton.jit
def _key(score, index):
    """A token's sort key: score bits * 2^32 + 2^32 - 1 - index. Scores are norms (>= 0), so their float32 bits are
    ordered as they are, and of two equal scores the earlier token (smaller index) has the greater key."""
    return score.to(tl.int32, bitcast=True).to(tl.int64) * 4294967296 + (4294967295 - index.to(tl.int64))


@triton.jit
def _chunk_sort_kernel(SC, KS, s_sc, s_ks, start, L, SCH: tl.constexpr):
    """Program (c, h): the write scores of tokens start + c SCH ... (SCH of them; fewer in the last chunk) of value
    head h as keys (`_key`, index within the piece), sorted descending into KS[h * s_ks + c SCH ...]; -1 (below every
    key) past the piece's end."""
    c, h = tl.program_id(0), tl.program_id(1)
    i = c * SCH + tl.arange(0, SCH)
    m = i < L
    key = tl.where(m, _key(tl.load(SC + (start + i) * s_sc + h, mask=m, other=0.), i), -1)
    tl.store(KS + h * s_ks + c * SCH + tl.arange(0, SCH), tl.sort(key, descending=True))


def sort_piece(score: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The write scores of tokens [start, end) (score [L, HV] float32) as `_chunk_sort_kernel`'s keys, sorted in
    chunks of SORT_CHUNK tokens: [HV, NCH * SORT_CHUNK], NCH a power of two (`select_piece`'s `new_sorted`,
    independent of the pieces before)."""
    HV = score.shape[1]
    n = max(1, triton.next_power_of_2(triton.cdiv(end - start, SORT_CHUNK)))
    keys = torch.empty(HV, n * SORT_CHUNK, dtype=torch.int64, device=score.device)
    _chunk_sort_kernel[(n, HV)](score, keys, score.stride(0), keys.stride(0), start, end - start, SCH=SORT_CHUNK)
    return keys


@triton.jit
def _rank_kernel(CAR, CCNT, SC, KS, OUT, s_car, s_cnt, s_sc, s_ks, start, L, M, BT: tl.constexpr,
                 SCH: tl.constexpr, NCH: tl.constexpr, NIT_C: tl.constexpr, NIT_M: tl.constexpr):
    """Program (t, h): entries [t BT, t BT + BT) of [carried (M), the new tokens' keys (NCH sorted chunks of SCH,
    `_chunk_sort_kernel`)] of value head h, each written to its rank in priority order (score desc, position asc)
    in OUT [HV, M + L] as its position (-1 for empty carried slots, last). CAR [HV, M] (head stride s_car): the
    carried positions in priority order, CCNT[h * s_cnt] of them valid; SC: scores (position p, head h at
    SC[p * s_sc + h]). A new token's rank: the new keys above its own (a binary search in every chunk) plus the
    carried scores at least its own (every carried token precedes every new one); a carried token's: its own index
    plus the new scores above its own."""
    t, h = tl.program_id(0), tl.program_id(1)
    e = t * BT + tl.arange(0, BT)
    nc = tl.load(CCNT + h * s_cnt, mask=M > 0, other=0)
    valid = (e < M) & (e < nc)
    slot = e - M
    new_slot = (e >= M) & (slot < NCH * SCH)
    key = tl.load(KS + h * s_ks + tl.where(new_slot, slot, 0), mask=new_slot, other=-1)
    new = key >= 0
    cp = tl.load(CAR + h * s_car + tl.where(valid, e, 0), mask=valid, other=0)
    # a carried score as the key of index 0: the new keys above it are the new scores greater than it
    key = tl.where(valid, _key(tl.load(SC + cp * s_sc + h, mask=valid, other=0.), e * 0), key)
    zero = tl.zeros([BT, NCH], dtype=tl.int32)
    base = h * s_ks + tl.arange(0, NCH)[None, :] * SCH
    n_new = tl.sum(_count_before(KS, base, key[:, None], zero, zero + SCH, True, NIT_C, False, SC, 0), 1)
    score = (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    zero1 = tl.zeros([BT], dtype=tl.int32)
    n_car = _count_before(CAR, h * s_car, score, zero1, zero1 + nc, False, NIT_M, True, SC + h, s_sc)
    rank = tl.where(valid, e + n_new, tl.where(new, n_new + n_car, L + e))
    pos = tl.where(valid, cp, tl.where(new, (4294967295 - (key & 4294967295)) + start, -1))
    tl.store(OUT + h * (M + L) + rank, pos.to(tl.int32), mask=valid | new | ((e >= nc) & (e < M)))


def select_piece(score: torch.Tensor, start: int, end: int, C: int, idx: torch.Tensor, cnt: torch.Tensor,
                 eviction: str = 'surprise', new_sorted: torch.Tensor | None = None) -> None:
    """The caches of a fresh prompt's blocks start // C .. end // C (start a multiple of C), chosen among its tokens
    [0, end), into those rows of idx [HV, NB, M] (token indices, -1 empty) and cnt [HV, NB], as `select_caches` with
    pos=None lays them out. score [L, HV]: the prompt's write scores (rows < end are read). The tokens before start
    enter through idx's row of block start // C, their top-M from the call for the piece before: top-M(A + B) =
    top-M(top-M(A) + B), so a prompt can be selected piece by piece, each piece as soon as its scores exist.
    new_sorted: `sort_piece(score, start, end)` if already computed (surprise eviction)."""
    HV, NB, M = idx.shape
    b0, n = start // C, end // C - start // C + 1
    if M == 0:
        cnt[:, b0:b0 + n] = 0
        return
    L, MC = end - start, (M if start else 0)  # carried candidates: none for the first piece
    # the candidates, in priority order, as positions: the carried top-M merged with the new tokens
    if eviction != 'recency':
        keys = new_sorted if new_sorted is not None else sort_piece(score, start, end)
        merged = torch.empty(HV, MC + L, dtype=torch.int32, device=idx.device)
        BT = 128
        _rank_kernel[(triton.cdiv(MC + keys.shape[1], BT), HV)](
            idx[:, b0], cnt[:, b0], score, keys, merged, idx.stride(0), cnt.stride(0), score.stride(0),
            keys.stride(0), start, L, MC, BT=BT, SCH=SORT_CHUNK, NCH=keys.shape[1] // SORT_CHUNK,
            NIT_C=SORT_CHUNK.bit_length(), NIT_M=M.bit_length() + 1)
    else:  # recency: the new tokens latest first, then the carried ones (latest first, empty slots last)
        merged = torch.arange(end - 1, start - 1, -1, device=idx.device, dtype=torch.int32).expand(HV, -1)
        if start:
            merged = torch.cat([merged, idx[:, b0]], 1)
    _walk(merged, merged, idx[:, b0:], cnt[:, b0:], b0, n, M, C)
