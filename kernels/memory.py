"""The memory's fused path: same inputs, outputs and memory state as `adapters/reference.memory_forward`,
computed with the selection of `select.py`, the Triton reads and decode step of `read.py` and the
state writes of `write.py`.

Used without autograd on CUDA tensors (and on CPU tensors when HOLA_KERNELS=1 under TRITON_INTERPRET=1,
which is how CI tests it). With autograd on (calibration), the PyTorch reference runs instead: it is
differentiable in the memory parameters, the kernels are not.
"""

from __future__ import annotations

import os

import torch

from .select import select_caches


def kernels_enabled(t: torch.Tensor) -> bool:
    mode = os.environ.get('HOLA_KERNELS', 'auto')
    if mode == '0' or torch.is_grad_enabled():
        return False
    if t.is_cuda:
        return True
    return mode == '1' and os.environ.get('TRITON_INTERPRET', '0') == '1'


def packed_weight(params: dict) -> torch.Tensor:
    """The memory parameters as one [HV, 2K + 2] tensor (MemoryParams.weight's layout) for the kernels."""
    if 'weight' in params:
        return params['weight']
    return torch.cat([params['q_gamma'], params['k_gamma'], params['sink'][:, None], params['gate'][:, None]], 1)


def memory_prefill_fused(mem: dict, n: int, q, k, v, score, o_state, params: dict, cfg, scale: float,
                         out: torch.Tensor | None = None, fresh: bool = False, k_rstd: torch.Tensor | None = None,
                         state: dict | None = None):
    """As reference.memory_forward for L tokens of sequence n, except that q, k are raw [L, H, K] (before the
    L2 norm, not expanded to the value heads): the kernels normalise them. Writes the output into `out`
    (default: a new float32 tensor; o_state itself may be passed) and returns it. `fresh=True` says the
    memory is empty (a prompt's first call): the candidates are the new tokens alone, nothing is read back
    from the device; the call launches the sort, the selection, the read and its online pass, and the state store.
    `k_rstd` [L, H]: the L2 norm's rstd of the raw keys, where the state path has it (fla's l2norm_fwd); else
    computed. `state`: the state path's pieces (see read.prefill_read), to compute the state output in the read
    kernel (o_state None)."""
    from .read import prefill_read
    from .write import store_state
    C, M = cfg.block_size, cfg.cache_size
    L, HV, _ = v.shape
    dev = v.device
    seen0 = 0 if fresh else int(mem['seen'][n])  # int(): a host sync, only when continuing a sequence
    seen1 = seen0 + L
    b0, fill0, b1 = seen0 // C, seen0 % C, seen1 // C
    n_blocks = max((seen1 - 1) // C, b1) - b0 + 1  # query blocks, and block b1 whose cache the state keeps
    if fresh:  # candidates: the new tokens, candidate i at position i
        k_old = mem['cache_k'].new_empty(HV, 0, k.shape[-1])
        v_old = mem['cache_v'].new_empty(HV, 0, v.shape[-1])
        s_old = cand_s = score.t()
        cand_p = by_pos = None
        p_old = mem['cache_pos'][n]  # never read (no earlier candidate); an int64 tensor for the kernel
    else:  # earlier candidates: the cache, then the partial block; new token i is candidate NO + i
        k_old = torch.cat([mem['cache_k'][n], mem['block_k'][n, :, :fill0]], 1)
        v_old = torch.cat([mem['cache_v'][n], mem['block_v'][n, :, :fill0]], 1)
        s_old = cand_s = torch.cat([mem['cache_score'][n], mem['block_score'][n, :, :fill0], score.t().float()], 1)
        p_old = cand_p = torch.cat([mem['cache_pos'][n], torch.arange(b0 * C, seen1, device=dev).expand(HV, -1)], 1)
        # candidates in position order: the cache sorted by position (empty slots last), then the rest
        by_pos = torch.cat([torch.argsort(torch.where(mem['cache_pos'][n] >= 0, mem['cache_pos'][n], 2**62), dim=-1),
                            torch.arange(M, cand_s.shape[1], device=dev).expand(HV, -1)], 1)
    idx, cnt = select_caches(cand_s, cand_p, b0, n_blocks, M, C, cfg.eviction, by_pos=by_pos)
    weight = packed_weight(params)
    out = prefill_read(q, k_old, v_old, k, v, idx, cnt, seen0, o_state, weight, scale, cfg.read_rule == 'shared', C,
                       cfg.read_block, cfg.norm_eps, out, cb0=None if fresh else M, r_new=k_rstd, state=state)
    store_state(mem, n, idx[:, b1 - b0] if b1 > b0 else None, k_old, v_old, s_old, p_old, k, v, score, seen0)
    return out


def memory_decode_fused(mem: dict, q, k, v, params: dict, cfg, scale: float, score=None, o_state=None,
                        state: dict | None = None, out: torch.Tensor | None = None):
    """One token for every sequence, raw q, k [N, H, K], v [N, HV, V], in one kernel launch (write, read,
    combine, the score and the merge at block ends) and the position update. No host sync. Either `score`
    [N, HV] and `o_state` [N, HV, V] are given, or `state` (see read.decode_step): then the kernels also take the
    recurrent step, S updated in place (state['S'] holds the new state) and o_state computed from it."""
    from .read import decode_step
    return decode_step(q, k, v, mem, packed_weight(params), cfg.norm_eps, scale, cfg.read_rule == 'shared',
                       cfg.read_block, cfg.eviction, score=score, o_state=o_state, state=state, out=out)
