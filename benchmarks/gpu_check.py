"""GPU check: paper-preset pretraining speed and memory, its batch/step time split, and whole-CT features.

Meant for a lent CUDA machine without network (``benchmarks/gpu_check.sh`` sets it up and calls this);
``--device cpu --quick`` is a dry run with tiny sizes that works anywhere (the test suite runs it).

1. Pretraining through the engine (``voxdiff.pretrain.pretrain``) with the ``paper`` budget of
   ``voxdiff/experiments/budgets.py`` (diffusion, 8 x 128x128x32 patches, base 16, 6 levels, bf16
   where native), on synthetic CT-like cases held in memory, for ``--steps`` steps (100), once per
   ``--workers`` count (batches drawn in the training process, then in worker processes): iterations
   per second from its metrics.jsonl, over all steps and in the steady state (log windows after the
   first, which holds cuDNN's autotuning and the workers' start), wall time, peak GPU memory.
2. The same model and batches in a timed loop, synchronising the device after each phase: batch
   assembly (patch sampling + copy to the device) against the device step (forward, loss,
   backward, clipping, AdamW, EMA).
3. Features of a synthetic 512 x 512 x 300 CT (0.8 x 0.8 x 1 mm): preprocessing to the paper grid
   (1 x 1 x 2 mm, cropped to the body) and ``voxdiff features``' extraction (``ExtractConfig``
   defaults) with the model of step 1, on the device: seconds, peak GPU memory, peak RSS.

Prints a table as it goes, then one JSON line.

    python benchmarks/gpu_check.py                        # cuda, full sizes (about 2-4 minutes on a GPU)
    python benchmarks/gpu_check.py --device cpu --quick   # dry run, tiny sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from voxdiff.core.cli import underscore_options
from voxdiff.core.config import flat_names, from_dict
from voxdiff.core.errors import VoxdiffError
from voxdiff.core.precision import bf16_autocast, use_bf16
from voxdiff.core.runtime import resolve_device, tune_allocator
from voxdiff.data.preprocess import PreprocessConfig, preprocess
from voxdiff.data.types import Case, CaseMeta
from voxdiff.experiments.budgets import get_budget
from voxdiff.features import ExtractConfig, extract_case, window_plan
from voxdiff.pretrain.load import load_pretrained
from voxdiff.pretrain.train import (
    EMA,
    PretrainConfig,
    build_task_and_backbone,
    lr_at,
    param_groups,
    pretrain,
)

# tiny sizes of the dry run (--quick)
QUICK = {"pretrain": {"patch_size": (16, 16, 16), "batch_size": 2, "base_channels": 4, "num_levels": 3,
                      "warmup_steps": 1, "diffusion_steps": 100, "feature_timesteps": (10,)},
         "steps": 3, "split_steps": 2, "train_shape": (48, 48, 24), "n_cases": 2, "ct_shape": (80, 80, 48)}
FULL = {"steps": 100, "split_steps": 30, "train_shape": (320, 320, 160), "n_cases": 4, "ct_shape": (512, 512, 300)}


def synthetic_ct(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int) -> np.ndarray:
    """CT-like HU volume: air around an elliptic body (fat rim, soft tissue, organ blobs, lungs at the
    top, a spine), with noise. Enough structure for body cropping and a realistic window count."""
    r = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    body = x ** 2 / 0.75 + y ** 2 / 0.45 < 1
    img = np.full(shape, -1000.0, np.float32)
    img[body] = -90.0
    img[x ** 2 / 0.65 + y ** 2 / 0.36 < 1] = 40.0
    for _ in range(6):
        c = r.uniform(-0.5, 0.5, 3)
        rad = r.uniform(0.04, 0.12)
        img[(x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < rad] = r.uniform(60, 200)
    lungs = ((np.abs(x) - 0.35) ** 2 / 0.06 + (y + 0.05) ** 2 / 0.12 < 1) & (z > 0.3)
    img[lungs] = -850.0
    img[(x ** 2 + (y - 0.45) ** 2) < 0.006] = 700.0  # spine
    img += r.normal(0, 20, shape).astype(np.float32)
    return img


def make_case(img: np.ndarray, spacing: tuple[float, float, float], case_id: str) -> Case:
    aff = np.diag([*spacing, 1.0])
    meta = CaseMeta(case_id, None, None, tuple(img.shape), aff.copy(), aff, tuple(spacing))
    return Case(img, None, meta)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_gpu_gib(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def row(name: str, value: str) -> None:
    print(f"| {name:<44s} | {value:<60s} |", flush=True)


def pretrain_config(args: argparse.Namespace, sizes: dict, spacing: tuple[float, float, float],
                    workers: int = 0) -> PretrainConfig:
    over = dict(get_budget("paper")["pretrain"])
    if args.quick:
        over.update(QUICK["pretrain"])
    fields = {f.name for f in dataclasses.fields(PretrainConfig)} | set(flat_names(PretrainConfig))  # budgets are flat
    over = {k: v for k, v in over.items() if k in fields}
    over.update(method="diffusion", condition="none", steps=sizes["steps"], log_every=max(1, sizes["steps"] // 10),
                workers=workers,
                checkpoint_every=10 ** 9, keep_checkpoints=1, device=args.device, seed=0,
                preprocess=PreprocessConfig(spacing=spacing))
    if args.bf16 is not None:
        over["bf16"] = args.bf16
    elif args.quick and args.device == "cpu":
        over["bf16"] = False  # the dry run checks the script, not bf16 speed
    if args.threads:
        over["threads"] = args.threads
    if args.compile:
        over["compile"] = True
    return from_dict(PretrainConfig, over)


def check_pretrain(cfg: PretrainConfig, cases: list, out: Path, dev: torch.device) -> dict:
    reset_peak(dev)
    t0 = time.perf_counter()
    pretrain(cfg, out, cases=cases, progress=False, force=True)
    sync(dev)
    wall = time.perf_counter() - t0
    rows = [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
            if "patches_per_s" in r]
    steps = np.diff([0] + [int(r["step"]) for r in rows])
    secs = steps * cfg.data.batch_size / np.array([float(r["patches_per_s"]) for r in rows])
    it_all = steps.sum() / secs.sum()
    it_steady = steps[1:].sum() / secs[1:].sum() if len(rows) > 1 else it_all
    return {"steps": cfg.optim.steps, "workers": int(cfg.data.workers), "it_per_s": round(float(it_all), 3),
            "it_per_s_steady": round(float(it_steady), 3),
            "patches_per_s_steady": round(float(it_steady) * cfg.data.batch_size, 2), "first_window_s": round(float(secs[0]), 1),
            "wall_s": round(wall, 1), "loss": round(float(rows[-1]["loss"]), 4), "peak_gpu_GiB": peak_gpu_gib(dev)}


def check_split(cfg: PretrainConfig, cases: list, n: int, dev: torch.device) -> dict:
    """Batch assembly vs device step, with a device synchronisation between them."""
    torch.manual_seed(cfg.seed)
    task, backbone, _ = build_task_and_backbone(cfg)
    task.to(dev)
    backbone.to(dev)
    params = list(backbone.parameters()) + list(task.parameters())
    opt = torch.optim.AdamW(param_groups(torch.nn.ModuleList([backbone, task]), cfg.optim.weight_decay), lr=cfg.optim.lr)
    ema = EMA(backbone, cfg.optim.ema_decay)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    t_batch, t_step = [], []
    for step in range(n + 1):  # step 0: warm-up (cudnn autotuning, allocator), not counted
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        sync(dev)
        t0 = time.perf_counter()
        batch = task.sample_batch(cases, cfg.data.batch_size, tuple(cfg.data.patch_size), rng)
        batch = {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        sync(dev)
        t1 = time.perf_counter()
        with bf16_autocast(dev, cfg.runtime.bf16):
            loss, _ = task.loss(backbone, batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        ema.update(backbone, step)
        sync(dev)
        t2 = time.perf_counter()
        if step > 0:
            t_batch.append(t1 - t0)
            t_step.append(t2 - t1)
    b, s = float(np.median(t_batch)), float(np.median(t_step))
    return {"steps": n, "batch_ms": round(1000 * b, 1), "step_ms": round(1000 * s, 1),
            "batch_fraction": round(b / (b + s), 3), "step_fraction": round(s / (b + s), 3)}


def check_features(model: Path, ct_shape: tuple[int, int, int], pre: PreprocessConfig, dev: torch.device) -> dict:
    src_spacing = (0.8, 0.8, 1.0)
    raw = make_case(synthetic_ct(ct_shape, src_spacing, seed=123), src_spacing, "ct512")
    t0 = time.perf_counter()
    case = preprocess(raw, pre)
    t_pre = time.perf_counter() - t0
    del raw
    ex = load_pretrained(model, device=dev)
    ecfg = ExtractConfig()
    reset_peak(dev)
    sync(dev)
    t0 = time.perf_counter()
    feats = extract_case(ex, case, ecfg)
    sync(dev)
    t_ex = time.perf_counter() - t0
    return {"ct_shape": list(ct_shape), "grid_shape": list(case.image.shape), "preprocess_s": round(t_pre, 1),
            "extract_s": round(t_ex, 1), "overlap": ecfg.overlap,
            "windows": window_plan(ex, case.image.shape, ecfg.roi, ecfg.overlap).describe(),
            "feature_shapes": [list(f.shape) for f in feats],
            "feature_MB": round(sum(f.numel() * f.element_size() for f in feats) / 2**20, 1),
            "peak_gpu_GiB": peak_gpu_gib(dev),
            "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu or auto")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the script itself")
    ap.add_argument("--steps", type=int, help="pretraining steps through the engine (100; quick: 3)")
    ap.add_argument("--split_steps", type=int, help="steps of the batch/step split (30; quick: 2)")
    ap.add_argument("--ct_shape", type=int, nargs=3, help="synthetic CT for the features (512 512 300)")
    ap.add_argument("--bf16", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                    help="bf16 autocast (default: the paper preset's, i.e. on where native)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the pretraining model (runtime.compile)")
    ap.add_argument("--workers", type=int, nargs="+",
                    help="batch worker counts of the pretraining runs (default on a GPU: 0 and min(8, cpus/2); else 0)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["pretrain", "split", "features"])
    ap.add_argument("--out", help="work folder (default: a temporary folder, removed at the end)")
    ap.add_argument("--json", help="also write the JSON report to this file")
    args = ap.parse_args(underscore_options(sys.argv[1:] if argv is None else argv))

    tune_allocator()  # as the CLI does (VOXDIFF_NO_MALLOPT=1: glibc default)
    try:
        dev = resolve_device(args.device)
    except VoxdiffError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch sizes
    sizes = dict(QUICK if args.quick else FULL)
    for key, val in (("steps", args.steps), ("split_steps", args.split_steps), ("ct_shape", args.ct_shape)):
        if val is not None:
            sizes[key] = tuple(val) if key == "ct_shape" else int(val)
    spacing = tuple(get_budget("paper")["spacing"])
    cfg = pretrain_config(args, sizes, spacing)
    if args.workers:
        worker_counts = list(dict.fromkeys(args.workers))
    else:
        worker_counts = [0, max(1, min(8, (os.cpu_count() or 2) // 2))] if dev.type == "cuda" else [0]

    env = {"torch": torch.__version__, "device": str(dev), "python": platform.python_version(),
           "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "quick": args.quick,
           "bf16": use_bf16(dev, cfg.runtime.bf16), "compile": bool(cfg.runtime.compile)}
    if dev.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    report: dict = {"env": env}
    print("voxdiff GPU check: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    print(f"| {'check':<44s} | {'result':<60s} |\n|{'-' * 46}|{'-' * 62}|", flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="voxdiff_gpu_check_") if not args.out else None
    work = Path(args.out) if args.out else Path(tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        cases = [make_case(synthetic_ct(tuple(sizes["train_shape"]), spacing, seed=i), spacing, f"train{i}")
                 for i in range(sizes["n_cases"])]
        row("synthetic training cases", f"{len(cases)} x {'x'.join(map(str, sizes['train_shape']))} "
                                        f"({time.perf_counter() - t0:.1f} s to build)")
        shape = f"{cfg.data.batch_size} x {'x'.join(map(str, cfg.data.patch_size))}, base {cfg.backbone.base_channels}, " \
                f"{cfg.backbone.num_levels} levels, bf16 {env['bf16']}"
        model = work / "pretrained_w0"
        if "pretrain" not in args.skip or "features" not in args.skip:
            report["pretrain"] = []
            for i, n in enumerate(worker_counts if "pretrain" not in args.skip else worker_counts[:1]):
                out = work / f"pretrained_w{n}"
                model = out if i == 0 else model
                r = check_pretrain(pretrain_config(args, sizes, spacing, n), cases, out, dev)
                report["pretrain"].append(r)
                row(f"pretrain engine, {r['steps']} steps, workers {n}",
                    f"{r['it_per_s_steady']} it/s steady ({r['patches_per_s_steady']} patches/s), "
                    f"{r['it_per_s']} it/s all")
                row("  wall, first log window, loss", f"{r['wall_s']} s, {r['first_window_s']} s, {r['loss']}")
                row("  peak GPU memory", f"{r['peak_gpu_GiB']} GiB" if r["peak_gpu_GiB"] is not None else "n/a (cpu)")
            row("  patch batch, model", shape)
        if "split" not in args.skip:
            r = check_split(cfg, cases, sizes["split_steps"], dev)
            report["split"] = r
            row(f"batch assembly vs device step ({r['steps']} steps)",
                f"{r['batch_ms']} ms ({100 * r['batch_fraction']:.0f} %) + {r['step_ms']} ms "
                f"({100 * r['step_fraction']:.0f} %) per step, medians")
        del cases
        if "features" not in args.skip:
            r = check_features(model, tuple(sizes["ct_shape"]), cfg.preprocess, dev)
            report["features"] = r
            row(f"features {'x'.join(map(str, r['ct_shape']))} CT (0.8x0.8x1 mm)",
                f"preprocess {r['preprocess_s']} s -> {'x'.join(map(str, r['grid_shape']))}, "
                f"extract {r['extract_s']} s")
            w = r["windows"]
            row("  windows, output", f"{w['count']} windows of {'x'.join(map(str, w['window']))}, overlap "
                f"{w['effective_overlap']} (requested {r['overlap']}), {r['feature_MB']} MB features")
            row("  peak GPU memory, peak RSS",
                f"{r['peak_gpu_GiB'] if r['peak_gpu_GiB'] is not None else 'n/a'} GiB, {r['peak_rss_GiB']} GiB")
        report["total_s"] = round(time.perf_counter() - t0, 1)
        row("total", f"{report['total_s']} s")
    finally:
        if tmp is not None:
            tmp.cleanup()
    line = json.dumps(report)
    print(line, flush=True)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
