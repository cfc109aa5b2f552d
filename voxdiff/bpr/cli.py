"""``voxdiff bpr ...``: train a body part regressor, map a CT with one."""

from __future__ import annotations

import json

from voxdiff.core.cli import CommandGroup, add_config
from voxdiff.core.config import from_namespace

from ..data.ctcheck import ALLOW_HELP


def register(root: CommandGroup) -> None:
    g = root.group("bpr", help="Body part regressors: self-supervised anatomical coordinates (slice | ape)")

    t = g.command("train", run_train, help="Train a body part regressor on unlabelled CT (phantoms or real)")
    t.add_argument("--out", type=str, required=True, help="output model folder (model.safetensors + model.json)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from --out/train_state")
    t.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config(t, "voxdiff.bpr.train:BPRTrainConfig")  # by name: imported when the options are built

    p = g.command("predict", run_predict, help="Write the coordinate map of a CT on its own grid (NIfTI)")
    p.add_argument("model", type=str, help="body part regressor folder (from 'voxdiff bpr train')")
    p.add_argument("ct", type=str, help="CT: NIfTI file or DICOM series folder")
    p.add_argument("-o", "--out", type=str, required=True, help="output map (.nii.gz); ape maps are 4D (X, Y, Z, 3)")
    p.add_argument("--plot", type=str, default=None, help="also write a PNG: score against z and a coronal view")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window / tile overlap")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--allow_non_ct", action="store_true", help=ALLOW_HELP)

    e = g.command("evaluate", run_evaluate,
                  help="Field-of-view consistency, Spearman and landmark spread of a regressor (JSON + PNG)")
    e.add_argument("model", type=str, help="body part regressor folder")
    e.add_argument("data", type=str, help="data set folder (any layout) or one CT (NIfTI file / DICOM folder)")
    e.add_argument("-o", "--out", type=str, required=True, help="report folder (summary.json, consistency.png)")
    e.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config(e, "voxdiff.bpr.evaluate:BPREvalConfig")

    n = g.command("ensemble", run_ensemble,
                  help="Combine slice models trained with different seeds into one (the mean of their calibrated scores)")
    n.add_argument("models", nargs="+", help="slice model folders (same architecture and preprocessing), at least two")
    n.add_argument("-o", "--out", type=str, required=True, help="output model folder (model.safetensors + model.json)")
    n.add_argument("--force", action="store_true", help="replace a non-empty --out folder")


def run_train(ns) -> None:
    from .train import BPRTrainConfig, train_bpr

    cfg = from_namespace(BPRTrainConfig, ns)
    out = train_bpr(cfg, ns.out, resume=bool(ns.resume), force=bool(ns.force), progress=not ns.quiet)
    print(f"body part regressor ({cfg.kind}) written to {out}")


def run_predict(ns) -> None:
    from .predict import predict_volume

    s = predict_volume(ns.model, ns.ct, ns.out, plot=ns.plot, overlap=ns.overlap, force=bool(ns.force), progress=True,
                       allow_non_ct=bool(ns.allow_non_ct))
    print(json.dumps({"out": s["out"], "kind": s["kind"], "shape": s["shape"], "seconds": round(s["seconds"]["total"], 2)}))


def run_ensemble(ns) -> None:
    from .ensemble import BPREnsembleConfig, write_ensemble

    out = write_ensemble(BPREnsembleConfig(models=list(ns.models)), ns.out, force=bool(ns.force))
    print(f"slice ensemble of {len(ns.models)} models written to {out}")


def _z_only(o: dict) -> str:
    """The same z-crops without in-plane narrowing, in mm of true z."""
    m, p = o.get("z_only_median_abs_dz_mm") or {}, o.get("z_only_p95_abs_dz_mm") or {}
    return (f", z-crops alone (whole in-plane field of view) median {m.get('mean', float('nan')):.1f}, "
            f"p95 {p.get('mean', float('nan')):.1f} mm (worst {p.get('max', float('nan')):.1f})")


def run_evaluate(ns) -> None:
    from .evaluate import BPREvalConfig, evaluate_bpr

    cfg = from_namespace(BPREvalConfig, ns)
    s = evaluate_bpr(ns.model, ns.data, ns.out, cfg, force=bool(ns.force), progress=not ns.quiet)
    o = s["overall"]
    print(f"{s['kind']} regressor on {o['n_cases']} case(s): crop consistency |dS| median "
          f"{o['median_abs_ds_mm'].get('mean', float('nan')):.1f} mm (worst case {o['median_abs_ds_mm'].get('max', float('nan')):.1f}), "
          f"p95 {o['p95_abs_ds_mm'].get('mean', float('nan')):.1f} mm (worst {o['p95_abs_ds_mm'].get('max', float('nan')):.1f}); "
          f"in mm of true z (|dS| / slope {o['slope_mm_per_mm'].get('mean', float('nan')):.2f}): "
          f"median {o['median_abs_dz_mm'].get('mean', float('nan')):.1f}, p95 {o['p95_abs_dz_mm'].get('mean', float('nan')):.1f} mm"
          f"{f' ({n} case(s) without: S does not rise with z)' if (n := o['n_cases_without_dz']) else ''}"
          f"{_z_only(o) if cfg.inplane_min_frac < 1.0 else ''}; "
          f"Spearman min {o['spearman'].get('min', float('nan')):.3f} (inferior / superior half min "
          f"{o['spearman_inferior_half'].get('min', float('nan')):.3f} / {o['spearman_superior_half'].get('min', float('nan')):.3f}); "
          f"report in {ns.out}")
