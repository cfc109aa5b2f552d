"""Benchmark: whole-volume feature extraction: windows, effective overlap, time and peak memory (RSS).

Runs the extraction in a fresh subprocess and reports the window plan (number of windows, window
size, step, effective overlap, voxels through the network relative to the volume), its wall time
and its peak resident memory (``ru_maxrss`` of the child: what the operating system saw, including
torch's allocations that tracemalloc misses), next to the estimate of
``voxdiff.features.estimate_memory``.

    .venv/bin/python benchmarks/bench_features.py --paper --threads 2   # the target: paper model, 512x512x300 CT
    .venv/bin/python benchmarks/bench_features.py                        # 256x256x128 random volume, base-16 4-level net
    .venv/bin/python benchmarks/bench_features.py --shape 128 128 64 --bf16 --overlap 0.25
    .venv/bin/python benchmarks/bench_features.py --paper --model runs/paper_random   # a pretrain output folder

``--paper``: the paper's backbone (base 16, 6 levels, divisor 32, trained on 128 x 128 x 32 patches:
``voxdiff/experiments/budgets.py``) on a 512 x 512 x 300 CT at 0.8 x 0.8 x 1 mm synthesised from a
phantom and preprocessed to the 1 x 1 x 2 mm grid (as ``benchmarks/bench_conditions.py``). The
window is the model's training patch unless ``--roi``, as in ``voxdiff features``. The network is
randomly initialised unless ``--model`` (the weights do not change the cost). The allocator setting
of the CLI (``voxdiff.core.runtime.tune_allocator``) is applied. Prints one JSON line.
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


def _extractor(args: argparse.Namespace):
    import torch

    from voxdiff.data.preprocess import PreprocessConfig
    from voxdiff.pretrain.backbone import Backbone
    from voxdiff.pretrain.load import FeatureExtractor, load_pretrained
    from voxdiff.pretrain.tasks.base import get_task_class

    if args.model:
        return load_pretrained(args.model)
    torch.manual_seed(0)
    task_cfg = {"condition": "none", "feature_timesteps": list(args.t)} if args.method == "diffusion" else {}
    task = get_task_class(args.method)(task_cfg)
    bb = Backbone(task.in_channels, task.out_channels, base_channels=args.base, num_levels=args.levels,
                  time_embedding=task.uses_timestep)
    return FeatureExtractor(bb, task, PreprocessConfig(), args.method, {"config": {"patch_size": list(args.patch)}})


def child(args: argparse.Namespace) -> None:
    from voxdiff.core.runtime import tune_allocator

    tune_allocator()  # the CLI's allocator setting (VOXDIFF_NO_MALLOPT=1: glibc default)
    import numpy as np
    import torch

    from voxdiff.core.runtime import resolve_device
    from voxdiff.features import ExtractConfig, estimate_memory, extract_volume, window_plan

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ExtractConfig()  # the defaults of `voxdiff features`
    roi = tuple(args.roi) if args.roi else cfg.roi
    overlap = cfg.overlap if args.overlap is None else args.overlap
    t_case = None
    if args.paper:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_conditions import big_case

        from voxdiff.data.preprocess import hu_to_unit

        t0 = time.perf_counter()
        case = big_case(0)
        vol = hu_to_unit(case.image, (-1350.0, 1000.0))
        t_case = time.perf_counter() - t0
        del case
    else:
        vol = np.random.default_rng(0).random(tuple(args.shape), dtype=np.float32)
    dev = resolve_device(args.device)
    ex = _extractor(args).to(dev)
    plan = window_plan(ex, vol.shape, roi, overlap)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = extract_volume(ex, vol, roi=roi, overlap=overlap, sw_batch_size=cfg.sw_batch_size,
                         upsample=args.upsample, progress=False, mode=cfg.mode, bf16=args.bf16)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    out_bytes = sum(f.numel() * f.element_size() for f in out)
    est = estimate_memory(vol.shape, [lv.channels for lv in ex.levels], [lv.stride for lv in ex.levels],
                          upsample=args.upsample, window=plan.window, sw_batch_size=cfg.sw_batch_size,
                          width=args.base)
    d = plan.describe()
    print(json.dumps({
        "seconds": round(secs, 2),
        "seconds_per_window": round(secs / plan.count, 3),
        "cpu_seconds_process": round(cpu.ru_utime + cpu.ru_stime, 1),
        "volume": list(vol.shape), "windows": plan.count, "window": d["window"], "step": d["step"],
        "counts": d["counts"], "effective_overlap": d["effective_overlap"], "requested_overlap": overlap,
        "exact": d["exact"], "coverage": d["coverage"],
        "case_seconds": None if t_case is None else round(t_case, 1),
        "output_MB": round(out_bytes / 2**20, 1),
        "output_shapes": [list(f.shape) for f in out],
        "rss_before_extract_MB": round(rss0 / 1024, 1),
        "estimate_peak_MB": round(est["peak"] / 2**20, 1),
        "gpu_peak_MB": round(torch.cuda.max_memory_allocated() / 2**20, 1) if dev.type == "cuda" else None,
        "device": str(dev), "threads": torch.get_num_threads(),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paper", action="store_true",
                    help="paper backbone (base 16, 6 levels, 128x128x32 training patch) on a 512x512x300 CT")
    ap.add_argument("--model", default=None, help="a voxdiff pretrain output folder instead of a random network")
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 128], help="random volume (without --paper)")
    ap.add_argument("--base", type=int, default=16, help="backbone base width (PretrainConfig default 16)")
    ap.add_argument("--levels", type=int, default=4, help="backbone levels (PretrainConfig default 4)")
    ap.add_argument("--patch", type=int, nargs=3, default=[96, 96, 64],
                    help="training patch of the random network (its default window)")
    ap.add_argument("--roi", type=int, nargs=3, default=None, help="window (default: the model's training patch)")
    ap.add_argument("--overlap", type=float, default=None, help="default: ExtractConfig's (0.5)")
    ap.add_argument("--method", default="diffusion", help="diffusion (t=10, no BPR) | random | restorative")
    ap.add_argument("--t", type=int, nargs="+", default=[10])
    ap.add_argument("--upsample", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.paper:
        args.base, args.levels, args.patch = 16, 6, [128, 128, 32]
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
        "paper": args.paper, "base": args.base, "levels": args.levels, "method": args.method, "t": args.t,
        "upsample": args.upsample, "bf16": args.bf16, "sw_batch_size": 2, "dtype": "float16",
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    })
    print(json.dumps(report))


if __name__ == "__main__":
    main()
