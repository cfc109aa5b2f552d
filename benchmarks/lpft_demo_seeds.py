"""How much of the demo's fine-tuned rows is the backbone's? LP-FT as the demo runs it, with the backbone
trained (``--tune all``: the demo's rows) or frozen (``--tune head``: the same whole-volume steps from the
same probe head, the head alone trained), on demo folders of several seeds.

Each folder is a finished ``voxdiff demo --out DIR --seed S`` run (or a ``compare`` run at the
``cpu-small`` budget): its pretrained backbones and frozen probes are reused, and one fine-tuning step
per method is written into it (``lpft-TUNE-METHOD-f0``; a finished step is not redone). With ``--tune all``
the numbers are the demo's own fine-tuned rows (the same settings, steps and seed). One JSON line per
(folder, method): validation and test Dice (%) of the frozen non-linear probe and of the LP-FT row,
its validation trajectory and seconds::

    python benchmarks/lpft_demo_seeds.py runs/demo runs/demo_s1 runs/demo_s2 --tune head \\
        --methods diffusion-ape,contrastive --out runs/lpft_demo_seeds.jsonl
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
from voxdiff.experiments.experiments import lpft_start, probe_step  # noqa: E402


def with_tune(exp: Experiment, tune: str) -> Experiment:
    """``exp`` (in memory only) whose LP-FT rows train ``tune`` (all: backbone and head; head: the head).
    A folder made before its budget had an ``lpft`` section gets the budget's current LP-FT settings."""
    if "lpft" not in exp.budget:
        now = BUDGETS.get(exp.cfg.budget, {})
        if "lpft" in now:
            print(f"{exp.out}: made before LP-FT on whole volumes; using {exp.cfg.budget}'s current settings",
                  file=sys.stderr)
            for k in ("lpft", "finetune_init", "finetune_steps"):
                exp.budget[k] = copy.deepcopy(now[k])
    if "lpft" not in exp.budget or exp.budget.get("finetune_init") != "probe":
        raise SystemExit(f"{exp.out}: its budget fine-tunes no LP-FT rows (no lpft section, or finetune_init "
                         "is not 'probe')")
    exp.budget["lpft"] = {**exp.budget["lpft"], "tune": tune}
    exp.cfg = dataclasses.replace(exp.cfg, progress=False)
    return exp


def run_method(exp: Experiment, method: str, tune: str) -> dict[str, Any]:
    pname = probe_step(method, 0)
    if not exp.runner.done(pname):
        raise SystemExit(f"{exp.out}: no finished frozen probe {pname} (run the demo there first)")
    model = exp.pretrained(method)
    t0 = time.time()
    ft = exp.tuned(f"lpft-{tune}-{method}-f0", 0, "finetune", model, init_probe=lpft_start(exp, pname, model, 0))
    pr = exp.runner.result(pname)
    pval = [h["val_dice"]["nonlinear"] for h in pr.get("history", []) if "nonlinear" in h.get("val_dice", {})]
    return {"method": method, "tune": tune,
            "probe_val": round(100 * max(pval), 2) if pval else None,
            "probe_test": round(100 * mean_of_cases(pr["scores"]["nonlinear"]), 2),
            "lpft_val": round(100 * ft["best_val_dice"], 2), "best_step": ft["best_step"],
            "lpft_test": round(100 * mean_of_cases(ft["scores"]["finetune"]), 2),
            "trajectory": [(h["step"], round(100 * h["val_dice"]["finetune"], 1)) for h in ft["history"]],
            "seconds": round(time.time() - t0)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="finished demo (or cpu-small compare) folders")
    ap.add_argument("--tune", default="head", choices=("all", "head"))
    ap.add_argument("--methods", default="diffusion-ape,contrastive")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="JSON-lines file the rows are appended to")
    a = ap.parse_args(argv)
    for f in a.folders:
        if not (f / "config.yaml").is_file():
            raise SystemExit(f"{f}: not an experiment folder (no config.yaml)")
    import torch

    tune_allocator()
    torch.set_num_threads(a.threads)
    for f in a.folders:
        exp = with_tune(Experiment.reopen(f), a.tune)
        for m in a.methods.split(","):
            row = {"folder": str(f), "seed": exp.cfg.seed, **run_method(exp, m, a.tune)}
            emit_row(row, a.out)


if __name__ == "__main__":
    main()
