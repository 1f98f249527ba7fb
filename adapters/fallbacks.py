"""Pure-PyTorch fallbacks that let fla 0.6.0 models run forward and generate on a CPU.

(Also: where the `flash_attn` package is missing, SDPA stand-ins for the two flash-attn functions
that fla's `Attention` layer calls, so hybrid checkpoints load and run; see `install()`.)

fla's short convolution, norms, gated MLP, fused cross-entropy and delta-rule kernels are
Triton-only: on a CPU every forward fails ("0 active drivers"). `install()` wraps those entry
points so that a call whose tensors are *not* on a CUDA device runs the plain PyTorch
computation below; CUDA tensors go to fla's own code, unchanged. Importing `hola_retrofit`
calls `install()` once. The delta-rule fallbacks run the chunked float32 delta rule of
`reference.py`, which the tests check against fla's own naive references (`fla/ops/*/naive.py`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_INSTALLED = False


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's in-kernel L2 norm: x / sqrt(sum x^2 + eps), in float32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def gdn_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """GDN log-decay g = -exp(A_log) * softplus(a + dt_bias), float32."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())


def expand_heads(x: torch.Tensor, hv: int) -> torch.Tensor:
    """[..., H, D] -> [..., HV, D]: value head i reads q/k head i // (HV/H) (grouped value heads)."""
    return x if x.shape[-2] == hv else x.repeat_interleave(hv // x.shape[-2], dim=-2)


def gdn_beta(beta_raw: torch.Tensor, allow_neg_eigval: bool) -> torch.Tensor:
    """GDN write strength sigmoid(b) (x2 with allow_neg_eigval), float32."""
    return torch.sigmoid(beta_raw.float()) * (2.0 if allow_neg_eigval else 1.0)


def spans(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch index, start, end) of every sequence of a [B, T, ...] input, or of a packed one (B = 1)."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    c = cu_seqlens.tolist()
    return [(0, c[i], c[i + 1]) for i in range(len(c) - 1)]


def _on_cuda(*tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


# --------------------------------------------------------------------------- modules

def rms_norm(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    dtype = x.dtype
    if residual is not None:
        x = x.float() + residual.float()
    res_out = x.to(torch.float32 if residual_in_fp32 else dtype)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    y = y.to(dtype)
    return (y, res_out) if prenorm else y


def gated_rms_norm(x, g, weight, bias=None, eps=1e-5, activation='swish'):
    """rmsnorm(x) * weight * act(g), as fla's FusedRMSNormGated computes it."""
    y = rms_norm(x.float(), weight, bias, eps=eps)
    gf = g.float()
    gate = gf * torch.sigmoid(gf) if activation in ('swish', 'silu') else torch.sigmoid(gf)
    return (y * gate).to(x.dtype)


def short_conv(x, weight, bias=None, activation=None, cache=None, output_final_state=False,
               cu_seqlens=None, mask=None, residual=None):
    """Depthwise causal conv of fla's ShortConvolution. x [B, T, D]; weight [D, W];
    cache [N, D, W] holds the last W inputs (oldest first), as fla's update kernel keeps it."""
    if mask is not None:
        x = x * mask.unsqueeze(-1).to(x.dtype)
    D, W = weight.shape
    ys, states = [], []
    # an unpacked batch is convolved in one call; packed sequences one by one
    parts = [(x, cache)] if cu_seqlens is None else [
        (x[b:b + 1, s:e], cache[n:n + 1] if cache is not None else None)
        for n, (b, s, e) in enumerate(spans(x.shape[0], x.shape[1], cu_seqlens))]
    for xs, c in parts:
        prev = c.transpose(1, 2) if c is not None else xs.new_zeros(xs.shape[0], W, D)
        full = torch.cat([prev[:, 1:].to(xs.dtype), xs], dim=1)  # [N, W-1+T, D]
        y = F.conv1d(full.transpose(1, 2).float(), weight.float().unsqueeze(1),
                     bias.float() if bias is not None else None, groups=D)  # [N, D, T]
        y = y.transpose(1, 2)
        if activation in ('silu', 'swish'):
            y = F.silu(y)
        ys.append(y.to(x.dtype))
        states.append(torch.cat([prev.to(xs.dtype), xs], dim=1)[:, -W:].transpose(1, 2))
    y = torch.cat(ys, dim=1)
    if residual is not None:
        y = y + residual
    final = None
    if output_final_state:
        final = torch.cat(states, dim=0)
        if cache is not None and not torch.is_grad_enabled() and final.shape == cache.shape:
            cache.copy_(final)  # fla's single-step path updates the cache in place
            final = cache
    return y, final


# --------------------------------------------------------------------------- delta rules

def _delta_rule_cpu(q, k, v, beta, log_alpha, scale, initial_state, output_final_state, cu_seqlens, state_v_first):
    """Unit q, k [B, T, H, K] (grouped heads expanded here), v [B, T, HV, V], float beta / log_alpha [B, T, HV]:
    every sequence through the chunked float32 delta rule of `reference.py` (tested against fla's naive ones)."""
    from .reference import chunk_delta_rule_with_score

    HV = v.shape[2]
    q, k = expand_heads(q, HV), expand_heads(k, HV)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, finals = torch.empty_like(v), []
    for n, (b, s, e) in enumerate(spans(v.shape[0], v.shape[1], cu_seqlens)):
        h0 = None if initial_state is None else initial_state[n].float()
        if h0 is not None and state_v_first:
            h0 = h0.transpose(-1, -2)
        on, _, ht = chunk_delta_rule_with_score(q[b, s:e], k[b, s:e], v[b, s:e], beta[b, s:e],
                                                None if log_alpha is None else log_alpha[b, s:e], scale, h0)
        o[b, s:e] = on.to(v.dtype)
        finals.append(ht.transpose(-1, -2) if state_v_first else ht)
    return o, (torch.stack(finals).contiguous() if output_final_state else None)


def gated_delta_rule_cpu(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                         use_qk_l2norm_in_kernel=False, cu_seqlens=None, use_gate_in_kernel=False,
                         A_log=None, dt_bias=None, use_beta_sigmoid_in_kernel=False,
                         allow_neg_eigval=False, state_v_first=False, **_):
    """fla's chunk/fused_recurrent_gated_delta_rule signature, in PyTorch on any device."""
    if use_qk_l2norm_in_kernel:
        q, k = l2_normalize(q), l2_normalize(k)
    beta = gdn_beta(beta, allow_neg_eigval) if use_beta_sigmoid_in_kernel else beta.float()
    g = gdn_decay(g, A_log, dt_bias) if use_gate_in_kernel else g.float()
    return _delta_rule_cpu(q.float(), k.float(), v, beta, g, scale, initial_state, output_final_state, cu_seqlens,
                           state_v_first)


def delta_rule_cpu(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None, use_qk_l2norm_in_kernel=False, **_):
    """fla's chunk/fused_recurrent_delta_rule signature, in PyTorch on any device."""
    if use_qk_l2norm_in_kernel:
        q, k = l2_normalize(q), l2_normalize(k)
    return _delta_rule_cpu(q.float(), k.float(), v, beta.float(), None, scale, initial_state, output_final_state,
                           cu_seqlens, False)


# --------------------------------------------------------------------------- attention (hybrids)

def rotary_cpu(x, cos, sin, seqlen_offsets=0, cu_seqlens=None, interleaved=False, inplace=False,
               conjugate=False, **_):
    """fla's rotary_embedding_fwdbwd, with its reference formula, per (packed) sequence."""
    from fla.modules.rotary.ops import rotary_embedding_ref
    if conjugate:
        sin = -sin
    y = x.clone()
    for n, (b, s, e) in enumerate(spans(x.shape[0], x.shape[1], cu_seqlens)):
        off = seqlen_offsets if isinstance(seqlen_offsets, int) else int(seqlen_offsets[n])
        pos = torch.arange(off, off + e - s, device=x.device)
        y[b, s:e] = rotary_embedding_ref(x[b, s:e].float()[None], cos[pos].float(), sin[pos].float(),
                                         interleaved)[0].to(x.dtype)
    if inplace:
        x.copy_(y)
        return x
    return y


def _sdpa(q, k, v, causal, window_size):
    """q [Tq, H, D], k/v [Tk, Hk, D]; flash-attn semantics (causal aligned to the bottom right)."""
    Tq, Tk = q.shape[0], k.shape[0]
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    i = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    j = torch.arange(Tk, device=q.device)[None, :]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= j <= i
    if window_size is not None and window_size[0] >= 0:
        allowed &= j >= i - window_size[0]
    o = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                       v.transpose(0, 1).float(), attn_mask=allowed)
    return o.transpose(0, 1).to(q.dtype)


def flash_attn_func_sdpa(q, k, v, causal=False, window_size=(-1, -1), **_):
    """Stand-in for flash_attn.flash_attn_func ([B, T, H, D]) through PyTorch SDPA."""
    return torch.stack([_sdpa(q[b], k[b], v[b], causal, window_size) for b in range(q.shape[0])])


def flash_attn_varlen_func_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                causal=False, window_size=(-1, -1), **_):
    """Stand-in for flash_attn.flash_attn_varlen_func ([total, H, D]) through PyTorch SDPA."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return torch.cat([_sdpa(q[cq[n]:cq[n + 1]], k[ck[n]:ck[n + 1]], v[ck[n]:ck[n + 1]], causal, window_size)
                      for n in range(len(cq) - 1)])


# --------------------------------------------------------------------------- install

def _dispatch(original, fallback):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [a for a in kwargs.values() if isinstance(a, torch.Tensor)]
        if _on_cuda(*tensors):
            return original(*args, **kwargs)
        return fallback(*args, **kwargs)
    wrapper.__hola_fallback__ = True
    return wrapper


def _method(cls, fallback):
    if not getattr(cls.forward, '__hola_fallback__', False):
        original = cls.forward

        @functools.wraps(original)
        def forward(self, *args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [a for a in kwargs.values() if isinstance(a, torch.Tensor)]
            if _on_cuda(*tensors):
                return original(self, *args, **kwargs)
            return fallback(self, *args, **kwargs)
        forward.__hola_fallback__ = True
        cls.forward = forward


def install() -> None:
    """Make fla's Triton-only modules fall back to PyTorch for non-CUDA tensors. Idempotent."""
    global _INSTALLED
    if _INSTALLED:
        return
    import fla.layers.delta_net as fla_dn
    import fla.layers.gated_deltanet as fla_gdn
    from fla.modules import FusedCrossEntropyLoss, FusedRMSNormGated, GatedMLP, RMSNorm, ShortConvolution

    _method(RMSNorm, lambda self, x, residual=None, prenorm=False, residual_in_fp32=False: rms_norm(
        x, self.weight, self.bias, residual, self.eps, prenorm, residual_in_fp32))

    def _gated(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        if residual is not None or prenorm:
            raise NotImplementedError("hola_retrofit's CPU FusedRMSNormGated takes no residual")
        return gated_rms_norm(x, g, self.weight, self.bias, self.eps, self.activation)
    _method(FusedRMSNormGated, _gated)

    def _conv(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **_):
        return short_conv(x, self.weight.squeeze(1), self.bias, self.activation, cache, output_final_state,
                          cu_seqlens, mask, residual)
    _method(ShortConvolution, _conv)

    def _mlp(self, x, **_):
        if self.hidden_act not in ('swish', 'silu'):
            raise NotImplementedError(f"hola_retrofit's CPU GatedMLP supports swish only, not {self.hidden_act}")
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
    _method(GatedMLP, _mlp)

    def _ce(self, logits, target):
        return F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)
    _method(FusedCrossEntropyLoss, _ce)

    for mod, names, fb in ((fla_gdn, ('chunk_gated_delta_rule', 'fused_recurrent_gated_delta_rule'), gated_delta_rule_cpu),
                           (fla_dn, ('chunk_delta_rule', 'fused_recurrent_delta_rule'), delta_rule_cpu)):
        for name in names:
            fn = getattr(mod, name)
            if not getattr(fn, '__hola_fallback__', False):
                setattr(mod, name, _dispatch(fn, fb))
    def _conv_fn(x, weight=None, bias=None, residual=None, initial_state=None, output_final_state=False,
                 activation=None, cu_seqlens=None, **_):
        return short_conv(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens,
                          residual=residual)
    if not getattr(fla_gdn.causal_conv1d, '__hola_fallback__', False):  # GDN's fused q/k/v conv (no cache)
        fla_gdn.causal_conv1d = _dispatch(fla_gdn.causal_conv1d, _conv_fn)

    import fla.layers.attn as fla_attn
    import fla.modules.rotary.ops as fla_rotary
    if not getattr(fla_rotary.rotary_embedding_fwdbwd, '__hola_fallback__', False):
        fla_rotary.rotary_embedding_fwdbwd = _dispatch(fla_rotary.rotary_embedding_fwdbwd, rotary_cpu)
    if fla_attn.flash_attn_func is None:
        # flash_attn is not installed (CPU, and the lent GPUs): fla's hybrid attention layers cannot even be
        # built. SDPA stand-ins with flash-attn's semantics let hybrid checkpoints load and run anywhere.
        fla_attn.flash_attn_func = flash_attn_func_sdpa
        fla_attn.flash_attn_varlen_func = flash_attn_varlen_func_sdpa
    _INSTALLED = True
