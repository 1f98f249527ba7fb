"""The memory's fused path: same inputs, outputs and memory state as `adapters/reference.memory_forward`,
computed with the selection of `select.py` and the Triton reads of `read.py`.

Used without autograd on CUDA tensors (and on CPU tensors when HOLA_KERNELS=1 under TRITON_INTERPRET=1,
which is how CI tests it). With autograd on (calibration), the PyTorch reference runs instead: it is
differentiable in the memory parameters, the kernels are not.
"""

from __future__ import annotations

import os

import torch

from ..adapters.fallbacks import l2_normalize
from ..adapters.reference import store_cache
from .select import select_caches


def kernels_enabled(t: torch.Tensor) -> bool:
    mode = os.environ.get('HOLA_KERNELS', 'auto')
    if mode == '0' or torch.is_grad_enabled():
        return False
    if t.is_cuda:
        return True
    return mode == '1' and os.environ.get('TRITON_INTERPRET', '0') == '1'


def unit_keys(k: torch.Tensor, rows: torch.Tensor, hv: int) -> torch.Tensor:
    """Unit-L2 keys of tokens `rows` [HV, R] for every value head from raw keys k [L, H, K]: [HV, R, K] float32."""
    heads = torch.arange(hv, device=k.device)[:, None] // (hv // k.shape[1])
    return l2_normalize(k[rows, heads])


def memory_prefill_fused(mem: dict, n: int, q, k, v, score, o_state, params: dict, cfg, scale: float,
                         out: torch.Tensor | None = None, fresh: bool = False):
    """As reference.memory_forward for L tokens of sequence n, except that q, k are raw [L, H, K] (before the
    L2 norm, not expanded to the value heads): the kernels normalise them. Writes the output into `out`
    (default: a new float32 tensor; o_state itself may be passed) and returns it. `fresh=True` says the
    memory is empty (a prompt's first call): nothing is read back from the device before the launches."""
    from .read import prefill_read
    C, M = cfg.block_size, cfg.cache_size
    L, HV, _ = v.shape
    dev = v.device
    dtype = mem['block_k'].dtype
    seen0 = 0 if fresh else int(mem['seen'][n])  # int(): a host sync, only when continuing a sequence
    seen1 = seen0 + L
    (b0, fill0), (b1, fill1) = divmod(seen0, C), divmod(seen1, C)
    NO = M + fill0  # earlier candidates: the cache, then the partial block; new token i is candidate NO + i
    k_old = torch.cat([mem['cache_k'][n], mem['block_k'][n, :, :fill0]], 1)
    v_old = torch.cat([mem['cache_v'][n], mem['block_v'][n, :, :fill0]], 1)
    cand_s = torch.cat([mem['cache_score'][n], mem['block_score'][n, :, :fill0], score.transpose(0, 1).float()], 1)
    cand_p = torch.cat([mem['cache_pos'][n], torch.arange(b0 * C, seen1, device=dev).expand(HV, -1)], 1)
    last = (seen1 - 1) // C                     # the last query block; the state needs the cache of block b1
    blocks = torch.arange(b0, max(last, b1) + 1, device=dev)
    qb = blocks[:last - b0 + 1]
    q_start = (qb * C - seen0).clamp_min(0)
    q_end = ((qb + 1) * C - seen0).clamp_max(L)
    cand_start = torch.where(qb == b0, torch.full_like(qb, M), NO + q_start)
    # candidates in position order: the cache sorted by position (empty slots last), then block and new tokens
    by_pos = torch.cat([torch.argsort(torch.where(mem['cache_pos'][n] >= 0, mem['cache_pos'][n], 2**62), dim=-1),
                        torch.arange(M, cand_s.shape[1], device=dev).expand(HV, -1)], 1)
    idx, cnt = select_caches(cand_s, cand_p, blocks, M, C, cfg.eviction, by_pos=by_pos)
    out = prefill_read(q, k_old, v_old, k, v, idx, cnt, q_start, q_end, cand_start, o_state,
                       params['q_gamma'].float() * params['k_gamma'].float(), params['sink'], params['gate'], scale,
                       cfg.read_rule == 'shared', C, cfg.read_block, cfg.norm_eps, out, has_old=not fresh)
    # the memory state after these tokens: cache of the last completed block boundary, trailing partial block
    if b1 > b0:
        if M:
            sel = idx[:, b1 - b0].long()                                  # [HV, M], -1 = empty
            old, at, new = sel < NO, sel.clamp(0, NO - 1), (sel - NO).clamp(0, L - 1)

            def pick(earlier, tokens):  # [HV, M, D]: earlier candidates gathered at `at`, else new tokens
                return torch.where(old[..., None], earlier.gather(1, at[..., None].expand(-1, -1, earlier.shape[-1])),
                                   tokens)
            kept = {'cache_k': pick(k_old, unit_keys(k, new, HV).to(dtype)),
                    'cache_v': pick(v_old, v[new, torch.arange(HV, device=dev)[:, None]].to(dtype)),
                    'cache_score': cand_s.gather(1, sel.clamp_min(0)), 'cache_pos': cand_p.gather(1, sel.clamp_min(0))}
            store_cache(mem, n, kept, torch.where(sel >= 0, torch.arange(M, device=dev), -1))
        mem['block_score'][n].fill_(float('-inf'))
    # the trailing partial block: buffer slots [start, fill1) take the last fill1 - start new tokens
    start = 0 if b1 > b0 else fill0
    first = L - (fill1 - start)
    mem['block_k'][n, :, start:fill1] = unit_keys(k, torch.arange(first, L, device=dev).expand(HV, -1), HV).to(dtype)
    mem['block_v'][n, :, start:fill1] = v[first:].transpose(0, 1).to(dtype)
    mem['block_score'][n, :, start:fill1] = score[first:].transpose(0, 1).float()
    mem['seen'][n].fill_(seen1)  # fill_: `t[n] = int` copies from the host and waits for the device
    return out


def memory_decode_fused(mem: dict, q, k, v, score, o_state, params: dict, cfg, scale: float,
                        state: dict | None = None, out: torch.Tensor | None = None):
    """One token for every sequence, raw q, k [N, H, K], v [N, HV, V], o_state [N, HV, V], and either the
    score [N, HV] or `state` to compute it from (see read.decode_step): one kernel launch (score, write,
    read, combine, merge at block ends) and the position update. No host sync."""
    from .read import decode_step
    out = decode_step(q, k, v, mem, o_state, params, cfg.norm_eps, scale, cfg.read_rule == 'shared', cfg.read_block,
                      cfg.eviction, score=score, state=state, out=out)
    mem['seen'] += 1
    return out
