"""The memory's fused path: same inputs, outputs and memory state as `adapters/reference.memory_forward`,
computed with the selection of `select.py` and the Triton reads of `read.py`.

Used without autograd on CUDA tensors (and on CPU tensors when HOLA_KERNELS=1 under TRITON_INTERPRET=1,
which is how CI tests it). With autograd on (calibration), the PyTorch reference runs instead: it is
differentiable in the memory parameters, the kernels are not.
"""

from __future__ import annotations

import math
import os

import torch

from ..adapters.reference import merge, rms, store_cache
from .select import select_caches


def kernels_enabled(t: torch.Tensor) -> bool:
    mode = os.environ.get('HOLA_KERNELS', 'auto')
    if mode == '0' or torch.is_grad_enabled():
        return False
    if t.is_cuda:
        return True
    return mode == '1' and os.environ.get('TRITON_INTERPRET', '0') == '1'


def memory_prefill_fused(mem: dict, n: int, q, k, v, score, o_state, params: dict, cfg, scale: float):
    """As reference.memory_forward for L tokens of sequence n; returns [L, HV, V] float32."""
    from .read import prefill_read
    C, M = cfg.block_size, cfg.cache_size
    L, HV, K = q.shape
    dev = q.device
    dtype = mem['block_k'].dtype
    seen0 = int(mem['seen'][n])
    b0, fill0 = divmod(seen0, C)
    kk, vv = k.transpose(0, 1).to(dtype), v.transpose(0, 1).to(dtype)           # [HV, L, *]
    new_pos = torch.arange(seen0, seen0 + L, device=dev)
    blk_pos = torch.arange(b0 * C, b0 * C + fill0, device=dev)
    cand_k = torch.cat([mem['cache_k'][n], mem['block_k'][n, :, :fill0], kk], 1)
    cand_v = torch.cat([mem['cache_v'][n], mem['block_v'][n, :, :fill0], vv], 1)
    cand_s = torch.cat([mem['cache_score'][n], mem['block_score'][n, :, :fill0], score.transpose(0, 1).float()], 1)
    cand_p = torch.cat([mem['cache_pos'][n], blk_pos.expand(HV, -1), new_pos.expand(HV, -1)], 1)
    off_new = M + fill0
    blocks = torch.arange(b0, (seen0 + L - 1) // C + 1, device=dev)
    q_start = (blocks * C - seen0).clamp_min(0)
    q_end = ((blocks + 1) * C - seen0).clamp_max(L)
    cand_start = torch.where(blocks == b0, torch.full_like(blocks, M), off_new + q_start)
    idx = select_caches(cand_s, cand_p, blocks, M, C, cfg.eviction)
    q_t = (rms(q, cfg.norm_eps) * params['q_gamma'].float()).transpose(0, 1) / math.sqrt(K)
    k_t = rms(cand_k, cfg.norm_eps) * params['k_gamma'].float()[:, None]
    out = prefill_read(q_t, k_t, cand_v, idx, q_start, q_end, cand_start, off_new, o_state, params['sink'],
                       params['gate'], scale, cfg.read_rule == 'shared', C, cfg.read_block)
    # the memory state after these tokens: cache of the last completed block boundary, trailing partial block
    seen1 = seen0 + L
    b1, fill1 = divmod(seen1, C)
    if b1 > b0:
        if M:
            sel = select_caches(cand_s, cand_p, torch.tensor([b1], device=dev), M, C, cfg.eviction)[:, 0]
            store_cache(mem, n, {'cache_k': cand_k, 'cache_v': cand_v, 'cache_score': cand_s, 'cache_pos': cand_p}, sel)
        mem['block_score'][n] = float('-inf')
        mem['block_k'][n, :, :fill1] = kk[:, L - fill1:]
        mem['block_v'][n, :, :fill1] = vv[:, L - fill1:]
        mem['block_score'][n, :, :fill1] = score[L - fill1:].transpose(0, 1).float()
    else:
        mem['block_k'][n, :, fill0:fill0 + L] = kk
        mem['block_v'][n, :, fill0:fill0 + L] = vv
        mem['block_score'][n, :, fill0:fill0 + L] = score.transpose(0, 1).float()
    mem['seen'][n] = seen1
    return out


def memory_decode_fused(mem: dict, q, k, v, score, o_state, params: dict, cfg, scale: float):
    """One token for every sequence: q, k [N, HV, K], v [N, HV, V], score [N, HV], o_state [N, HV, V]."""
    from .read import decode_read
    C = cfg.block_size
    N = q.shape[0]
    rows = torch.arange(N, device=q.device)
    fill = mem['seen'] % C
    mem['block_k'][rows, :, fill] = k.to(mem['block_k'].dtype)
    mem['block_v'][rows, :, fill] = v.to(mem['block_v'].dtype)
    mem['block_score'][rows, :, fill] = score.float()
    out = decode_read(q, mem, fill + 1, o_state, params, cfg.norm_eps, scale, cfg.read_rule == 'shared',
                      cfg.read_block)
    mem['seen'] += 1
    for n in torch.nonzero(fill + 1 == C).flatten().tolist():  # blocks that just ended: merge (every C steps)
        merge(mem, n, cfg)
        mem['block_score'][n] = float('-inf')
    return out
