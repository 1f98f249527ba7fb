"""Transformers model classes of retrofitted checkpoints, their cache, and Auto registration.

A retrofitted checkpoint is the base fla checkpoint plus the memory parameters, with
`model_type` `hola_gated_deltanet` or `hola_delta_net` and two config fields: `hola` (the
MemoryConfig) and `hola_base` (where the base weights came from). `import hola_retrofit`
registers both with AutoConfig / AutoModelForCausalLM.
"""

from __future__ import annotations

from fla.models import DeltaNetConfig, DeltaNetForCausalLM, GatedDeltaNetConfig, GatedDeltaNetForCausalLM
from fla.models.cache_utils import Cache
from transformers import AutoConfig, AutoModelForCausalLM

from .config import MemoryConfig
from .mixers import MEMORY_KEY, HolaMixin, attach_memory
from .reference import memory_nbytes


def tensor_nbytes(x) -> int:
    """Bytes of every tensor in a nest of dicts, lists and tuples (e.g. an fla cache's layer states)."""
    if hasattr(x, 'element_size'):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(tensor_nbytes(y) for y in x.values())
    if isinstance(x, (list, tuple)):
        return sum(tensor_nbytes(y) for y in x)
    return 0


class HolaCache(Cache):
    """fla's Cache; each layer's state dict also holds `hola_memory` (cache, block, scores, counts)."""

    def _states(self):
        return [self[i] for i in range(len(self))]

    def memory_nbytes(self) -> int:
        """Bytes held by the exact memory of all layers (bounded by (M + C) entries per head)."""
        return sum(memory_nbytes(s[MEMORY_KEY]) for s in self._states() if s.get(MEMORY_KEY) is not None)

    def nbytes(self) -> int:
        """Bytes of every tensor in the cache: recurrent and conv states plus the memory."""
        return tensor_nbytes(self._states())


class _HolaConfigMixin:
    def _init_hola(self, hola, hola_base):
        self.hola = MemoryConfig.from_dict(hola).to_dict()
        self.hola_base = dict(hola_base or {})

    @property
    def memory_config(self) -> MemoryConfig:
        return MemoryConfig.from_dict(self.hola)


class HolaGatedDeltaNetConfig(_HolaConfigMixin, GatedDeltaNetConfig):
    model_type = 'hola_gated_deltanet'

    def __init__(self, hola: dict | None = None, hola_base: dict | None = None, **kwargs):
        self._init_hola(hola, hola_base)
        super().__init__(**kwargs)


class HolaDeltaNetConfig(_HolaConfigMixin, DeltaNetConfig):
    model_type = 'hola_delta_net'

    def __init__(self, hola: dict | None = None, hola_base: dict | None = None, **kwargs):
        self._init_hola(hola, hola_base)
        super().__init__(**kwargs)


SHIM_CONFIG = '''# Remote-code shim written by hola-retrofit: needs `pip install hola-retrofit`.
from hola_retrofit.adapters.modeling import HolaDeltaNetConfig, HolaGatedDeltaNetConfig  # noqa: F401
'''
SHIM_MODEL = '''# Remote-code shim written by hola-retrofit: needs `pip install hola-retrofit`.
import hola_retrofit  # noqa: F401  (CPU fallbacks, Auto registration)
from hola_retrofit.adapters.modeling import HolaDeltaNetForCausalLM, HolaGatedDeltaNetForCausalLM  # noqa: F401
'''


def write_remote_code(folder, config) -> None:
    """Two shims + `auto_map`, so `from_pretrained(..., trust_remote_code=True)` works without the import."""
    from pathlib import Path
    config.auto_map = {'AutoConfig': f'configuration_hola.{type(config).__name__}',
                       'AutoModelForCausalLM': f'modeling_hola.{config.architectures[0]}'}
    (Path(folder) / 'configuration_hola.py').write_text(SHIM_CONFIG)
    (Path(folder) / 'modeling_hola.py').write_text(SHIM_MODEL)


class _HolaModelMixin:
    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, plus the remote-code shims (the config's auto_map names them)."""
        import os
        os.makedirs(save_directory, exist_ok=True)
        write_remote_code(save_directory, self.config)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _attach(self):
        self.hola_layers = attach_memory(self, self.config.memory_config)

    def _init_weights(self, module, *args, **kwargs):
        super()._init_weights(module, *args, **kwargs)
        if isinstance(module, HolaMixin):
            module.reset_memory_parameters()

    def set_memory_config(self, cfg: MemoryConfig) -> None:
        """Change the memory settings of every layer (parameters are kept) and record them in the config."""
        self.config.hola = cfg.to_dict()
        attach_memory(self, cfg)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None,
                use_cache=None, **kwargs):
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = HolaCache()
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               past_key_values=past_key_values, use_cache=use_cache, **kwargs)


class HolaGatedDeltaNetForCausalLM(_HolaModelMixin, GatedDeltaNetForCausalLM):
    config_class = HolaGatedDeltaNetConfig

    def __init__(self, config):
        super().__init__(config)
        self._attach()


class HolaDeltaNetForCausalLM(_HolaModelMixin, DeltaNetForCausalLM):
    config_class = HolaDeltaNetConfig

    def __init__(self, config):
        super().__init__(config)
        self._attach()


# base model_type -> (memory config class, memory model class)
HOLA_CLASSES = {
    'gated_deltanet': (HolaGatedDeltaNetConfig, HolaGatedDeltaNetForCausalLM),
    'delta_net': (HolaDeltaNetConfig, HolaDeltaNetForCausalLM),
}
SUPPORTED_BASE_TYPES = tuple(HOLA_CLASSES)
HOLA_TYPES = tuple(c.model_type for c, _ in HOLA_CLASSES.values())


_NOT_COPIED = ('model_type', 'architectures', 'transformers_version', 'auto_map', 'hola', 'hola_base',
               '_name_or_path')


def hola_config_from_base(base_config, mem: MemoryConfig, base_info: dict | None = None):
    """The config of the retrofitted model: every base field, plus `hola` and `hola_base`."""
    if base_config.model_type not in HOLA_CLASSES:
        raise ValueError(f"unsupported model type {base_config.model_type!r}; supported: "
                         f"{', '.join(SUPPORTED_BASE_TYPES)}")
    cfg_cls, model_cls = HOLA_CLASSES[base_config.model_type]
    fields = {k: v for k, v in base_config.to_dict().items() if k not in _NOT_COPIED}
    config = cfg_cls(hola=mem.to_dict(), hola_base=base_info, **fields)
    config.architectures = [model_cls.__name__]
    return config


def meta_model(config):
    """The retrofitted model of `config` on the meta device: names, shapes, layer structure, no memory."""
    import torch
    with torch.device('meta'):
        return HOLA_CLASSES[config.model_type.removeprefix('hola_')][1](config)


def retrofit_model(base_model, mem: MemoryConfig, base_info: dict | None = None):
    """A memory-augmented copy of an in-memory fla model (base weights copied, memory initialised)."""
    config = hola_config_from_base(base_model.config, mem, base_info)
    model = HOLA_CLASSES[base_model.config.model_type][1](config)
    model.to(dtype=next(base_model.parameters()).dtype, device=next(base_model.parameters()).device)
    missing, unexpected = model.load_state_dict(base_model.state_dict(), strict=False)
    if unexpected or any('.mem.' not in k for k in missing):
        raise RuntimeError(f"weights do not match: missing {missing}, unexpected {unexpected}")
    return model.train(base_model.training)


def register() -> None:
    for cfg_cls, model_cls in HOLA_CLASSES.values():
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
