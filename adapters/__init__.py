"""Memory-augmented GDN / DeltaNet mixers, their cache, and the model classes."""

from .config import MemoryConfig
from .mixers import HolaDeltaNet, HolaGatedDeltaNet, attach_memory, memory_layers
from .modeling import (
    HOLA_CLASSES,
    HOLA_TYPES,
    SUPPORTED_BASE_TYPES,
    HolaCache,
    HolaDeltaNetConfig,
    HolaDeltaNetForCausalLM,
    HolaGatedDeltaNetConfig,
    HolaGatedDeltaNetForCausalLM,
    hola_config_from_base,
    retrofit_model,
)

__all__ = [
    'HOLA_CLASSES', 'HOLA_TYPES', 'SUPPORTED_BASE_TYPES', 'HolaCache', 'HolaDeltaNet', 'HolaDeltaNetConfig',
    'HolaDeltaNetForCausalLM', 'HolaGatedDeltaNet', 'HolaGatedDeltaNetConfig', 'HolaGatedDeltaNetForCausalLM',
    'MemoryConfig', 'attach_memory', 'hola_config_from_base', 'memory_layers', 'retrofit_model',
]
