"""hola-retrofit: an exact key-value memory for pretrained Gated DeltaNet / DeltaNet checkpoints.

Importing the package registers the retrofitted model types with transformers' Auto classes and
installs pure-PyTorch CPU fallbacks for fla's Triton-only modules (CUDA tensors are unaffected).
"""

import warnings

__version__ = "0.1.0"

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
    import fla  # noqa: F401  (registers fla's own model types)

from .adapters import fallbacks as _fallbacks  # noqa: E402
from .adapters.config import MemoryConfig  # noqa: E402
from .adapters.modeling import HolaCache, register as _register  # noqa: E402

_fallbacks.install()
_register()

__all__ = ["MemoryConfig", "HolaCache", "__version__"]
