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
from hola_retrofit import MemoryConfig, retrofit_model

N_KEYS = N_VALS = 256
KEY0, VAL0, VOCAB = 4, 4 + N_KEYS, 4 + 2 * N_KEYS


def set_symbols(n: int) -> None:
    """n distinct keys and n values (the task's difficulty; --symbols)."""
    global N_KEYS, N_VALS, VAL0, VOCAB
    N_KEYS = N_VALS = n
    VAL0, VOCAB = 4 + n, 4 + 2 * n


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
    ap.add_argument('--symbols', type=int, default=256, help='distinct keys (and values)')
    ap.add_argument('--lr', type=float, default=3e-3)
    ap.add_argument('--calibrate-steps', type=int, default=0,
                    help='then train only the memory parameters (attn.mem) on --calibrate-pairs pairs')
    ap.add_argument('--calibrate-pairs', type=int, default=32)
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    set_symbols(args.symbols)
    torch.manual_seed(0)
    cfg = GatedDeltaNetConfig(hidden_size=args.hidden, num_heads=2, head_dim=32, expand_v=2, num_hidden_layers=2,
                              vocab_size=VOCAB, hidden_ratio=2, fuse_cross_entropy=False)
    model = GatedDeltaNetForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    t0, log = time.time(), []
    for step in range(args.steps):
        ids, labels = batch(args.train_pairs, min(16, args.train_pairs), 32, g)
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
    pairs = [int(x) for x in args.eval_pairs.split(',') if int(x) <= N_KEYS]  # pairs need distinct keys
    for n in pairs:
        row = {'pairs': n, 'tokens': 2 * n + 32, 'base': accuracy(model, n, 16, 64, seed=n), 'chance': 1 / N_VALS}
        for M, C, sink in ((64, 16, 12.0), (64, 16, 16.0), (256, 16, 12.0), (256, 16, 16.0)):
            hola = retrofit_model(model, MemoryConfig(cache_size=M, block_size=C, sink_init=sink)).eval()
            row[f'M{M}_C{C}_sink{int(sink)}'] = accuracy(hola, n, 16, 64, seed=n)
        rows.append(row)
        print(json.dumps(row), flush=True)
    calib = None
    if args.calibrate_steps:
        hola = retrofit_model(model, MemoryConfig(cache_size=256, block_size=16, sink_init=16.0))
        for n_, p in hola.named_parameters():
            p.requires_grad_('.mem.' in n_)
        params = [p for p in hola.parameters() if p.requires_grad]
        copt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.0)
        gc = torch.Generator().manual_seed(2)
        hola.train()
        clog = []
        for step in range(args.calibrate_steps):
            ids, labels = batch(min(args.calibrate_pairs, N_KEYS), 16, 16, gc)
            loss = torch.nn.functional.cross_entropy(hola(ids, use_cache=False).logits.flatten(0, 1), labels.flatten())
            copt.zero_grad()
            loss.backward()
            copt.step()
            if step % 25 == 0 or step == args.calibrate_steps - 1:
                clog.append((step, round(loss.item(), 4)))
                print('calibrate', clog[-1], flush=True)
        hola.eval()
        calib = {'log': clog, 'parameters': sum(p.numel() for p in params),
                 'accuracy': {n: accuracy(hola, n, 16, 64, seed=n) for n in pairs}}
        print(json.dumps(calib['accuracy']), flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump({'train_log': log, 'config': vars(args), 'results': rows, 'calibrated': calib}, f, indent=1)


if __name__ == '__main__':
    main()
