"""hola-retrofit: an exact key-value memory for pretrained Gated DeltaNet / DeltaNet checkpoints.

Importing the package registers the retrofitted model types with transformers' Auto classes and
installs pure-PyTorch CPU fallbacks for fla's Triton-only modules (CUDA tensors are unaffected).

The subpackages `adapters`, `kernels`, `retrofit`, `cli` and `evals` are the repository's top-level
folders, linked here; they have no `__init__.py` of their own, so that run from a clone's root they
never shadow an installed package of the same name (docs/design.md, "Layout").
"""

import warnings

__version__ = "0.1.0"

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
    import fla  # noqa: F401  (registers fla's own model types)

from .adapters import fallbacks as _fallbacks  # noqa: E402
from .adapters.config import MemoryConfig  # noqa: E402
from .adapters.mixers import attach_memory, memory_layers  # noqa: E402
from .adapters.modeling import HolaCache, register as _register, retrofit_model  # noqa: E402

_fallbacks.install()
_register()

__all__ = ["HolaCache", "MemoryConfig", "__version__", "attach_memory", "memory_layers", "retrofit_model"]
