"""Crop consistency of a slice-anchored ape model's S with other slice models as its anchor.

The S coordinate of an ape model with ``anchor: slice`` comes from its embedded slice model and the
anchor map ``g`` (calibrated slice score -> S) fitted on the training volumes; the ape network's own
weights only place R and A. So the S map that ``voxdiff bpr train --kind ape --task.anchor slice
--task.slice_model M`` would give for another slice model M is the given ape model with M embedded
and ``g`` refitted on the same training volumes (:func:`reanchor`), without training the ape network
again. For each slice model this script evaluates that model's crop consistency on each data set
twice from one :func:`voxdiff.bpr.evaluate.case_report`: z-crops with whole slices and the same
z-crops narrowed in-plane (``--inplane_min_frac``), and prints one line per (model, set, fraction) with ``|dz|`` median / p95
(mean over cases, worst case) and the slope of S against z. docs/BPR.md, "The scan's coverage and
the in-plane field of view"::

    python benchmarks/bpr_anchor_swap.py runs/thx/a-one runs/thx/s-one-s1 runs/thx/s-p64 \\
        --train runs/thx/ph-uc/unlabelled --set val=runs/thx/chest6-uc/unlabelled --set test=runs/thx/ph-uc:test \\
        --set ts_a=../shared/data/real_ct/ts_a_abdomen_ct.nii.gz --out swap.json

``-`` as a slice model evaluates the ape model as it is.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any, Sequence

import torch

from voxdiff.bpr.evaluate import BPREvalConfig, case_report, summarise
from voxdiff.bpr.models import BodyPartRegressor, load_bpr
from voxdiff.bpr.predict import model_preprocess_config
from voxdiff.bpr.sampling import Volume
from voxdiff.bpr.train import calibrate_slice_anchor, cases_to_volumes
from voxdiff.core.runtime import tune_allocator
from voxdiff.data.cache import load_preprocessed


def reanchor(ape: BodyPartRegressor, slice_model: BodyPartRegressor, train: Sequence[Volume]) -> BodyPartRegressor:
    """A copy of the slice-anchored ``ape`` with ``slice_model`` embedded and ``g`` refitted on ``train``."""
    if getattr(ape, "anchor", None) != "slice":
        raise ValueError("the ape model is not anchored on a slice model (task.anchor slice)")
    if slice_model.kind != "slice":
        raise ValueError(f"expected a slice model, got a {slice_model.kind} model")
    m = copy.deepcopy(ape)
    m.slice_model = copy.deepcopy(slice_model).to(next(m.parameters()).dtype).eval()
    calibrate_slice_anchor(m, list(train))
    return m.eval()


def consistency_rows(model: BodyPartRegressor, cases: Sequence[Any], inplane_min_frac: float, n_crops: int,
                     seed: int = 0) -> dict[float, dict[str, float]]:
    """``|dz|`` median / p95 (mean over cases), worst p95 and the slope of S, for z-crops alone (key
    1.0) and narrowed in-plane (key ``inplane_min_frac``), from one evaluation (its ``z_only_*`` entries)."""
    cfg = BPREvalConfig(n_crops=n_crops, inplane_min_frac=float(inplane_min_frac), seed=seed)
    o = summarise([case_report(model, c, cfg, cfg.seed + k) for k, c in enumerate(cases)])

    def row(prefix: str) -> dict[str, float]:
        return {"median_abs_dz_mm": o[f"{prefix}median_abs_dz_mm"].get("mean", float("nan")),
                "p95_abs_dz_mm": o[f"{prefix}p95_abs_dz_mm"].get("mean", float("nan")),
                "p95_abs_dz_mm_worst": o[f"{prefix}p95_abs_dz_mm"].get("max", float("nan")),
                "slope_mm_per_mm": o["slope_mm_per_mm"].get("mean", float("nan"))}

    out = {1.0: row("z_only_")}
    if inplane_min_frac < 1.0:
        out[float(inplane_min_frac)] = row("")
    return out


def _dataset(spec: str) -> tuple[str, str, str]:
    """``NAME=PATH[:SPLIT]`` (SPLIT: all, train or test) -> (name, path, split)."""
    name, _, path = spec.partition("=")
    head, _, tail = path.rpartition(":")
    path, split = (head, tail) if head and tail in ("all", "train", "test") else (path, "all")
    if not name or not path:
        raise SystemExit(f"--set takes NAME=PATH[:SPLIT], got {spec!r}")
    return name, path, split


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ape", help="a slice-anchored ape model folder")
    ap.add_argument("slices", nargs="+", help="slice model folders ('-': the ape model's own)")
    ap.add_argument("--train", required=True, help="the unlabelled volumes the ape model was trained on (refits g)")
    ap.add_argument("--set", action="append", required=True, dest="sets", help="NAME=PATH[:SPLIT], repeatable")
    ap.add_argument("--inplane_min_frac", type=float, default=0.7,
                    help="the narrowed rows' in-plane fraction (the z-crops-alone rows come with them; 1: those only)")
    ap.add_argument("--crops", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON of every row")
    a = ap.parse_args(argv)
    tune_allocator()
    torch.set_num_threads(a.threads)
    ape = load_bpr(a.ape, kind="ape")
    pp = model_preprocess_config(ape)
    sets = {name: load_preprocessed(path, pp, split=split) for name, path, split in map(_dataset, a.sets)}
    train = cases_to_volumes(load_preprocessed(a.train, pp), ape.preprocess.get("hu_window"), where=a.train)
    rows = []
    for sp in a.slices:
        m = ape if sp == "-" else reanchor(ape, load_bpr(sp, kind="slice"), train)
        for name, cases in sets.items():
            for frac, r in consistency_rows(m, cases, a.inplane_min_frac, a.crops).items():
                rows.append({"slice_model": sp, "set": name, "inplane_min_frac": frac, **r})
                print(f"{sp} {name} in-plane {frac:g}: |dz| median {r['median_abs_dz_mm']:.1f}, p95 "
                      f"{r['p95_abs_dz_mm']:.1f} mm (worst {r['p95_abs_dz_mm_worst']:.1f}), slope {r['slope_mm_per_mm']:.2f}",
                      flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"ape": a.ape, "train": a.train, "crops": a.crops, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
