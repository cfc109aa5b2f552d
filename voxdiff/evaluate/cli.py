"""``voxdiff evaluate MODEL DATA -o OUT``: Dice per case and organ, CV aggregates, report, figures."""

from __future__ import annotations

from voxdiff.core.cli import CommandGroup, add_config
from voxdiff.core.config import from_namespace


def register(root: CommandGroup) -> None:
    p = root.command(
        "evaluate", run_evaluate,
        help="Evaluate segmenters on labelled data (one model, or fold_*/ models for cross-validation)",
    )
    p.add_argument("model", type=str, help="segmenter folder, probe run folder, or CV root with fold_*/ runs")
    p.add_argument("data", type=str, help="labelled data set folder (BTCV, nnU-Net, FLARE, AMOS, phantoms)")
    p.add_argument("-o", "--out", type=str, required=True, help="output folder (summary.json, summary.md, figures/)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    add_config(p, "voxdiff.evaluate.report:EvaluateConfig")  # by name: imported when the options are built


def run_evaluate(ns) -> None:
    from .report import EvaluateConfig, evaluate_models

    cfg = from_namespace(EvaluateConfig, ns)
    s = evaluate_models(ns.model, ns.data, ns.out, cfg, force=ns.force)
    cv = s.get("cross_validation")
    if cv:
        m = cv["mean"]
        print(f"mean Dice over {cv['n_folds']} folds: {m['mean']:.3f} +- {m['std']:.3f}")
    p = s["pooled"]
    mean = p["mean"]
    print(f"mean Dice ({p['n_cases']} cases): {'n/a' if mean is None else f'{mean:.3f}'}; "
          + ", ".join(f"{g} {'n/a' if v is None else f'{v:.3f}'}" for g, v in p["groups"].items()))
    print(f"wrote {ns.out}/summary.json, summary.md, figures/")
