"""``voxdiff experiment compare|timesteps|label-efficiency`` and ``voxdiff demo``."""

from __future__ import annotations

from voxdiff.core.cli import CommandGroup, add_config
from voxdiff.core.config import from_namespace


def register(root: CommandGroup) -> None:
    g = root.group("experiment", help="The paper's experiments (resumable; results JSON, markdown report, PNG figures)")
    for name, fn, help_ in (
        ("compare", "compare", "method x {linear, non-linear} probing, mean ± std Dice per organ and size group"),
        ("timesteps", "timesteps", "Dice against the feature timestep t and the diffusion steps T in training"),
        ("label-efficiency", "label_efficiency", "Dice against the number of labelled cases: frozen probes, fine-tuned, from scratch"),
    ):
        p = g.command(name, _runner(fn), help=help_)
        p.add_argument("--out", type=str, required=True, help="experiment folder (an existing one is resumed)")
        p.add_argument("--force", action="store_true", help="use an existing non-empty folder that is not an experiment")
        if name == "compare":
            p.add_argument("--report_only", action="store_true",
                           help="with --seeds: run nothing, report the rows finished for every seed")
        add_config(p, "voxdiff.experiments.base:ExperimentConfig")  # by name: imported when the options are built

    p = root.command("demo", _run_demo, help="the whole pipeline on synthetic phantoms at the cpu-small budget")
    p.add_argument("--out", type=str, default="demo_out", help="output folder")
    p.add_argument("--force", action="store_true", help="replace an existing demo folder instead of resuming it")
    p.add_argument("--budget", type=str, default="cpu-small", help="budget preset (tiny, cpu-small, paper)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms, the split and every training")
    p.add_argument("--jobs", type=int, default=0,
                   help="processes running independent steps side by side, each with cores / jobs threads "
                        "(0 = auto: 2 on a CPU of 2 or more cores, 1 with a GPU)")


def _runner(fn_name: str):
    def run(ns) -> None:
        from . import experiments
        from .base import ExperimentConfig

        cfg = from_namespace(ExperimentConfig, ns)
        extra = {"report_only": True} if getattr(ns, "report_only", False) else {}
        res = getattr(experiments, fn_name)(cfg, ns.out, force=ns.force, **extra)
        print(f"\nreport: {ns.out}/report.md  ({res['seconds']:.0f} s)")

    return run


def _run_demo(ns) -> None:
    from .demo import run_demo

    run_demo(ns.out, budget=ns.budget, seed=ns.seed, force=ns.force, jobs=ns.jobs)
