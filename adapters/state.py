"""The recurrent state path, unchanged from the base layer, plus the write score m_t = ||beta_t e_t||.

On CUDA it runs fla's kernels: prefill calls the pieces of fla's chunked forward itself, because
`chunk_gated_delta_rule_fwd_h` returns `v_new_t = beta_t (v_t - alpha_t S_{t-1}^T k_t)`, the
score's vector; decode runs fla's fused recurrent step and computes e_t from the cached state
S_{t-1} (one mat-vec per head). Elsewhere it runs the chunked float32 delta rule of `reference.py`.

Layouts follow fla: q, k [B, T, H, K]; v [B, T, HV, V]; beta/gate inputs [B, T, HV] (raw, before
the sigmoid / softplus); GDN state [N, HV, V, K] (value-first), DeltaNet state [N, H, K, V].
"""

from __future__ import annotations

import torch
import triton

from ..kernels.write import row_norm
from .fallbacks import expand_heads, gdn_beta, gdn_decay, l2_normalize, spans
from .reference import chunk_delta_rule_with_score


def state_forward(kind: str, q, k, v, beta_raw, a_raw, A_log, dt_bias, allow_neg_eigval: bool,
                  initial_state, cu_seqlens, parts: bool = False, pieces: int = 1):
    """Returns o [B, T, HV, V] (scaled by d_k^-0.5, fla's output), score [B, T, HV] float32, the final state
    and the rstd of k's L2 norm [B, T, H] (float32; None where the path does not compute it).

    kind: 'gdn' or 'deltanet'. For DeltaNet, `beta_raw` is already beta (fla's layer applies the
    sigmoid itself) and `a_raw`, `A_log`, `dt_bias` are None. `parts=True`: where fla's chunked prefill runs
    (CUDA, no autograd, more than one token per sequence), o is not computed: the first value is instead a
    dict of the pieces fla's output kernel would read (see `sequence_parts`), for the memory's read kernel; with
    `pieces` > 1 (one sequence) the recurrence runs in pieces of the prompt (see `_chunk_cuda`), score None."""
    if q.is_cuda:
        return _state_forward_cuda(kind, q, k, v, beta_raw, a_raw, A_log, dt_bias, allow_neg_eigval,
                                   initial_state, cu_seqlens, parts, pieces)
    return (*_state_forward_reference(kind, q, k, v, beta_raw, a_raw, A_log, dt_bias, allow_neg_eigval,
                                      initial_state, cu_seqlens), None)


def _beta(kind, beta_raw, allow_neg_eigval):
    return gdn_beta(beta_raw, allow_neg_eigval) if kind == 'gdn' else beta_raw.float()


def _state_forward_reference(kind, q, k, v, beta_raw, a_raw, A_log, dt_bias, allow_neg_eigval,
                             initial_state, cu_seqlens):
    B, T, H, K = q.shape
    HV = v.shape[2]
    scale = K ** -0.5
    qn, kn = expand_heads(l2_normalize(q), HV), expand_heads(l2_normalize(k), HV)
    beta = _beta(kind, beta_raw, allow_neg_eigval)
    log_alpha = gdn_decay(a_raw, A_log, dt_bias) if kind == 'gdn' else None
    o = torch.empty(*v.shape, dtype=v.dtype, device=v.device)
    score = torch.empty(B, T, HV, dtype=torch.float32, device=v.device)
    finals = []
    for n, (b, s, e) in enumerate(spans(B, T, cu_seqlens)):
        S0 = None
        if initial_state is not None:
            S0 = initial_state[n].transpose(-1, -2) if kind == 'gdn' else initial_state[n]  # -> [HV, K, V]
        on, mn, Sn = chunk_delta_rule_with_score(qn[b, s:e], kn[b, s:e], v[b, s:e], beta[b, s:e],
                                                 None if log_alpha is None else log_alpha[b, s:e], scale, S0)
        o[b, s:e], score[b, s:e] = on.to(v.dtype), mn
        finals.append(Sn.transpose(-1, -2) if kind == 'gdn' else Sn)
    return o, score, torch.stack(finals).contiguous()


def _state_forward_cuda(kind, q, k, v, beta_raw, a_raw, A_log, dt_bias, allow_neg_eigval,
                        initial_state, cu_seqlens, parts=False, pieces=1):
    B, T, H, K = q.shape
    scale = K ** -0.5
    n_seq = B if cu_seqlens is None else len(cu_seqlens) - 1
    if B * T == n_seq and initial_state is not None and not torch.is_grad_enabled():
        return (*_decode_cuda(kind, q, k, v, beta_raw, a_raw, A_log, dt_bias, allow_neg_eigval,
                              initial_state, cu_seqlens, scale), None)
    if torch.is_grad_enabled():
        # autograd through fla's own function; the score (a selection key, never differentiated)
        # comes from a second, gradient-free pass.
        with torch.no_grad():
            _, score, _, _ = _chunk_cuda(kind, q, k, v, beta_raw, a_raw, A_log, dt_bias, allow_neg_eigval,
                                         initial_state, cu_seqlens, scale, parts=True)
        if kind == 'gdn' and gdn_backward_problem():
            o, final = _torch_chunk_gdn(q, k, v, beta_raw, a_raw, A_log, dt_bias, allow_neg_eigval, initial_state,
                                        cu_seqlens)
        else:
            o, final = _fla_chunk(kind, q, k, v, beta_raw, a_raw, A_log, dt_bias, allow_neg_eigval,
                                  initial_state, cu_seqlens)
        return o, score, final, None
    return _chunk_cuda(kind, q, k, v, beta_raw, a_raw, A_log, dt_bias, allow_neg_eigval,
                       initial_state, cu_seqlens, scale, parts=parts, pieces=pieces)


def gdn_backward_problem() -> str | None:
    """Why fla's fused GDN backward cannot run here, or None. fla issue #640: on Hopper with
    3.4 <= triton < 3.7.1, `chunk_bwd_dqkwg` refuses to compile."""
    import os
    if os.environ.get('HOLA_GDN_BACKWARD') == 'fla' or not torch.cuda.is_available():
        return None
    version = tuple(int(p) for p in triton.__version__.split('+')[0].split('.')[:3] if p.isdigit())
    forced = os.environ.get('HOLA_GDN_BACKWARD') == 'torch'
    if forced or (torch.cuda.get_device_capability()[0] == 9 and (3, 4) <= version < (3, 7, 1)):
        return (f"triton {triton.__version__} on {torch.cuda.get_device_name()}: fla's fused GDN backward does not "
                "run here (fla issue #640); gradients use a PyTorch chunked delta rule instead (slower). "
                "Install triton >= 3.7.1 for the fused backward.")
    return None


def _torch_chunk_gdn(q, k, v, beta_raw, a_raw, A_log, dt_bias, allow_neg_eigval, initial_state, cu_seqlens):
    """An autograd-capable GDN forward in PyTorch (fla's chunked naive reference), same layouts as fla's."""
    from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
    B, T, H, K = q.shape
    HV = v.shape[2]
    qn, kn = expand_heads(l2_normalize(q), HV), expand_heads(l2_normalize(k), HV)
    beta, g = _beta('gdn', beta_raw, allow_neg_eigval), gdn_decay(a_raw, A_log, dt_bias)
    outs, finals = [], []
    for n, (b, s, e) in enumerate(spans(B, T, cu_seqlens)):
        h0 = initial_state[n:n + 1].transpose(-1, -2).float() if initial_state is not None else None
        o, ht = naive_chunk_gated_delta_rule(qn[b:b + 1, s:e], kn[b:b + 1, s:e], v[b:b + 1, s:e].float(), g[b:b + 1, s:e],
                                             beta[b:b + 1, s:e], scale=K ** -0.5, initial_state=h0,
                                             output_final_state=True)
        outs.append(o.to(v.dtype)), finals.append(ht.transpose(-1, -2))
    o = torch.cat(outs, 1 if cu_seqlens is not None else 0)
    return o, torch.cat(finals).contiguous()


def _fla_chunk(kind, q, k, v, beta_raw, a_raw, A_log, dt_bias, allow_neg_eigval, initial_state, cu_seqlens):
    if kind == 'gdn':
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return chunk_gated_delta_rule(q=q, k=k, v=v, g=a_raw, beta=beta_raw, initial_state=initial_state,
                                      output_final_state=True, use_qk_l2norm_in_kernel=True,
                                      use_beta_sigmoid_in_kernel=True, allow_neg_eigval=allow_neg_eigval,
                                      state_v_first=True, cu_seqlens=cu_seqlens, use_gate_in_kernel=True,
                                      A_log=A_log, dt_bias=dt_bias)
    from fla.ops.delta_rule import chunk_delta_rule
    return chunk_delta_rule(q=q, k=k, v=v, beta=beta_raw, initial_state=initial_state, output_final_state=True,
                            cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True)


CHUNK = 64  # fla's chunk size


def piece_bounds(T: int, pieces: int, chunk_size: int = CHUNK) -> list[tuple[int, int]]:
    """[start, end) of `pieces` near-equal pieces of T tokens, cut at multiples of chunk_size."""
    cuts = [i * T // pieces // chunk_size * chunk_size for i in range(pieces)] + [T]
    return [(s, e) for s, e in zip(cuts, cuts[1:]) if e > s]


def _recurrence(k, w, u, g, initial_state, v_first: bool, chunk_size: int):
    """fla's `chunk_gated_delta_rule_fwd_h` for unpacked sequences, its kernel launched as that function launches it,
    except that (1) the final state is allocated without zeroing it (the kernel writes all of it): between two pieces
    of a prompt, the wrapper's zero-fill kernel let the memory's state output take the GPU before the next piece's
    recurrence (a CUDA graph trace: 27-36 us lost per piece, docs/notes.md session 13); (2) there is always an initial
    state (zeros for a fresh prompt, the same result): the kernel's autotuner keys on it, so a prompt in one piece
    (eager) tunes the variant its pieces use (later pieces start from a state), which a CUDA graph capture of the
    pieces could not (no timing inside a capture)."""
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_kernel_h_blockdim64 as kernel
    B, T, H, K = k.shape
    HV, V = u.shape[2], u.shape[3]
    state = (HV, V, K) if v_first else (HV, K, V)
    h = k.new_empty(B, triton.cdiv(T, chunk_size), *state)
    final = k.new_empty(B, *state, dtype=torch.float32)
    if initial_state is None:
        initial_state = torch.zeros_like(final)
    v_new = torch.empty_like(u)
    kernel[lambda meta: (triton.cdiv(V, meta['BV']) * B * HV,)](
        k=k, v=u, w=w, v_new=v_new, g=g, gk=None, h=h, h0=initial_state, ht=final, cu_seqlens=None,
        chunk_offsets=None, T=T, H=H, HV=HV, K=K, V=V, BT=chunk_size, STATE_V_FIRST=v_first)
    return h, v_new, final


def _chunk_cuda(kind, q, k, v, beta_raw, a_raw, A_log, dt_bias, allow_neg_eigval, initial_state, cu_seqlens,
                scale, chunk_size: int = CHUNK, parts: bool = False, pieces: int = 1):
    """fla's chunked forward, step for step as `chunk_(gated_)delta_rule` runs it, keeping v_new (the score)
    and k's rstd (the memory's key factors). `parts`: stop before the output kernel and return its inputs
    instead of o (the memory's read kernel computes the output; q's L2 norm is then not needed either).
    `pieces` > 1 (with `parts`, one sequence): the recurrence runs in that many pieces of the prompt, and the
    first value is {'k', 'g', 'v_first', 'pieces': [{'start', 'end', 'h', 'v_new', 'ready' (event)}]}, score None:
    the memory computes it per piece (kernels.memory._prefill_in_pieces)."""
    from fla.modules.l2norm import l2norm_fwd
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
    from fla.ops.common.chunk_o import chunk_fwd_o
    from fla.ops.utils.index import prepare_chunk_indices

    chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size) if cu_seqlens is not None else None
    k, k_rstd = l2norm_fwd(k)
    if kind == 'gdn':
        from fla.ops.common.gate import fused_beta_sigmoid
        from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
        from fla.ops.gated_delta_rule.gate import gdn_gate_chunk_cumsum
        from fla.ops.utils.constant import RCP_LN2

        beta = fused_beta_sigmoid(beta_raw, scale=2.0 if allow_neg_eigval else 1.0)
        g = gdn_gate_chunk_cumsum(g=a_raw, A_log=A_log, chunk_size=chunk_size, scale=RCP_LN2, dt_bias=dt_bias,
                                  cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
        w, u, _ = chunk_gated_delta_rule_fwd_intra(k=k, v=v, g=g, beta=beta, cu_seqlens=cu_seqlens,
                                                    chunk_indices=chunk_indices, chunk_size=chunk_size)
        v_first = True
    else:
        from fla.ops.delta_rule.wy_fast import prepare_wy_repr_fwd
        g = None
        w, u, _ = prepare_wy_repr_fwd(k=k, v=v, beta=beta_raw, cu_seqlens=cu_seqlens,
                                      chunk_indices=chunk_indices, chunk_size=chunk_size)
        v_first = False
    if parts and pieces > 1:  # the recurrence piece by piece, each piece's end marked by an event (one sequence)
        assert k.shape[0] == 1 and cu_seqlens is None
        from ..kernels.memory import _event, side_stream
        out, final = [], initial_state
        # highest priority: the recurrence takes the GPU's blocks first whenever the memory's streams also have work
        with side_stream(k.device, 'recurrence', -3, fork=True):
            for s, e in piece_bounds(k.shape[1], pieces, chunk_size):
                sl = slice(s, e)
                h, v_new, state = _recurrence(k[:, sl], w[:, sl], u[:, sl], None if g is None else g[:, sl], final,
                                              v_first, chunk_size)
                out.append(dict(start=s, end=e, h=h, v_new=v_new, ready=_event(k.device)))
                final = state
        final.record_stream(torch.cuda.current_stream(k.device))
        # w, u: read by the recurrence, held until the memory's streams have joined (kernels.memory.side_stream)
        return dict(k=k, g=g, v_first=v_first, pieces=out, keep=(w, u)), None, final, k_rstd
    if parts and cu_seqlens is None:
        h, v_new, final = _recurrence(k, w, u, g, initial_state, v_first, chunk_size)
    else:
        h, v_new, final = chunk_gated_delta_rule_fwd_h(k=k, w=w, u=u, g=g, initial_state=initial_state,
                                                       output_final_state=True, cu_seqlens=cu_seqlens,
                                                       chunk_indices=chunk_indices, state_v_first=v_first,
                                                       chunk_size=chunk_size)
    score = row_norm(v_new)
    if parts:
        return dict(h=h, v_new=v_new, k=k, g=g, v_first=v_first), score, final, k_rstd
    q, _ = l2norm_fwd(q)
    o = chunk_fwd_o(q=q, k=k, v=v_new, h=h, g=g, scale=scale, cu_seqlens=cu_seqlens,
                    chunk_indices=chunk_indices, state_v_first=v_first, chunk_size=chunk_size)
    return o.to(v.dtype), score, final, k_rstd


def sequence_parts(parts: dict, seqs: list[tuple[int, int, int]], varlen: bool):
    """The pieces of `state_forward(parts=True)` for each sequence (b, s, e) of `spans`, as `prefill_read(state=)`
    takes them: its chunks' starting states h [NC, HV, ...], v_new, unit-L2 k, the gate cumsum g (or None) and
    the state layout. Packed sequences (varlen) own consecutive chunks of h, in order."""
    if 'pieces' in parts:  # one sequence, whole
        (b, s, e), = seqs
        yield dict(parts, k=parts['k'][b], g=None if parts['g'] is None else parts['g'][b],
                   pieces=[dict(p, h=p['h'][b], v_new=p['v_new'][b]) for p in parts['pieces']])
        return
    c0 = 0
    for b, s, e in seqs:
        nc = -(-(e - s) // CHUNK)
        yield dict(h=parts['h'][b, c0:c0 + nc], v_new=parts['v_new'][b, s:e], k=parts['k'][b, s:e],
                   g=None if parts['g'] is None else parts['g'][b, s:e], v_first=parts['v_first'])
        c0 += nc if varlen else 0


def _decode_cuda(kind, q, k, v, beta_raw, a_raw, A_log, dt_bias, allow_neg_eigval, initial_state, cu_seqlens,
                 scale):
    """One token per sequence: e_t from the cached S_{t-1}, then fla's fused recurrent step."""
    HV = v.shape[2]
    shape = v.shape[:2]
    kn = expand_heads(l2_normalize(k), HV).reshape(-1, HV, k.shape[-1])          # [N, HV, K]
    beta = _beta(kind, beta_raw, allow_neg_eigval).reshape(-1, HV)
    S = initial_state.float()
    if kind == 'gdn':
        alpha = gdn_decay(a_raw, A_log, dt_bias).exp().reshape(-1, HV)
        pred = alpha[..., None] * torch.einsum('nhvk,nhk->nhv', S, kn)
    else:
        pred = torch.einsum('nhkv,nhk->nhv', S, kn)
    score = (beta[..., None] * (v.reshape(-1, HV, v.shape[-1]).float() - pred)).norm(dim=-1).reshape(*shape, HV)
    if kind == 'gdn':
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
        o, final = fused_recurrent_gated_delta_rule(
            q=q, k=k, v=v, g=a_raw, beta=beta_raw, initial_state=initial_state, output_final_state=True,
            use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
            use_beta_sigmoid_in_kernel=True, allow_neg_eigval=allow_neg_eigval, state_v_first=True,
            cu_seqlens=cu_seqlens)
    else:
        from fla.ops.delta_rule import fused_recurrent_delta_rule
        o, final = fused_recurrent_delta_rule(q=q, k=k, v=v, beta=beta_raw, initial_state=initial_state,
                                              output_final_state=True, cu_seqlens=cu_seqlens,
                                              use_qk_l2norm_in_kernel=True)
    return o, score, final
