"""Does the frozen probe's feature window change what LP-FT fine-tuning starts from, and ends at?

``compare`` at the ``cpu-small`` budget fine-tunes a backbone starting from the non-linear head of
its frozen probe (LP-FT, ``finetune_init: probe``). That head is fitted on whole-volume features,
extracted with windows of ``feature_roi`` (one 160^3 window per phantom since the thirtieth session)
or of ``roi`` (64^3, before); fine-tuning itself trains on patches and scores with 64^3 windows. For
each seed folder of demo-sized experiments and each window, this fits the frozen heads as the
experiment does, fine-tunes from the non-linear head for the budget's fine-tuning steps, and prints
one JSON line per (seed, window, stage) with the mean Dice (%) on the validation and the test cases:

    python benchmarks/lpft_window.py runs/demoreg --method diffusion-ape --seeds 0,1,2 --threads 2 \\
        --out runs/demoreg/lpft_window.json

``--windows one`` runs one window only; ``--feature_side both`` probes and fine-tunes on that pyramid; ``--finetune '{"backbone_lr": 1e-4}'`` changes the
fine-tuning optimiser (the LP-FT head and the backbone train at ``backbone_lr``); ``--score_rois
'[[160, 160, 160]]'`` also scores each fine-tuned network with other sliding windows.

Nothing is pretrained again; the experiment folders are not written to.
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
from voxdiff.probe.voxel import fit_heads_voxels

WINDOWS = {"64^3 windows (roi)": (64, 64, 64), "one 160^3 window (feature_roi)": (160, 160, 160)}


def run_seed(folder: Path, method: str, emit, windows: dict[str, tuple[int, int, int]], finetune: dict[str, Any],
             score_rois: list[tuple[int, int, int]], feature_side: str | None = None) -> None:
    exp = Experiment.reopen(folder)
    train, val, test = exp.folds()[0]
    model = exp.out / f"pretrain-{method}" / "model"
    vox = int(exp.budget.get("probe_voxels", 8192))
    for name, roi in windows.items():
        pcfg = exp.probe_cfg(feature_roi=roi, **({"feature_side": feature_side} if feature_side else {}))
        ext = with_feature_side(load_pretrained(model, device=pcfg.runtime.device), pcfg.feature_side)
        heads = fit_heads_voxels(ext, train, val, ("nonlinear",), pcfg, progress=False, voxels_per_step=vox)
        for split, cases in (("validation", val), ("test", test)):
            emit(name, "frozen non-linear", split, mean_of_cases(exp.score(ext, heads, cases, pcfg, volume=True)["nonlinear"]))
        tcfg = replace(exp.tuned_cfg("finetune"), feature_side=pcfg.feature_side)
        if finetune:
            tcfg = replace(tcfg, optim=replace(tcfg.optim, **finetune))
        tuned, head = fit_network(ext, train, val, "finetune", tcfg, progress=False, init_head=heads["nonlinear"])
        for split, cases in (("validation", val), ("test", test)):
            emit(name, "fine-tuned (LP-FT)", split, mean_of_cases(exp.score(tuned, {"ft": head}, cases, tcfg)["ft"]))
        for roi in score_rois:  # the same fine-tuned network scored with other sliding windows
            scfg = replace(tcfg, inference=replace(tcfg.inference, roi=roi))
            for split, cases in (("validation", val), ("test", test)):
                emit(name, f"fine-tuned (LP-FT), scored with {'x'.join(map(str, roi))} windows", split,
                     mean_of_cases(exp.score(tuned, {"ft": head}, cases, scfg)["ft"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", help="a folder of seed-S experiment folders (voxdiff experiment compare --out)")
    ap.add_argument("--method", default="diffusion-ape")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (default: every seed-S folder)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="JSON file for the results (default: RUNS/lpft_window.json)")
    ap.add_argument("--windows", default="", help="comma-separated prefixes of the windows to run (default: both)")
    ap.add_argument("--score_rois", default="[]", help="JSON list of other sliding windows to score the fine-tuned "
                                                         "network with, e.g. '[[160, 160, 160]]'")
    ap.add_argument("--feature_side", default="", choices=("", "decoder", "encoder", "both"),
                    help="the pyramid the probes and fine-tuning use (default: the experiment's saved budget's)")
    ap.add_argument("--finetune", default="{}", help="JSON overrides of the fine-tuning optimiser settings, "
                                                      "e.g. '{\"backbone_lr\": 1e-4}' (recorded in every line)")
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    folders = seed_folders(runs, args.seeds)
    out = Path(args.out) if args.out else runs / "lpft_window.json"
    results: list[dict[str, Any]] = []
    over = json.loads(args.finetune)
    windows = {k: v for k, v in WINDOWS.items() if not args.windows or any(k.startswith(w) for w in args.windows.split(","))}
    for folder in folders:
        seed = int(folder.name.split("-")[1])
        t0 = time.time()

        def emit(window: str, stage: str, split: str, value: float) -> None:
            r = {"seed": seed, "method": args.method, "window": window, "finetune": over,
                 "feature_side": args.feature_side or "budget", "stage": stage, "split": split,
                 "dice": round(100 * value, 2), "seconds": round(time.time() - t0)}
            print(json.dumps(r), flush=True)
            results.append(r)
            out.write_text(json.dumps(results, indent=1))

        run_seed(folder, args.method, emit, windows, over, [tuple(int(v) for v in r) for r in json.loads(args.score_rois)],
                 args.feature_side or None)
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in results:
        groups.setdefault((r["stage"], r["split"], r["window"]), []).append(r["dice"])
    print("\n| stage | split | window | mean ± std over seeds | seeds |\n|---|---|---|---|---|")
    for (stage, split, window), v in groups.items():
        a = np.asarray(v)
        sd = f" ± {a.std(ddof=1):.1f}" if a.size > 1 else ""
        print(f"| {stage} | {split} | {window} | {a.mean():.1f}{sd} | {a.size} |")


if __name__ == "__main__":
    main()
