"""Frozen heads refined on whole training volumes (``optim.refine_steps``), from finished probe steps.

For each seed folder (``BENCH/seed-S``) this loads the segmenter bundle a finished frozen probe step
saved (``--step``; ``{method}`` in it is replaced by ``--method``), refines its head on the fold's
labelled training phantoms exactly as ``fit_heads_voxels`` does after its voxel steps
(:func:`voxdiff.probe.voxel.refine_heads_volume`: the bundle's extractor and feature window, the
head as saved being the first candidate of the validation), and scores the refined head on the
fold's validation and test phantoms with whole-volume features. Nothing is written into the folders.
One JSON line per seed: validation and test Dice (%) before and after, the step chosen, seconds::

    python benchmarks/refine_heads.py runs/bench56 --seeds 5,6,7 --method diffusion-ape \\
        --step s50-probe-{method}-n1 --n_train 1 --refine '{"refine_steps": 30, "refine_lr": 1e-4}'

``--upsample trilinear`` scores the saved head with its coarse levels upsampled trilinearly (voxel-probe
heads are saved with ``nearest``), beside the head as saved; with ``--refine '{"refine_steps": 0}'``
nothing is refined. ``BENCH`` may also be a single experiment folder (``--seeds -``), e.g. a demo's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxdiff.core.outputs import emit_row  # noqa: E402
from voxdiff.core.runtime import tune_allocator  # noqa: E402
from voxdiff.experiments.base import Experiment, mean_of_cases  # noqa: E402

HEAD = "nonlinear"


def refine_cfg(exp: Experiment, doc: dict, refine: dict):
    """The experiment's probe settings with the bundle's feature window and the refinement's settings."""
    from voxdiff.probe.train import check_probe_config

    cfg = exp.probe_cfg(feature_roi=list(doc["roi"]), overlap=doc["overlap"], **refine)
    check_probe_config(cfg)
    return cfg


def run_seed(exp: Experiment, step: str, n_train: int | None, refine: dict, upsample: str | None = None
             ) -> dict[str, Any]:
    from voxdiff.probe.bundle import load_segmenter
    from voxdiff.probe.voxel import refine_heads_volume

    bundle = exp.out / step / f"segmenter-{HEAD}"
    if not (exp.runner.done(step) and bundle.is_dir()):
        raise SystemExit(f"{exp.out}: no finished probe step {step} with a {HEAD} segmenter bundle")
    seg = load_segmenter(bundle, device="cpu")
    cfg = refine_cfg(exp, seg.info, refine)
    given = seg.head
    if upsample is not None:  # the saved head, its coarse levels upsampled another way (before refining)
        seg.head = copy.deepcopy(given)
        seg.head.upsample = upsample
    train, val, test = exp.folds()[0]
    if n_train:
        train = train[:n_train]
    t0 = time.time()
    hist: list = []
    refined = refine_heads_volume(seg.extractor, {HEAD: seg.head}, train, val, cfg, history=hist)[HEAD]
    secs = time.time() - t0
    heads = {"after": refined, "before": seg.head}  # every head scored on one feature pass per case
    if upsample is not None:
        heads["as_saved"] = given
    val_s = {k: round(100 * mean_of_cases(v), 2)
             for k, v in exp.score(seg.extractor, heads, val, cfg, volume=True).items()} if val else {}
    test_s = {k: round(100 * mean_of_cases(v), 2) for k, v in exp.score(seg.extractor, heads, test, cfg, volume=True).items()}
    raw = [(h["step"], 100 * h["val_dice"][HEAD]) for h in hist if HEAD in h.get("val_dice", {})]
    best = max(raw, key=lambda sv: sv[1]) if raw else (None, None)  # the first of equal scores, as kept
    vals = [(k, round(v, 2)) for k, v in raw]
    extra = {} if upsample is None else {"upsample": upsample, "val_as_saved": val_s.get("as_saved"),
                                         "test_as_saved": test_s["as_saved"]}
    return {"step": step, "n_train": n_train, **refine, **extra, "val_before": vals[0][1] if vals else None,
            "test_before": test_s["before"], "val_after": val_s.get("after"),
            "test_after": test_s["after"], "chosen_step": best[0], "trajectory": vals,
            "refine_s": round(secs)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path, help="folder of a compare --seeds run (with seed-S subfolders)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--method", default="diffusion-ape")
    ap.add_argument("--step", default="probe-{method}-f0", help="the finished probe step ({method} replaced)")
    ap.add_argument("--n_train", type=int, default=None, help="the probe's labelled phantoms (default: the fold's)")
    ap.add_argument("--refine", default='{"refine_steps": 30}', help="JSON: refine_steps, refine_lr, refine_val_every")
    ap.add_argument("--upsample", default=None, choices=("nearest", "trilinear"),
                    help="score (and refine) the saved head with this upsampling; the head as saved is scored too")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="JSON-lines file the rows are appended to")
    a = ap.parse_args(argv)
    refine = json.loads(a.refine)
    if not isinstance(refine, dict) or set(refine) - {"refine_steps", "refine_lr", "refine_val_every"}:
        raise SystemExit(f"--refine: a JSON object of refine_steps, refine_lr, refine_val_every, not {a.refine}")
    import torch

    tune_allocator()
    torch.set_num_threads(a.threads)
    for s in ([None] if a.seeds == "-" else [int(x) for x in a.seeds.split(",")]):
        folder = a.bench if s is None else a.bench / f"seed-{s}"
        if not (folder / "config.yaml").is_file():
            raise SystemExit(f"{folder}: not a seed folder of a compare run (no config.yaml)")
        row = {"folder": str(folder), "method": a.method, **run_seed(Experiment.reopen(folder), a.step.format(method=a.method),
                                                         a.n_train, refine, a.upsample)}
        emit_row(row, a.out)


if __name__ == "__main__":
    main()
