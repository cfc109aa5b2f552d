"""Speed of whole-volume BPR conditions: computing a volume's field once, and assembling batches.

* field: a 512 x 512 x 300 CT (0.8 x 0.8 x 1.0 mm, an upsampled phantom) preprocessed to the paper
  grid (1 x 1 x 2 mm), then its coordinate field computed once (``voxdiff.bpr.fields.volume_field``:
  resampled to the regressor's 3 mm, windows voted, profiles taken back to the grid). Printed:
  seconds for the field alone and the memory of the stored field.
* batches: the diffusion task's ``sample_batch`` at the paper's size (8 x 128 x 128 x 32) on
  paper-grid volumes, with the condition cropped from the fields, against the same batches with
  ``condition_source=patch`` (the regressor run on every patch, as before); samples per second on
  one thread.

    .venv/bin/python benchmarks/bench_conditions.py [--bpr runs/bpr-ape] [--kind ape]

Without ``--bpr`` an untrained regressor of the default architecture is used (the speed does not
depend on the weights). The allocator setting of the CLI (``voxdiff.core.runtime.tune_allocator``)
is applied first.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch


def _bpr(path: str | None, kind: str):
    from voxdiff.bpr.models import build_bpr, load_bpr

    if path:
        return load_bpr(path, kind=kind)
    torch.manual_seed(0)
    arch = {"channels": (16, 32, 64), "patch_size": (64, 64, 64), "input_pool": 2} if kind == "ape" else \
        {"channels": (16, 32, 48, 64), "patch_size": (48, 48, 8)}
    return build_bpr(kind, arch, {"spacing": [3.0, 3.0, 3.0], "hu_window": [-1350.0, 1000.0]}).eval()


def big_case(seed: int = 0):
    """A phantom upsampled to 512 x 512 x 300 at 0.8 x 0.8 x 1.0 mm, preprocessed to 1 x 1 x 2 mm."""
    from scipy import ndimage

    from voxdiff.data.phantom.generator import generate_phantom
    from voxdiff.data.preprocess import PreprocessConfig, preprocess
    from voxdiff.data.types import Case, CaseMeta

    ph = generate_phantom(seed, unlabelled=True)
    img = ndimage.zoom(ph.image, [512 / ph.image.shape[0], 512 / ph.image.shape[1], 300 / ph.image.shape[2]], order=1)
    aff = np.diag([0.8, 0.8, 1.0, 1.0])
    meta = CaseMeta(f"big{seed}", None, None, img.shape, aff, aff, (0.8, 0.8, 1.0))
    return preprocess(Case(img.astype(np.float32), None, meta), PreprocessConfig(spacing=(1.0, 1.0, 2.0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpr", default=None, help="a trained body part regressor folder (default: untrained)")
    ap.add_argument("--kind", default="ape", choices=["ape", "slice"])
    ap.add_argument("--cases", type=int, default=2, help="paper-grid volumes in memory for the batch test")
    ap.add_argument("--batches", type=int, default=10)
    args = ap.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    from voxdiff.core.runtime import tune_allocator

    fix = tune_allocator() or os.environ.get("MALLOC_MMAP_MAX_") == "0"
    print(f"allocator setting in effect: {fix}; threads: 1", flush=True)
    torch.set_num_threads(1)
    from voxdiff.bpr.fields import volume_field
    from voxdiff.pretrain.tasks.diffusion import DiffusionTask

    model = _bpr(args.bpr, args.kind)
    t = time.perf_counter()
    cases = [big_case(s) for s in range(args.cases)]
    print(f"{len(cases)} CTs 512x512x300 -> paper grid {cases[0].image.shape}: {time.perf_counter() - t:.1f} s", flush=True)
    times = []
    for c in cases:
        t = time.perf_counter()
        f = volume_field(model, c.image, c.meta.spacing)
        times.append(time.perf_counter() - t)
    nbytes = sum(p.nbytes for p in f.profiles)
    print(f"field of one volume ({args.kind}): {np.median(times):.2f} s (median of {len(times)}), "
          f"{nbytes} bytes stored (a dense float16 map would take {3 * 2 * np.prod(f.shape) / 2**20:.0f} MiB)", flush=True)

    pre = {"preprocess": {"hu_window": [-1350.0, 1000.0], "spacing": [1.0, 1.0, 2.0]}}
    size = (128, 128, 32)
    for source in ("volume", "patch"):
        task = DiffusionTask(dict(pre, condition=args.kind, condition_source=source), bpr=model)
        task.prepare(cases)
        rng = np.random.default_rng(0)
        n = args.batches if source == "volume" else max(2, args.batches // 5)
        t = time.perf_counter()
        for _ in range(n):
            b = task.sample_batch(cases, 8, size, rng)
            if source == "patch":  # what the loss computed per batch before: the regressor on every patch
                task.condition_map(b["image"])
        dt = time.perf_counter() - t
        print(f"batch assembly 8 x {size} with condition_source={source}: {8 * n / dt:.1f} samples/s "
              f"({dt / n * 1000:.0f} ms per batch, one thread)", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
