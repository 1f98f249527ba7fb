"""Memory settings that travel with a retrofitted model (stored in its config as `hola`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

READ_RULES = ('shared', 'gated')
EVICTIONS = ('surprise', 'novelty', 'recency')


@dataclass
class MemoryConfig:
    """Settings of the exact memory (see docs/method.md in the shared docs and README).

    cache_size   M: entries kept per layer and value head (top-M write scores over the history).
    block_size   C: tokens per block; queries read their own block causally, the cache merges at block ends.
    read_block   whether queries read the current block (off + M = 0 means memory off: base outputs).
    read_rule    'shared': one softmax over [sink, cache, block] whose sink value is the state read
                 (training-free default); 'gated': HOLA's state + sigmoid(gate) * read, null sink.
    eviction     which tokens the cache keeps: the top-M by a write score computed once per token, 'surprise'
                 beta*||e|| (HOLA) or 'novelty' 1 - max cos(k_t, k_j) over the `novelty_window` tokens before t
                 (a key unlike its recent past); or 'recency', the last M tokens.
    novelty_window  W of the 'novelty' score (the memory also keeps the last W keys).
    cache_sizes  per layer (by layer index), the cache size of that layer, overriding `cache_size`; a layer given 0
                 has no memory at all (computes exactly the base layer). None: `cache_size` everywhere.
    gamma_init   initial value of the RMSNorm-gamma of the cache-path q and k (logit temperature
                 gamma_init^2 * sqrt(d) * cos(q, k)).
    sink_init    initial sink logit. Defaults 2.0 / 28.0 from `bench/defaults.py` (synthetic SiLU-feature
                 keys, M=512, C=64): an exact or cos-0.9 match gets all the mass, a query that matches
                 nothing leaves >= 99.88% on the state, at head dims 128 and 256 (docs/notes.md).
    gate_init    initial gate logit of the 'gated' rule (HOLA: -4, i.e. almost off).
    norm_eps     eps of the cache-path RMSNorm.
    """

    cache_size: int = 512
    block_size: int = 64
    read_block: bool = True
    read_rule: str = 'shared'
    eviction: str = 'surprise'
    novelty_window: int = 256
    cache_sizes: list[int] | None = None
    gamma_init: float = 2.0
    sink_init: float = 28.0
    gate_init: float = -4.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.cache_size, int) or isinstance(self.cache_size, bool) or self.cache_size < 0:
            raise ValueError(f"cache_size must be an integer >= 0, got {self.cache_size!r}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or not 1 <= self.block_size <= 4096:
            raise ValueError(f"block_size must be an integer in [1, 4096], got {self.block_size!r}")
        if self.read_rule not in READ_RULES:
            raise ValueError(f"read_rule must be one of {READ_RULES}, got {self.read_rule!r}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        if not isinstance(self.novelty_window, int) or isinstance(self.novelty_window, bool) or self.novelty_window < 1:
            raise ValueError(f"novelty_window must be an integer >= 1, got {self.novelty_window!r}")
        if self.cache_sizes is not None:
            if not isinstance(self.cache_sizes, (list, tuple)) or not all(
                    isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in self.cache_sizes):
                raise ValueError(f"cache_sizes must be a list of integers >= 0, got {self.cache_sizes!r}")
            self.cache_sizes = list(self.cache_sizes)
        if not self.gamma_init > 0:
            raise ValueError(f"gamma_init must be > 0, got {self.gamma_init!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def enabled(self) -> bool:
        """False when the layer must compute exactly what the base layer computes."""
        return self.cache_size > 0 or self.read_block

    def for_layer(self, i: int) -> MemoryConfig:
        """The settings of layer i: its own cache size where `cache_sizes` gives one (0: memory off there)."""
        if self.cache_sizes is None:
            return self
        if i >= len(self.cache_sizes):
            raise ValueError(f"cache_sizes has {len(self.cache_sizes)} entries; layer {i} has none")
        m = self.cache_sizes[i]
        return replace(self, cache_size=m, read_block=self.read_block and m > 0, cache_sizes=None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> MemoryConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown memory settings: {sorted(unknown)}")
        return cls(**d)
