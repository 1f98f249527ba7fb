"""Evidence for the training-free defaults (gamma_init, sink_init) of the 'shared' read, on the memory math.

Keys are unit-L2 SiLU features, normalize(silu(x)), x ~ N(0, I_d), like post-conv keys (positively
correlated: typical cosine ~0.3-0.5). A cache of M keys + a block of C keys is read by:
  - a query equal to one cached key (or at cosine `--match`): recall = softmax mass on that entry;
  - a fresh query that matches nothing: distortion = 1 - sink mass (how far the output moves off the base).
Prints recall and distortion per (gamma, sink); a good training-free default keeps distortion small
(the base model's behaviour where nothing matches) and recall high.

    python bench/defaults.py --dim 256 --cache 512 --block 64
"""

import argparse
import json
import math

import torch
import torch.nn.functional as F


def keys(n, d, g):
    return F.normalize(F.silu(torch.randn(n, d, generator=g)), dim=-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--dim', type=int, default=256)
    ap.add_argument('--cache', type=int, default=512)
    ap.add_argument('--block', type=int, default=64)
    ap.add_argument('--match', type=float, default=1.0, help='cosine of the query to its cached key')
    ap.add_argument('--trials', type=int, default=200)
    ap.add_argument('--gammas', default='1,1.5,2,3')
    ap.add_argument('--sinks', default='4,8,12,16,24,32')
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    d, E = args.dim, args.cache + args.block
    rows = []
    for gamma in (float(x) for x in args.gammas.split(',')):
        for sink in (float(x) for x in args.sinks.split(',')):
            rec, dist = [], []
            for _ in range(args.trials):
                ek = keys(E, d, g)
                target = ek[0]
                noise = F.normalize(torch.randn(d, generator=g) - (torch.randn(d, generator=g) @ target) * target, dim=0)
                q_hit = F.normalize(args.match * target + math.sqrt(max(0.0, 1 - args.match ** 2)) * noise, dim=0)
                q_miss = keys(1, d, g)[0]
                scale = gamma * gamma * math.sqrt(d)  # (gamma rms(q)).(gamma rms(k))/sqrt(d) for unit q, k
                for q, out in ((q_hit, rec), (q_miss, dist)):
                    w = torch.softmax(torch.cat([torch.tensor([sink]), scale * (ek @ q)]), 0)
                    out.append(w[1].item() if out is rec else 1 - w[0].item())
            rows.append(dict(gamma=gamma, sink=sink, recall=sum(rec) / len(rec), distortion=sum(dist) / len(dist)))
            print(json.dumps(rows[-1]))
    ok = [r for r in rows if r['distortion'] < 0.05]
    best = max(ok, key=lambda r: r['recall']) if ok else None
    print('best with distortion < 5%:', json.dumps(best))


if __name__ == '__main__':
    main()
