"""Fused kernels and the vectorised selection against the PyTorch reference, at several shapes.

Without a GPU these run under TRITON_INTERPRET=1 (set in conftest); on a GPU, compiled."""

import math
import os

import pytest
import torch
from conftest import VOCAB, hola_from_base, tiny_base

from hola_retrofit import MemoryConfig
from hola_retrofit.adapters.fallbacks import expand_heads, gdn_beta, gdn_decay, l2_normalize
from hola_retrofit.adapters.reference import delta_rule_with_score, empty_memory, memory_forward
from hola_retrofit.kernels.memory import memory_decode_fused, memory_prefill_fused
from hola_retrofit.kernels import select
from hola_retrofit.kernels.select import select_caches
from hola_retrofit.kernels.write import row_norm

DEV = 'cuda' if torch.cuda.is_available() else 'cpu'


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv('HOLA_POISON', '1')  # kernel outputs start as NaN; rel() fails on any NaN left


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), 'NaN/inf'
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize('eviction', ['surprise', 'recency'])
@pytest.mark.parametrize('M,C,N,tile', [(4, 3, 40, 2048), (7, 5, 61, 2048), (16, 4, 30, 2048), (1, 8, 33, 2048),
                                         (4, 3, 40, 16), (20, 7, 200, 16)])
def test_select_equals_brute_force(monkeypatch, eviction, M, C, N, tile):
    """Each block's cache against a sort of its earlier candidates; tile 16: the walk takes many steps."""
    monkeypatch.setattr(select, 'TILE', tile)
    g = torch.Generator().manual_seed(M + N)
    HV = 3
    score = torch.randint(0, 5, (HV, N), generator=g).float()
    pos = torch.arange(N).expand(HV, -1).clone()
    pos[1, 3] = -1  # an empty candidate
    blocks = torch.arange(0, N // C + 2)
    idx, cnt = (t.cpu() for t in select_caches(score.to(DEV), pos.to(DEV), 0, len(blocks), M, C, eviction))
    for h in range(HV):
        for j, b in enumerate(blocks.tolist()):
            prior = [i for i in range(N) if 0 <= pos[h, i] < b * C]
            key = (lambda i: (-score[h, i].item(), pos[h, i].item())) if eviction == 'surprise' else \
                (lambda i: -pos[h, i].item())
            expect = sorted(prior, key=key)[:M]
            got = [i for i in idx[h, j].tolist() if i >= 0]
            assert got == expect, (h, b)
            assert cnt[h, j] == len(expect)


@pytest.mark.parametrize('eviction', ['surprise', 'recency'])
@pytest.mark.parametrize('M,C,L,cuts', [(4, 3, 40, (9, 21)), (16, 4, 70, (8, 12, 40)), (7, 5, 61, (30,)),
                                        (20, 8, 200, (64, 128)), (5, 16, 48, (16, 32))])
@pytest.mark.parametrize('sort_chunk', [8, 64])
def test_select_by_pieces_equals_whole(monkeypatch, eviction, M, C, L, cuts, sort_chunk):
    """A prompt selected piece by piece (each piece's candidates: the cache of its first block and its own tokens,
    sorted in chunks of `sort_chunk`, `select.sort_piece`) against the selection over the whole prompt at once;
    scores with ties; small walk tiles."""
    from hola_retrofit.kernels.select import select_piece
    monkeypatch.setattr(select, 'TILE', 16)
    monkeypatch.setattr(select, 'SORT_CHUNK', sort_chunk)
    g = torch.Generator().manual_seed(M + L)
    HV = 3
    score = torch.randint(0, 6, (L, HV), generator=g).float().to(DEV)
    NB = L // C + 1
    want, want_cnt = select_caches(score.t(), None, 0, NB, M, C, eviction)
    idx = torch.full((HV, NB, M), -7, dtype=torch.int32, device=DEV)
    cnt = torch.full((HV, NB), -7, dtype=torch.int32, device=DEV)
    bounds = [0, *(c // C * C for c in cuts), L]
    for s, e in zip(bounds, bounds[1:]):
        select_piece(score, s, e, C, idx, cnt, eviction)
    assert torch.equal(cnt, want_cnt)
    assert torch.equal(idx, want)


def _inputs(L, HV, K, V, seed, dtype=torch.float32, H=None):
    """Raw q, k [L, H, K] (the kernels' input; H = HV unless given), v, score, o_state, params."""
    g = torch.Generator().manual_seed(seed)
    H = H or HV
    q = torch.randn(L, H, K, generator=g) * 3
    k = torch.randn(L, H, K, generator=g) * 3
    v = torch.randn(L, HV, V, generator=g)
    score = torch.rand(L, HV, generator=g)
    o_state = torch.randn(L, HV, V, generator=g) * 0.3
    params = {'q_gamma': 1 + torch.rand(HV, K, generator=g), 'k_gamma': 1 + torch.rand(HV, K, generator=g),
              'sink': torch.randn(HV, generator=g) + 2, 'gate': torch.randn(HV, generator=g)}
    cast = lambda t: t.to(DEV, dtype)  # noqa: E731
    return (cast(q), cast(k), cast(v), score.to(DEV), cast(o_state),
            {n: p.to(DEV) for n, p in params.items()})


def unit(x, hv):
    """What the reference takes: unit-L2 q/k expanded to the value heads."""
    return expand_heads(l2_normalize(x), hv).to(x.dtype)


SHAPES = [  # HV, H, K, V, M, C, splits
    (2, 2, 16, 16, 8, 16, [37, 21, 1]),
    (1, 1, 32, 48, 5, 16, [16, 17, 3]),
    (3, 3, 8, 12, 0, 16, [29]),             # cache off, block read only
    (4, 2, 16, 32, 12, 32, [7, 70, 2]),     # grouped value heads
]


@pytest.mark.parametrize('rule,eviction,read_block', [('shared', 'surprise', True), ('gated', 'surprise', True),
                                                      ('shared', 'recency', True), ('shared', 'surprise', False)])
@pytest.mark.parametrize('shape', SHAPES)
def test_prefill_kernel_equals_reference(shape, rule, eviction, read_block):
    _check_prefill(shape, MemoryConfig(cache_size=shape[4], block_size=shape[5], read_rule=rule, eviction=eviction,
                                       read_block=read_block))


@pytest.mark.parametrize('span', [60, 300])
@pytest.mark.parametrize('shape', SHAPES)
def test_prefill_kernel_sharp_logits(shape, span):
    """The read kernel takes max(|q| sqrt(K) - 60, sink) (base 2) as the softmax max where that lies within 100 of
    the sink, else the online running max: logits up to 60 above that max (span 60: the fixed max, above the sink),
    and a row bound 300 above the sink (span 300: the online max, with logits far above the sink)."""
    HV, H, K, V, M, C, splits = shape
    c = (span + 60) / math.log2(math.e) / K ** 0.5  # gamma_q gamma_k: every row's bound is sink + span + 60
    _check_prefill(shape, MemoryConfig(cache_size=M, block_size=C), gamma=c ** 0.5, sink=0.0)


@torch.no_grad()
def _check_prefill(shape, cfg, gamma=None, sink=None):
    HV, H, K, V, M, C, splits = shape
    L = sum(splits)
    q, k, v, score, o_state, params = _inputs(L, HV, K, V, seed=L + M, H=H)
    if gamma is not None:
        params.update(q_gamma=torch.full_like(params['q_gamma'], gamma), k_gamma=torch.full_like(params['k_gamma'], gamma),
                      sink=torch.full_like(params['sink'], sink))
    mem_ref = empty_memory(1, HV, K, V, cfg, torch.float32, torch.device(DEV))
    # a first call of whole blocks writes every slot: uninitialised (NaN / 7 here), as the model allocates it
    mem_fus = empty_memory(1, HV, K, V, cfg, torch.float32, torch.device(DEV), init=splits[0] < C)
    # the keys' L2-norm rstd as the model passes it: a strided view of a [B, T, H]-like tensor (fla's l2norm_fwd)
    k_rstd = torch.stack([torch.zeros(L, H, device=DEV), k.float().square().sum(-1).add(1e-6).rsqrt()], 1)[:, 1]
    i = 0
    for n in splits:
        sl = slice(i, i + n)
        a = memory_forward(mem_ref, 0, unit(q[sl], HV), unit(k[sl], HV), v[sl], score[sl], o_state[sl], params, cfg,
                           0.25)
        out = memory_prefill_fused(mem_fus, 0, q[sl], k[sl], v[sl], score[sl], o_state[sl], params, cfg, 0.25,
                                   fresh=i == 0,  # the first call skips the (empty) earlier candidates
                                   k_rstd=k_rstd[sl] if n % 2 else None)  # given, or computed by the kernels' host
        assert rel(out, a) < 1e-4, (shape, n)
        i += n
    for key in ('cache_v', 'cache_score', 'cache_pos', 'seen', 'block_score'):
        assert torch.equal(mem_ref[key], mem_fus[key]), key
    fill = int(mem_ref['seen'][0]) % C
    assert torch.equal(mem_ref['block_v'][:, :, :fill], mem_fus['block_v'][:, :, :fill])
    assert not any(t.isnan().any() for t in mem_fus.values())  # the slots past fill too
    # keys are normalised in the kernel: equal up to rounding (an empty cache slot must stay zero)
    assert rel(mem_fus['cache_k'], mem_ref['cache_k']) < 1e-6
    assert rel(mem_fus['block_k'][:, :, :fill], mem_ref['block_k'][:, :, :fill]) < 1e-6


def _chunk_pieces(q, k, v, beta, log_alpha, C, v_first, scale):
    """The chunked delta rule's pieces, float32, by the recurrence S_t = a_t S_{t-1} + k_t v_new_t^T: each chunk's
    starting state (fla's layout), v_new_t = beta_t (v_t - a_t S_{t-1}^T k_t), the chunk-local cumulative log2
    decay, and the state output scale * S_t^T q_t."""
    L, HV, V = v.shape
    qn, kn = unit(q, HV).float(), unit(k, HV).float()
    S = torch.zeros(HV, qn.shape[-1], V, device=DEV)
    hs, v_new, o = [], torch.empty(L, HV, V, device=DEV), torch.empty(L, HV, V, device=DEV)
    for t in range(L):
        if t % C == 0:
            hs.append(S.transpose(-1, -2) if v_first else S.clone())
        if log_alpha is not None:
            S = S * log_alpha[t].exp()[:, None, None]
        v_new[t] = beta[t][:, None] * (v[t].float() - torch.einsum('hkv,hk->hv', S, kn[t]))
        S = S + kn[t][:, :, None] * v_new[t][:, None, :]
        o[t] = scale * torch.einsum('hkv,hk->hv', S, qn[t])
    g = None
    if log_alpha is not None:
        g = torch.cat([c.cumsum(0) for c in log_alpha.split(C)]) / math.log(2)
    return dict(h=torch.stack(hs).contiguous(), v_new=v_new, k=l2_normalize(k.float()), g=g, v_first=v_first), o


def _state_path_inputs(HV, H, K, V, M, C, L, gated_state):
    """Raw q, k, v, a score, the memory parameters, and the float32 chunked state path's pieces and output
    (scale K^-0.5) for random beta and (gated_state) decay."""
    q, k, v, score, _, params = _inputs(L, HV, K, V, seed=L + M + HV, H=H)
    g = torch.Generator().manual_seed(L)
    beta = torch.rand(L, HV, generator=g).to(DEV)
    log_alpha = (-0.3 * torch.rand(L, HV, generator=g)).to(DEV) if gated_state else None
    return q, k, v, score, params, *_chunk_pieces(q, k, v, beta, log_alpha, C, gated_state, K ** -0.5)


@pytest.mark.parametrize('rule,sharp', [('shared', False), ('gated', False), ('shared', True)])
@pytest.mark.parametrize('gated_state', [True, False])  # GDN (decay, fla's value-first state) or DeltaNet
@pytest.mark.parametrize('HV,H,K,V,M,C,L', [(2, 2, 16, 16, 8, 16, 37), (4, 2, 16, 32, 12, 32, 70),
                                            (1, 1, 32, 48, 5, 16, 33), (2, 1, 8, 12, 0, 16, 16)])
@torch.no_grad()
def test_prefill_kernel_state_output(HV, H, K, V, M, C, L, gated_state, rule, sharp):
    """The read kernel computing the state output itself from the chunked state path's pieces (a fresh prompt's
    blocks are chunks) against the reference memory given the state output of the float32 recurrence."""
    q, k, v, score, params, pieces, o_state = _state_path_inputs(HV, H, K, V, M, C, L, gated_state)
    scale = K ** -0.5
    if sharp:  # the online launch (see test_prefill_kernel_sharp_logits)
        c = 360 / math.log2(math.e) / K ** 0.5
        params.update(q_gamma=torch.full_like(params['q_gamma'], c ** 0.5),
                      k_gamma=torch.full_like(params['k_gamma'], c ** 0.5), sink=torch.zeros_like(params['sink']))
    cfg = MemoryConfig(cache_size=M, block_size=C, read_rule=rule)
    ref = memory_forward(empty_memory(1, HV, K, V, cfg, torch.float32, torch.device(DEV)), 0, unit(q, HV),
                         unit(k, HV), v, score, o_state, params, cfg, scale)
    mem = empty_memory(1, HV, K, V, cfg, torch.float32, torch.device(DEV))
    out = memory_prefill_fused(mem, 0, q, k, v, score, None, params, cfg, scale, fresh=True, state=pieces)
    assert rel(out, ref) < 1e-4


def test_prompt_pieces(monkeypatch):
    """HOLA_PIECES: by default one piece outside a CUDA graph capture (here: no capture on the CPU); a count forces
    pieces; anything else is a clear error."""
    from hola_retrofit.kernels.memory import prompt_pieces
    cpu = torch.device('cpu')
    monkeypatch.delenv('HOLA_PIECES', raising=False)
    assert prompt_pieces(32768, cpu) == 1
    monkeypatch.setenv('HOLA_PIECES', '3')
    assert prompt_pieces(32768, cpu) == 3
    monkeypatch.setenv('HOLA_PIECES', 'four')
    with pytest.raises(ValueError, match='HOLA_PIECES'):
        prompt_pieces(32768, cpu)


def test_decode_beside(monkeypatch):
    """HOLA_BESIDE: off the GPU never (nothing to overlap); '1'/'0' force it on a CUDA device, 'auto' (default) only
    inside a CUDA graph capture; anything else is a clear error. Off CUDA, `beside` is simply called after the step."""
    from hola_retrofit.kernels.memory import decode_beside
    monkeypatch.delenv('HOLA_BESIDE', raising=False)
    assert not decode_beside(torch.device('cpu'))
    if torch.cuda.is_available():
        assert not decode_beside(torch.device('cuda'))
        monkeypatch.setenv('HOLA_BESIDE', '1')
        assert decode_beside(torch.device('cuda'))
    monkeypatch.setenv('HOLA_BESIDE', 'yes')
    with pytest.raises(ValueError, match='HOLA_BESIDE'):
        decode_beside(torch.device('cpu'))


@pytest.mark.parametrize('gated_state', [True, False])
@pytest.mark.parametrize('HV,H,K,V,M,C,L,cuts', [(2, 2, 16, 16, 8, 16, 70, (16, 48)), (4, 2, 16, 32, 12, 32, 96, (64,)),
                                                 (1, 1, 32, 48, 5, 16, 33, (16,)), (2, 1, 8, 12, 0, 16, 40, (32,))])
@torch.no_grad()
def test_prefill_in_pieces(monkeypatch, HV, H, K, V, M, C, L, cuts, gated_state):
    """A fresh prompt whose state path ran in pieces (`kernels.memory._prefill_in_pieces`: per piece the write
    score, the selection, the state output and the read) against the reference memory on the float32 recurrence,
    output and memory state."""
    monkeypatch.setattr(select, 'SORT_CHUNK', 16)  # pieces of up to 64 tokens: several chunks
    q, k, v, _, params, whole, o_state = _state_path_inputs(HV, H, K, V, M, C, L, gated_state)
    scale = K ** -0.5
    score = row_norm(whole['v_new'])  # the write score from the state path's v_new, as the pieces compute it
    cfg = MemoryConfig(cache_size=M, block_size=C)
    mem_ref = empty_memory(1, HV, K, V, cfg, torch.float32, torch.device(DEV))
    ref = memory_forward(mem_ref, 0, unit(q, HV), unit(k, HV), v, score, o_state, params, cfg, scale)
    bounds = [0, *cuts, L]
    pieces = [dict(start=s, end=e, h=whole['h'][s // C:-(-e // C)], v_new=whole['v_new'][s:e], ready=None)
              for s, e in zip(bounds, bounds[1:])]
    state = dict(k=whole['k'], g=whole['g'], v_first=gated_state, pieces=pieces)
    mem = empty_memory(1, HV, K, V, cfg, torch.float32, torch.device(DEV), init=False)
    out = memory_prefill_fused(mem, 0, q, k, v, None, None, params, cfg, scale, out=torch.full_like(v, float('nan')),
                               fresh=True, state=state)
    assert rel(out, ref) < 1e-4
    for key in ('cache_v', 'cache_score', 'cache_pos', 'seen', 'block_score'):
        assert torch.equal(mem_ref[key], mem[key]), key
    assert rel(mem['cache_k'], mem_ref['cache_k']) < 1e-6


@pytest.mark.parametrize('read_block,M,V', [(True, 6, 24), (False, 6, 24), (True, 20, 24), (True, 40, 48)])
@torch.no_grad()
def test_decode_kernel_equals_reference(read_block, M, V):
    """M 6: two parts of 16 entries (one without the block read), two value tiles of 16 (interpreter sizes); M 20:
    three parts, which the head's last program loads in one step (two and a tail of one); M 40: four parts, in two
    steps of two; V 48: three tiles."""
    HV, K, C = 2, 16, 16
    cfg = MemoryConfig(cache_size=M, block_size=C, read_block=read_block)
    N, steps = 2, 2 * C + 5
    mem_ref = empty_memory(N, HV, K, V, cfg, torch.float32, torch.device(DEV))
    mem_fus = empty_memory(N, HV, K, V, cfg, torch.float32, torch.device(DEV))
    # different histories per sequence: 23 and 40 prefilled tokens
    for n, L in enumerate((23, 40)):
        q, k, v, score, o_state, params = _inputs(L, HV, K, V, seed=n, H=1)
        memory_forward(mem_ref, n, unit(q, HV), unit(k, HV), v, score, o_state, params, cfg, 0.25)
        memory_prefill_fused(mem_fus, n, q, k, v, score, o_state, params, cfg, 0.25)
    for t in range(steps):
        q, k, v, score, o_state, _ = _inputs(N, HV, K, V, seed=100 + t, H=1)
        qn, kn = unit(q, HV), unit(k, HV)
        ref = torch.stack([memory_forward(mem_ref, n, qn[n:n + 1], kn[n:n + 1], v[n:n + 1], score[n:n + 1],
                                          o_state[n:n + 1], params, cfg, 0.25)[0] for n in range(N)])
        out = memory_decode_fused(mem_fus, q, k, v, params, cfg, 0.25, score=score, o_state=o_state)
        assert rel(out, ref) < 1e-4, t
    for key in ('cache_pos', 'cache_score', 'seen'):
        assert torch.equal(mem_ref[key], mem_fus[key]), key
    for key in ('cache_k', 'cache_v'):  # keys are normalised in the kernel: equal up to rounding
        assert rel(mem_fus[key], mem_ref[key]) < 1e-6, key


@pytest.mark.parametrize('kind', ['gdn', 'deltanet'])
def test_decode_state_step_equals_reference(kind):
    """The decode kernel's own recurrent step (state in place, score, state output) against the float32
    delta rule and the reference memory, across a block end; GDN with grouped value heads."""
    H, HV = (1, 2) if kind == 'gdn' else (2, 2)
    _check_decode_state_step(kind, N=2, H=H, HV=HV, K=16, V=24, M=4, C=8, prompts=(5, 13), steps=11)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='races between the programs of one launch: CUDA')
def test_decode_state_step_at_scale():
    """The same at the 340M layer's shape (M 512, K 256, V 512; hundreds of programs per launch, the head's last one
    finishing), 140 steps across two block ends, with full caches."""
    _check_decode_state_step('gdn', N=2, H=4, HV=4, K=256, V=512, M=512, C=64, prompts=(600, 650), steps=140)


@torch.no_grad()
def _check_decode_state_step(kind, N, H, HV, K, V, M, C, prompts, steps):
    cfg = MemoryConfig(cache_size=M, block_size=C)
    g = torch.Generator().manual_seed(3)
    mem_ref = empty_memory(N, HV, K, V, cfg, torch.float32, torch.device(DEV))
    mem_fus = empty_memory(N, HV, K, V, cfg, torch.float32, torch.device(DEV))
    for n, L in enumerate(prompts):
        q, k, v, score, o_state, params = _inputs(L, HV, K, V, seed=n, H=H)
        memory_forward(mem_ref, n, unit(q, HV), unit(k, HV), v, score, o_state, params, cfg, 0.25)
        memory_prefill_fused(mem_fus, n, q, k, v, score, o_state, params, cfg, 0.25)
    S_ref = torch.randn(N, HV, K, V, generator=g).to(DEV) * 0.2                  # the reference's [HV, K, V]
    S_fus = S_ref.transpose(-1, -2).contiguous() if kind == 'gdn' else S_ref.clone()  # fla's layout
    A_log, dt_bias = torch.randn(HV, generator=g).to(DEV), torch.randn(HV, generator=g).to(DEV)
    scale = K ** -0.5
    for t in range(steps):
        q, k, v, _, _, _ = _inputs(N, HV, K, V, seed=200 + t, H=H)
        b = torch.randn(N, HV, generator=g).to(DEV)
        a = torch.randn(N, HV, generator=g).to(DEV)
        beta = gdn_beta(b, False) if kind == 'gdn' else torch.sigmoid(b)
        log_alpha = gdn_decay(a, A_log, dt_bias) if kind == 'gdn' else None
        qn, kn = unit(q, HV), unit(k, HV)
        ref = []
        for n in range(N):
            o_s, m, S_n = delta_rule_with_score(qn[n:n + 1], kn[n:n + 1], v[n:n + 1], beta[n:n + 1],
                                                None if log_alpha is None else log_alpha[n:n + 1], scale, S_ref[n])
            S_ref[n] = S_n
            ref.append(memory_forward(mem_ref, n, qn[n:n + 1], kn[n:n + 1], v[n:n + 1], m, o_s, params, cfg, scale)[0])
        step = dict(kind=kind, S=S_fus, beta=b if kind == 'gdn' else beta, a=a, A_log=A_log, dt_bias=dt_bias,
                    allow_neg_eigval=False)
        out = memory_decode_fused(mem_fus, q, k, v, params, cfg, scale, state=step)
        assert step['S'] is S_fus  # updated in place
        assert rel(out, torch.stack(ref)) < 1e-4, t
        assert rel(S_fus.transpose(-1, -2) if kind == 'gdn' else S_fus, S_ref) < 1e-5, t
        assert torch.equal(mem_ref['seen'], mem_fus['seen']), t
    assert torch.equal(mem_ref['cache_pos'], mem_fus['cache_pos'])
    assert rel(mem_fus['cache_score'].clamp_min(-1), mem_ref['cache_score'].clamp_min(-1)) < 1e-5


@torch.no_grad()
def test_bf16_kernels_within_1e2_of_fp32_reference():
    HV, K, V, M, C = 2, 32, 32, 8, 16
    cfg = MemoryConfig(cache_size=M, block_size=C)
    L = 53
    q, k, v, score, o_state, params = _inputs(L, HV, K, V, seed=9)
    ref = memory_forward(empty_memory(1, HV, K, V, cfg, torch.float32, torch.device(DEV)), 0, unit(q, HV),
                         unit(k, HV), v, score, o_state, params, cfg, 0.25)
    mem = empty_memory(1, HV, K, V, cfg, torch.bfloat16, torch.device(DEV))
    out = memory_prefill_fused(mem, 0, q.bfloat16(), k.bfloat16(), v.bfloat16(), score, o_state.bfloat16(), params,
                               cfg, 0.25)
    assert rel(out, ref) < 1e-2


@pytest.mark.parametrize('eviction', ['surprise', 'novelty'])
@torch.no_grad()
def test_model_with_kernels_equals_reference_model(monkeypatch, kind, eviction):
    model = hola_from_base(tiny_base(kind), cache_size=6, block_size=16, sink_init=2.0, gamma_init=1.5,
                           eviction=eviction, novelty_window=20).to(DEV)
    ids = torch.randint(3, VOCAB, (2, 56), device=DEV)

    def run():  # 38 prefilled, then 18 decode steps across a block end (48): score, write, read, merge
        out = model(ids[:, :38], use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for t in range(38, 56):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
        return torch.cat(logits, 1)
    monkeypatch.setenv('HOLA_KERNELS', '0')
    ref = run()
    monkeypatch.setenv('HOLA_KERNELS', '1')
    if DEV == 'cpu' and os.environ.get('TRITON_INTERPRET') != '1':
        pytest.skip('needs TRITON_INTERPRET=1 on CPU')
    # on CUDA the reference's state path is fla's (TF32 for float32), the kernels' own state output and step IEEE
    assert rel(run(), ref) < (2e-3 if DEV == 'cuda' else 1e-4)


def _cuda_model_and_reference(monkeypatch, kind, layers, batch, T):
    """A tiny retrofitted model on CUDA (block size 64, fla's chunk), random ids, and the logits of the PyTorch
    memory; HOLA_KERNELS=1 afterwards."""
    torch.manual_seed(0)
    model = hola_from_base(tiny_base(kind, num_hidden_layers=layers), cache_size=6, block_size=64, sink_init=2.0,
                           gamma_init=1.5).cuda()
    ids = torch.randint(3, VOCAB, (batch, T), device='cuda')
    monkeypatch.setenv('HOLA_KERNELS', '0')
    ref = model(ids).logits
    monkeypatch.setenv('HOLA_KERNELS', '1')
    return model, ids, ref


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's chunked prefill, whose pieces the kernel reads: CUDA")
@pytest.mark.parametrize('kind', ['gdn', 'deltanet'])
@torch.no_grad()
def test_model_state_output_in_read_kernel(monkeypatch, kind):
    """With block size 64 (fla's chunk), a fresh prompt's read kernel computes the state output itself instead of
    fla's output kernel: against the PyTorch memory on fla's output, and a left-padded batch (packed sequences:
    each sequence's own chunks of the state) against each sequence alone."""
    model, ids, ref = _cuda_model_and_reference(monkeypatch, kind, layers=1, batch=2, T=150)
    assert rel(model(ids).logits, ref) < 2e-3  # fla's output kernel uses TF32 for float32, ours IEEE
    mask = torch.ones_like(ids)
    mask[0, :37] = 0
    out = model(ids, attention_mask=mask).logits
    assert rel(out[0, 37:], model(ids[:1, 37:]).logits[0]) < 2e-3
    assert rel(out[1], ref[1]) < 2e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's chunked prefill in pieces, on CUDA streams")
@pytest.mark.parametrize('kind', ['gdn', 'deltanet'])
@torch.no_grad()
def test_model_prefill_in_pieces(monkeypatch, kind):
    """A fresh prompt whose state path runs in pieces (its recurrence on a high-priority stream, each piece's state
    output, scores and caches on three more streams as the piece arrives, the reads in parts on a fourth) against the
    same prompt in one piece: the same logits and memory state, three times (a race between the streams would show
    as a difference), and replayed from a CUDA graph (pieces by default there, one piece in eager mode); and against
    the PyTorch memory."""
    import hola_retrofit.kernels.memory as memory
    calls, real = [], memory._prefill_in_pieces
    monkeypatch.setattr(memory, '_prefill_in_pieces', lambda *a: calls.append(1) or real(*a))
    model, ids, ref = _cuda_model_and_reference(monkeypatch, kind, layers=2, batch=1, T=700)
    monkeypatch.setenv('HOLA_PIECES', '1')
    out = model(ids, use_cache=True)
    whole, mem = out.logits, out.past_key_values[1]['hola_memory']
    assert rel(whole, ref) < 2e-3 and not calls

    def same(out, why):
        assert rel(out.logits, whole) < 1e-6, why
        for key, t in out.past_key_values[1]['hola_memory'].items():
            assert torch.equal(t, mem[key]), (why, key)

    monkeypatch.setenv('HOLA_PIECES', '3')  # pieces [0, 192), [192, 448), [448, 700)
    for run in range(3):
        same(model(ids, use_cache=True), run)
    assert len(calls) == 6  # 2 layers, 3 runs
    # the default: one piece in eager mode, pieces inside a CUDA graph capture
    monkeypatch.delenv('HOLA_PIECES')
    monkeypatch.setattr(memory, 'MIN_PIECE', 128)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        same(model(ids, use_cache=True), 'eager')
    torch.cuda.current_stream().wait_stream(side)
    assert len(calls) == 6
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(ids, use_cache=True)
    assert len(calls) == 8
    graph.replay()
    torch.cuda.synchronize()
    same(out, 'graph')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='a race between warps of compiled programs: CUDA')
@torch.no_grad()
def test_state_output_in_read_launch_at_scale():
    """The read launch that computes the state output (over a thousand programs, ticketed) against the same read
    given the state output of fla's output math in float32 PyTorch, at 8k tokens of the 340M layer's shape, three
    times. A Triton shared-memory race (q's tile in the state programs) once showed here as wrong, run-dependent rows
    in a fifth of the tiles."""
    from hola_retrofit.kernels.read import prefill_read, rstd
    T, HV, K, V, C, M = 8192, 4, 256, 512, 64, 512
    g = torch.Generator(device='cuda').manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device='cuda', generator=g)  # noqa: E731
    q, k, v = rnd(T, HV, K).bfloat16(), rnd(T, HV, K).bfloat16(), rnd(T, HV, V).bfloat16()
    idx, cnt = select_caches(torch.rand(HV, T, device='cuda', generator=g), None, 0, T // C, M, C)
    decay = -0.05 * torch.rand(T, HV, device='cuda', generator=g)
    pieces = dict(h=(rnd(T // C, HV, V, K) * 0.05).bfloat16(), v_new=(rnd(T, HV, V) * 0.3).bfloat16(),
                  k=l2_normalize(rnd(T, HV, K)).bfloat16(), v_first=True,
                  g=torch.cat([c.cumsum(0) for c in decay.split(C)]) / math.log(2))
    # fla's chunk_fwd_o: o_i = scale (2^g_i q_i S_j + sum_{i' <= i in the chunk} 2^(g_i - g_i') (q_i . k_i') v_new_i')
    qc, kc = l2_normalize(q.float()).view(-1, C, HV, K), pieces['k'].float().view(-1, C, HV, K)
    gc = pieces['g'].view(-1, C, HV).permute(0, 2, 1)                                      # [chunk, head, i]
    a = torch.einsum('nchk,nihk->nhci', qc, kc) * (gc[..., :, None] - gc[..., None, :]).exp2()
    a = a * torch.ones(C, C, device='cuda', dtype=torch.bool).tril()
    o = torch.einsum('nchk,nhvk->nchv', qc, pieces['h'].float()) * gc.permute(0, 2, 1).exp2()[..., None]
    o = (o + torch.einsum('nhci,nihv->nchv', a, pieces['v_new'].float().view(-1, C, HV, V))) * K ** -0.5
    weight = torch.cat([torch.full((HV, 2 * K), 2.0), torch.full((HV, 1), 28.0), torch.zeros(HV, 1)], 1).cuda()
    ek, ev, r = k.new_empty(HV, 0, K), v.new_empty(HV, 0, V), rstd(k)
    want = o.reshape(T, HV, V).bfloat16()
    prefill_read(q, ek, ev, k, v, idx, cnt, 0, want, weight, K ** -0.5, True, C, out=want, r_new=r)
    for _ in range(3):
        got = torch.full_like(v, float('nan'))
        prefill_read(q, ek, ev, k, v, idx, cnt, 0, None, weight, K ** -0.5, True, C, out=got, r_new=r, state=pieces)
        tile = lambda x: x.float().view(-1, C, HV, V).norm(dim=(1, 3))  # noqa: E731  [block, head]
        tiles = tile(got.float() - want.float()) / tile(want)
        assert rel(got, want) < 1e-2 and tiles.max().item() < 2e-2, (rel(got, want), tiles.max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA streams and graphs')
@torch.no_grad()
def test_model_decode_beside(monkeypatch):
    """A decode step whose launch runs on a stream of its own beside the output gate's projection: the same logits
    and memory state as on one stream, eagerly (forced, 18 steps across a block end) and replayed from a CUDA graph
    (the default there)."""
    import hola_retrofit.adapters.mixers as mixers
    calls, real = [], mixers.decode_beside
    monkeypatch.setattr(mixers, 'decode_beside', lambda d: calls.append(real(d)) or calls[-1])
    model, ids, _ = _cuda_model_and_reference(monkeypatch, 'gdn', layers=2, batch=2, T=100)

    def steps(n0, n1):
        out = model(ids[:, :n0], use_cache=True)
        cache, logits = out.past_key_values, []
        for t in range(n0, n1):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
        return torch.cat(logits, 1), cache

    def same(a, b, why):
        assert torch.equal(a[0], b[0]), why
        for key, t in a[1][1]['hola_memory'].items():
            assert torch.equal(t, b[1][1]['hola_memory'][key]), (why, key)

    monkeypatch.setenv('HOLA_BESIDE', '0')
    one = steps(80, 98)  # block end at 127: 80 + 48
    monkeypatch.setenv('HOLA_BESIDE', '1')
    same(steps(80, 98), one, 'eager')
    assert calls[-1] and not any(calls[:36])
    # the default inside a graph: capture step 80 on a prompt of 80, replay it, compare with the eager step
    monkeypatch.delenv('HOLA_BESIDE')
    eager = steps(80, 81)
    cache = model(ids[:, :80], use_cache=True).past_key_values
    warm = model(ids[:, :80], use_cache=True).past_key_values
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model(ids[:, 80:81], past_key_values=warm, use_cache=True)
    torch.cuda.current_stream().wait_stream(side)
    n = len(calls)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(ids[:, 80:81], past_key_values=cache, use_cache=True)
    assert calls[n:] == [True, True]  # both layers
    graph.replay()
    torch.cuda.synchronize()
    same((out.logits, cache), eager, 'graph')
