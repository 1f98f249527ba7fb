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
)

__all__ = [
    'HOLA_CLASSES', 'HOLA_TYPES', 'SUPPORTED_BASE_TYPES', 'HolaCache', 'HolaDeltaNet', 'HolaDeltaNetConfig',
    'HolaDeltaNetForCausalLM', 'HolaGatedDeltaNet', 'HolaGatedDeltaNetConfig', 'HolaGatedDeltaNetForCausalLM',
    'MemoryConfig', 'attach_memory', 'memory_layers',
]
