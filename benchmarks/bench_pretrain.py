"""Training-step throughput of the voxdiff Backbone against MONAI's DiffusionModelUNet.

Both networks get the same input (image + BPR channels), the same patch, batch, optimiser (AdamW)
and epsilon-MSE loss, in one process. MONAI's network runs without attention levels (its middle
block always has one self-attention layer at the coarsest resolution); its widths are chosen from a
few candidates to match our parameter count as closely as possible.

    .venv/bin/python benchmarks/bench_pretrain.py --patch 32 --batch 2 --steps 6
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from voxdiff.core.runtime import tune_allocator
from voxdiff.pretrain.backbone import Backbone, count_parameters


def monai_unet(in_ch: int, target_params: int, levels: int):
    from monai.networks.nets import DiffusionModelUNet

    best = None
    for base in (8, 12, 16, 24, 32):
        for mult in ((1, 2, 4, 8), (1, 2, 4, 4), (1, 2, 2, 4), (1, 1, 2, 2)):
            ch = tuple(base * m for m in mult[:levels])
            if any(c % 8 for c in ch):
                continue
            net = DiffusionModelUNet(spatial_dims=3, in_channels=in_ch, out_channels=1, channels=ch,
                                     attention_levels=(False,) * levels, num_res_blocks=1, norm_num_groups=8,
                                     num_head_channels=8)
            n = count_parameters(net)
            if best is None or abs(n - target_params) < abs(best[0] - target_params):
                best = (n, ch, net)
    return best


def time_steps(net, x, t, steps: int, warmup: int, bf16: bool) -> float:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    target = torch.randn_like(x[:, :1])
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with ctx():
            out = net(x, t)
        pred = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]  # median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--cond", type=int, default=3, help="condition channels (3 = APE BPR)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for both")
    args = ap.parse_args()
    tune_allocator()  # the CLI's allocator setting (VOXDIFF_NO_MALLOPT=1: glibc default)
    torch.manual_seed(0)
    in_ch = 1 + args.cond
    ours = Backbone(in_channels=in_ch, out_channels=1, base_channels=args.base, num_levels=args.levels)
    n_ours = count_parameters(ours)
    n_monai, ch, theirs = monai_unet(in_ch, n_ours, args.levels)
    s = args.patch
    x = torch.randn(args.batch, in_ch, s, s, s)
    t = torch.randint(0, 1000, (args.batch,))
    vox = args.batch * s ** 3
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, patch {s}^3, batch {args.batch}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, median of {args.steps} steps after {args.warmup} warm-up")
    r_ours = time_steps(ours, x, t, args.steps, args.warmup, args.bf16)
    print(f"voxdiff Backbone (base {args.base}, {args.levels} levels): {n_ours / 1e6:.2f}M params, "
          f"{r_ours:.3f} s/step, {vox / r_ours:,.0f} patch voxels/s")
    r_theirs = time_steps(theirs, x, t, args.steps, args.warmup, args.bf16)
    print(f"MONAI DiffusionModelUNet (channels {ch}, no attention levels): {n_monai / 1e6:.2f}M params, "
          f"{r_theirs:.3f} s/step, {vox / r_theirs:,.0f} patch voxels/s")
    print(f"throughput ratio voxdiff / MONAI: {r_theirs / r_ours:.2f}x")


if __name__ == "__main__":
    main()
