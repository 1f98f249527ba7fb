"""Tiny random fla checkpoints with a byte-level tokenizer: the demo default and the tests' fixtures."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ('gdn', 'deltanet', 'hybrid')


def byte_tokenizer():
    """A real, lossless byte-level tokenizer (256 byte symbols + <unk>, <s>, </s>), no download needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {'<unk>': 0, '<s>': 1, '</s>': 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='<unk>', bos_token='<s>', eos_token='</s>',
                                   pad_token='<unk>')


def example_config(arch: str = 'gdn', hidden: int = 64, layers: int = 2, vocab: int = 259):
    from fla.models import DeltaNetConfig, GatedDeltaNetConfig
    common = dict(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab, hidden_ratio=2,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=4096)
    if arch == 'gdn':
        return GatedDeltaNetConfig(num_heads=2, head_dim=hidden // 4, expand_v=2, **common)
    if arch == 'deltanet':
        return DeltaNetConfig(num_heads=2, **common)
    if arch == 'hybrid':
        return GatedDeltaNetConfig(num_heads=2, head_dim=hidden // 4, expand_v=2, **{**common, 'num_hidden_layers': max(layers, 3)},
                                   attn={'layers': [1], 'num_heads': 2, 'num_kv_heads': 1, 'window_size': None})
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def make_example_checkpoint(path: str | Path, arch: str = 'gdn', seed: int = 0, hidden: int = 64,
                            layers: int = 2) -> Path:
    """Save a tiny randomly initialised fla checkpoint (safetensors + tokenizer) to `path`."""
    from fla.models import DeltaNetForCausalLM, GatedDeltaNetForCausalLM
    path = Path(path)
    torch.manual_seed(seed)
    config = example_config(arch, hidden, layers)
    cls = DeltaNetForCausalLM if arch == 'deltanet' else GatedDeltaNetForCausalLM
    model = cls(config)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
