"""How much of the demo's fine-tuned rows is the backbone's? LP-FT as the demo runs it, with the backbone
trained (``--tune all``: the demo's rows), its decoder alone trained (``--tune decoder``: the encoder frozen)
or frozen (``--tune head``: the same whole-volume steps from the same probe head, the head alone trained), on
demo folders of several seeds.

Each folder is a finished ``voxdiff demo --out DIR --seed S`` run (or a ``compare`` run at the
``cpu-small`` budget): its pretrained backbones and frozen probes are reused, and one fine-tuning step
per method is written into it (``lpft-TUNE-METHOD-f0``; a finished step is not redone). With ``--tune all``
the numbers are the demo's own fine-tuned rows (the same settings, steps and seed). One JSON line per
(folder, method): validation and test Dice (%) of the frozen non-linear probe and of the LP-FT row,
its validation trajectory and seconds::

    python benchmarks/lpft_demo_seeds.py runs/demo runs/demo_s1 runs/demo_s2 --tune head \\
        --methods diffusion-ape,contrastive --out runs/lpft_demo_seeds.jsonl

Options for deciding LP-FT's settings (each non-default one is named in the step, so runs do not mix):
``--probe 'NAME-{method}'`` starts from another finished probe step (e.g. one of
``benchmarks/heldout_heads.py --probe_steps``), ``--backbone_lr``, ``--validate_start on|off`` and
``--patience N`` (stop after N validations in a row without a better one) override the folder's LP-FT
settings, and ``--heldout N`` also scores the selected state on N labelled
phantoms no run has seen (``benchmarks/heldout_heads.py``'s, seed ``--heldout_seed``), with the start's
score there (the probe's head scored the same way) beside it::

    python benchmarks/lpft_demo_seeds.py DEMO_S0 ... DEMO_S4 --tune all --probe 's52-probe-{method}-600' \\
        --backbone_lr 1e-6 --validate_start off --heldout 8
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

from benchmarks.heldout_heads import heldout_cases  # noqa: E402
from benchmarks.heldout_heads import score as score_heads  # noqa: E402
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


def step_name(method: str, tune: str, probe: str | None = None, backbone_lr: float | None = None,
              validate_start: str = "folder", heldout: int = 0, heldout_seed: int = 4242,
              patience: int | None = None) -> str:
    """The fine-tuning step's name: ``lpft-TUNE-METHOD-f0`` plus a part for each non-default option."""
    tag = "".join([f"-from-{probe.format(method=method)}" if probe else "",
                   f"-lr{backbone_lr:g}" if backbone_lr is not None else "",
                   f"-start{validate_start}" if validate_start != "folder" else "",
                   f"-patience{patience}" if patience is not None else "",
                   f"-heldout{heldout_seed}x{heldout}" if heldout else ""])
    return f"lpft-{tune}-{method}{tag}-f0"


def run_method(exp: Experiment, method: str, tune: str, probe: str | None = None, heldout: list | None = None,
               name: str | None = None) -> dict[str, Any]:
    """One LP-FT row (``exp`` already carries the settings) from ``probe`` (a step name with ``{method}``;
    default the folder's own probe step); ``heldout``: cases the selected state and the start are also
    scored on."""
    pname = probe.format(method=method) if probe else probe_step(method, 0)
    if not exp.runner.done(pname):
        raise SystemExit(f"{exp.out}: no finished frozen probe {pname} (run the demo there first)")
    name = name or step_name(method, tune, probe)
    if heldout and exp.runner.done(name) and "also_scores" not in exp.runner.result(name):
        raise SystemExit(f"{exp.out}: step {name} finished without held-out scores (the network is not kept); "
                         "remove that step folder to run it again")
    model = exp.pretrained(method)
    init = pname if probe else lpft_start(exp, pname, model, 0)
    t0 = time.time()
    ft = exp.tuned(name, 0, "finetune", model, init_probe=init, also_score={"heldout": heldout} if heldout else None)
    pr = exp.runner.result(pname)
    pval = [h["val_dice"]["nonlinear"] for h in pr.get("history", []) if "nonlinear" in h.get("val_dice", {})]
    row = {"method": method, "tune": tune, "probe": pname,
           "probe_val": round(100 * max(pval), 2) if pval else None,
           "probe_test": round(100 * mean_of_cases(pr["scores"]["nonlinear"]), 2),
           "lpft_val": round(100 * ft["best_val_dice"], 2), "best_step": ft["best_step"],
           "lpft_test": round(100 * mean_of_cases(ft["scores"]["finetune"]), 2),
           "trajectory": [(h["step"], round(100 * h["val_dice"]["finetune"], 1)) for h in ft["history"]],
           "seconds": round(time.time() - t0)}
    if heldout:
        row["lpft_heldout"] = round(100 * mean_of_cases(ft["also_scores"]["heldout"]["finetune"]), 2)
        row["start_heldout"] = score_heads(exp, pname, "nonlinear", heldout, ("trilinear",))["trilinear"]  # as LP-FT starts it
    return row


def start_on(folders: list[Path], threads: int) -> None:
    """Refuse anything in ``folders`` that is not an experiment folder, then set the allocator and torch's
    thread count for the runs."""
    for f in folders:
        if not (f / "config.yaml").is_file():
            raise SystemExit(f"{f}: not an experiment folder (no config.yaml)")
    import torch

    tune_allocator()
    torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="finished demo (or cpu-small compare) folders")
    ap.add_argument("--tune", default="head", choices=("all", "decoder", "head"))
    ap.add_argument("--methods", default="diffusion-ape,contrastive")
    ap.add_argument("--probe", default=None, help="start from this finished probe step ('{method}' in the name)")
    ap.add_argument("--backbone_lr", type=float, default=None, help="LP-FT's learning rate (backbone and head)")
    ap.add_argument("--validate_start", default="folder", choices=("folder", "on", "off"),
                    help="the start as the first validation candidate (default: the folder's setting)")
    ap.add_argument("--patience", type=int, default=None,
                    help="stop after this many validations in a row without a better one (default: the folder's)")
    ap.add_argument("--heldout", type=int, default=0, help="also score on this many held-out phantoms")
    ap.add_argument("--heldout_seed", type=int, default=4242)
    ap.add_argument("--phantoms", type=Path, default=None,
                    help="where the held-out phantoms are kept (default FOLDER/../heldout-SEED-N)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="JSON-lines file the rows are appended to")
    a = ap.parse_args(argv)
    if a.probe is not None and "{method}" not in a.probe:
        raise SystemExit(f"--probe must name the method as '{{method}}', not {a.probe!r}")
    if a.backbone_lr is not None and not a.backbone_lr > 0:
        raise SystemExit(f"--backbone_lr must be > 0, not {a.backbone_lr}")
    if a.patience is not None and a.patience < 0:
        raise SystemExit(f"--patience must be >= 0, not {a.patience}")
    if a.heldout < 0:
        raise SystemExit(f"--heldout must be >= 0, not {a.heldout}")
    start_on(a.folders, a.threads)
    for f in a.folders:
        exp = with_tune(Experiment.reopen(f), a.tune)
        if a.backbone_lr is not None:
            exp.budget["lpft"]["backbone_lr"] = a.backbone_lr
        if a.validate_start != "folder":
            exp.budget["lpft"]["validate_start"] = a.validate_start == "on"
        if a.patience is not None:
            exp.budget["lpft"]["patience"] = a.patience
        cases = None
        if a.heldout:
            where = a.phantoms or f.resolve().parent / f"heldout-{a.heldout_seed}-{a.heldout}"
            cases = heldout_cases(exp, where, a.heldout_seed, a.heldout)
        for m in a.methods.split(","):
            name = step_name(m, a.tune, a.probe, a.backbone_lr, a.validate_start, a.heldout, a.heldout_seed,
                             a.patience)
            row = {"folder": str(f), "seed": exp.cfg.seed, "lpft": {k: exp.budget["lpft"].get(k) for k in
                                                                    ("backbone_lr", "validate_start", "patience")},
                   **run_method(exp, m, a.tune, a.probe, cases, name)}
            emit_row(row, a.out)


if __name__ == "__main__":
    main()
