import os

# Never let a test reach the network: the Hub is resolved from local caches only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

# Without a GPU, our Triton kernels run under Triton's interpreter (must be set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import hola_retrofit  # noqa: E402,F401
from hola_retrofit import MemoryConfig, retrofit_model  # noqa: E402
from fla.models import DeltaNetConfig, DeltaNetForCausalLM, GatedDeltaNetConfig, GatedDeltaNetForCausalLM  # noqa: E402

torch.set_num_threads(2)

VOCAB = 64


def tiny_config(kind: str = 'gdn', **over):
    """Tiny fla configs: GDN 2 heads x 16 (value 32), DeltaNet 4 heads x 16."""
    if kind == 'gdn':
        kw = dict(hidden_size=32, num_heads=2, head_dim=16, expand_v=2, num_hidden_layers=2, vocab_size=VOCAB,
                  hidden_ratio=2, bos_token_id=1, eos_token_id=2)
        kw.update(over)
        return GatedDeltaNetConfig(**kw)
    kw = dict(hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=VOCAB, hidden_ratio=2,
              bos_token_id=1, eos_token_id=2)
    kw.update(over)
    return DeltaNetConfig(**kw)


def tiny_base(kind: str = 'gdn', seed: int = 0, **over):
    torch.manual_seed(seed)
    cls = GatedDeltaNetForCausalLM if kind == 'gdn' else DeltaNetForCausalLM
    model = cls(tiny_config(kind, **over)).eval()
    # random init leaves A_log/dt_bias as drawn and sizable weights: make the state path non-trivial
    for layer in model.model.layers:
        if hasattr(layer.attn, 'A_log'):
            with torch.no_grad():
                layer.attn.A_log.uniform_(-3, 0)
    return model


def hola_from_base(base, **mem):
    """The retrofitted model, with the same weights as `base` and the memory attached."""
    return retrofit_model(base, MemoryConfig(**mem)).eval()


@pytest.fixture(params=['gdn', 'deltanet'])
def kind(request):
    return request.param
