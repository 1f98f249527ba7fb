"""The training-free recipe: retrieval heads, their temperature and sink, and where the entries go."""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, hola_from_base, tiny_base

from hola_retrofit import memory_layers
from hola_retrofit.retrofit import recipe as R


def _features(ids, n_layers=2, HV=2, K=64, seed=0):
    """Synthetic unit q, k per layer: head 0 of the last layer is a retrieval head (its query at t, made of tokens
    t-2 to t, is the key at j + 1 for every earlier j with the same three tokens: the pattern of GDN checkpoints);
    every other head is noise."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(3, VOCAB, K, generator=g)
    t = torch.tensor([0, 0] + list(ids))
    T = len(ids)
    ctx = F.normalize(emb[0, t[2:]] + emb[1, t[1:-1]] + emb[2, t[:-2]], dim=-1)         # tokens t-2, t-1 and t
    out = []
    for layer in range(n_layers):
        q = F.normalize(torch.randn(T, HV, K, generator=g), dim=-1)
        k = F.normalize(torch.randn(T, HV, K, generator=g), dim=-1)
        if layer == n_layers - 1:
            q[:, 0] = F.normalize(ctx + 0.05 * torch.randn(T, K, generator=g), dim=-1)
            k[1:, 0] = F.normalize(ctx[:-1] + 0.05 * torch.randn(T - 1, K, generator=g), dim=-1)
        out.append((layer, q, k))
    return out


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        class Enc:
            input_ids = [3 + (ord(c) % (VOCAB - 3)) for c in text]
        return Enc()


def test_ngram_ids_and_copy_sequences():
    g = R._ngram_ids([5, 6, 7, 5, 6, 7, 8], n=3)
    assert g[:2].tolist() == [-1, -1] and g[2] == g[5] and g[2] != g[6]
    seqs = R.copy_sequences(list(range(100)), 3, 10, 40, seed=1)
    assert all(len(s) == 60 and s[:10] == s[50:] for s in seqs)
    with pytest.raises(ValueError, match='at least'):
        R.copy_sequences(list(range(20)), 1, 10, 40)


def test_fit_finds_the_retrieval_head_and_gives_it_the_budget(monkeypatch):
    model = hola_from_base(tiny_base('gdn'), cache_size=8, block_size=4)
    rng = random.Random(0)
    text = ''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(3000))
    monkeypatch.setattr(R, 'head_features', lambda m, ids: _features(ids))
    rec = R.fit_recipe(model, _Tok(), text, cache_size=8, sequences=2, copy_len=64, filler_len=300,
                       quiet_queries=128, progress=False)
    fits = {(f.layer, f.head): f for f in rec.heads}
    hit = fits[1, 0]
    assert hit.reads and hit.offset == 1 and hit.hit_rate > 0.9 and hit.copy_read > 0.9
    assert hit.match_cos > hit.background_cos
    assert [f.reads for f in rec.heads].count(True) == 1 and max(f.hit_rate for f in rec.heads if not f.reads) < 0.2
    assert rec.cache_sizes == [0, 16]  # the budget of 2 layers x 2 heads x 8 entries, in the reading layer
    R.apply_recipe(model, rec)
    assert model.config.hola['cache_sizes'] == [0, 16] and model.config.hola['eviction'] == 'novelty'
    w, K = memory_layers(model)[1].mem.weight.detach(), memory_layers(model)[1].mem.k
    assert torch.allclose(w[0, :2 * K], torch.full((2 * K,), math.sqrt(hit.tau / math.sqrt(K))))
    assert w[0, 2 * K] == pytest.approx(hit.sink, rel=1e-5) and w[1, 2 * K] == R.ABSTAIN
    assert R.Recipe.from_dict(rec.to_dict()) == rec
    assert 'copy_read' in rec.table() and len(rec.table().splitlines()) == 5


@torch.no_grad()
def test_no_reading_head_turns_the_memory_off():
    """A random model has no retrieval head: the recipe gives no layer any entries, and the model is the base."""
    base = tiny_base('gdn')
    model = hola_from_base(base, cache_size=8, block_size=4)
    text = ''.join(chr(97 + (i * 7919) % 26) for i in range(3000))
    rec = R.fit_recipe(model, _Tok(), text, cache_size=8, sequences=1, copy_len=32, filler_len=200,
                       quiet_queries=64, progress=False)
    assert not rec.reading and rec.cache_sizes == [0, 0] and rec.notes
    R.apply_recipe(model, rec)
    ids = torch.randint(3, VOCAB, (1, 30))
    assert torch.equal(model(ids).logits, base(ids).logits)


@torch.no_grad()
def test_abstaining_heads_return_the_state_output_exactly():
    """A head with the ABSTAIN sink gives its state output bit for bit, beside a head that reads."""
    from hola_retrofit.adapters.config import MemoryConfig
    from hola_retrofit.adapters.reference import empty_memory, memory_forward
    g = torch.Generator().manual_seed(0)
    L, HV, K, V = 20, 2, 8, 4
    cfg = MemoryConfig(cache_size=4, block_size=4)
    q, k = (F.normalize(torch.randn(L, HV, K, generator=g), dim=-1) for _ in range(2))
    v, o_state = torch.randn(L, HV, V, generator=g), torch.randn(L, HV, V, generator=g)
    params = {'q_gamma': torch.full((HV, K), 3.0), 'k_gamma': torch.full((HV, K), 3.0),
              'sink': torch.tensor([0.0, R.ABSTAIN]), 'gate': torch.zeros(HV)}
    out = memory_forward(empty_memory(1, HV, K, V, cfg, torch.float32, torch.device('cpu')), 0, q, k, v,
                         torch.rand(L, HV, generator=g), o_state, params, cfg, 0.5)
    assert torch.equal(out[:, 1], o_state[:, 1]) and not torch.allclose(out[:, 0], o_state[:, 0])
