"""Benchmark: whole-volume feature extraction time and peak memory (RSS) at the default settings.

Runs the extraction in a fresh subprocess and reports its wall time and peak resident memory
(``ru_maxrss`` of the child: what the operating system saw, including torch's allocations that
tracemalloc misses), next to the estimate of ``voxdiff.features.estimate_memory``.

    .venv/bin/python benchmarks/bench_features.py                 # 256x256x128, base-16 4-level diffusion net
    .venv/bin/python benchmarks/bench_features.py --upsample      # full-resolution float16 output
    .venv/bin/python benchmarks/bench_features.py --shape 128 128 64 --bf16

The network is randomly initialised (the weights do not change the cost). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def child(args: argparse.Namespace) -> None:
    from voxdiff.core.runtime import tune_allocator

    tune_allocator()  # the CLI's allocator setting (VOXDIFF_NO_MALLOPT=1: glibc default)
    import numpy as np
    import torch

    from voxdiff.data.preprocess import PreprocessConfig
    from voxdiff.features import ExtractConfig, estimate_memory, extract_volume
    from voxdiff.pretrain.backbone import Backbone
    from voxdiff.pretrain.load import FeatureExtractor
    from voxdiff.pretrain.tasks.base import get_task_class

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ExtractConfig()  # the defaults of `voxdiff features`
    task_cfg = {"condition": "none", "feature_timesteps": list(args.t)} if args.method == "diffusion" else {}
    task = get_task_class(args.method)(task_cfg)
    bb = Backbone(task.in_channels, task.out_channels, base_channels=args.base, num_levels=args.levels,
                  time_embedding=task.uses_timestep)
    ex = FeatureExtractor(bb, task, PreprocessConfig(), args.method, {})
    dev = "cuda" if args.device == "cuda" else "cpu"
    ex.to(dev)
    vol = np.random.default_rng(0).random(tuple(args.shape), dtype=np.float32)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = extract_volume(ex, vol, roi=cfg.roi, overlap=cfg.overlap, sw_batch_size=cfg.sw_batch_size,
                         upsample=args.upsample, progress=False, mode=cfg.mode, bf16=args.bf16)
    if dev == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    out_bytes = sum(f.numel() * f.element_size() for f in out)
    est = estimate_memory(args.shape, [lv.channels for lv in ex.levels], [lv.stride for lv in ex.levels],
                          upsample=args.upsample, window=cfg.roi, sw_batch_size=cfg.sw_batch_size, width=args.base)
    print(json.dumps({
        "seconds": round(secs, 2),
        "output_MB": round(out_bytes / 2**20, 1),
        "output_shapes": [list(f.shape) for f in out],
        "rss_before_extract_MB": round(rss0 / 1024, 1),
        "estimate_peak_MB": round(est["peak"] / 2**20, 1),
        "gpu_peak_MB": round(torch.cuda.max_memory_allocated() / 2**20, 1) if dev == "cuda" else None,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 128])
    ap.add_argument("--base", type=int, default=16, help="backbone base width (PretrainConfig default 16)")
    ap.add_argument("--levels", type=int, default=4, help="backbone levels (PretrainConfig default 4)")
    ap.add_argument("--method", default="diffusion", help="diffusion (t=10, no BPR) | random | restorative")
    ap.add_argument("--t", type=int, nargs="+", default=[10])
    ap.add_argument("--upsample", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + sys.argv[1:]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        sys.exit(res.returncode)
    report = json.loads(res.stdout.strip().splitlines()[-1])
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: kilobytes
    import torch

    report.update({
        "peak_rss_MB": round(peak_kb / 1024, 1),
        "process_wall_seconds": round(wall, 2),
        "shape": args.shape, "base": args.base, "levels": args.levels, "method": args.method, "t": args.t,
        "upsample": args.upsample, "bf16": args.bf16, "device": args.device,
        "roi": [96, 96, 64], "overlap": 0.5, "sw_batch_size": 2, "dtype": "float16",
        "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
    })
    print(json.dumps(report))


if __name__ == "__main__":
    main()
