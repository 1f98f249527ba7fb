"""The model card (README.md) written next to a converted or calibrated checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

EVAL_FILE = 'hola_eval.json'
EVICTION_TEXT = {
    'surprise': 'the tokens with the largest delta-rule correction `beta*||e||`',
    'novelty': 'the tokens whose key is least like the keys of the tokens just before them',
    'recency': 'the most recent tokens',
}


def _base_line(base: dict) -> str:
    if not base:
        return 'a Gated DeltaNet / DeltaNet checkpoint'
    if base.get('local', True):  # a local folder: its name only (a path on the converting machine means nothing here)
        return f"the local checkpoint `{Path(base.get('model_id', '?')).name}`"
    rev = f" (revision `{base['revision']}`)" if base.get('revision') else ''
    return f"[`{base['model_id']}`](https://huggingface.co/{base['model_id']}){rev}"


def write_model_card(folder: Path, config, repo_id: str | None = None, name: str | None = None) -> None:
    """README.md of `folder`; `name` (or `repo_id`) is what users load it as: the final folder or the Hub repo."""
    from .recipe import RECIPE_FILE, Recipe

    folder = Path(folder)
    base = config.hola_base or {}
    mem = config.hola
    name = repo_id or name or folder.name
    front = ['---', 'library_name: transformers', 'tags:', '- hola-retrofit', '- fla', f'- {config.model_type}']
    if not base.get('local', True):
        front.append(f"base_model: {base['model_id']}")
    front.append('---')
    rows = '\n'.join(f'| `{k}` | `{v}` |' for k, v in mem.items())
    recipe = ''
    if (folder / RECIPE_FILE).is_file():
        rec = Recipe.from_dict(json.loads((folder / RECIPE_FILE).read_text()))
        layers = ', '.join(f'layer {i}: {m}' for i, m in enumerate(rec.cache_sizes) if m) or 'none'
        recipe = f"""
## Recipe

Fitted by `hola-retrofit convert` on the model itself, without training and without labels: copies
[X, {rec.filler_tokens}-token filler, X] cut from {rec.text}. A head reads the memory where its
second-copy queries pick the first copy's keys (`hit_rate`) and its fitted temperature `tau` and sink let it
read them (`copy_read`); every other head returns its state output unchanged. Entries per head: {layers};
no memory in the other layers. {' '.join(rec.notes)}

```
{rec.table()}
```
"""
    calibration = ''
    cal = getattr(config, 'hola_calibration', None)
    if cal:
        calibration = ("\n## Calibration\n\nThe memory parameters" + (" and LoRA adapters on the mixers (merged)"
                       if cal.get('lora_r') else '') + f" were trained briefly with `hola-retrofit calibrate`: "
                       + ', '.join(f'{k} `{v}`' for k, v in cal.items()) + ' (see `calibration.json`).\n')
    evals = ''
    eval_path = folder / EVAL_FILE
    if eval_path.is_file():
        results = json.loads(eval_path.read_text())
        evals = '\n## Evaluation\n\nMeasured with `hola-retrofit eval` (see `hola_eval.json`):\n\n```json\n' + \
            json.dumps(results, indent=1)[:4000] + '\n```\n'
    state = 'calibrated (below)' if cal else 'not trained: its parameters come from the recipe or the defaults'
    text = f"""{chr(10).join(front)}
# {name}

{_base_line(base)} with an exact key-value memory retrofitted by hola-retrofit: per layer and value head,
a cache of {EVICTION_TEXT.get(mem.get('eviction'), mem.get('eviction'))}, read with a decoupled RMSNorm-gamma
attention next to the recurrent state. The base weights are unchanged; the memory adds one tensor per layer,
`attn.mem.weight` [value heads, 2 * head_k_dim + 2] (q gamma, k gamma, sink, gate). The memory is {state}.

## Memory settings

| setting | value |
|---|---|
{rows}
{recipe}{calibration}
## Use

```python
import hola_retrofit  # registers the model type; install hola-retrofit from its source (pip install . in a clone)
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tok = AutoTokenizer.from_pretrained("{name}")
ids = tok("The passkey is", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=20)[0]))
```

Without the import, `trust_remote_code=True` loads the same classes through the shims in this folder (they
import hola-retrofit, which must be installed).
{evals}"""
    (folder / 'README.md').write_text(text)
