"""What the memory buys on a *trained* model, small enough for a CPU: multi-query associative recall.

Train a small GDN (fla, CPU fallbacks) on MQAR: a sequence of key-value pairs, then queries of keys; the
loss is on the values after queries only. Then read the same weights as base and as retrofit, with more
pairs than were trained on (the state has fixed capacity), and report query accuracy.

    python bench/tiny_recall.py --steps 600 --out bench/results/tiny_recall.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import hola_retrofit  # noqa: F401
from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
from hola_retrofit.adapters import MemoryConfig, retrofit_model

N_KEYS, N_VALS = 256, 256
KEY0, VAL0 = 4, 4 + N_KEYS
VOCAB = 4 + N_KEYS + N_VALS


def batch(n_pairs, n_queries, bsz, g):
    """[k v]*n_pairs then [k v]*n_queries (queried keys drawn from the pairs); targets only at query values."""
    keys = torch.stack([torch.randperm(N_KEYS, generator=g)[:n_pairs] for _ in range(bsz)]) + KEY0
    vals = torch.randint(0, N_VALS, (bsz, n_pairs), generator=g) + VAL0
    which = torch.randint(0, n_pairs, (bsz, n_queries), generator=g)
    qk, qv = keys.gather(1, which), vals.gather(1, which)
    ids = torch.cat([torch.stack([keys, vals], 2).flatten(1), torch.stack([qk, qv], 2).flatten(1)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, 2 * n_pairs::2] = qv  # predict the value from the position of its query key
    return ids, labels


@torch.no_grad()
def accuracy(model, n_pairs, n_queries, bsz, seed):
    g = torch.Generator().manual_seed(seed)
    ids, labels = batch(n_pairs, n_queries, bsz, g)
    logits = model(ids, use_cache=False).logits
    m = labels != -100
    return (logits.argmax(-1)[m] == labels[m]).float().mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--steps', type=int, default=600)
    ap.add_argument('--train-pairs', type=int, default=24)
    ap.add_argument('--eval-pairs', default='24,48,96,192')
    ap.add_argument('--hidden', type=int, default=128)
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = GatedDeltaNetConfig(hidden_size=args.hidden, num_heads=2, head_dim=32, expand_v=2, num_hidden_layers=2,
                              vocab_size=VOCAB, hidden_ratio=2, fuse_cross_entropy=False)
    model = GatedDeltaNetForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    t0, log = time.time(), []
    for step in range(args.steps):
        ids, labels = batch(args.train_pairs, 16, 32, g)
        logits = model(ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            log.append((step, round(loss.item(), 4), round(time.time() - t0, 1)))
            print(log[-1], flush=True)
    model.eval()
    rows = []
    pairs = [int(x) for x in args.eval_pairs.split(',')]
    for n in pairs:
        row = {'pairs': n, 'tokens': 2 * n + 32, 'base': accuracy(model, n, 16, 64, seed=n)}
        for M, C, sink in ((64, 16, 12.0), (64, 16, 16.0), (256, 16, 12.0), (256, 16, 16.0)):
            hola = retrofit_model(model, MemoryConfig(cache_size=M, block_size=C, sink_init=sink)).eval()
            row[f'M{M}_C{C}_sink{int(sink)}'] = accuracy(hola, n, 16, 64, seed=n)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump({'train_log': log, 'config': vars(args), 'results': rows}, f, indent=1)


if __name__ == '__main__':
    main()
