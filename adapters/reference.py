"""The plain PyTorch reference of the exact memory: the specification every fast path is tested against.

Per layer and value head, for one sequence:

- every token t gets a static write score, computed once: m_t = ||beta_t * e_t|| (surprise), or
  m_t = 1 - max_j cos(k_t, k_j) over the W tokens before t (novelty, `novelty_scores`), or its position (recency);
- the cache holds the M tokens with the largest score among all tokens of *completed* blocks of C tokens;
  ties keep the earlier token; the cache merges with a block when the block ends;
- a query reads, with the decoupled RMSNorm-gamma attention, the cache, the earlier tokens of its own
  block and itself (if `read_block`), and one sink;
- the read is combined with the state output o_state = scale * S_t^T q_t:
    'shared': w = softmax([sink, l_1..l_E]);  o = w_0 * o_state + scale * sum_j w_j v_j
    'gated' : w = softmax([sink, l_1..l_E]);  o = o_state + sigmoid(gate) * scale * sum_j w_j v_j
  with l_j = (gq * rms(q)) . (gk * rms(k_j)) / sqrt(d_k), q and k the unit-L2 vectors of the state path.

A memory state is a dict of tensors with the sequence index first, so fla's Cache can reorder,
repeat and offload it like its own state.
"""

from __future__ import annotations

import math
import os

import torch

from .config import MemoryConfig


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def empty_memory(n: int, hv: int, k: int, v: int, cfg: MemoryConfig, dtype: torch.dtype,
                 device: torch.device, init: bool = True) -> dict[str, torch.Tensor]:
    """The memory of n sequences before their first token. init=False: left uninitialised (no fill kernels), for
    a caller whose first write covers every slot: the fused prefill of a fresh prompt of at least one block per
    sequence. Under HOLA_POISON=1 (tests) those tensors start as NaN / 7 instead, so a slot left unwritten shows."""
    M, C = cfg.cache_size, cfg.block_size

    def new(shape, value, dt=dtype):
        if init:
            return torch.full(shape, value, dtype=dt, device=device)
        if os.environ.get('HOLA_POISON') == '1':
            return torch.full(shape, float('nan') if dt.is_floating_point else 7, dtype=dt, device=device)
        return torch.empty(shape, dtype=dt, device=device)

    mem = {
        'cache_k': new((n, hv, M, k), 0),
        'cache_v': new((n, hv, M, v), 0),
        'cache_score': new((n, hv, M), float('-inf'), torch.float32),
        'cache_pos': new((n, hv, M), -1, torch.long),
        'block_k': new((n, hv, C, k), 0),
        'block_v': new((n, hv, C, v), 0),
        'block_score': new((n, hv, C), float('-inf'), torch.float32),
        'seen': new((n,), 0, torch.long),
    }
    if cfg.eviction == 'novelty':  # the last W keys (key p in slot p % W); zeros before the sequence starts
        mem['recent_k'] = torch.zeros(n, hv, cfg.novelty_window, k, dtype=dtype, device=device)
    return mem


def memory_nbytes(mem: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in mem.values())


def store_cache(mem: dict, n: int, cand: dict[str, torch.Tensor], sel: torch.Tensor) -> None:
    """Write the candidates `sel` [HV, M] (-1: leave the slot empty) into the cache of sequence n.
    `cand` holds candidate tensors under the cache's keys: cache_k/cache_v [HV, N, D], cache_score/cache_pos [HV, N]."""
    ok, idx = sel >= 0, sel.clamp_min(0)
    for key, empty in (('cache_k', 0), ('cache_v', 0), ('cache_score', float('-inf')), ('cache_pos', -1)):
        t = cand[key]
        if t.dim() == 3:
            mem[key][n] = torch.where(ok[..., None], t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1])), empty)
        else:
            mem[key][n] = torch.where(ok, t.gather(1, idx), empty)


def merge(mem: dict, n: int, cfg: MemoryConfig) -> None:
    """Merge the full block of sequence n into its cache: keep the top-M by (score desc, position asc)."""
    M, C = cfg.cache_size, cfg.block_size
    start = int(mem['seen'][n]) - C  # position of the block's first token
    if M == 0:
        return
    hv = mem['cache_k'].shape[1]
    block_pos = torch.arange(start, start + C, device=mem['cache_pos'].device).expand(hv, C)
    cand = {'cache_k': torch.cat([mem['cache_k'][n], mem['block_k'][n]], 1),
            'cache_v': torch.cat([mem['cache_v'][n], mem['block_v'][n]], 1),
            'cache_score': torch.cat([mem['cache_score'][n], mem['block_score'][n]], 1),
            'cache_pos': torch.cat([mem['cache_pos'][n], block_pos], 1)}
    cand_s, cand_p = cand['cache_score'], cand['cache_pos']
    key = cand_s if cfg.eviction != 'recency' else torch.where(cand_p >= 0, cand_p.double(), float('-inf'))
    by_pos = torch.argsort(cand_p, dim=1, stable=True)
    order = torch.argsort(key.gather(1, by_pos), dim=1, descending=True, stable=True)[:, :M]
    store_cache(mem, n, cand, by_pos.gather(1, order))


def novelty_scores(mem: dict, n: int, k: torch.Tensor, seen: int, rows: int = 1024) -> torch.Tensor:
    """The 'novelty' write scores of L new tokens of sequence n at positions seen, seen + 1, ...: m_t = 1 - max_j
    cos(k_t, k_j) over the W = novelty_window tokens before t, where positions before the sequence's start hold zero
    keys (cos 0). k [L, HV, K] unit-L2. Keys are compared as the memory stores them (its dtype), so any split of a
    sequence gives the same scores. Updates mem['recent_k'][n] [HV, W, K] (key p in slot p % W); returns [L, HV]
    float32. `rows`: queries per matrix product (memory)."""
    ring = mem['recent_k'][n]
    HV, W, _ = ring.shape
    L = k.shape[0]
    new = k.transpose(0, 1).to(ring.dtype)                                          # [HV, L, K]
    keys = torch.cat([ring[:, torch.arange(seen - W, seen, device=ring.device) % W], new], 1).float()
    out = torch.empty(L, HV, dtype=torch.float32, device=k.device)
    for i0 in range(0, L, rows):                     # key j of `keys` is position seen - W + j: token i sees j in [i, i + W)
        i1 = min(L, i0 + rows)
        cos = new[:, i0:i1].float() @ keys[:, i0:i1 + W].transpose(-1, -2)             # [HV, l, W + l]
        d = torch.arange(i0, i1 + W, device=k.device)[None, :] - torch.arange(i0, i1, device=k.device)[:, None]
        out[i0:i1] = (1 - cos.masked_fill((d < 0) | (d >= W), float('-inf')).amax(-1)).transpose(0, 1)
    last = min(L, W)
    ring[:, torch.arange(seen + L - last, seen + L, device=ring.device) % W] = new[:, L - last:]
    return out


def novelty_step(mem: dict, k: torch.Tensor) -> torch.Tensor:
    """`novelty_scores` for one token of every sequence, without a host sync: k [N, HV, K] unit-L2, the positions
    are mem['seen']. Returns [N, HV] float32."""
    ring = mem['recent_k']
    W = ring.shape[2]
    new = k.to(ring.dtype)
    score = 1 - torch.einsum('nhwk,nhk->nhw', ring.float(), new.float()).amax(-1)
    slot = (mem['seen'] % W)[:, None, None, None].expand(-1, ring.shape[1], 1, ring.shape[3])
    ring.scatter_(2, slot, new[:, :, None])
    return score


def read_combine(q: torch.Tensor, ek: torch.Tensor, ev: torch.Tensor, valid: torch.Tensor,
                 o_state: torch.Tensor, params: dict, cfg: MemoryConfig, scale: float) -> torch.Tensor:
    """q [L, HV, K] unit; entries ek [HV, E, K], ev [HV, E, V]; valid [HV or 1, L, E]; o_state [L, HV, V].
    Returns the combined output [L, HV, V] in float32."""
    d = q.shape[-1]
    qt = rms(q, cfg.norm_eps) * params['q_gamma'].float()             # [L, HV, K]
    kt = rms(ek, cfg.norm_eps) * params['k_gamma'].float()[:, None]   # [HV, E, K]
    logits = torch.einsum('lhk,hek->hle', qt, kt) / math.sqrt(d)
    logits = logits.masked_fill(~valid, float('-inf'))
    sink = params['sink'].float()[:, None, None].expand(-1, q.shape[0], 1)
    w = torch.softmax(torch.cat([sink, logits], -1), -1)
    read = torch.einsum('hle,hev->lhv', w[..., 1:], ev.float()) * scale
    if cfg.read_rule == 'shared':
        return w[..., 0].transpose(0, 1)[..., None] * o_state.float() + read
    return o_state.float() + torch.sigmoid(params['gate'].float())[None, :, None] * read


def memory_forward(mem: dict, n: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   score: torch.Tensor, o_state: torch.Tensor, params: dict, cfg: MemoryConfig,
                   scale: float) -> torch.Tensor:
    """Feed L new tokens of sequence n through its memory, in place; return the combined output.

    q, k [L, HV, K] (unit-L2, already expanded to value heads), v [L, HV, V], score [L, HV],
    o_state [L, HV, V]. Prefill and decode both call this: the result depends only on absolute
    positions and static scores, so any split of the input gives the same cache and outputs."""
    C = cfg.block_size
    L = q.shape[0]
    out = torch.empty(L, *o_state.shape[1:], dtype=torch.float32, device=o_state.device)
    i = 0
    while i < L:
        fill = int(mem['seen'][n]) % C
        seg = min(C - fill, L - i)
        sl = slice(i, i + seg)
        kk, vv = k[sl].transpose(0, 1).to(mem['block_k'].dtype), v[sl].transpose(0, 1).to(mem['block_v'].dtype)
        parts_k, parts_v, parts_m = [], [], []
        cache_valid = mem['cache_pos'][n] >= 0                                  # [HV, M]
        parts_k.append(mem['cache_k'][n]), parts_v.append(mem['cache_v'][n])
        parts_m.append(cache_valid[:, None, :].expand(-1, seg, -1))
        if cfg.read_block:
            hv = kk.shape[0]
            parts_k += [mem['block_k'][n, :, :fill], kk]
            parts_v += [mem['block_v'][n, :, :fill], vv]
            causal = torch.ones(seg, seg, dtype=torch.bool, device=q.device).tril()
            parts_m += [torch.ones(hv, seg, fill, dtype=torch.bool, device=q.device),
                        causal[None].expand(hv, -1, -1)]
        out[sl] = read_combine(q[sl], torch.cat(parts_k, 1), torch.cat(parts_v, 1), torch.cat(parts_m, 2),
                               o_state[sl], params, cfg, scale)
        mem['block_k'][n, :, fill:fill + seg] = kk.detach()  # the memory holds values, never a graph
        mem['block_v'][n, :, fill:fill + seg] = vv.detach()
        s = score[sl].transpose(0, 1).float()
        mem['block_score'][n, :, fill:fill + seg] = s
        mem['seen'][n] += seg
        if fill + seg == C:
            merge(mem, n, cfg)
            mem['block_score'][n] = float('-inf')
        i += seg
    return out


def delta_rule_with_score(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                          log_alpha: torch.Tensor | None, scale: float,
                          state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (gated) delta rule of one sequence, step by step, in float32, with the write score.

    q, k [T, HV, K] unit-L2; v [T, HV, V]; beta [T, HV]; log_alpha [T, HV] or None (DeltaNet);
    state [HV, K, V] or None. Returns o [T, HV, V], score m_t = ||beta_t e_t|| [T, HV], final state."""
    T, HV, K = k.shape
    V = v.shape[-1]
    S = torch.zeros(HV, K, V, dtype=torch.float32, device=v.device) if state is None else state.float().clone()
    q, k, v, beta = q.float(), k.float(), v.float(), beta.float()
    o = torch.empty(T, HV, V, dtype=torch.float32, device=v.device)
    m = torch.empty(T, HV, dtype=torch.float32, device=v.device)
    for t in range(T):
        if log_alpha is not None:
            S = S * log_alpha[t].float().exp()[:, None, None]
        u = beta[t][:, None] * (v[t] - torch.einsum('hkv,hk->hv', S, k[t]))
        S = S + k[t][:, :, None] * u[:, None, :]
        o[t] = scale * torch.einsum('hkv,hk->hv', S, q[t])
        m[t] = u.norm(dim=-1)
    return o, m, S


def chunk_delta_rule_with_score(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                                log_alpha: torch.Tensor | None, scale: float, state: torch.Tensor | None,
                                chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`delta_rule_with_score` computed chunk by chunk (same arguments and results, float32): the CPU fast path.

    Within a chunk with cumulative log-decays c_t and starting state S0, the corrections u_t = beta_t e_t solve
    the unit lower-triangular system (I + A) U = beta V - diag(beta e^c) K S0, A_tj = beta_t e^(c_t - c_j) k_t.k_j
    (j < t); then o_t = scale (e^(c_t) S0^T q_t + sum_{j<=t} e^(c_t - c_j) (q_t.k_j) u_j) and
    S_end = e^(c_end) S0 + sum_j e^(c_end - c_j) k_j u_j^T. One Python step per chunk instead of per token."""
    T, HV, K = k.shape
    V = v.shape[-1]
    S = torch.zeros(HV, K, V, dtype=torch.float32, device=v.device) if state is None else state.float().clone()
    pad = -T % chunk
    q, k, v, beta = (torch.nn.functional.pad(t.float().transpose(0, 1), (0, 0, 0, pad) if t.dim() == 3 else (0, pad))
                     for t in (q, k, v, beta))                                  # [HV, T', D] / [HV, T']
    g = (torch.zeros_like(beta) if log_alpha is None
         else torch.nn.functional.pad(log_alpha.float().transpose(0, 1), (0, pad)))
    n = q.shape[1] // chunk
    q, k, v = (t.reshape(HV, n, chunk, -1) for t in (q, k, v))
    beta, c = beta.reshape(HV, n, chunk), g.reshape(HV, n, chunk).cumsum(-1)
    decay = (c[..., :, None] - c[..., None, :]).tril().exp().tril()          # e^(c_t - c_j), j <= t
    strict = torch.ones(chunk, chunk, dtype=torch.bool, device=v.device).tril(-1)
    A = (beta[..., None] * decay * (k @ k.transpose(-1, -2))).masked_fill(~strict, 0)
    eye = torch.eye(chunk, device=v.device)
    solve = lambda rhs: torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)  # noqa: E731
    u0, w = solve(beta[..., None] * v), solve((beta * c.exp())[..., None] * k)
    qk = q @ k.transpose(-1, -2) * decay
    o = torch.empty(HV, n, chunk, V, dtype=torch.float32, device=v.device)
    m = torch.empty(HV, n, chunk, dtype=torch.float32, device=v.device)
    for i in range(n):
        u = u0[:, i] - w[:, i] @ S                                             # [HV, C, V]
        o[:, i] = scale * ((q[:, i] * c[:, i, :, None].exp()) @ S + qk[:, i] @ u)
        m[:, i] = u.norm(dim=-1)
        last = c[:, i, -1]
        S = S * last.exp()[:, None, None] + (k[:, i] * (last[:, None] - c[:, i]).exp()[..., None]).transpose(-1, -2) @ u
    o = o.reshape(HV, n * chunk, V)[:, :T].transpose(0, 1)
    return o, m.reshape(HV, n * chunk)[:, :T].transpose(0, 1), S
