"""The model card (README.md) written next to a converted checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

EVAL_FILE = 'hola_eval.json'


def write_model_card(folder: Path, config, repo_id: str | None = None) -> None:
    base = config.hola_base or {}
    base_id = base.get('model_id', 'unknown')
    mem = config.hola
    name = repo_id or folder.name
    front = ['---', 'library_name: transformers', 'tags:', '- hola-retrofit', '- fla', f'- {config.model_type}']
    if not base.get('local', True):
        front.append(f'base_model: {base_id}')
    front.append('---')
    rows = '\n'.join(f'| `{k}` | `{v}` |' for k, v in mem.items())
    evals = ''
    eval_path = folder / EVAL_FILE
    if eval_path.is_file():
        results = json.loads(eval_path.read_text())
        evals = '\n## Evaluation\n\nMeasured with `hola-retrofit eval` (see `hola_eval.json`):\n\n```json\n' + \
            json.dumps(results, indent=1)[:4000] + '\n```\n'
    rev = f" (revision `{base['revision']}`)" if base.get('revision') else ''
    text = f"""{chr(10).join(front)}
# {name}

`{base_id}`{rev} with an exact key-value memory retrofitted by
[hola-retrofit](https://pypi.org/project/hola-retrofit/): per layer and head, a cache of the
`cache_size` tokens with the largest delta-rule correction `beta*||e||`, read with a decoupled
RMSNorm-gamma attention next to the recurrent state. The base weights are unchanged; the memory adds
one tensor per layer, `attn.mem.weight` [value heads, 2 * head_k_dim + 2] (q gamma, k gamma, sink, gate). It is *not* trained unless this card
says it was calibrated.

## Memory settings

| setting | value |
|---|---|
{rows}

## Use

```python
import hola_retrofit  # registers the model type (pip install hola-retrofit)
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tok = AutoTokenizer.from_pretrained("{name}")
ids = tok("The passkey is", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=20)[0]))
```

Without the import, `trust_remote_code=True` loads the same classes through the shims in this repo
(they still need `pip install hola-retrofit`).
{evals}"""
    (folder / 'README.md').write_text(text)
