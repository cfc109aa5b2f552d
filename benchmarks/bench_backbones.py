"""Training-step and feature-pass time of the registered backbones (``--backbone unet | fpn3d``).

Every variant gets the same input, optimiser (AdamW), timesteps and MSE loss; the variants run in
turn inside each repeat (alternating), and the median over repeats is printed::

    .venv/bin/python benchmarks/bench_backbones.py --base 16 --levels 4 --patch 32 --batch 2 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from voxdiff.core.runtime import tune_allocator
from voxdiff.pretrain.backbones import build_backbone, count_parameters

VARIANTS = (("unet", 1), ("fpn3d", 1), ("fpn3d", 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--patch", type=int, default=32, help="training patch side")
    ap.add_argument("--feature_size", type=int, nargs=3, default=(64, 64, 32), help="feature window")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    nets = {}
    for name, blocks in VARIANTS:
        torch.manual_seed(0)
        net = build_backbone(name, in_channels=1, out_channels=1, base_channels=args.base, num_levels=args.levels,
                             blocks_per_level=blocks)
        nets[(name, blocks)] = (net, torch.optim.AdamW(net.parameters(), lr=1e-4))
    x = torch.randn(args.batch, 1, *([args.patch] * 3))
    t = torch.randint(0, 1000, (args.batch,))
    big = torch.randn(1, 1, *args.feature_size)
    train: dict = {k: [] for k in nets}
    feat: dict = {k: [] for k in nets}
    for r in range(args.repeats + 2):  # two warm-up rounds
        for k, (net, opt) in nets.items():
            net.train()
            t0 = time.perf_counter()
            pred, _ = net(x, t)
            loss = (pred - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            t1 = time.perf_counter()
            net.eval()
            with torch.no_grad():
                net.pyramid(big, 10)
            t2 = time.perf_counter()
            if r >= 2:
                train[k].append(t1 - t0)
                feat[k].append(t2 - t1)
    print(f"base {args.base}, {args.levels} levels, batch {args.batch} x {args.patch}^3, {args.threads} thread(s)")
    print("| backbone | parameters | train step (s) | feature pass " + "x".join(map(str, args.feature_size)) + " (s) |")
    print("|---|---|---|---|")
    for (name, blocks), (net, _) in nets.items():
        print(f"| {name}, {blocks} block(s) | {count_parameters(net) / 1e6:.2f}M | "
              f"{statistics.median(train[(name, blocks)]):.3f} | {statistics.median(feat[(name, blocks)]):.3f} |")


if __name__ == "__main__":
    main()
