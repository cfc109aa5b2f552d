"""Slice ordering of single slice models and of every K-member ensemble of them (``voxdiff bpr ensemble``).

An ensemble's slice score is the mean of its members' calibrated scores
(``tests/bpr/test_bpr_ensemble.py`` checks that against the saved ensemble), so every subset of the
given models can be scored from one pass of each model over each data set, without writing the
ensembles. For each single model and each K-subset, and each data set, the script prints
Spearman(score, z) over the whole scan and over its inferior and superior halves (mean over the
set's cases) and whether the issue's target holds: Spearman >= ``--target`` on every set named in
``--whole`` and, on the sets named in ``--halves``, on both halves too. docs/BPR.md, "Ensembles of
slice models"::

    python benchmarks/bpr_ensembles.py runs/thx/fov-s0 runs/thx/fov-s1 runs/thx/fov-s2 runs/thx/fov-s3 \\
        --set val=runs/thx/chest6-uc/unlabelled --set ts_a=../shared/data/real_ct/ts_a_abdomen_ct.nii.gz \\
        --set ts_c=../shared/data/real_ct/ts_c_thorax_cta_ct.nii.gz --whole ts_a,ts_c --halves ts_c --k 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from voxdiff.bpr import load_bpr
from voxdiff.bpr.inference import slice_scores_volume
from voxdiff.bpr.predict import model_preprocess_config
from voxdiff.bpr.quality import slice_z_mm, spearman_by_halves
from voxdiff.core.runtime import tune_allocator
from voxdiff.data.cache import load_preprocessed
from voxdiff.data.preprocess import hu_to_unit


def member_scores(models, path: str, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per case: ((M, Z) calibrated slice scores of every model, (Z,) slice z in mm)."""
    cases = load_preprocessed(path, model_preprocess_config(models[0]), split=split)
    if not cases:
        raise SystemExit(f"bpr_ensembles: {path}: no cases")
    out = []
    for c in cases:
        unit = hu_to_unit(np.asarray(c.image, dtype=np.float32), models[0].preprocess["hu_window"])
        out.append((np.stack([slice_scores_volume(m, unit) for m in models]), slice_z_mm(c.meta.affine, c.image.shape)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="single slice model folders (same architecture and preprocessing)")
    ap.add_argument("--set", action="append", required=True, dest="sets", help="NAME=PATH[:SPLIT], repeatable")
    ap.add_argument("--k", type=int, default=3, help="ensemble size (every subset of this size is scored)")
    ap.add_argument("--whole", default="", help="comma-separated sets whose whole-scan Spearman the target needs")
    ap.add_argument("--halves", default="", help="comma-separated sets whose halves the target needs too")
    ap.add_argument("--target", type=float, default=0.98)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON of every row")
    a = ap.parse_args(argv)
    tune_allocator()
    torch.set_num_threads(max(a.threads, 1))
    models = [load_bpr(m, kind="slice") for m in a.models]
    if not 1 <= a.k <= len(models):
        ap.error(f"--k must be between 1 and the number of models ({len(models)})")
    data = {}
    for spec in a.sets:
        name, _, rest = spec.partition("=")
        head, _, tail = rest.rpartition(":")  # as benchmarks/bpr_anchor_swap.py reads its --set
        path, split = (head, tail) if head and tail in ("all", "train", "test") else (rest, "all")
        if not name or not path:
            ap.error(f"--set takes NAME=PATH[:SPLIT], got {spec!r}")
        data[name] = member_scores(models, path, split)
    whole = [s for s in a.whole.split(",") if s]
    halves = [s for s in a.halves.split(",") if s]
    subsets = [(k,) for k in range(len(models))] + (list(itertools.combinations(range(len(models)), a.k)) if a.k > 1 else [])
    rows = []
    for sub in subsets:
        row = {"members": [a.models[k] for k in sub], "sets": {}}
        for name, per in data.items():
            row["sets"][name] = np.nanmean([spearman_by_halves(sc[list(sub)].mean(0), z) for sc, z in per], axis=0).tolist()
        need = [row["sets"][s][0] for s in whole] + [v for s in halves for v in row["sets"][s]]
        row["meets"] = bool(need) and all(np.isfinite(v) and v >= a.target for v in need)  # NaN (too few slices) fails
        rows.append(row)
        print(f"{'+'.join(str(k) for k in sub):>8}  " + "  ".join(
            f"{n} {v[0]:.4f} ({v[1]:.3f} / {v[2]:.3f})" for n, v in row["sets"].items()) + ("  meets" if row["meets"] else ""))
    for size in sorted({len(r["members"]) for r in rows}):
        rs = [r for r in rows if len(r["members"]) == size]
        print(f"{size}-model: {sum(r['meets'] for r in rs)} of {len(rs)} meet the target")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
