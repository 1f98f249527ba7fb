"""`generate` decodes with the cache exactly as one full forward computes, for plain fla models and retrofits.

A transformers release that stops handing the cache to fla's models makes every decode step after the prompt
start from an empty state; the generated tokens then still look plausible, but these logits differ.
"""

import pytest
import torch
from conftest import VOCAB, hola_from_base, tiny_base


@pytest.mark.parametrize('retrofit', [False, True], ids=['base', 'retrofit'])
@torch.no_grad()
def test_generate_step_by_step_equals_one_full_forward(kind, retrofit):
    model = tiny_base(kind).float()
    if retrofit:  # an active memory (low sink) whose blocks end during decoding
        model = hola_from_base(model, cache_size=4, block_size=4, sink_init=2.0)
    prompt = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (1, 22)
    stepwise = torch.cat(out.logits, 0)                                        # [12, vocab]
    full = model(input_ids=out.sequences, use_cache=False).logits[0, 9:-1]    # the same 12 positions
    torch.testing.assert_close(stepwise, full, rtol=0, atol=1e-4)
