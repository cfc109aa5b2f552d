"""End-to-end rows (from scratch, fine-tuned) trained with deformed copies of the labelled phantoms.

The frozen heads gain from ``sampling.deformed_copies`` (``hypotheses.py --tests augment``); a fair
comparison gives the networks trained end to end the same copies. For each seed folder of a
``voxdiff experiment compare --seeds`` run and each copy count, this trains the from-scratch network
(and, with ``--methods``, fine-tunes those pretrained backbones) exactly as the experiment's
``scratch-f0`` / ``finetune-M-f0`` steps do (the folder's saved budget: steps, early stopping on the
validation phantom, learning rates), with the count's copies added to the training phantoms, and
prints one JSON line per (seed, row, copies, split) with the mean Dice (%) of the validation and the
test phantoms:

    python benchmarks/copies_rows.py runs/bench --seeds 0,1,2 --copies 0,4 --threads 2 \\
        --out runs/bench/copies_rows.json

``--labels 1`` trains on the first labelled phantom only (as ``label-efficiency`` does);
``--max_steps N`` raises (or lowers) the step cap of every row, to see whether the budget's cap
stopped a row that was still improving (early stopping keeps the budget's interval and patience);
``--feature_side both`` fine-tunes through that pyramid (default: the saved budget's). Nothing is
pretrained again and the experiment folders are not written to; rows already in ``--out`` are
skipped, so an interrupted run is simply started again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hypotheses import seed_folders  # noqa: E402

from voxdiff.core.runtime import tune_allocator
from voxdiff.experiments.base import Experiment, mean_of_cases
from voxdiff.features.extract import with_feature_side
from voxdiff.pretrain.load import load_pretrained
from voxdiff.probe.train import fit_network


def run_row(exp: Experiment, row: str, copies: int, feature_side: str | None, emit, labels: int | None = None,
            max_steps: int | None = None) -> None:
    """Train one end-to-end row (``scratch`` or a pretrained method's name: fine-tuned) with
    ``copies`` deformed copies of each labelled phantom (the first ``labels`` of them, as
    ``label-efficiency`` takes them; None: all), and emit its validation and test Dice.
    ``max_steps`` replaces the budget's step cap (early stopping keeps its interval and patience)."""
    train, val, test = exp.folds()[0]
    if labels:
        train = train[:labels]
    mode = "scratch" if row == "scratch" else "finetune"
    early = bool(exp.budget.get("tuned_early_stopping", False))
    cfg = exp.tuned_cfg(mode, early_stopping=early)
    cfg = replace(cfg, sampling=replace(cfg.sampling, deformed_copies=copies),
                  **({"feature_side": feature_side} if feature_side else {}))
    if max_steps:
        cfg = replace(cfg, optim=replace(cfg.optim, steps=max_steps))
    src = exp.pretrained("random") if mode == "scratch" else exp.out / f"pretrain-{row}" / "model"
    ext = with_feature_side(load_pretrained(src, device=cfg.runtime.device), cfg.feature_side)
    tuned, head = fit_network(ext, train, val, mode, cfg, progress=False)
    for split, cases in (("validation", val), ("test", test)):
        emit(row, copies, split, mean_of_cases(exp.score(tuned, {mode: head}, cases, cfg)[mode]),
             getattr(head, "best_step", None), getattr(head, "steps_run", None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", help="a folder of seed-S experiment folders (voxdiff experiment compare --seeds)")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (default: every seed-S folder)")
    ap.add_argument("--copies", default="0,4", help="comma-separated numbers of deformed copies per labelled phantom")
    ap.add_argument("--methods", default="", help="comma-separated pretrained methods to fine-tune beside from scratch")
    ap.add_argument("--no_scratch", action="store_true", help="fine-tuned rows only")
    ap.add_argument("--feature_side", default="", choices=("", "decoder", "encoder", "both"))
    ap.add_argument("--labels", type=int, default=0, help="labelled phantoms that train (default 0: all)")
    ap.add_argument("--max_steps", type=int, default=0,
                    help="step cap of every row (default 0: the budget's; early stopping still applies)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="JSON file for the results (default: BENCH/copies_rows.json)")
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    bench = Path(args.bench)
    out = Path(args.out) if args.out else bench / "copies_rows.json"
    results: list[dict[str, Any]] = json.loads(out.read_text()) if out.is_file() else []
    done = {(r["seed"], r["row"], r["copies"]) for r in results
            if r.get("labels", 0) == args.labels and r.get("max_steps", 0) == args.max_steps}
    rows = ([] if args.no_scratch else ["scratch"]) + [m for m in args.methods.split(",") if m]
    counts = [int(c) for c in args.copies.split(",")]
    for folder in seed_folders(bench, args.seeds):
        seed = int(folder.name.split("-")[1])
        exp = Experiment.reopen(folder)
        for row in rows:
            for k in counts:
                if (seed, row, k) in done:
                    continue
                t0 = time.time()

                def emit(r: str, copies: int, split: str, value: float, best_step, steps_run) -> None:
                    rec = {"seed": seed, "row": r, "copies": copies, "labels": args.labels,
                           "max_steps": args.max_steps, "split": split,
                           "dice": round(100 * value, 2),
                           "best_step": best_step, "steps_run": steps_run,
                           "feature_side": args.feature_side or "budget", "seconds": round(time.time() - t0)}
                    print(json.dumps(rec), flush=True)
                    results.append(rec)
                    out.write_text(json.dumps(results, indent=1))

                run_row(exp, row, k, args.feature_side or None, emit, args.labels or None, args.max_steps or None)
    groups: dict[tuple[int, str, int, int, str], list[float]] = {}
    for r in results:
        key = (r.get("labels", 0), r["row"], r["copies"], r.get("max_steps", 0), r["split"])
        groups.setdefault(key, []).append(r["dice"])
    print("\n| labels | row | copies | step cap | split | mean ± std over seeds | seeds |\n|---|---|---|---|---|---|---|")
    for (n, row, k, cap, split), v in sorted(groups.items()):
        a = np.asarray(v)
        sd = f" ± {a.std(ddof=1):.1f}" if a.size > 1 else ""
        print(f"| {n or 'all'} | {row} | {k} | {cap or 'budget'} | {split} | {a.mean():.1f}{sd} | {a.size} |")


if __name__ == "__main__":
    main()
