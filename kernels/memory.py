"""The memory's fused path: same inputs, outputs and memory state as `adapters/reference.memory_forward`,
computed with the selection of `select.py`, the Triton reads and decode step of `read.py` and the
state writes of `write.py`.

Used without autograd on CUDA tensors (and on CPU tensors when HOLA_KERNELS=1 under TRITON_INTERPRET=1,
which is how CI tests it). With autograd on (calibration), the PyTorch reference runs instead: it is
differentiable in the memory parameters, the kernels are not.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .select import select_caches, select_piece


def kernels_enabled(t: torch.Tensor) -> bool:
    mode = os.environ.get('HOLA_KERNELS', 'auto')
    if mode == '0' or torch.is_grad_enabled():
        return False
    if t.is_cuda:
        return True
    return mode == '1' and os.environ.get('TRITON_INTERPRET', '0') == '1'


def prompt_pieces(T: int) -> int:
    """How many pieces a fresh prompt of T tokens is run in (state path beside the memory's selection and state
    output, see `_prefill_in_pieces`): one per HOLA_PIECE_TOKENS tokens (default 0: one piece). Pieces save device
    time (H100, 32k tokens: 4 pieces, 2.5-3.5 ms of about 117) but add about 60 small launches a layer: worth it
    under CUDA graphs or where the host launches fast, not in eager mode on a slow host (docs/notes.md, session 12)."""
    size = int(os.environ.get('HOLA_PIECE_TOKENS', '0'))
    return max(1, T // size) if size > 0 else 1


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
    kernel (o_state None); or, for a fresh prompt, the state path run in pieces of the prompt (`state['pieces']`, see
    `_prefill_in_pieces`), score None."""
    from .read import prefill_read
    from .write import store_state
    if state is not None and 'pieces' in state:
        return _prefill_in_pieces(mem, n, q, k, v, params, cfg, scale, out, k_rstd, state)
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


_SIDE: dict = {}


@contextlib.contextmanager
def side_stream(device: torch.device, name: str, priority: int = 0, uses=(), fork: bool = False):
    """Work queued inside goes to this module's CUDA stream `name` (made with this priority: 0 the default's, -1, -2
    higher), which waits only on the events it is told to (`_wait`), or (fork) first on everything queued so far;
    the current stream waits for all of it at the end. `uses`: tensors of other streams that the work reads or writes
    (the allocator then keeps their memory until it is done). Off CUDA: inline."""
    if device.type != 'cuda':
        yield
        return
    cur = torch.cuda.current_stream(device)
    side = _SIDE.get((device, name))
    if side is None:
        side = _SIDE[device, name] = torch.cuda.Stream(device, priority=priority)
    for t in uses:
        if t is not None:
            t.record_stream(side)
    if fork:
        side.wait_stream(cur)
    with torch.cuda.stream(side):
        yield
    cur.wait_stream(side)


def _wait(event) -> None:
    if event is not None:
        torch.cuda.current_stream().wait_event(event)


def _prefill_in_pieces(mem, n, q, k, v, params, cfg, scale, out, k_rstd, state):
    """A fresh prompt whose state path ran in pieces: `state` holds the unit-L2 keys 'k' [L, H, K], the gate cumsum 'g'
    and 'v_first' for the whole prompt, and 'pieces', each {'start', 'end' (token rows, start a multiple of C), 'h'
    (the piece's chunk states), 'v_new' [end - start, HV, V], 'ready' (a CUDA event recorded once the piece's state
    path is queued, or None)}. As each piece's state path finishes, three streams take it beside the state path of
    the pieces after it (fla's recurrence fills a fraction of the GPU): one computes its state output, one its write
    scores and their sort, one the caches of its blocks (from the top-M of everything before it and its own tokens).
    Then one read launch over the whole prompt combines in place, and the memory state is stored."""
    from .read import prefill_read, state_output
    from .select import sort_new
    from .write import row_norm, store_state
    C, M = cfg.block_size, cfg.cache_size
    L, HV, V = v.shape
    dev = v.device
    b1 = L // C  # the block whose cache the memory state keeps
    k_old, v_old = mem['cache_k'].new_empty(HV, 0, k.shape[-1]), mem['cache_v'].new_empty(HV, 0, V)
    g, pieces = state['g'], state['pieces']
    tensors = (q, state['k'], g, out, *(p[x] for p in pieces for x in ('h', 'v_new')))
    # the state outputs at the default priority, below the other two: the GPU's scheduler serves their small kernels
    # first (in a CUDA graph trace the caches' chain otherwise waited ~140 us per piece behind the state programs)
    with side_stream(dev, 'state', 0, uses=tensors):
        for piece in pieces:
            s, e = piece['start'], piece['end']
            _wait(piece['ready'])
            state_output(q[s:e], dict(h=piece['h'], v_new=piece['v_new'], k=state['k'][s:e], v_first=state['v_first'],
                                      g=None if g is None else g[s:e]), out[s:e], scale, C)
    sorted_ = []
    with side_stream(dev, 'sort', -1, uses=tensors):  # the scores and their sort: independent piece to piece
        for i, piece in enumerate(pieces):
            s, e = piece['start'], piece['end']
            _wait(piece['ready'])
            if i == 0:  # allocated once the stream waits on the current one (under CUDA graph capture: joined it)
                score = torch.empty(L, HV, dtype=torch.float32, device=dev)
            row_norm(piece['v_new'], out=score[s:e])
            new = sort_new(score, s, e) if cfg.eviction == 'surprise' else None
            done = torch.cuda.Event() if dev.type == 'cuda' else None
            if done is not None:
                done.record()
            sorted_.append((new, done))
    # the caches, a chain (each piece's candidates include the cache the piece before chose)
    with side_stream(dev, 'select', -1, uses=(score, *(t for new, _ in sorted_ if new for t in new))):
        for i, (piece, (new, done)) in enumerate(zip(pieces, sorted_)):
            _wait(done)
            if i == 0:
                idx = torch.empty(HV, b1 + 1, M, dtype=torch.int32, device=dev)
                cnt = torch.empty(HV, b1 + 1, dtype=torch.int32, device=dev)
            select_piece(score, piece['start'], piece['end'], C, idx, cnt, cfg.eviction, new_sorted=new)
    if v.device.type == 'cuda':  # made on another stream, read on this one
        for t in (score, idx, cnt):
            t.record_stream(torch.cuda.current_stream(v.device))
    prefill_read(q, k_old, v_old, k, v, idx, cnt, 0, out, packed_weight(params), scale, cfg.read_rule == 'shared', C,
                 cfg.read_block, cfg.norm_eps, out, r_new=k_rstd)
    store_state(mem, n, idx[:, b1] if b1 > 0 else None, k_old, v_old, score.t(), mem['cache_pos'][n], k, v, score, 0)
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
