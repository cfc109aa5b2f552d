"""Benchmark: a training step (forward, backward, Adam) of the probing heads, their kernel-1
convolutions as :class:`voxdiff.probe.heads.PointwiseConv3d` (one matrix product over channels)
against plain ``nn.Conv3d(kernel_size=1)`` (PyTorch's CPU path unfolds the input), alternating the
two in one process, medians.

Two shapes, those of the demo's budget (``cpu-small``): patch mode, a batch of 2 pyramids of a
48 x 48 x 32 patch (fine-tuning and window probing), and voxel mode, 8,192 voxels (frozen probing on
whole-volume features), laid out as each version of ``voxdiff.probe.voxel.gather`` hands them over:
``(N, C, 1, 1, 1)`` before, ``(1, C, N, 1, 1)`` channels-last now. Level channels of a base-8,
4-level backbone, doubled for two feature timesteps with ``--passes 2``.

    .venv/bin/python benchmarks/bench_heads.py                 # 1 thread
    .venv/bin/python benchmarks/bench_heads.py --threads 2 --passes 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from voxdiff.core.layers import PointwiseConv3d
from voxdiff.core.runtime import tune_allocator
from voxdiff.probe.heads import LinearHead, NonLinearHead


def as_plain_conv(module: nn.Module) -> nn.Module:
    """The same head with every :class:`PointwiseConv3d` replaced by an ``nn.Conv3d`` holding its weights."""
    for name, child in module.named_children():
        if isinstance(child, PointwiseConv3d):
            plain = nn.Conv3d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
            plain.load_state_dict(child.state_dict())
            setattr(module, name, plain)
        else:
            as_plain_conv(child)
    return module


def as_voxel_batch(pyramid: list[torch.Tensor]) -> list[torch.Tensor]:
    """``(N, C, 1, 1, 1)`` levels as the ``(1, C, N, 1, 1)`` channels-last views of today's ``gather``."""
    return [p[:, :, 0, 0, 0].contiguous().t()[None, :, :, None, None] for p in pyramid]


def logits_of(head: nn.Module, pyramid: list[torch.Tensor]) -> torch.Tensor:
    """``(B, classes, X, Y, Z)`` for patches; ``(N, classes)`` for voxel batches in either layout."""
    out = head(pyramid, out_size=pyramid[0].shape[2:])
    if pyramid[0].shape[2:] == (1, 1, 1):
        return out[:, :, 0, 0, 0]
    if pyramid[0].shape[0] == 1 and pyramid[0].shape[3:] == (1, 1):
        return out[0, :, :, 0, 0].t()
    return out


def step_time(head: nn.Module, pyramid: list[torch.Tensor], target: torch.Tensor, reps: int) -> float:
    opt = torch.optim.Adam(head.parameters(), 1e-3)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        loss = F.cross_entropy(logits_of(head, pyramid), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--passes", type=int, default=1, help="feature timesteps concatenated per level")
    ap.add_argument("--reps", type=int, default=10, help="steps per timing")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two variants")
    ap.add_argument("--hidden", type=int, default=32)
    args = ap.parse_args(argv)
    tune_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    chans = [c * args.passes for c in (8, 16, 32, 64)]
    n_classes = 14
    shapes = {"patch 2 x 48x48x32": [(2, c, 48 // 2 ** i, 48 // 2 ** i, 32 // 2 ** i) for i, c in enumerate(chans)],
              "voxels 8192": [(8192, c, 1, 1, 1) for c in chans]}
    rows = []
    print(f"threads {args.threads}, level channels {chans}, hidden {args.hidden}, median of {args.reps} steps x "
          f"{args.rounds} rounds (ms per step)")
    print("| head | shape | before: nn.Conv3d | now: PointwiseConv3d | speed-up | max |logit difference| |")
    print("|---|---|---|---|---|---|")
    for kind in ("nonlinear", "linear"):
        for label, shp in shapes.items():
            pyr = [torch.randn(s) for s in shp]
            voxels = shp[0][2:] == (1, 1, 1)
            new_pyr = as_voxel_batch(pyr) if voxels else pyr
            target = torch.randint(0, n_classes, (shp[0][0],) if voxels else (shp[0][0], *shp[0][2:]))
            ours = NonLinearHead(chans, n_classes, args.hidden) if kind == "nonlinear" else LinearHead(chans, n_classes)
            for p in ours.parameters():  # non-zero output layers, so that the comparison means something
                nn.init.normal_(p, std=0.1)
            plain = as_plain_conv(NonLinearHead(chans, n_classes, args.hidden) if kind == "nonlinear"
                                  else LinearHead(chans, n_classes))
            plain.load_state_dict(ours.state_dict())
            with torch.no_grad():
                diff = (logits_of(ours.eval(), new_pyr) - logits_of(plain.eval(), pyr)).abs().max().item()
            ours.train(), plain.train()
            t_plain, t_ours = [], []
            for _ in range(args.rounds):
                t_plain.append(step_time(plain, pyr, target, args.reps))
                t_ours.append(step_time(ours, new_pyr, target, args.reps))
            a, b = statistics.median(t_plain), statistics.median(t_ours)
            rows.append({"head": kind, "shape": label, "conv3d_ms": a * 1e3, "pointwise_ms": b * 1e3,
                         "speedup": a / b, "max_abs_diff": diff})
            print(f"| {kind} | {label} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f}x | {diff:.1e} |")
    return rows


if __name__ == "__main__":
    main()
