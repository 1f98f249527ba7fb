"""The PyTorch reference of the memory and the CPU fallbacks, against independent definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from hola_retrofit import MemoryConfig
from hola_retrofit.adapters import fallbacks
from hola_retrofit.adapters.reference import (chunk_delta_rule_with_score, delta_rule_with_score, empty_memory,
                                             memory_forward, novelty_scores, novelty_step)


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "NaN/inf in result"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _feed(cfg, scores, T, hv=2, split=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    K, V = 4, 3
    q = F.normalize(torch.randn(T, hv, K, generator=g), dim=-1)
    k = F.normalize(torch.randn(T, hv, K, generator=g), dim=-1)
    v = torch.randn(T, hv, V, generator=g)
    o_state = torch.randn(T, hv, V, generator=g)
    params = {'q_gamma': torch.full((hv, K), 1.5), 'k_gamma': torch.ones(hv, K), 'sink': torch.zeros(hv),
              'gate': torch.zeros(hv)}
    mem = empty_memory(1, hv, K, V, cfg, torch.float32, torch.device('cpu'))
    outs, i = [], 0
    for L in (split or [T]):
        outs.append(memory_forward(mem, 0, q[i:i + L], k[i:i + L], v[i:i + L], scores[i:i + L], o_state[i:i + L],
                                   params, cfg, 0.5))
        i += L
    return mem, torch.cat(outs), (q, k, v, o_state, params)


@pytest.mark.parametrize('eviction', ['surprise', 'recency'])
@pytest.mark.parametrize('M,C,T', [(5, 4, 37), (8, 3, 40), (1, 7, 29), (16, 4, 12)])
def test_topm_equals_brute_force(eviction, M, C, T):
    g = torch.Generator().manual_seed(M * 100 + T)
    scores = torch.randint(0, 6, (T, 2), generator=g).float()  # many ties on purpose
    cfg = MemoryConfig(cache_size=M, block_size=C, eviction=eviction)
    mem, _, _ = _feed(cfg, scores, T)
    done = (T // C) * C  # tokens of completed blocks
    for h in range(2):
        if eviction == 'surprise':
            ranked = sorted(range(done), key=lambda p: (-scores[p, h].item(), p))  # ties keep the earlier token
        else:
            ranked = sorted(range(done), key=lambda p: -p)
        expect = sorted(ranked[:M])
        got = sorted(p for p in mem['cache_pos'][0, h].tolist() if p >= 0)
        assert got == expect
        # the block holds exactly the tokens after the last merge
        assert int(mem['seen'][0]) == T


def test_cache_entries_are_exact_copies():
    cfg = MemoryConfig(cache_size=6, block_size=4)
    scores = torch.rand(30, 2)
    mem, _, (q, k, v, _, _) = _feed(cfg, scores, 30)
    for h in range(2):
        for slot, p in enumerate(mem['cache_pos'][0, h].tolist()):
            assert torch.equal(mem['cache_k'][0, h, slot], k[p, h])
            assert torch.equal(mem['cache_v'][0, h, slot], v[p, h])
            assert mem['cache_score'][0, h, slot] == scores[p, h]


@pytest.mark.parametrize('rule', ['shared', 'gated'])
@pytest.mark.parametrize('read_block', [True, False])
def test_read_equals_explicit_softmax(rule, read_block):
    """The block-wise read equals a direct per-query computation over the entries it may see."""
    M, C, T = 4, 5, 23
    cfg = MemoryConfig(cache_size=M, block_size=C, read_rule=rule, read_block=read_block)
    scores = torch.rand(T, 2)
    _, out, (q, k, v, o_state, params) = _feed(cfg, scores, T)
    for t in range(T):
        b0 = (t // C) * C
        for h in range(2):
            done = list(range(b0))
            cache = sorted(done, key=lambda p: (-scores[p, h].item(), p))[:M]
            entries = cache + (list(range(b0, t + 1)) if read_block else [])
            qt = q[t, h] * params['q_gamma'][h] / torch.sqrt(q[t, h].pow(2).mean() + cfg.norm_eps)
            logits = [params['sink'][h]]
            for p in entries:
                kt = k[p, h] * params['k_gamma'][h] / torch.sqrt(k[p, h].pow(2).mean() + cfg.norm_eps)
                logits.append((qt * kt).sum() / math.sqrt(q.shape[-1]))
            w = torch.softmax(torch.stack(logits), 0)
            read = sum((w[i + 1] * v[p, h] for i, p in enumerate(entries)), torch.zeros(v.shape[-1])) * 0.5
            if rule == 'shared':
                expect = w[0] * o_state[t, h] + read
            else:
                expect = o_state[t, h] + torch.sigmoid(params['gate'][h]) * read
            assert rel(out[t, h], expect) < 1e-5


@pytest.mark.parametrize('split', [[1] * 23, [7, 9, 7], [5, 5, 13], [22, 1]])
def test_split_invariance(split):
    cfg = MemoryConfig(cache_size=4, block_size=5)
    scores = torch.rand(23, 2)
    mem_a, out_a, _ = _feed(cfg, scores, 23)
    mem_b, out_b, _ = _feed(cfg, scores, 23, split=split)
    assert torch.allclose(out_a, out_b, atol=1e-6, rtol=1e-5)
    for key in mem_a:
        assert torch.equal(mem_a[key], mem_b[key]), key


@pytest.mark.parametrize('W', [1, 5, 16])
def test_novelty_scores_equal_their_definition_at_any_split(W):
    """m_t = 1 - max cos(k_t, k_j) over the W tokens before t (positions before the start: zero keys, cos 0),
    the same however the sequence is cut, decoded token by token included (novelty_step)."""
    g = torch.Generator().manual_seed(W)
    T, HV, K = 41, 2, 8
    k = F.normalize(torch.randn(T, HV, K, generator=g), dim=-1)
    k[20] = k[17]                                       # a repeat within the window: novelty 0
    cfg = MemoryConfig(cache_size=4, block_size=8, eviction='novelty', novelty_window=W)
    expect = torch.empty(T, HV)
    for t in range(T):
        prev = [k[j] for j in range(t - W, t) if j >= 0] + [torch.zeros(HV, K)] * max(0, W - t)
        expect[t] = 1 - torch.stack([(k[t] * p).sum(-1) for p in prev]).amax(0)
    if W >= 3:
        assert expect[20].abs().max() < 1e-6
    for cuts in ([T], [3, 30, 8], [1] * T):
        mem = empty_memory(1, HV, K, 4, cfg, torch.float32, torch.device('cpu'))
        got, i = [], 0
        for n in cuts:
            got.append(novelty_scores(mem, 0, k[i:i + n], i, rows=7))
            i += n
        assert rel(torch.cat(got), expect) < 1e-6, cuts
    mem = empty_memory(2, HV, K, 4, cfg, torch.float32, torch.device('cpu'))
    steps = []
    for t in range(T):  # two sequences at once, the second one token behind
        both = torch.stack([k[t], k[t - 1] if t else k[0]])
        steps.append(novelty_step(mem, both)[0])
        mem['seen'] += 1
    assert rel(torch.stack(steps), expect) < 1e-6


@pytest.mark.parametrize('gated', [True, False])
def test_delta_rule_reference_equals_fla_naive(gated):
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    g = torch.Generator().manual_seed(1)
    T, H, K, V = 19, 3, 8, 6
    q = F.normalize(torch.randn(1, T, H, K, generator=g), dim=-1)
    k = F.normalize(torch.randn(1, T, H, K, generator=g), dim=-1)
    v = torch.randn(1, T, H, V, generator=g)
    beta = torch.rand(1, T, H, generator=g)
    la = -torch.rand(1, T, H, generator=g) if gated else torch.zeros(1, T, H)
    S0 = torch.randn(H, K, V, generator=g) * 0.1
    o_ref, S_ref = naive_recurrent_gated_delta_rule(q, k, v, beta, la, scale=K ** -0.5, initial_state=S0[None],
                                                    output_final_state=True)
    o, m, S = delta_rule_with_score(q[0], k[0], v[0], beta[0], la[0] if gated else None, K ** -0.5, S0)
    assert rel(o, o_ref[0]) < 1e-5 and rel(S, S_ref[0]) < 1e-5
    # score: ||beta_t (v_t - alpha_t S_{t-1}^T k_t)||, recomputed here from the reference's own states
    Sp = S0.clone()
    for t in range(T):
        Sp = Sp * la[0, t].exp()[:, None, None]
        e = v[0, t] - torch.einsum('hkv,hk->hv', Sp, k[0, t])
        assert rel(m[t], (beta[0, t, :, None] * e).norm(dim=-1)) < 1e-5
        Sp = Sp + k[0, t][:, :, None] * (beta[0, t, :, None] * e)[:, None, :]


@pytest.mark.parametrize('gated', [True, False])
@pytest.mark.parametrize('T', [1, 16, 53, 130])
def test_chunked_delta_rule_equals_step_by_step(gated, T):
    """The CPU fast path (one step per chunk) against the step-by-step reference: outputs, scores, final state."""
    g = torch.Generator().manual_seed(T)
    H, K, V = 3, 8, 6
    q = F.normalize(torch.randn(T, H, K, generator=g), dim=-1)
    k = F.normalize(torch.randn(T, H, K, generator=g), dim=-1)
    v, beta = torch.randn(T, H, V, generator=g), torch.rand(T, H, generator=g)
    la = -torch.rand(T, H, generator=g) * 0.5 if gated else None
    S0 = torch.randn(H, K, V, generator=g) * 0.3
    for start in (None, S0):
        expect = delta_rule_with_score(q, k, v, beta, la, K ** -0.5, start)
        got = chunk_delta_rule_with_score(q, k, v, beta, la, K ** -0.5, start, chunk=16)
        for a, b in zip(got, expect):
            assert rel(a, b) < 1e-5


def test_fallback_delta_rule_equals_fla_naive_recurrence():
    """DeltaNet's CPU fallback (base models) against fla's own step-by-step reference, from a state."""
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    g = torch.Generator().manual_seed(3)
    B, T, H, K, V = 2, 45, 2, 8, 6
    q, k, v = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, V, generator=g)
    beta, S0 = torch.rand(B, T, H, generator=g), torch.randn(B, H, K, V, generator=g) * 0.1
    o, S = fallbacks.delta_rule_cpu(q, k, v, beta, initial_state=S0, output_final_state=True,
                                    use_qk_l2norm_in_kernel=True)
    qn, kn = fallbacks.l2_normalize(q), fallbacks.l2_normalize(k)
    o_ref, S_ref = delta_rule_recurrence(*(t.transpose(1, 2) for t in (qn, kn, v, beta)), initial_state=S0,
                                         output_final_state=True)
    assert rel(o, o_ref.transpose(1, 2)) < 1e-5 and rel(S, S_ref) < 1e-5


def test_fallback_rmsnorm_equals_fla_reference():
    from fla.modules.norm.layernorm import rms_norm_ref
    x, r, w = torch.randn(3, 5, 16), torch.randn(3, 5, 16), torch.rand(16) + 0.5
    y, res = fallbacks.rms_norm(x, w, None, r, 1e-5, prenorm=True)
    y_ref, res_ref = rms_norm_ref(x, w, None, r, 1e-5, prenorm=True, upcast=True)
    assert rel(y, y_ref) < 1e-6 and rel(res, res_ref) < 1e-6


def test_fallback_gated_norm_and_conv_and_ce():
    x, g, w = torch.randn(2, 7, 3, 8), torch.randn(2, 7, 3, 8), torch.rand(8) + 0.5
    y = fallbacks.gated_rms_norm(x, g, w, eps=1e-5, activation='swish')
    expect = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w * F.silu(g)
    assert rel(y, expect) < 1e-6
    # short conv: full pass == token-by-token with the cache, and == an explicit causal sum
    D, W, T = 6, 4, 11
    x, wt = torch.randn(2, T, D), torch.randn(D, W)
    y, state = fallbacks.short_conv(x, wt, None, 'silu', output_final_state=True)
    pad = torch.cat([torch.zeros(2, W - 1, D), x], 1)
    direct = F.silu(sum(pad[:, i:i + T] * wt[:, i] for i in range(W)))
    assert rel(y, direct) < 1e-6
    cache, steps = torch.zeros(2, D, W), []
    with torch.no_grad():
        for t in range(T):
            yt, cache = fallbacks.short_conv(x[:, t:t + 1], wt, None, 'silu', cache=cache, output_final_state=True)
            steps.append(yt)
    assert rel(torch.cat(steps, 1), y) < 1e-6 and torch.equal(cache, state)
    from fla.modules import FusedCrossEntropyLoss
    logits, target = torch.randn(10, 7), torch.randint(0, 7, (10,))
    target[3] = -100
    assert rel(FusedCrossEntropyLoss()(logits, target), F.cross_entropy(logits, target)) < 1e-6


@pytest.mark.parametrize('gva', [False, True])
def test_fallback_gated_delta_rule_equals_fla_chunk_naive(gva):
    """The CPU fallback of fla's kernel entry point (used by base models) against fla's chunked naive."""
    from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
    g = torch.Generator().manual_seed(2)
    T, H, HV, K, V = 70, 2, 4 if gva else 2, 8, 6
    q, k = torch.randn(1, T, H, K, generator=g), torch.randn(1, T, H, K, generator=g)
    v, a, b = torch.randn(1, T, HV, V, generator=g), torch.randn(1, T, HV, generator=g), torch.randn(1, T, HV, generator=g)
    A_log, dt_bias = torch.rand(HV, generator=g), torch.randn(HV, generator=g)
    o, S = fallbacks.gated_delta_rule_cpu(q, k, v, a, b, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                          A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True,
                                          output_final_state=True, state_v_first=True)
    rep = HV // H
    qn = fallbacks.l2_normalize(q).repeat_interleave(rep, 2)
    kn = fallbacks.l2_normalize(k).repeat_interleave(rep, 2)
    o_ref, S_ref = naive_chunk_gated_delta_rule(qn, kn, v, fallbacks.gdn_decay(a, A_log, dt_bias), b.sigmoid(),
                                                chunk_size=16, output_final_state=True)
    assert rel(o, o_ref) < 1e-4 and rel(S.transpose(-1, -2), S_ref) < 1e-4


def test_sdpa_attention_stand_in_matches_explicit_softmax():
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 6, 4, 8, generator=g), torch.randn(1, 9, 2, 8, generator=g), torch.randn(1, 9, 2, 8, generator=g)
    o = fallbacks.flash_attn_func_sdpa(q, k, v, causal=True, window_size=(3, 0))
    kk, vv = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    for i in range(6):
        pos = i + 3  # bottom-right aligned
        js = [j for j in range(9) if pos - 3 <= j <= pos]
        w = torch.softmax(torch.einsum('hd,jhd->hj', q[0, i], kk[0, js]) / 8 ** 0.5, -1)
        assert rel(o[0, i], torch.einsum('hj,jhd->hd', w, vv[0, js])) < 1e-5
    cu = torch.tensor([0, 4, 9])
    ov = fallbacks.flash_attn_varlen_func_sdpa(k.repeat_interleave(2, 2)[0], k[0], v[0], cu, cu, causal=True)
    assert rel(ov[4:], fallbacks.flash_attn_func_sdpa(kk[:, 4:], k[:, 4:], v[:, 4:], causal=True)[0]) < 1e-6


def test_torch_chunk_gdn_fallback_matches_reference_and_has_gradients():
    """The PyTorch GDN path used for gradients where fla's fused backward cannot run (Hopper, triton < 3.7.1)."""
    from hola_retrofit.adapters.state import _state_forward_reference, _torch_chunk_gdn
    g = torch.Generator().manual_seed(5)
    B, T, H, HV, K, V = 2, 45, 2, 4, 8, 6
    q = torch.randn(B, T, H, K, generator=g, requires_grad=True)
    k, v = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, HV, V, generator=g)
    b, a = torch.randn(B, T, HV, generator=g), torch.randn(B, T, HV, generator=g)
    A_log, dt = torch.rand(HV, generator=g), torch.randn(HV, generator=g)
    S0 = torch.randn(B, HV, V, K, generator=g) * 0.1
    o, S = _torch_chunk_gdn(q, k, v, b, a, A_log, dt, False, S0, None)
    o_ref, _, S_ref = _state_forward_reference('gdn', q.detach(), k, v, b, a, A_log, dt, False, S0, None)
    assert rel(o, o_ref) < 1e-4 and rel(S, S_ref) < 1e-4
    o.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
