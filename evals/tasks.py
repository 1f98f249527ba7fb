"""Deterministic evaluation cases: single needle, multi-key needle, key-value lookup, copy, perplexity text.

A case is a prompt (token ids) and the answer (token ids) a perfect model continues it with. Cases
depend only on (task, length, depth, trial, seed, templates, haystack), never on the model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from importlib import resources

# The classic passkey filler (Mohtashami & Jaggi, 2023): repetitive, so only the needle carries information.
DEFAULT_HAYSTACK = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                    "There and back again. ")
NAMES = ['Alice', 'Bob', 'Carol', 'Dave', 'Erin', 'Frank', 'Grace', 'Heidi', 'Ivan', 'Judy', 'Mallory',
         'Niaj', 'Olivia', 'Peggy', 'Rupert', 'Sybil', 'Trent', 'Victor', 'Walter', 'Yara']


DEPTHS = tuple(i / 10 for i in range(11))  # needle depths evaluated by default

# Needle phrasings: (needle, question); the answer is ' ' + key. {name} is a name drawn per case.
PHRASINGS = {
    'passkey': ("The pass key is {key}. Remember it. {key} is the pass key. ", "What is the pass key? The pass key is"),
    # the shape of the needles the reference checkpoints were trained on (../shared/checkpoints/README.md)
    'secret': (" The secret number for {name} is {key}. ",
               "\nWhat is the secret number for {name}? The secret number for {name} is"),
    # a phrasing of the same shape in words the reference checkpoints never saw
    'locker': (" The locker combination of {name} is {key}. ",
               "\nWhat is the locker combination of {name}? The locker combination of {name} is"),
}


@dataclass
class Templates:
    needle: str = PHRASINGS['passkey'][0]
    question: str = PHRASINGS['passkey'][1]
    multikey_needle: str = "The pass key of {name} is {key}. "
    multikey_question: str = "What is the pass key of {name}? The pass key of {name} is"
    kv_pair: str = "{k}: {v}\n"
    kv_question: str = "{k}:"
    key_digits: int = 5
    copy_tokens: int = 128      # the copied text X of the copy task
    copy_prefix: int = 8        # tokens of the second copy given before scoring starts

    @classmethod
    def phrasing(cls, name: str) -> Templates:
        if name not in PHRASINGS:
            raise ValueError(f"unknown phrasing {name!r}; phrasings: {', '.join(PHRASINGS)}")
        needle, question = PHRASINGS[name]
        return cls(needle=needle, question=question)


@dataclass
class Case:
    task: str
    length: int
    depth: float
    trial: int
    prompt: list[int]
    answer: list[int]
    meta: dict = field(default_factory=dict)


def default_text() -> str:
    """The perplexity text shipped with the package (public-domain prose)."""
    return resources.files('hola_retrofit.evals').joinpath('data/sample.txt').read_text()


def parse_length(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith('k') else int(s)


_TOKENS: dict = {}


def _tokens(tok, text: str) -> list[int]:
    """The token ids of a (haystack) text, tokenized once per tokenizer and text."""
    key = (id(tok), hash(text))
    if key not in _TOKENS:
        _TOKENS.clear()
        _TOKENS[key] = tok(text, add_special_tokens=False).input_ids
    return _TOKENS[key]


def _fill(tok, haystack: str, n_tokens: int, rng: random.Random | None = None) -> list[int]:
    """n_tokens of the haystack: from a random place where it is long enough (rng given), else repeated."""
    unit = _tokens(tok, haystack)
    if not unit:
        raise ValueError("the haystack text is empty")
    n_tokens = max(n_tokens, 0)
    if rng is not None and len(unit) > n_tokens:
        start = rng.randrange(0, len(unit) - n_tokens)
        return unit[start:start + n_tokens]
    return (unit * (n_tokens // len(unit) + 1))[:n_tokens]


def _key(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _assemble(tok, filler_budget: int, haystack: str, inserts: list[tuple[float, str]], question: str, rng):
    """Filler of `filler_budget` tokens with each text of `inserts` placed at its depth (0 = start)."""
    filler = _fill(tok, haystack, filler_budget, rng)
    ids, last = [], 0
    for depth, text in sorted(inserts):
        cut = int(round(depth * len(filler)))
        ids += filler[last:cut] + tok(text, add_special_tokens=False).input_ids
        last = cut
    ids += filler[last:] + tok(question, add_special_tokens=False).input_ids
    return ids


def make_case(tok, task: str, length: int, depth: float, trial: int, seed: int = 0,
              templates: Templates | None = None, haystack: str | None = None, n_keys: int = 4,
              n_pairs: int | None = None) -> Case:
    t = templates or Templates()
    hay = haystack or DEFAULT_HAYSTACK
    rng = random.Random(f"{seed}/{task}/{length}/{depth}/{trial}")
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    if task == 'niah':
        key, name = _key(rng, t.key_digits), rng.choice(NAMES)
        needle, question, answer = t.needle.format(key=key, name=name), t.question.format(name=name), ' ' + key
        inserts = [(depth, needle)]
        meta = {'key': key, 'name': name}
    elif task == 'multikey':
        names = rng.sample(NAMES, n_keys)
        keys = [_key(rng, t.key_digits) for _ in names]
        target = rng.randrange(n_keys)
        others = sorted(rng.random() for _ in range(n_keys - 1))
        depths = others[:target] + [depth] + others[target:]
        inserts = [(d, t.multikey_needle.format(name=n, key=k)) for d, n, k in zip(depths, names, keys)]
        question, answer = t.multikey_question.format(name=names[target]), ' ' + keys[target]
        meta = {'name': names[target], 'key': keys[target], 'n_keys': n_keys}
    elif task == 'kv':
        # pairs of short random strings fill the context; the asked pair sits at `depth`
        def word():
            return ''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(6))
        pair_len = len(enc(t.kv_pair.format(k=word(), v=word())))
        n = n_pairs or max(2, (length - 16) // max(pair_len, 1))
        pairs = [(word(), word()) for _ in range(n)]
        target = min(int(depth * n), n - 1)
        ids = []
        for k, v in pairs:
            ids += enc(t.kv_pair.format(k=k, v=v))
        question = t.kv_question.format(k=pairs[target][0])
        prompt = ids + enc(question)
        answer = enc(' ' + pairs[target][1])
        return Case(task, length, depth, trial, prompt, answer, {'key': pairs[target][0], 'n_pairs': n})
    elif task == 'copy':
        # [X, filler of `length` tokens, X]: the second copy is scored token by token after its first few
        text = _fill(tok, hay, t.copy_tokens + length, rng)  # X, then the text that follows it as the filler
        x = text[:t.copy_tokens]
        prompt = text + x[:t.copy_prefix]
        return Case(task, length, depth, trial, prompt, x[t.copy_prefix:], {'copy_tokens': t.copy_tokens})
    else:
        raise ValueError(f"unknown task {task!r}; tasks: niah, multikey, kv, copy, ppl")
    answer_ids = enc(answer)
    fixed = sum(len(enc(text)) for _, text in inserts) + len(enc(question))
    prompt = _assemble(tok, length - fixed, hay, inserts, question, rng)
    return Case(task, length, depth, trial, prompt, answer_ids, meta)
