"""End-to-end rows (fine-tuned and from scratch) with other training patches, scored with several windows.

The fine-tuned and from-scratch rows of ``label-efficiency`` train on the budget's probe patches
(``cpu-small`` / ``cpu-bench``: 2 x 48 x 48 x 32) and are validated and scored with sliding windows of
its ``roi`` (64^3). This trains them, for one label count and some seeds of a
``voxdiff experiment compare --seeds`` folder, with the experiment config's ``end_to_end`` settings
set to ``--end_to_end`` (e.g. larger patches and windows; the same for both rows), exactly as
``label-efficiency`` would (early stopping on the validation case, the budget's fine-tuning
settings plus ``--finetune``), then scores each trained network on the validation and the test
cases with every window of ``--rois``. One JSON line per (seed, row) is appended to ``--out``:

    python benchmarks/tuned_windows.py runs/bench56 --seeds 5,6,7 --labels 1 --modes finetune,scratch \\
        --end_to_end '{"patch_size": [80, 80, 48], "batch_size": 1, "roi": [96, 96, 96]}' \\
        --finetune '{"feature_input": "clean"}' --rois '[[64, 64, 64], [96, 96, 96]]' \\
        --threads 2 --out runs/bench56/tuned_windows_p80.jsonl

Whole volumes (``--end_to_end '{"whole_volume": true, "batch_size": 1}'``) are scored on whole-volume
features with ``--rois '["volume"]'``; ``--early_stopping '{"steps": 300, "val_every": 30}'`` changes the
budget's early-stopping settings (a whole-volume step holds about 10x a patch step's voxels).

``--end_to_end '{}'`` gives the budget's own rows (those of ``benchmarks/label_rows.py``), scored with
the other windows too. Nothing in the experiment folders is written; the fine-tuned row starts from
``pretrain-METHOD`` (``--method``, default diffusion-ape) and a random head.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxdiff.core.runtime import tune_allocator  # noqa: E402
from voxdiff.experiments.base import Experiment, mean_of_cases, scores_to_per_case  # noqa: E402


def with_settings(exp: Experiment, end_to_end: dict[str, Any], finetune: dict[str, Any],
                  early_stopping: dict[str, Any] | None = None) -> Experiment:
    """``exp`` (in memory only) with ``end_to_end`` as its config's end-to-end settings and ``finetune``
    (``early_stopping``) merged into its budget's fine-tuning (early-stopping) settings."""
    exp.cfg = dataclasses.replace(exp.cfg, end_to_end=dict(end_to_end))
    exp.budget["finetune"] = {**exp.budget.get("finetune", {}), **finetune}
    exp.budget["early_stopping"] = {**exp.budget.get("early_stopping", {}), **(early_stopping or {})}
    return exp


def case_means(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each case's mean Dice (%) over the organs it has (one head's :meth:`Experiment.score`)."""
    from voxdiff.evaluate.metrics import mean_over_organs

    return {cid: round(100 * mean_over_organs(d), 2) for cid, d in scores_to_per_case(scores).items()}


def run_row(exp: Experiment, mode: str, labels: int, rois: list[tuple[int, int, int] | str], method: str) -> dict[str, Any]:
    from voxdiff.pretrain.load import load_pretrained
    from voxdiff.probe.train import fit_network

    t0 = time.time()
    train, val, test = exp.folds()[0]
    train = train[:labels]
    pcfg = exp.tuned_cfg(mode, early_stopping=True)
    src = exp.pretrained("random") if mode == "scratch" else exp.out / f"pretrain-{method}" / "model"
    ext = load_pretrained(src, device=pcfg.runtime.device)
    net, head = fit_network(ext, train, val, mode, pcfg, progress=False)
    row: dict[str, Any] = {"mode": mode, "method": "from-scratch" if mode == "scratch" else method, "labels": labels,
                           "patch": "volume" if pcfg.sampling.whole_volume else list(pcfg.sampling.patch_size),
                           "batch": pcfg.sampling.batch_size,
                           "val_roi": list(pcfg.inference.roi), "best_step": head.best_step, "steps_run": head.steps_run,
                           "best_val_dice": None if head.best_val_dice is None else round(100 * head.best_val_dice, 2),
                           "train_s": round(time.time() - t0)}
    for roi in rois:
        if roi == "volume":  # whole-volume features, as whole-volume rows train and validate
            sc, key = exp.score(net, {"h": head}, val + test, pcfg, volume=True)["h"], "volume"
        else:
            c = dataclasses.replace(pcfg, inference=dataclasses.replace(pcfg.inference, roi=roi))
            sc, key = exp.score(net, {"h": head}, val + test, c)["h"], str(roi[0])
        for split, cases in (("val", val), ("test", test)):
            row[f"{split}@{key}"] = round(100 * mean_of_cases({k.case_id: sc[k.case_id] for k in cases}), 2)
        row[f"cases@{key}"] = case_means(sc)
    row["seconds"] = round(time.time() - t0)
    return row


def summary(rows: list[dict[str, Any]]) -> str:
    """A markdown table: per row kind and window, the validation and test Dice over seeds."""
    lines = ["| row | window | validation, per seed | mean | test, per seed | mean ± std |", "|---|---|---|---|---|---|"]
    def patch_of(r: dict[str, Any]) -> str:
        return r["patch"] if r["patch"] == "volume" else "x".join(map(str, r["patch"]))

    kinds = dict.fromkeys((r["method"], patch_of(r), r["batch"]) for r in rows)
    for method, patch, batch in kinds:
        rs = sorted((r for r in rows if (r["method"], patch_of(r), r["batch"]) == (method, patch, batch)),
                    key=lambda r: r["seed"])
        rois = [k.split("@")[1] for k in rs[0] if k.startswith("test@")]
        for roi in rois:
            v = np.array([r[f"val@{roi}"] for r in rs])
            t = np.array([r[f"test@{roi}"] for r in rs])
            sd = f" ± {t.std(ddof=1):.1f}" if t.size > 1 else ""
            win = roi if roi == "volume" else f"{roi}^3"
            lines.append(f"| {method}, {batch} x {patch} | {win} | "
                         f"{' / '.join(f'{x:.1f}' for x in v)} | {v.mean():.1f} | "
                         f"{' / '.join(f'{x:.1f}' for x in t)} | {t.mean():.1f}{sd} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path, help="folder of a compare --seeds run (with seed-S subfolders)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--labels", type=int, default=1, help="labelled training phantoms (default 1)")
    ap.add_argument("--modes", default="finetune,scratch", help="rows: finetune and/or scratch")
    ap.add_argument("--method", default="diffusion-ape", help="the pretrained backbone fine-tuned")
    ap.add_argument("--end_to_end", default="{}", help="JSON probe settings of both rows (ExperimentConfig.end_to_end)")
    ap.add_argument("--finetune", default="{}", help="JSON overrides of the budget's fine-tuning settings")
    ap.add_argument("--early_stopping", default="{}",
                    help="JSON overrides of the budget's early-stopping settings (steps, val_every, patience)")
    ap.add_argument("--rois", default="[[64, 64, 64], [96, 96, 96]]",
                    help='JSON list of scoring windows; "volume": whole-volume features')
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True, help="JSON-lines file the rows are appended to")
    a = ap.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    if not modes or set(modes) - {"finetune", "scratch"}:
        ap.error("--modes: finetune and/or scratch")
    import torch

    tune_allocator()
    torch.set_num_threads(a.threads)
    rois = [r if r == "volume" else tuple(int(v) for v in r) for r in json.loads(a.rois)]
    e2e, ft, es = json.loads(a.end_to_end), json.loads(a.finetune), json.loads(a.early_stopping)
    rows = []
    for s in (int(x) for x in a.seeds.split(",")):
        folder = a.bench / f"seed-{s}"
        if not (folder / "config.yaml").is_file():
            raise SystemExit(f"{folder}: not a seed folder of a compare run (no config.yaml)")
        exp = with_settings(Experiment.reopen(folder), e2e, ft, es)
        for mode in modes:
            row = {"seed": s, "end_to_end": e2e, "finetune": ft if mode == "finetune" else {}, "early_stopping": es,
                   **run_row(exp, mode, a.labels, rois, a.method)}
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("cases")}), flush=True)
            rows.append(row)
    print("\n" + summary(rows))


if __name__ == "__main__":
    main()
