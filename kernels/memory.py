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


AUTO_PIECES, MIN_PIECE = 4, 1024


def prompt_pieces(T: int, device: torch.device) -> int:
    """How many pieces a fresh prompt of T tokens is run in (the state path beside the memory's selection, state
    output and read, see `_prefill_in_pieces`). HOLA_PIECES: a count (1: off), or 'auto' (default): AUTO_PIECES
    pieces of at least MIN_PIECE tokens while a CUDA graph is being captured, else one. Pieces save device time
    (H100, 32k tokens, M 512: 109.7 ms against the base's 100.4; 117.4-118.1 in one piece) but add about 30 launches
    a layer, which cost more than that in eager mode on a host with slow launches (the lent hosts: 266 ms against
    143), nothing in a graph (docs/notes.md, session 13)."""
    mode = os.environ.get('HOLA_PIECES', 'auto')
    if mode != 'auto':
        if not mode.isdigit():
            raise ValueError(f"HOLA_PIECES={mode!r}: expected 'auto' or a number of pieces (1: off)")
        return max(1, int(mode))
    if device.type != 'cuda' or not torch.cuda.is_current_stream_capturing():
        return 1
    return max(1, min(AUTO_PIECES, T // MIN_PIECE))


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
def side_stream(device: torch.device, name: str, priority: int = 0, fork: bool = False):
    """Work queued inside goes to this module's CUDA stream `name` (made with this priority: 0 the default's, -1 to -3
    higher), which waits only on the events it is told to (`_wait`), or (fork) first on everything queued so far;
    the current stream waits for all of it at the end. Every tensor the work touches must stay referenced until the
    current stream has waited for it (the callers hold them to the end of the prompt's pieces): freed earlier, its
    memory could go to a tensor that another stream writes meanwhile. (Not `record_stream`: during a CUDA graph
    capture that keeps the memory until the capture ends, every layer's, which at 128k tokens fills the GPU.)
    Off CUDA: inline."""
    if device.type != 'cuda':
        yield
        return
    cur = torch.cuda.current_stream(device)
    side = _SIDE.get((device, name))
    if side is None:
        side = _SIDE[device, name] = torch.cuda.Stream(device, priority=priority)
    if fork:
        side.wait_stream(cur)
    with torch.cuda.stream(side):
        yield
    cur.wait_stream(side)


def _wait(event) -> None:
    if event is not None:
        torch.cuda.current_stream().wait_event(event)


def _event(device: torch.device):
    """An event recorded on the current stream now (None off CUDA)."""
    if device.type != 'cuda':
        return None
    e = torch.cuda.Event()
    e.record()
    return e


def _prefill_in_pieces(mem, n, q, k, v, params, cfg, scale, out, k_rstd, state):
    """A fresh prompt whose state path ran in pieces: `state` holds the unit-L2 keys 'k' [L, H, K], the gate cumsum 'g'
    and 'v_first' for the whole prompt, and 'pieces', each {'start', 'end' (token rows, start a multiple of C), 'h'
    (the piece's chunk states), 'v_new' [end - start, HV, V], 'ready' (a CUDA event recorded once the piece's state
    path is queued, or None)}. As each piece's state path finishes, three streams take it beside the state path of
    the pieces after it (fla's recurrence fills a fraction of the GPU): one computes its state output, one its write
    scores and their sort, one the caches of its blocks (from the top-M of everything before it and its own tokens).
    The read combines in place, piece by piece: the earlier pieces' on a fourth stream, each as soon as its caches and
    state output are ready (beside the recurrence of the pieces after it), the last one's once everything is. Then
    the memory state is stored."""
    from .read import prefill_read, state_output
    from .select import sort_piece
    from .write import row_norm, store_state
    C, M = cfg.block_size, cfg.cache_size
    L, HV, V = v.shape
    dev = v.device
    b1 = L // C  # the block whose cache the memory state keeps
    k_old, v_old = mem['cache_k'].new_empty(HV, 0, k.shape[-1]), mem['cache_v'].new_empty(HV, 0, V)
    g, pieces = state['g'], state['pieces']
    # priorities: fla's recurrence (-3, see adapters/state) over the caches' chain (-2) over the state outputs (-1)
    # over the reads (0): a launch of many programs takes every free slot of the GPU, and small kernels queued behind
    # it wait (CUDA graph traces, docs/notes.md sessions 12-13)
    state_done = []
    with side_stream(dev, 'state', -1):
        for piece in pieces:
            s, e = piece['start'], piece['end']
            _wait(piece['ready'])
            state_output(q[s:e], dict(h=piece['h'], v_new=piece['v_new'], k=state['k'][s:e], v_first=state['v_first'],
                                      g=None if g is None else g[s:e]), out[s:e], scale, C)
            state_done.append(_event(dev))
    sorted_ = []
    with side_stream(dev, 'sort', -2):  # the scores and their sort: independent piece to piece
        for i, piece in enumerate(pieces):
            s, e = piece['start'], piece['end']
            _wait(piece['ready'])
            if i == 0:  # allocated once the stream waits on the current one (under CUDA graph capture: joined it)
                score = torch.empty(L, HV, dtype=torch.float32, device=dev)
            row_norm(piece['v_new'], out=score[s:e])
            new = sort_piece(score, s, e) if cfg.eviction != 'recency' else None
            sorted_.append((new, _event(dev)))
    # the caches, a chain (each piece's candidates include the cache the piece before chose)
    select_done = []
    with side_stream(dev, 'select', -2):
        for i, (piece, (new, done)) in enumerate(zip(pieces, sorted_)):
            _wait(done)
            if i == 0:
                idx = torch.empty(HV, b1 + 1, M, dtype=torch.int32, device=dev)
                cnt = torch.empty(HV, b1 + 1, dtype=torch.int32, device=dev)
            select_piece(score, piece['start'], piece['end'], C, idx, cnt, cfg.eviction, new_sorted=new)
            select_done.append(_event(dev))
    weight = packed_weight(params)

    def read(j0, j1):
        prefill_read(q, k_old, v_old, k, v, idx, cnt, 0, out, weight, scale, cfg.read_rule == 'shared', C,
                     cfg.read_block, cfg.norm_eps, out, r_new=k_rstd, blocks=(j0, j1))

    if dev.type == 'cuda':  # made on other streams, read on this one
        for t in (score, idx, cnt):
            t.record_stream(torch.cuda.current_stream(dev))
    read(pieces[-1]['start'] // C, -(-L // C))  # the last piece, queued first: it does not wait for the others' reads
    if len(pieces) > 1:  # (a stream with no work would not join a CUDA graph capture)
        with side_stream(dev, 'read', 0):
            for i, piece in enumerate(pieces[:-1]):  # each piece's read once its caches and state output are done
                _wait(state_done[i])
                _wait(select_done[i])
                read(piece['start'] // C, piece['end'] // C)
    store_state(mem, n, idx[:, b1] if b1 > 0 else None, k_old, v_old, score.t(), mem['cache_pos'][n], k, v, score, 0)
    return out


def decode_beside(device: torch.device) -> bool:
    """Whether a decode step's launch runs on a stream of its own beside work of the layer that does not depend on it
    (`memory_decode_fused(beside=)`: the output gate's projection). HOLA_BESIDE: '1', '0', or 'auto' (default): while
    a CUDA graph is being captured (in eager mode a decode step is bound by the host's launches, which a second
    stream does not shorten)."""
    mode = os.environ.get('HOLA_BESIDE', 'auto')
    if mode not in ('auto', '0', '1'):
        raise ValueError(f"HOLA_BESIDE={mode!r}: expected 'auto', '0' or '1'")
    if device.type != 'cuda':
        return False
    return mode == '1' or (mode == 'auto' and torch.cuda.is_current_stream_capturing())


def memory_decode_fused(mem: dict, q, k, v, params: dict, cfg, scale: float, score=None, o_state=None,
                        state: dict | None = None, out: torch.Tensor | None = None, beside=None):
    """One token for every sequence, raw q, k [N, H, K], v [N, HV, V], in one kernel launch (write, read,
    combine, the score and the merge at block ends) and the position update. No host sync. Either `score`
    [N, HV] and `o_state` [N, HV, V] are given, or `state` (see read.decode_step): then the kernels also take the
    recurrent step, S updated in place (state['S'] holds the new state) and o_state computed from it.
    `beside`: a function whose work does not depend on this step's; on CUDA the launch then goes to a stream of
    its own (high priority), beside(), queued meanwhile on the current stream, runs next to it, and the call
    returns (out, beside()) once the current stream has waited for the launch."""
    from .read import decode_step

    def step():
        return decode_step(q, k, v, mem, packed_weight(params), cfg.norm_eps, scale, cfg.read_rule == 'shared',
                           cfg.read_block, cfg.eviction, score=score, o_state=o_state, state=state, out=out)

    if beside is None:
        return step()
    if not v.is_cuda:
        return step(), beside()
    cur = torch.cuda.current_stream(v.device)
    with side_stream(v.device, 'decode', -1, fork=True):
        o = step()
        with torch.cuda.stream(cur):
            other = beside()
    # made on the side stream (on a first step), then used and freed on this one
    for t in (o, mem['ticket'], None if state is None else state['S']):
        if t is not None:
            t.record_stream(cur)
    return o, other
