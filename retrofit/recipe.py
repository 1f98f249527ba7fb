"""The training-free recipe: which heads read the memory, how sharply, and which layers hold the entries.

Fitted on the model itself and unlabeled text, with copy-shaped sequences [X, filler, X] whose filler is longer
than the model's training length (no needles, no labels):

1. **Retrieval heads.** For each head, the queries of the second copy of X are compared (cosine, the read's
   geometry before its temperature) with every earlier key. A retrieval head's query picks, as its most similar
   far key, the first copy's key at a fixed offset from the aligned position (+1 in GDN checkpoints: the key whose
   short-conv window ends on the token after the aligned one). `hit_rate` is the share of second-copy queries that
   do, at the head's best offset.
2. **Temperature and sink per head.** For each temperature tau of a grid (logit = tau * cos; gamma =
   sqrt(tau / sqrt(K))), the sink is set so that on 95% of the queries with no copy to find (the first copy and
   the filler) the memory's entries take less than half of the read; `copy_read` is then the share of second-copy
   queries whose aligned key takes at least half. The head keeps the tau with the highest `copy_read`.
3. **Which heads read.** A head reads when both `hit_rate` and `copy_read` reach 0.5; every other head abstains
   exactly (its sink logit is `ABSTAIN`: the entries' weights are 0 in float32, the output is the state's).
4. **Where the entries go.** The budget (`cache_size` entries for every head of every memory layer) is given to the
   layers that have a reading head, shared equally per head; the other layers get no memory at all (they compute
   exactly the base layer). Entries are chosen by key novelty (`MemoryConfig.eviction`).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

import torch

RECIPE_FILE = 'recipe.json'
ABSTAIN = 1e4            # sink logit of a head that does not read: exp(logit - ABSTAIN) is 0 in float32
TAUS = (8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0, 128.0)
OFFSETS = range(-2, 3)
LOCAL = 64               # keys this close to a query are left to the state when finding a head's offset
QUIET_SHARE = 0.95       # share of copy-free queries on which the entries must take less than half of the read
MIN_SHARE = 0.5          # hit_rate a head needs to read
MIN_READ = 0.2           # copy_read a head needs to read: its copies can be read without flooding the rest
NGRAM = 3                # a key matches a query where the text repeats: the same NGRAM tokens end at both


@dataclass
class HeadFit:
    layer: int
    head: int
    offset: int
    hit_rate: float
    match_cos: float | None
    background_cos: float | None
    tau: float | None
    sink: float | None
    copy_read: float
    reads: bool


@dataclass
class Recipe:
    heads: list[HeadFit]
    cache_sizes: list[int]
    eviction: str = 'novelty'
    text: str = ''
    sequences: int = 0
    copy_tokens: int = 0
    filler_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def reading(self) -> list[HeadFit]:
        return [h for h in self.heads if h.reads]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        d = dict(d)
        d['heads'] = [HeadFit(**h) for h in d['heads']]
        return cls(**d)

    def table(self) -> str:
        """One line per head: the statistics that decided it."""
        lines = ['layer head offset hit_rate match_cos bg_cos   tau   sink copy_read reads']
        f = lambda x, spec, w: format(x, spec) if x is not None else '-'.rjust(w)  # noqa: E731
        for h in self.heads:
            lines.append(f"{h.layer:5d} {h.head:4d} {h.offset:+6d} {h.hit_rate:8.2f} {f(h.match_cos, '9.2f', 9)} "
                         f"{f(h.background_cos, '6.2f', 6)} {f(h.tau, '5.0f', 5)} {f(h.sink, '6.1f', 6)} "
                         f"{h.copy_read:9.2f} {'yes' if h.reads else 'no':>5}")
        return '\n'.join(lines)


def training_length(config) -> int:
    return int(getattr(config, 'max_position_embeddings', None) or 2048)


def copy_sequences(ids: list[int], n: int, copy_len: int, filler_len: int, seed: int = 0) -> list[list[int]]:
    """n sequences [X, filler, X] cut from the token ids of a text (X and its filler from different places)."""
    need = copy_len + filler_len
    if len(ids) < need + copy_len:
        raise ValueError(f"the calibration text has {len(ids)} tokens; it needs at least {need + copy_len}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.randrange(0, len(ids) - need)
        x = ids[a:a + copy_len]
        f0 = (a + copy_len + rng.randrange(0, len(ids) - need)) % (len(ids) - filler_len)
        out.append(x + ids[f0:f0 + filler_len] + x)
    return out


@torch.no_grad()
def head_features(model, ids: list[int]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(layer index, unit-L2 q, k [T, HV, K] float32) of every memory layer, for one sequence run through the model
    with its memory off."""
    from ..adapters.fallbacks import expand_heads, l2_normalize
    from ..adapters.mixers import memory_layers
    from ..evals.runner import memory_off

    layers = {id(m): i for i, block in enumerate(model.model.layers) for m in [block.attn]}
    inputs, hooks = {}, []
    for m in memory_layers(model):
        hooks.append(m.register_forward_pre_hook(
            lambda mod, args, kw: inputs.__setitem__(id(mod), kw['hidden_states']), with_kwargs=True))
    dev = next(model.parameters()).device
    try:
        with memory_off(model):
            model(input_ids=torch.tensor([ids], device=dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for m in memory_layers(model):
        q, k, v, *_ = m._inputs(inputs[id(m)], None, False, None)
        HV = v.shape[2]
        out.append((layers[id(m)], expand_heads(l2_normalize(q[0]), HV), expand_heads(l2_normalize(k[0]), HV)))
    return out


def _ngram_ids(ids: list[int], n: int = NGRAM) -> torch.Tensor:
    """An id per position for the n tokens ending there (equal ids: equal n-grams); -1 before the n-th token."""
    t = torch.tensor(ids)
    out = torch.full((len(ids),), -1, dtype=torch.long)
    if len(ids) >= n:
        grams = torch.stack([t[i:len(ids) - n + 1 + i] for i in range(n)], 1)
        out[n - 1:] = torch.unique(grams, dim=0, return_inverse=True)[1]
    return out


def _offset_hits(cos: torch.Tensor, qpos: torch.Tensor, gap: int) -> torch.Tensor:
    """[Q]: for each second-copy query (at `qpos`, cosines `cos` [Q, T] with every key), the position of its most
    similar far key relative to the aligned one."""
    far = torch.arange(cos.shape[1])[None, :] < qpos[:, None] - LOCAL
    return cos.masked_fill(~far, -2).argmax(-1) - (qpos - gap)


def _read_stats(cos: torch.Tensor, qpos: torch.Tensor, grams: torch.Tensor, offset: int, n_copy: int,
                gap: int) -> dict:
    """What the temperature and sink fit needs of one head on one sequence. cos [Q, T]: the queries at `qpos` (the
    second copy's first, `n_copy` of them, then copy-free ones) against every key. A key j *matches* query t when the
    n-gram ending at j - offset is the one ending at t (the text repeats there). Per tau: the log-sum-exp of
    tau * cos over the matching keys and over the other keys each query sees; whether a far key matches."""
    T = cos.shape[1]
    pos = torch.arange(T)
    seen = pos[None, :] <= qpos[:, None]
    far = pos[None, :] < qpos[:, None] - LOCAL
    shifted = torch.full((T,), -2, dtype=torch.long)
    lo, hi = max(0, offset), min(T, T + offset)
    shifted[lo:hi] = grams[lo - offset:hi - offset]                               # the n-gram ending at j - offset
    match = (shifted[None, :] == grams[qpos][:, None]) & (grams[qpos][:, None] >= 0) & seen
    rows = (qpos[:n_copy] - gap + offset).clamp(0, T - 1)
    return {'found': (match & far).any(-1),
            'lse_match': torch.stack([torch.logsumexp((t * cos).masked_fill(~match, float('-inf')), -1) for t in TAUS]),
            'lse_other': torch.stack([torch.logsumexp((t * cos).masked_fill(~seen | match, float('-inf')), -1)
                                      for t in TAUS]),
            'aligned': cos[:n_copy].gather(1, rows[:, None])[:, 0],
            'background': cos[:n_copy].masked_fill(~far[:n_copy] | match[:n_copy], -2).amax(-1)}


def _fit_read(parts: list[dict]) -> tuple[float, float, float, float, float]:
    """(tau, sink, copy_read, median aligned cos, median background cos) from one head's `_read_stats`."""
    s = {key: torch.cat([p[key] for p in parts], -1) for key in parts[0]}
    found = s['found']
    best = (TAUS[0], 0.0, -1.0)
    for i, tau in enumerate(TAUS):
        match, other = s['lse_match'][i], s['lse_other'][i]
        sink = torch.quantile(other, QUIET_SHARE).item()     # the other keys take < half the read on 95% of queries
        total = torch.logaddexp(torch.logaddexp(match, other), torch.tensor(sink))
        share = ((match - total)[found] >= math.log(0.5)).float().mean().item() if found.any() else 0.0
        if share > best[2]:
            best = (tau, sink, share)
    return (*best, s['aligned'].median().item(), s['background'].median().item())


@torch.no_grad()
def fit_recipe(model, tokenizer, text: str, cache_size: int, *, sequences: int = 4, copy_len: int = 256,
               filler_len: int | None = None, quiet_queries: int = 512, seed: int = 0, text_name: str = '',
               progress: bool = True) -> Recipe:
    """Fit the recipe of the module docstring on `model` (a retrofitted model) with copies cut from `text`."""
    from tqdm.auto import tqdm

    filler_len = filler_len or max(2 * training_length(model.config), 4096)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    seqs = copy_sequences(ids, sequences, copy_len, filler_len, seed)
    gap = copy_len + filler_len
    rng = torch.Generator().manual_seed(seed)
    quiet_pos = torch.randperm(gap - LOCAL, generator=rng)[:quiet_queries] + LOCAL
    copy_pos = torch.arange(gap + 8, gap + copy_len)          # the second copy, past its first few tokens
    qpos = torch.cat([copy_pos, quiet_pos])
    bar = tqdm(total=2 * len(seqs), desc='fitting the memory', unit='pass', disable=not progress)
    hits: dict = {}                                            # pass 1: every head's offset statistics
    for seq in seqs:
        for layer, q, k in head_features(model, seq):
            for h in range(q.shape[1]):
                cos = q[copy_pos, h].float().cpu() @ k[:, h].float().cpu().T
                hits.setdefault((layer, h), []).append(_offset_hits(cos, copy_pos, gap))
        bar.update(1)
    offsets, rates = {}, {}
    for key, parts in hits.items():
        argmax = torch.cat(parts)
        share = {d: (argmax == d).float().mean().item() for d in OFFSETS}
        offsets[key] = max(share, key=share.get)
        rates[key] = share[offsets[key]]
    candidates = {key for key, r in rates.items() if r >= MIN_SHARE}
    reads: dict = {}                                           # pass 2: the retrieval heads' temperature and sink
    for seq in seqs:
        grams = _ngram_ids(seq)
        for layer, q, k in (head_features(model, seq) if candidates else []):
            for h in range(q.shape[1]):
                if (layer, h) in candidates:
                    cos = q[qpos, h].float().cpu() @ k[:, h].float().cpu().T
                    reads.setdefault((layer, h), []).append(
                        _read_stats(cos, qpos, grams, offsets[layer, h], len(copy_pos), gap))
        bar.update(1)
    bar.close()
    heads = []
    for (layer, h) in sorted(hits):
        tau, sink, copy_read, aligned, background = _fit_read(reads[layer, h]) if (layer, h) in reads else \
            (None, None, 0.0, None, None)
        r4 = lambda x: None if x is None else round(x, 4)  # noqa: E731
        heads.append(HeadFit(layer, h, offsets[layer, h], r4(rates[layer, h]), r4(aligned), r4(background), tau,
                             r4(sink), r4(copy_read),
                             (layer, h) in candidates and copy_read >= MIN_READ))
    hv = {}
    for f in heads:
        hv[f.layer] = hv.get(f.layer, 0) + 1
    reading_layers = sorted({f.layer for f in heads if f.reads})
    per_head = cache_size * sum(hv.values()) // max(1, sum(hv[i] for i in reading_layers))
    cache_sizes = [per_head if i in reading_layers else 0 for i in range(len(model.model.layers))]
    notes = [] if reading_layers else ['no head of this model reads copies back: the memory is off in every layer']
    return Recipe(heads, cache_sizes, text=text_name, sequences=sequences, copy_tokens=copy_len,
                  filler_tokens=filler_len, notes=notes)


def apply_recipe(model, recipe: Recipe) -> None:
    """Set the fitted per-head parameters and the per-layer cache sizes on a retrofitted model, in place."""
    from dataclasses import replace

    cfg = replace(model.config.memory_config, cache_sizes=list(recipe.cache_sizes), eviction=recipe.eviction)
    model.set_memory_config(cfg)
    fits = {(f.layer, f.head): f for f in recipe.heads}
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            mem = getattr(block.attn, 'mem', None)
            if mem is None:
                continue
            K = mem.k
            for h in range(mem.weight.shape[0]):
                f = fits.get((i, h))
                if f is not None and f.reads:
                    mem.weight[h, :2 * K] = math.sqrt(f.tau / math.sqrt(K))
                    mem.weight[h, 2 * K] = f.sink
                else:
                    mem.weight[h, 2 * K] = ABSTAIN
