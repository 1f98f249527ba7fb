"""What `hola-retrofit info` reports: architecture, patched layers, settings, memory bytes."""

from __future__ import annotations

from ..adapters.config import MemoryConfig
from ..adapters.mixers import HolaMixin
from ..adapters.modeling import HOLA_TYPES, hola_config_from_base, meta_model
from .convert import read_base_config
from .source import resolve_source

DTYPE_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}


def memory_bytes_per_layer(hv: int, k: int, v: int, mem: MemoryConfig, dtype_bytes: int, batch: int = 1) -> int:
    """Bytes of one layer's memory for `batch` sequences: (M + C) keys and values per value head in the model
    dtype, float32 scores, int64 cache positions, one int64 counter per sequence. Independent of length."""
    M, C = mem.cache_size, mem.block_size
    return batch * (hv * ((M + C) * (k + v) * dtype_bytes + (M + C) * 4 + M * 8) + 8)


def model_info(source: str, revision: str | None = None, mem: MemoryConfig | None = None) -> dict:
    """Describe a converted model (or, with `mem`, what converting a base model would give)."""
    import json
    src = resolve_source(source, revision)
    raw = json.loads((src.path / 'config.json').read_text()) if (src.path / 'config.json').is_file() else {}
    from transformers import AutoConfig
    if raw.get('model_type') in HOLA_TYPES:
        config = AutoConfig.for_model(**raw)
        converted = True
    else:
        base = AutoConfig.for_model(**read_base_config(src))
        config = hola_config_from_base(base, mem or MemoryConfig(), src.info())
        converted = False
    mem = config.memory_config
    model = meta_model(config)
    dtype = str(getattr(config, 'dtype', None) or 'float32').replace('torch.', '')
    nbytes = DTYPE_BYTES.get(dtype, 2)
    layers = []
    for i, block in enumerate(model.model.layers):
        m = block.attn
        if isinstance(m, HolaMixin):
            layers.append(dict(layer=i, mixer=type(m).__name__, value_heads=m.num_value_heads, head_k_dim=m.head_k_dim,
                               head_v_dim=m.head_v_dim,
                               memory_bytes=memory_bytes_per_layer(m.num_value_heads, m.head_k_dim, m.head_v_dim, mem,
                                                                   nbytes)))
        else:
            layers.append(dict(layer=i, mixer=type(m).__name__, memory_bytes=0))
    return dict(source=src.name, converted=converted, model_type=config.model_type, base=config.hola_base,
                num_layers=len(layers), patched_layers=[d['layer'] for d in layers if d['memory_bytes']],
                memory=mem.to_dict(), dtype=dtype, layers=layers,
                memory_bytes_total=sum(d['memory_bytes'] for d in layers),
                memory_parameters=sum(p.numel() for n, p in model.named_parameters() if '.mem.' in n))
