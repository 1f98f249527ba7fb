"""Memory-augmented drop-in replacements for fla's GatedDeltaNet and DeltaNet mixers.

`attach_memory(model, cfg)` turns every GDN/DeltaNet mixer of an fla causal LM into its
memory-augmented subclass in place: every pretrained weight stays where it was, one small module
`attn.mem` per layer is added, and standard-attention layers of hybrid models are left alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange
from fla.layers.delta_net import DeltaNet, elu_p1
from fla.layers.gated_deltanet import GatedDeltaNet
from fla.layers.utils import get_layer_cache, repad_hidden_states, unpad_hidden_states, update_layer_cache
from torch.nn import functional as F

from ..kernels.memory import (decode_beside, kernels_enabled, memory_decode_fused, memory_prefill_fused,
                              prompt_pieces)
from .config import MemoryConfig
from .fallbacks import expand_heads, l2_normalize, spans
from .reference import empty_memory, memory_forward, novelty_scores, novelty_step
from .state import CHUNK, sequence_parts, state_forward

MEMORY_KEY = 'hola_memory'


class MemoryParams(nn.Module):
    """The memory's own parameters, packed in one tensor `weight` [HV, 2K + 2]:
    columns [0, K) gamma of the cache-path q, [K, 2K) gamma of k, 2K the sink logit, 2K + 1 the gate logit.
    One module with one `weight` so PEFT can train it as a unit (LN-tuning, or `modules_to_save` with LoRA)."""

    def __init__(self, hv: int, k: int, device=None):
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.empty(hv, 2 * k + 2, device=device, dtype=torch.float32))

    @staticmethod
    def initial(hv: int, k: int, cfg: MemoryConfig) -> torch.Tensor:
        w = torch.empty(hv, 2 * k + 2, dtype=torch.float32)
        w[:, :2 * k] = cfg.gamma_init
        w[:, 2 * k] = cfg.sink_init
        w[:, 2 * k + 1] = cfg.gate_init
        return w

    @torch.no_grad()
    def reset(self, cfg: MemoryConfig) -> None:
        if self.weight.device.type != 'meta':
            self.weight.copy_(self.initial(self.weight.shape[0], self.k, cfg))

    def forward(self, x=None) -> dict[str, torch.Tensor]:
        w, k = self.weight, self.k
        return {'q_gamma': w[:, :k], 'k_gamma': w[:, k:2 * k], 'sink': w[:, 2 * k], 'gate': w[:, 2 * k + 1],
                'weight': w}


class HolaMixin:
    """Memory parameters and the forward shared by both mixers. Subclasses define `_inputs`."""

    kind: str
    hola: MemoryConfig

    @property
    def num_value_heads(self) -> int:
        return getattr(self, 'num_v_heads', self.num_heads)

    def _init_memory(self, cfg: MemoryConfig) -> None:
        self.hola = cfg
        self.mem = MemoryParams(self.num_value_heads, self.head_k_dim, device=self.q_proj.weight.device)
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        self.mem.reset(self.hola)

    def _conv_qkv(self, x, last_state, use_cache, cu_seqlens):
        conv_state = (None, None, None)
        if self.use_short_conv:
            if last_state is not None and last_state.get('conv_state') is not None:
                conv_state = last_state['conv_state']
            outs = [conv(x=proj(x), cache=c, output_final_state=use_cache, cu_seqlens=cu_seqlens)
                    for conv, proj, c in zip((self.q_conv1d, self.k_conv1d, self.v_conv1d),
                                             (self.q_proj, self.k_proj, self.v_proj), conv_state)]
            (q, cq), (k, ck), (v, cv) = outs
            return q, k, v, (cq, ck, cv)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return q, k, v, None

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, **kwargs):
        if not self.hola.enabled:
            return super().forward(hidden_states, attention_mask=attention_mask, past_key_values=past_key_values,
                                   use_cache=use_cache, output_attentions=output_attentions, **kwargs)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a [batch, seq_len] 0/1 padding mask")
        batch_size, q_len, _ = hidden_states.shape
        last_state = get_layer_cache(self, past_key_values)
        x, indices, cu_seqlens = unpad_hidden_states(hidden_states=hidden_states, cu_seqlens=kwargs.get('cu_seqlens'),
                                                     attention_mask=attention_mask, q_len=q_len)
        q, k, v, beta, a, conv_state = self._inputs(x, last_state, use_cache, cu_seqlens)
        g_raw = None  # the output gate's projection, where computed beside the decode step
        previous = last_state['recurrent_state'] if last_state is not None else None
        B, T, HV, V = v.shape
        seqs = spans(B, T, cu_seqlens)
        mem = last_state.get(MEMORY_KEY) if last_state is not None else None
        fresh = mem is None
        fused = kernels_enabled(v)
        if fresh:  # the fused prefill of whole blocks writes every slot: no fills needed
            whole = fused and B * T > len(seqs) and all(e - s >= self.hola.block_size for _, s, e in seqs)
            mem = empty_memory(len(seqs), HV, self.head_k_dim, V, self.hola, v.dtype, v.device, init=not whole)
        elif mem['seen'].shape[0] != len(seqs):
            raise ValueError(f"the cache holds memory for {mem['seen'].shape[0]} sequences, this call has "
                             f"{len(seqs)}; pass a padding mask whose last column is all ones, or a new cache")
        params = self.mem(x)
        scale = self.head_k_dim ** -0.5
        novelty = self.hola.eviction == 'novelty'
        if fused and B * T == len(seqs):  # one token per sequence: the memory's kernels take the state step too
            N = len(seqs)
            step = dict(kind=self.kind, S=previous, beta=beta, a=a, A_log=getattr(self, 'A_log', None),
                        dt_bias=getattr(self, 'dt_bias', None), allow_neg_eigval=self.allow_neg_eigval)
            given = novelty_step(mem, expand_heads(l2_normalize(k.reshape(N, *k.shape[2:])), HV)) if novelty else None
            # the output gate's projection does not depend on the step: under CUDA graphs it runs beside it
            beside = (lambda: self.g_proj(x)) if self.use_gate and decode_beside(v.device) else None
            o = memory_decode_fused(mem, q.reshape(N, *q.shape[2:]), k.reshape(N, *k.shape[2:]), v.reshape(N, HV, V),
                                    params, self.hola, scale, score=given, state=step, beside=beside)
            if beside is not None:
                o, g_raw = o
            o = o.reshape(v.shape)
            recurrent = step['S']
        else:
            # a fresh prompt's blocks are the state path's chunks: the read kernel then computes the state output too
            parts = fused and fresh and self.hola.block_size == CHUNK
            whole = parts and len(seqs) == 1 and B == 1 and cu_seqlens is None and not novelty
            o, score, recurrent, k_rstd = state_forward(
                self.kind, q, k, v, beta, a, getattr(self, 'A_log', None), getattr(self, 'dt_bias', None),
                self.allow_neg_eigval, previous, cu_seqlens, parts=parts, pieces=prompt_pieces(T, v.device) if whole else 1)
            if novelty:  # the write scores from the keys instead (before the memory advances its positions)
                kn = expand_heads(l2_normalize(k), HV)
                score = torch.empty(B, T, HV, dtype=torch.float32, device=v.device)
                for n, (b, s, e) in enumerate(seqs):
                    score[b, s:e] = novelty_scores(mem, n, kn[b, s:e], 0 if fresh else int(mem['seen'][n]))
            if fused:  # the kernels normalise raw q/k themselves and write the output in place
                parts = None
                if isinstance(o, dict):
                    parts, o = sequence_parts(o, seqs, cu_seqlens is not None), torch.empty_like(v)
                for n, (b, s, e) in enumerate(seqs):
                    memory_prefill_fused(mem, n, q[b, s:e], k[b, s:e], v[b, s:e],
                                         None if score is None else score[b, s:e],
                                         None if parts else o[b, s:e], params, self.hola, scale, out=o[b, s:e],
                                         fresh=fresh, k_rstd=None if k_rstd is None else k_rstd[b, s:e],
                                         state=next(parts) if parts else None)
            else:
                o_state, o = o, torch.empty_like(o)
                qn, kn = expand_heads(l2_normalize(q), HV), expand_heads(l2_normalize(k), HV)
                for n, (b, s, e) in enumerate(seqs):
                    o[b, s:e] = memory_forward(mem, n, qn[b, s:e], kn[b, s:e], v[b, s:e], score[b, s:e],
                                               o_state[b, s:e], params, self.hola, scale).to(o.dtype)
        state = update_layer_cache(self, past_key_values, recurrent_state=recurrent, conv_state=conv_state,
                                   offset=q_len)
        if state is not None:
            state[MEMORY_KEY] = mem

        if self.use_gate:
            g = rearrange(self.g_proj(x) if g_raw is None else g_raw, '... (h d) -> ... h d', d=self.head_v_dim)
            o = self.o_norm(o, g)
        else:
            o = self.o_norm(o)
        o = self.o_proj(rearrange(o, 'b t h d -> b t (h d)'))
        o = repad_hidden_states(hidden_states=o, indices=indices, batch_size=batch_size, q_len=q_len)
        return o, None, past_key_values


class HolaGatedDeltaNet(HolaMixin, GatedDeltaNet):
    kind = 'gdn'

    def _inputs(self, x, last_state, use_cache, cu_seqlens):
        q, k, v, conv_state = self._conv_qkv(x, last_state, use_cache, cu_seqlens)
        if not self.use_short_conv:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k = (rearrange(t, '... (h d) -> ... h d', d=self.head_k_dim) for t in (q, k))
        v = rearrange(v, '... (h d) -> ... h d', d=self.head_v_dim)
        return q, k, v, self.b_proj(x), self.a_proj(x), conv_state


class HolaDeltaNet(HolaMixin, DeltaNet):
    kind = 'deltanet'

    def _inputs(self, x, last_state, use_cache, cu_seqlens):
        q, k, v, conv_state = self._conv_qkv(x, last_state, use_cache, cu_seqlens)
        if not self.use_short_conv:
            if self.qk_activation == 'silu':
                q, k = F.silu(q), F.silu(k)
            v = F.silu(v)
        q, k = (rearrange(t, '... (h d) -> ... h d', d=self.head_k_dim) for t in (q, k))
        v = rearrange(v, '... (h d) -> ... h d', d=self.head_v_dim)
        if self.qk_activation == 'relu':
            q, k = q.relu(), k.relu()
        elif self.qk_activation == 'elu':
            q, k = elu_p1(q), elu_p1(k)
        beta = self.b_proj(x).sigmoid() if self.use_beta else torch.ones_like(q[..., 0])
        if self.allow_neg_eigval:
            beta = beta * 2.0
        return q, k, v, beta, None, conv_state


_SWAPS = ((GatedDeltaNet, HolaGatedDeltaNet), (DeltaNet, HolaDeltaNet))


def _check_supported(mixer: nn.Module) -> None:
    if isinstance(mixer, DeltaNet) and mixer.qk_norm != 'l2':
        raise ValueError(f"DeltaNet with qk_norm={mixer.qk_norm!r} is not supported (only 'l2')")


def attach_memory(model: nn.Module, cfg: MemoryConfig) -> list[int]:
    """Swap every GDN/DeltaNet mixer of `model` for its memory-augmented subclass, in place.
    Returns the indices of the patched layers; other mixers (hybrid attention) are left alone."""
    patched = []
    for i, block in enumerate(model.model.layers):
        mixer = block.attn
        if isinstance(mixer, HolaMixin):
            mixer.hola = cfg.for_layer(i)
            patched.append(i)
            continue
        for base, hola in _SWAPS:
            if type(mixer) is base:
                _check_supported(mixer)
                mixer.__class__ = hola
                mixer._init_memory(cfg.for_layer(i))
                patched.append(i)
                break
    return patched


def memory_layers(model: nn.Module) -> list[HolaMixin]:
    return [m for m in model.modules() if isinstance(m, HolaMixin)]
