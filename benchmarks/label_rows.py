"""Label-efficiency rows inside the seed folders of a ``voxdiff experiment compare --seeds`` run.

``voxdiff experiment label-efficiency`` runs every label count into a folder of its own. The rows of
docs/RESULTS.md ("Label efficiency ...", "One labelled phantom") were instead added to the folders of
the matched-compute benchmark (``runs/bench/seed-S``), so that they reuse its BPR and pretrained
backbones: this script runs, for one label count and some seeds, the steps that
``label-efficiency`` would run (the same step names ``labels/...-n<N>-f0``, the same settings: the
seed folder's saved config and budget), without touching the folder's own config, results or report.
Several processes may share the work: each step is claimed through a marker file in
``BENCH/claims`` holding the claimant's PID (a claim whose process died is taken over, so an
interrupted run is simply started again), finished steps are skipped, and the step lock of
``StepRunner`` keeps any step from running twice.

    python benchmarks/label_rows.py runs/bench 1 --seeds 0,1,2 [--threads 1]

Then ``python benchmarks/label_curve.py runs/bench --out docs/images --tests 1,2,4`` tabulates and draws them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxdiff.core.config import from_dict  # noqa: E402
from voxdiff.core.runtime import tune_allocator  # noqa: E402
from voxdiff.experiments.base import Experiment, ExperimentConfig  # noqa: E402


def steps(n: int, methods: list[str]) -> list[tuple[str, str, str | None]]:
    """(step name, kind, method) of one label count, in label-efficiency's order."""
    out: list[tuple[str, str, str | None]] = [(f"labels/scratch-n{n}-f0", "scratch", None)]
    for m in methods:
        out += [(f"labels/{m}-n{n}-f0", "probe", m), (f"labels/finetune-{m}-n{n}-f0", "finetune", m)]
    return out


def claim(marker: Path) -> bool:
    """Take the step whose claim file is ``marker`` (holding the claimant's PID) for this process:
    False while another process that is still alive holds it; a claim left by a process that died
    (an interrupted run) is taken over."""
    while True:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(marker.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                return False
            marker.unlink(missing_ok=True)  # stale: try again
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path, help="folder of a compare --seeds run (with seed-S subfolders)")
    ap.add_argument("labels", type=int, help="labelled training phantoms per row")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--methods", default="diffusion-ape,contrastive", help="pretrained methods (probe + fine-tune rows)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = ap.parse_args(argv)

    import torch

    tune_allocator()
    torch.set_num_threads(a.threads)
    claims = a.bench / "claims"
    claims.mkdir(exist_ok=True)
    for s in (int(x) for x in a.seeds.split(",")):
        folder = a.bench / f"seed-{s}"
        if not (folder / "config.yaml").is_file():
            raise SystemExit(f"{folder}: not a seed folder of a compare run (no config.yaml)")
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        cfg = from_dict(ExperimentConfig, saved["config"], strict=False)
        # the saved budget settings: a preset changed since would otherwise refuse the folder
        exp = Experiment(cfg, folder, log=print, budget=saved["budget_settings"])
        for name, kind, m in steps(a.labels, a.methods.split(",")):
            if (folder / name / "result.json").is_file():
                continue  # finished earlier
            if not claim(claims / f"{folder.name}-{name.replace('/', '_')}"):
                continue  # another live process runs it
            if kind == "scratch":
                exp.scratch(name, 0, n_train=a.labels, early_stopping=True)
            elif kind == "probe":
                assert m is not None
                exp.probe(name, exp.pretrained(m), 0, tuple(cfg.heads), n_train=a.labels)
            else:
                assert m is not None
                exp.tuned(name, 0, "finetune", exp.pretrained(m), n_train=a.labels, early_stopping=True)


if __name__ == "__main__":
    main()
