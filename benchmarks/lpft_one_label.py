"""LP-FT on whole volumes at one labelled phantom: the frozen probe at its best one-label recipe, then
the demo's fine-tuning from its head, on the seed folders of a ``voxdiff experiment compare --seeds`` run.

For each seed folder (``BENCH/seed-S``) and one pretrained backbone (``--method``; ``--models`` names
another run's folder holding ``seed-S/pretrain-METHOD`` on the same data):

1. the frozen non-linear probe fitted on the fold's first labelled phantom with the best one-label
   recipe of docs/RESULTS.md: both sides of the network, fixed normalisation statistics, one 160^3
   feature window per volume, 64 field-of-view crops of the phantom, 2,400 head steps (a diffusion
   backbone through its two clean passes);
2. LP-FT from that head with ``cpu-small``'s ``lpft`` settings, as the demo's fine-tuned rows: whole
   volumes, backbone and head at 1e-5, 30 steps validated every 10, the best state scored on whole-volume
   features; the head keeps its BatchNorm statistics.

Both are experiment steps written into the seed folder (``onelabel-probe-METHOD``,
``onelabel-lpft-METHOD``; a finished step is not redone). One JSON line per seed: validation and test
Dice (%) of both, the LP-FT validation trajectory and the seconds each took::

    python benchmarks/lpft_one_label.py runs/bench56 --seeds 5,6,7 --method diffusion-ape
    python benchmarks/lpft_one_label.py runs/bench56 --seeds 5,6,7 --method contrastive --models runs/bench56-cenc

``--tune head`` runs step 2 with the backbone frozen (the head alone refined on whole volumes; step
``onelabel-lpft-head-METHOD``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxdiff.core.outputs import emit_row  # noqa: E402
from voxdiff.core.runtime import tune_allocator  # noqa: E402
from voxdiff.experiments.base import Experiment, mean_of_cases  # noqa: E402
from voxdiff.experiments.budgets import BUDGETS  # noqa: E402

#: the frozen probe's one-label recipe (docs/RESULTS.md, "Field-of-view crops at 1, 2 and all labelled
#: phantoms" and "Fixed normalisation statistics")
PROBE = {"feature_side": "both", "norm_stats": "fixed", "feature_roi": (160, 160, 160), "steps": 2400, "fov_crops": 64}


def with_recipe(exp: Experiment, method: str, tune: str = "all") -> Experiment:
    """``exp`` (in memory only) with the frozen probe's one-label recipe and ``cpu-small``'s LP-FT
    (``tune head``: the same steps with the backbone frozen, the head alone refined)."""
    probe = dict(PROBE)
    if method.startswith("diffusion"):
        probe["feature_input"] = "clean"
    exp.budget["probe"].update(probe)
    exp.budget["lpft"] = copy.deepcopy(BUDGETS["cpu-small"]["lpft"])
    if tune != "all":
        exp.budget["lpft"]["tune"] = tune
    exp.budget["finetune_steps"] = BUDGETS["cpu-small"]["finetune_steps"]
    exp.cfg = dataclasses.replace(exp.cfg, progress=False)
    return exp


def run_seed(exp: Experiment, model: Path, method: str, tune: str = "all") -> dict[str, Any]:
    t0 = time.time()
    pname = f"onelabel-probe-{method}"
    fname = f"onelabel-lpft-{method}" if tune == "all" else f"onelabel-lpft-{tune}-{method}"
    pr = exp.probe(pname, model, 0, ("nonlinear",), n_train=1)
    t1 = time.time()
    ft = exp.tuned(fname, 0, "finetune", model, n_train=1, init_probe=pname)
    pval = max(h["val_dice"]["nonlinear"] for h in pr["history"] if "val_dice" in h)
    return {"method": method, "tune": tune, "probe_val": round(100 * pval, 2),
            "probe_test": round(100 * mean_of_cases(pr["scores"]["nonlinear"]), 2),
            "lpft_val": round(100 * ft["best_val_dice"], 2), "lpft_best_step": ft["best_step"],
            "lpft_test": round(100 * mean_of_cases(ft["scores"]["finetune"]), 2),
            "trajectory": [(h["step"], round(100 * h["val_dice"]["finetune"], 1)) for h in ft["history"]],
            "probe_s": round(t1 - t0), "lpft_s": round(time.time() - t1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path, help="folder of a compare --seeds run (with seed-S subfolders)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--method", default="diffusion-ape", help="the pretrained backbone (default diffusion-ape)")
    ap.add_argument("--models", type=Path, default=None,
                    help="folder of a run on the same data holding seed-S/pretrain-METHOD (default: BENCH)")
    ap.add_argument("--tune", default="all", choices=("all", "head"),
                    help="LP-FT trains backbone and head (all, the demo's), or the head alone on the frozen "
                         "backbone (head: step onelabel-lpft-head-METHOD)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="JSON-lines file the rows are appended to")
    a = ap.parse_args(argv)
    import torch

    tune_allocator()
    torch.set_num_threads(a.threads)
    for s in (int(x) for x in a.seeds.split(",")):
        folder = a.bench / f"seed-{s}"
        model = (a.models or a.bench) / f"seed-{s}" / f"pretrain-{a.method}" / "model"
        if not (folder / "config.yaml").is_file():
            raise SystemExit(f"{folder}: not a seed folder of a compare run (no config.yaml)")
        if not model.is_dir():
            raise SystemExit(f"{model}: no pretrained model there")
        row = {"seed": s, **run_seed(with_recipe(Experiment.reopen(folder), a.method, a.tune), model, a.method, a.tune)}
        emit_row(row, a.out)


if __name__ == "__main__":
    main()
