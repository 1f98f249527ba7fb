"""Memory-augmented mixers inside whole tiny fla models, on CPU."""

import pytest
import torch
import torch.nn as nn
from conftest import VOCAB, hola_from_base, tiny_base

from hola_retrofit import HolaCache, MemoryConfig, attach_memory, memory_layers
from hola_retrofit.adapters.mixers import MEMORY_KEY, HolaGatedDeltaNet


def rel(a, b):
    assert torch.isfinite(a).all(), "NaN/inf in result"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_split(model, ids, split, mask=None):
    """Logits of `ids` fed as consecutive chunks through one cache."""
    cache, outs, i = None, [], 0
    for L in split:
        kw = {} if mask is None else {'attention_mask': mask[:, :i + L]}
        out = model(ids[:, i:i + L], past_key_values=cache, use_cache=True, **kw)
        cache, i = out.past_key_values, i + L
        outs.append(out.logits)
    return torch.cat(outs, 1), cache


VARIANTS = {
    'gdn': dict(),
    'gdn-gva': dict(num_v_heads=4),
    'gdn-neg-nogate-noconv': dict(allow_neg_eigval=True, use_gate=False, use_short_conv=False),
    'deltanet': dict(),
    'deltanet-gate-noconv': dict(use_gate=True, use_short_conv=False, allow_neg_eigval=True),
}


def _base(name, seed=0):
    return tiny_base('gdn' if name.startswith('gdn') else 'deltanet', seed=seed, **VARIANTS[name])


@pytest.mark.parametrize('name', list(VARIANTS))
@torch.no_grad()
def test_memory_off_equals_base(name):
    base = _base(name)
    model = hola_from_base(base, cache_size=0, read_block=False)
    ids = torch.randint(3, VOCAB, (2, 45))
    assert torch.equal(model(ids).logits, base(ids).logits)
    # without a cache fla's GDN takes its fused q/k/v convolution path
    assert torch.equal(model(ids, use_cache=False).logits, base(ids, use_cache=False).logits)
    assert rel(base(ids, use_cache=False).logits, base(ids).logits) < 1e-5
    a, _ = run_split(model, ids, [20, 1, 24])
    b, _ = run_split(base, ids, [20, 1, 24])
    assert torch.equal(a, b)


@pytest.mark.parametrize('name', list(VARIANTS))
@torch.no_grad()
def test_abstaining_memory_equals_base(name):
    """Memory on, but the sink takes all the mass: our state path + memory must give the base logits
    (ours: float32 recurrence with the score; base on CPU: fla's naive reference)."""
    base = _base(name)
    model = hola_from_base(base, cache_size=8, block_size=5, sink_init=1e4)
    ids = torch.randint(3, VOCAB, (2, 37))
    assert rel(model(ids).logits, base(ids).logits) < 1e-5
    a, _ = run_split(model, ids, [11, 1, 25])
    assert rel(a, base(ids).logits) < 1e-5


@pytest.mark.parametrize('name', ['gdn', 'gdn-gva', 'deltanet'])
@pytest.mark.parametrize('rule,eviction', [('shared', 'surprise'), ('gated', 'surprise'), ('shared', 'novelty')])
@torch.no_grad()
def test_prefill_equals_decode_at_any_split(name, rule, eviction):
    model = hola_from_base(_base(name), cache_size=6, block_size=8, read_rule=rule, sink_init=2.0,
                           gate_init=2.0, gamma_init=1.5, eviction=eviction, novelty_window=12)
    ids = torch.randint(3, VOCAB, (2, 61))
    full, cache_full = run_split(model, ids, [61])
    assert rel(full, _base(name)(ids).logits) > 1e-3  # the memory does change the output
    for split in ([30, 20, 1, 10], [1] * 61, [8, 8, 45], [60, 1]):
        got, cache = run_split(model, ids, split)
        assert rel(got, full) < 1e-5, split
        for layer in range(len(model.model.layers)):
            m1, m2 = cache[layer][MEMORY_KEY], cache_full[layer][MEMORY_KEY]
            assert torch.equal(m1['cache_pos'], m2['cache_pos']) and torch.equal(m1['seen'], m2['seen'])


@torch.no_grad()
def test_layer_cache_sizes(kind):
    """cache_sizes gives each layer its own M; a layer given 0 has no memory and computes exactly the base layer."""
    base = tiny_base(kind)
    model = hola_from_base(base, cache_size=6, block_size=4, sink_init=1.0, cache_sizes=[0, 5])
    assert [m.hola.cache_size for m in memory_layers(model)] == [0, 5]
    assert not memory_layers(model)[0].hola.enabled and memory_layers(model)[1].hola.enabled
    ids = torch.randint(3, VOCAB, (1, 19))
    out = model(ids, use_cache=True)
    assert MEMORY_KEY not in out.past_key_values[0] and out.past_key_values[1][MEMORY_KEY]['cache_k'].shape[2] == 5
    layer0 = {}
    for m, store in ((base, 'base'), (model, 'hola')):
        h = m.model.layers[0].attn.register_forward_hook(lambda mod, a, o, store=store: layer0.__setitem__(store, o[0]))
        m(ids)
        h.remove()
    assert torch.equal(layer0['base'], layer0['hola'])
    with pytest.raises(ValueError, match='cache_sizes'):
        hola_from_base(base, cache_sizes=[1])


@torch.no_grad()
def test_cache_stays_bounded(kind):
    M, C = 4, 8
    model = hola_from_base(tiny_base(kind), cache_size=M, block_size=C)
    ids = torch.randint(3, VOCAB, (1, 200))
    sizes = []
    _, cache = run_split(model, ids, [10])
    for t in range(10, 200, 10):
        _, cache = run_split_with(model, ids[:, t:t + 10], cache)
        sizes.append((cache.memory_nbytes(), cache.nbytes()))
    assert len(set(sizes)) == 1, sizes
    layer = model.model.layers[0].attn
    hv, K, V = layer.num_value_heads, layer.head_k_dim, layer.head_v_dim
    per_layer = hv * ((M + C) * (K + V) * 4 + (M + C) * 4 + M * 8) + 8
    assert cache.memory_nbytes() == per_layer * len(model.model.layers)
    assert int(cache[0][MEMORY_KEY]['seen'][0]) == 200


def run_split_with(model, ids, cache):
    out = model(ids, past_key_values=cache, use_cache=True)
    return out.logits, out.past_key_values


@torch.no_grad()
def test_padded_batch_equals_unpadded_runs(kind):
    model = hola_from_base(tiny_base(kind), cache_size=4, block_size=6, sink_init=2.0)
    lens = [29, 17, 23]
    seqs = [torch.randint(3, VOCAB, (1, n)) for n in lens]
    T = max(lens)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding, as generation pads
        ids[i, T - lens[i]:], mask[i, T - lens[i]:] = s[0], 1
    full, cache = run_split(model, ids, [T], mask)
    stepped, _ = run_split(model, torch.cat([ids, torch.randint(3, VOCAB, (3, 4))], 1), [T - 3, 3, 1, 1, 1, 1],
                           torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1))
    for i, s in enumerate(seqs):
        alone = model(s).logits[0]
        assert rel(full[i, T - lens[i]:], alone) < 1e-5
        assert rel(stepped[i, T - lens[i]:T], alone) < 1e-5
    # packed: one row, cu_seqlens
    packed = torch.cat(seqs, 1)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    out = model(packed, cu_seqlens=cu, use_cache=False).logits[0]
    for i, s in enumerate(seqs):
        assert rel(out[int(cu[i]):int(cu[i + 1])], model(s).logits[0]) < 1e-5


def _recall_layer(cache_size):
    """One hand-built GDN mixer: q = k = silu(x[:8]), v = silu(x[8:]), beta = 1/2, decay exp(-0.1)."""
    torch.manual_seed(0)
    layer = HolaGatedDeltaNet(hidden_size=16, expand_v=1, head_dim=8, num_heads=1, use_gate=False,
                              use_short_conv=False, layer_idx=0)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        eye = torch.eye(16)
        layer.q_proj.weight.copy_(eye[:8]), layer.k_proj.weight.copy_(eye[:8]), layer.v_proj.weight.copy_(eye[8:])
        layer.o_proj.weight.copy_(eye[:, 8:])
        layer.o_norm.weight.fill_(1.0)
        layer.A_log.zero_()
        layer.dt_bias.fill_(float(torch.log(torch.expm1(torch.tensor(0.1)))))  # g = -0.1
    layer._init_memory(MemoryConfig(cache_size=cache_size, block_size=4, read_block=cache_size > 0,
                                    gamma_init=3.0, sink_init=18.0))
    return layer.eval()


@torch.no_grad()
def test_exact_recall_where_the_state_forgot():
    """A fact (key a, large value) is followed by 60 distractors with random keys: the state's read
    of key a is overwritten, the memory still returns the fact's exact value."""
    g = torch.Generator().manual_seed(3)
    T = 62
    x = torch.zeros(1, T, 16)
    x[0, 1:-1, :8] = torch.randn(T - 2, 8, generator=g) * 2
    x[0, 1:-1, 12:] = torch.randn(T - 2, 4, generator=g).abs()   # distractor values live on dims 4..7
    x[0, 0, :8] = torch.randn(8, generator=g) * 2
    x[0, 0, 8:12] = 4 + torch.rand(4, generator=g) * 4           # the fact's value on dims 0..3
    x[0, -1, :8] = x[0, 0, :8]                    # the query: key a again, no value
    fact = torch.nn.functional.silu(x[0, 0, 8:])
    cos = nn.functional.cosine_similarity
    base = _recall_layer(cache_size=0)
    assert not base.hola.enabled
    mem = _recall_layer(cache_size=4)
    o_base = base(x)[0][0, -1, 8:]
    o_mem = mem(x)[0][0, -1, 8:]
    assert cos(o_base, fact, dim=0) < 0.2
    assert cos(o_mem, fact, dim=0) > 0.99
    assert 0 in mem_cache_positions(mem, x)


@torch.no_grad()
def mem_cache_positions(layer, x):
    from fla.models.cache_utils import Cache
    cache = Cache()
    layer(x, past_key_values=cache, use_cache=True)
    return cache[0][MEMORY_KEY]['cache_pos'][0, 0].tolist()


@torch.no_grad()
def test_generate_batch_with_padding(kind):
    model = hola_from_base(tiny_base(kind), cache_size=4, block_size=4, sink_init=2.0)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert out.shape == (2, 21)
    # greedy generation equals a manual greedy loop over the unpadded prompt
    for i, start in ((0, 0), (1, 3)):
        seq = ids[i:i + 1, start:]
        for _ in range(12):
            nxt = model(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
        assert torch.equal(seq[0, -12:], out[i, -12:])


def test_hybrid_attention_layers_untouched():
    from hola_retrofit.adapters.modeling import retrofit_model
    base = tiny_base('gdn', num_hidden_layers=3, attn={'layers': [1], 'num_heads': 2, 'num_kv_heads': 2,
                                                        'window_size': None})
    model = retrofit_model(base, MemoryConfig(cache_size=4, block_size=4))
    assert model.hola_layers == [0, 2]
    assert type(model.model.layers[1].attn).__name__ == 'Attention'
    assert not any('.mem.' in n for n, _ in model.model.layers[1].named_parameters())
    with torch.no_grad():
        ids = torch.randint(3, VOCAB, (2, 21))
        full = model.eval()(ids).logits
        assert rel(run_split(model, ids, [9, 1, 11])[0], full) < 1e-5
        off = retrofit_model(base, MemoryConfig(cache_size=0, read_block=False)).eval()
        assert torch.equal(off(ids).logits, base.eval()(ids).logits)


def test_bad_settings_are_refused():
    for bad in (dict(cache_size=-1), dict(block_size=0), dict(read_rule='x'), dict(eviction='lru'),
                dict(gamma_init=0.0), dict(cache_size=1.5)):
        with pytest.raises(ValueError):
            MemoryConfig(**bad)
    with pytest.raises(ValueError, match='unknown memory settings'):
        MemoryConfig.from_dict({'cache': 3})


def test_memory_params_get_gradients(kind):
    model = hola_from_base(tiny_base(kind), cache_size=4, block_size=4, sink_init=1.0, read_rule='gated',
                           gate_init=0.0).train()
    ids = torch.randint(3, VOCAB, (2, 19))
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if '.mem.' in n:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert isinstance(HolaCache(), HolaCache)
    attach_memory(model, MemoryConfig(cache_size=0, read_block=False))  # re-attaching only changes settings
    assert model.model.layers[0].attn.hola.cache_size == 0
