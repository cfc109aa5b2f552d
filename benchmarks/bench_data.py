"""The pretraining data path: batch assembly, main-process overhead per step, memory per rank.

1. **Batch assembly** at the paper's size (8 x 128x128x32, diffusion with a 3-channel whole-volume
   BPR field cropped per patch, as the paper recipe) from int16 memory maps of a preprocessing cache,
   with 0, 1, 2 worker processes: samples/s in all and per worker process (target >= 100).
2. **Main-process overhead per step** through the real engine (``pretrain``) with a no-op model
   (one parameter; the loss reads the batch) and a fixed batch, so that what is timed is the
   engine's own work per step: moving the batch, the optimiser/EMA/metric bookkeeping, receiving
   batches from workers (target <= 5 ms).
3. **Resident memory** of a pretraining process (``voxdiff.pretrain.pretrain`` with ``data`` and
   ``cache_dir``) on N cases of a synthetic int16 cache, each a realistic volume on the paper grid
   (default 200 x 400x300x150 voxels, 36 MB each on disk): peak RSS, its anonymous (private) and
   file-backed (page cache of the memory maps, shared and reclaimable) parts, per rank and for the
   worker processes (target <= 4 GiB per rank). With a no-op model (real batches, a loss that only
   reads them: the host memory of a GPU rank, whose activations live on the device) and once with a
   tiny backbone on the CPU (there the activations of a paper-size batch dominate).

The synthetic cache (default /tmp/voxdiff_bench_data) is written once with the cache's own format
(``PreprocessCache.write``) under the keys of small stand-in source files, so ``load_preprocessed``
finds every case in the cache and never reads a source. Run it niced on a shared machine::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 nice -n 10 \\
        .venv/bin/python benchmarks/bench_data.py --cases 200 --batches 12
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PATCH = (128, 128, 32)
BATCH = 8


# ----------------------------------------------------------------------------- synthetic cache


def synthetic_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """An int16 HU volume: air, an elliptic body (fat rim, soft tissue), two lungs in the upper
    part, a liver-like organ, a spine, CT-like noise."""
    r = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0], dtype=np.float32), np.linspace(-1, 1, shape[1], dtype=np.float32),
                       indexing="ij")
    sx, sy = r.uniform(0.8, 0.95), r.uniform(0.75, 0.9)
    body = (x / sx) ** 2 + (y / sy) ** 2 < 1
    inner = (x / (sx - 0.06)) ** 2 + (y / (sy - 0.06)) ** 2 < 1
    sl = np.where(body, -90.0, -1000.0).astype(np.float32)
    sl[inner] = 40.0
    spine = (x ** 2 + (y + 0.6) ** 2) < 0.012
    sl[spine] = 500.0
    vol = np.repeat(sl[:, :, None], shape[2], axis=2)
    z0 = int(shape[2] * r.uniform(0.55, 0.7))
    lungs = ((np.abs(x) - 0.4) ** 2 / 0.08 + (y + 0.05) ** 2 / 0.3 < 1) & inner
    vol[:, :, z0:][lungs] = -850.0
    liver = ((x - 0.35) ** 2 / 0.1 + y ** 2 / 0.15 < 1) & inner
    vol[:, :, int(z0 * 0.6):z0][liver] = 60.0
    vol += r.normal(0.0, 12.0, size=(shape[0], shape[1], 1)).astype(np.float32)  # streaks, cheap
    vol += r.normal(0.0, 15.0, size=shape).astype(np.float32)
    return np.clip(np.rint(vol), -1024, 3000).astype(np.int16)


def build_cache(root: Path, n: int, shape: tuple[int, int, int]) -> tuple[Path, Path]:
    """``root/src`` (stand-in source files, one per case) and ``root/cache`` (the int16 volumes)."""
    import nibabel as nib

    from voxdiff.data.adapters import open_dataset
    from voxdiff.data.cache import PreprocessCache
    from voxdiff.data.preprocess import PreprocessConfig
    from voxdiff.data.types import Case, CaseMeta

    src, cache_dir = root / "src", root / "cache"
    src.mkdir(parents=True, exist_ok=True)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    for i in range(n):
        p = src / f"case{i:04d}.nii.gz"
        if not p.exists():
            nib.save(nib.Nifti1Image(np.full((4, 4, 4), -1000, np.int16), aff), str(p))
    ds = open_dataset(src, kind="folder")
    cache = PreprocessCache(cache_dir, PreprocessConfig())
    t0 = time.perf_counter()
    made = 0
    for i, ref in enumerate(ds.refs):
        key = cache.key(ref, ds)
        if cache.paths(key)[0].is_file():
            continue
        img = synthetic_volume(shape, seed=i)
        meta = CaseMeta(ref.case_id, ref.image_path, None, shape, aff.copy(), aff.copy(), (1.0, 1.0, 2.0))
        cache.write(key, Case(img, None, meta))
        made += 1
    if made:
        print(f"wrote {made} synthetic cases {shape} int16 to {cache_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
    return src, cache_dir


# ----------------------------------------------------------------------------- 1. batch assembly


def paper_task(cases: list):
    """The diffusion task with an (untrained) APE BPR and whole-volume fields per case, so that a
    batch is what the paper recipe draws: 8 patches + their 3-channel field crops."""
    from voxdiff.bpr.fields import CoordinateField
    from voxdiff.bpr.models import build_bpr
    from voxdiff.pretrain.tasks.diffusion import DiffusionTask

    bpr = build_bpr("ape", {"channels": [4, 4, 4, 4]})
    task = DiffusionTask({"condition": "ape", "diffusion_steps": 1000}, bpr=bpr)
    task._fields = [CoordinateField(c.image.shape, (0, 1, 2),
                                    tuple(np.linspace(-1, 1, n) for n in c.image.shape)) for c in cases]
    return task


def bench_assembly(cases: list, workers: int, batches: int) -> dict:
    from voxdiff.pretrain.data import StepBatches, step_batches

    task = paper_task(cases)
    sb = StepBatches(task.sample_batch, cases, BATCH, PATCH, seed=0)
    it = step_batches(sb, 0, batches + 2 * max(1, workers), workers=workers, prefetch_factor=2)
    for _ in range(2 * max(1, workers)):  # worker start-up and the first batches are not counted
        next(it)
    t0 = time.perf_counter()
    n = 0
    for b in it:
        n += 1
        assert b["image"].shape == (BATCH, 1, *PATCH) and b["cond_profiles"].shape == (BATCH, 3, max(PATCH))
    dt = time.perf_counter() - t0
    sps = n * BATCH / dt
    return {"workers": workers, "batches": n, "ms_per_batch": round(1000 * dt / n, 1),
            "samples_per_s": round(sps, 1), "samples_per_s_per_process": round(sps / max(1, workers), 1)}


# ----------------------------------------------------------------------------- 2. main-process overhead


def bench_overhead(workers: int, steps: int, tmp: Path) -> dict:
    """Per-step time of the engine with a no-op model and a fixed batch (nothing else to wait for)."""
    from voxdiff.core.sections import OptimConfig, RuntimeConfig
    from voxdiff.pretrain.tasks.base import TASKS
    from voxdiff.pretrain.tasks.diffusion import DiffusionTask
    from voxdiff.pretrain.train import BackboneConfig, PretrainConfig, PretrainData, pretrain

    fixed = {"image": torch.rand(BATCH, 1, *PATCH), "cond_profiles": torch.rand(BATCH, 3, max(PATCH)),
             "cond_axes": torch.arange(3),
             "origin": torch.zeros(BATCH, 3, dtype=torch.int64), "case_index": torch.zeros(BATCH, dtype=torch.int64)}

    class NoOp(DiffusionTask):
        def sample_batch(self, cases, batch_size, patch_size, rng):
            return dict(fixed)

        def loss(self, backbone, batch, generator):
            # one parameter touched; the batch is read (so that it is really received)
            w = backbone.out_conv.bias
            loss = (w * 0).sum() + batch["image"][:, :, 0, 0, 0].mean()
            return loss, {"noop": loss.detach()}

    TASKS["bench_noop"] = NoOp
    try:
        cfg = PretrainConfig(method="bench_noop", data=PretrainData(patch_size=PATCH, batch_size=BATCH, workers=workers),
                             optim=OptimConfig(steps=steps, warmup_steps=1),
                             backbone=BackboneConfig(base_channels=1, num_levels=1, norm_groups=1),
                             runtime=RuntimeConfig(log_every=steps, checkpoint_every=10 ** 9, bf16=False, device="cpu",
                                                   threads=1))
        from voxdiff.data.types import Case, CaseMeta

        dummy = [Case(np.zeros((4, 4, 4), np.int16), None, CaseMeta("d", None, None, (4, 4, 4), np.eye(4), np.eye(4),
                                                                    (1.0, 1.0, 1.0)))]
        out = pretrain(cfg, tmp / f"noop{workers}", cases=dummy, progress=False, force=True)
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    finally:
        TASKS.pop("bench_noop", None)
    ms = 1000 * BATCH / row["patches_per_s"]
    return {"workers": workers, "steps": steps, "ms_per_step": round(ms, 2)}


# ----------------------------------------------------------------------------- 3. memory


MEMORY_CHILD = r'''
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
from voxdiff.core.sections import OptimConfig, RuntimeConfig
from voxdiff.pretrain.train import BackboneConfig, PretrainConfig, PretrainData, TaskOptions, pretrain, load_cases
args = json.loads(sys.argv[2])
method = "diffusion"
if args["model"] == "noop":
    # the data path alone: real batches (patches read from the memory maps), a loss that only reads
    # them; on a GPU rank the model's activations live on the device, not here
    from voxdiff.pretrain.tasks.base import TASKS
    from voxdiff.pretrain.tasks.diffusion import DiffusionTask

    class NoOpLoss(DiffusionTask):
        def loss(self, backbone, batch, generator):
            loss = (backbone.out_conv.bias * 0).sum() + batch["image"].mean()
            return loss, {}

    TASKS["bench_noop_loss"] = NoOpLoss
    method = "bench_noop_loss"
def status():
    d = {}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            d[k] = round(int(v.split()[0]) / 2**20, 3)  # GiB
    return d
cfg = PretrainConfig(method=method,
                     data=PretrainData(paths=[args["src"]], kind="folder", cache_dir=args["cache"], patch_size=(128, 128, 32),
                                       batch_size=8, workers=args["workers"]),
                     optim=OptimConfig(steps=args["steps"]), backbone=BackboneConfig(base_channels=4, num_levels=3),
                     task=TaskOptions(diffusion_steps=1000),
                     runtime=RuntimeConfig(log_every=args["steps"], checkpoint_every=10 ** 9, bf16=False, device="cpu",
                                           threads=1))
t0 = time.perf_counter()
cases = load_cases(cfg)
t_load = time.perf_counter() - t0
after_load = status()
pretrain(cfg, args["out"], cases=cases, progress=False, force=True)
end = status()
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
print(json.dumps({"cases": len(cases), "dtype": str(cases[0].image.dtype), "memmap": type(cases[0].image).__name__,
                  "load_s": round(t_load, 1), "after_load": after_load, "end": end,
                  "worker_peak_rss_GiB": round(children, 3)}))
'''


def bench_memory(src: Path, cache: Path, workers: int, steps: int, tmp: Path, model: str) -> dict:
    repo = str(Path(__file__).resolve().parents[1])
    args = {"src": str(src), "cache": str(cache), "workers": workers, "steps": steps, "model": model,
            "out": str(tmp / f"mem{workers}{model}")}
    r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, repo, json.dumps(args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "voxdiff_bench_data"))
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--shape", type=int, nargs=3, default=(400, 300, 150))
    ap.add_argument("--batches", type=int, default=12, help="batches timed per worker setting")
    ap.add_argument("--overhead_steps", type=int, default=200)
    ap.add_argument("--memory_steps", type=int, default=50, help="steps of the no-op-model memory runs")
    ap.add_argument("--tiny_steps", type=int, default=2,
                    help="steps of the memory run with a tiny backbone on the CPU (0 = skip)")
    ap.add_argument("--workers", type=int, nargs="+", default=(0, 1, 2))
    ap.add_argument("--skip", nargs="*", default=(), choices=("assembly", "overhead", "memory"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(a.root)
    src, cache_dir = build_cache(root, a.cases, tuple(a.shape))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared machine)")
    results: dict = {}
    if "assembly" not in a.skip:
        from voxdiff.pretrain.train import PretrainConfig, PretrainData, load_cases

        cases = load_cases(PretrainConfig(data=PretrainData(paths=[str(src)], kind="folder", cache_dir=str(cache_dir))))
        results["assembly"] = []
        # the same steps every time: the first setting may read the volumes from disk, the repeat of
        # the in-process run at the end finds their pages in the page cache
        for w in [*a.workers, 0]:
            r = bench_assembly(cases, w, a.batches)
            results["assembly"].append(r)
            print("assembly", json.dumps(r), flush=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if "overhead" not in a.skip:
            results["overhead"] = []
            for w in (0, 2):
                r = bench_overhead(w, a.overhead_steps, tmp)
                results["overhead"].append(r)
                print("overhead", json.dumps(r), flush=True)
        if "memory" not in a.skip:
            results["memory"] = []
            runs = [(0, "noop", a.memory_steps), (2, "noop", a.memory_steps)]
            if a.tiny_steps:
                runs.append((0, "tiny", a.tiny_steps))
            for w, model, steps in runs:
                r = bench_memory(src, cache_dir, w, steps, tmp, model)
                r.update(workers=w, model=model, steps=steps)
                results["memory"].append(r)
                print("memory", json.dumps(r), flush=True)
    print(json.dumps({"peak_rss_GiB_this_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
