"""Frozen probe heads scored on held-out phantoms that no run has seen, with each upsampling.

One validation phantom per run cannot tell a 2-4 point difference between two head settings. This
scores a finished probe step's segmenter bundle (``FOLDER/STEP/segmenter-HEAD``) on ``--n`` labelled
phantoms generated with ``--seed`` and the generator settings of the run's own budget (the phantom
section minus its counts; every budget's phantoms share them), with whole-volume features as the
voxel probe is scored, once per ``--upsample`` mode (training does not depend on it). With
``--probe_steps N`` it first trains a frozen probe in the folder from the run's pretrained backbone
with the budget's probe settings and N steps (step ``heldout-probe-METHOD-N``, validated every
``val_every`` steps as the budget says; linear and non-linear heads, as the experiments fit them) and
scores that. One JSON line: mean Dice (%) per mode and each case's gain of the last mode over the first.

    python benchmarks/heldout_heads.py DEMO --step probe-diffusion-ape-f0
    python benchmarks/heldout_heads.py DEMO --method contrastive --probe_steps 600 --upsample trilinear

The phantoms are written once to ``--phantoms`` (default ``FOLDER/../heldout-SEED-N``) and reused; they
must not be any run's training, validation or test phantoms (a seed that no experiment uses as its
``phantom_seed``: the default 4242 was chosen so). docs/RESULTS.md, "Trilinear upsampling for the
non-linear and mix heads, decided on held-out phantoms" and "Longer frozen heads in the demo", used it.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxdiff.core.outputs import emit_row  # noqa: E402
from voxdiff.core.runtime import tune_allocator  # noqa: E402
from voxdiff.experiments.base import Experiment, mean_of_cases  # noqa: E402

MODES = ("nearest", "trilinear")


def heldout_cases(exp: Experiment, where: Path, seed: int, n: int) -> list:
    """``n`` labelled phantoms of seed ``seed`` with ``exp``'s generator settings, preprocessed as ``exp`` does."""
    from voxdiff.core.config import from_dict
    from voxdiff.data.adapters import open_dataset
    from voxdiff.data.cache import load_preprocessed
    from voxdiff.data.phantom import PhantomConfig, make_phantom_dataset, with_variation

    if seed == exp.cfg.phantom_seed and not exp.cfg.data:
        raise SystemExit(f"--seed {seed} is the run's own phantom seed: its phantoms are not held out")
    data = where / "data"
    if not (data / "dataset.json").is_file():
        ph = {k: v for k, v in exp.budget["phantoms"].items() if k not in ("n_train", "n_test", "n_unlabelled")}
        pcfg = with_variation(from_dict(PhantomConfig, ph), exp.cfg.variation)
        make_phantom_dataset(data, seed=seed, cfg=pcfg, n_train=0, n_test=n, n_unlabelled=0, workers=2, progress=False)
    ds = open_dataset(data, split="test")
    if len(ds.refs) != n:
        raise SystemExit(f"{data}: holds {len(ds.refs)} phantoms, not --n {n} (another --phantoms folder?)")
    return load_preprocessed(ds, exp.preprocess, cache_dir=where / "cache", progress=False)


def train_probe(exp: Experiment, method: str, steps: int) -> str:
    """A frozen probe of ``method``'s pretrained backbone trained ``steps`` steps; its step name."""
    model = exp.out / f"pretrain-{method}" / "model"
    if not model.is_dir():
        raise SystemExit(f"{exp.out}: no pretrained {method} backbone ({model})")
    exp.cfg.probe_steps = int(steps)  # as `--probe_steps` of an experiment command (Experiment.probe_cfg)
    name = f"heldout-probe-{method}-{steps}"
    exp.probe(name, model, 0, ("linear", "nonlinear"))
    return name


def score(exp: Experiment, step: str, head: str, cases: list, modes: tuple[str, ...]) -> dict[str, Any]:
    from voxdiff.probe.bundle import load_segmenter

    bundle = exp.out / step / f"segmenter-{head}"
    if not bundle.is_dir():
        raise SystemExit(f"{exp.out}: no {head} segmenter bundle in step {step}")
    seg = load_segmenter(bundle, device="cpu")
    cfg = exp.probe_cfg(feature_roi=list(seg.info["roi"]), overlap=seg.info["overlap"])
    heads = {}
    for m in modes:
        heads[m] = copy.deepcopy(seg.head)
        heads[m].upsample = m
    t0 = time.time()
    sc = exp.score(seg.extractor, heads, cases, cfg, volume=True)
    row: dict[str, Any] = {"step": step, "head": head, "saved_upsample": seg.head.upsample}
    row.update({m: round(100 * mean_of_cases(sc[m]), 2) for m in modes})
    if len(modes) > 1:
        a, b = modes[0], modes[-1]
        row[f"per_case_{b}_minus_{a}"] = {c: round(100 * (mean_of_cases({c: sc[b][c]}) - mean_of_cases({c: sc[a][c]})), 2)
                                          for c in sc[a]}
    row["score_s"] = round(time.time() - t0, 1)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="an experiment folder (a demo's, or a seed folder of compare --seeds)")
    ap.add_argument("--step", default=None, help="the finished probe step (default probe-METHOD-f0)")
    ap.add_argument("--method", default="diffusion-ape")
    ap.add_argument("--head", default="nonlinear", choices=("linear", "nonlinear", "mix"))
    ap.add_argument("--probe_steps", type=int, default=None, help="train a probe with this many steps first")
    ap.add_argument("--upsample", default=",".join(MODES), help="comma-separated modes to score (default both)")
    ap.add_argument("--n", type=int, default=8, help="held-out phantoms (default 8)")
    ap.add_argument("--seed", type=int, default=4242, help="their generator seed (default 4242)")
    ap.add_argument("--phantoms", type=Path, default=None, help="where they are kept (default FOLDER/../heldout-SEED-N)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="JSON-lines file the row is appended to")
    a = ap.parse_args(argv)
    modes = tuple(m.strip() for m in a.upsample.split(",") if m.strip())
    if not modes or set(modes) - set(MODES):
        raise SystemExit(f"--upsample: modes from {', '.join(MODES)}, not {a.upsample!r}")
    if a.n < 1:
        raise SystemExit(f"--n must be at least 1, not {a.n}")
    if not (a.folder / "config.yaml").is_file():
        raise SystemExit(f"{a.folder}: not an experiment folder (no config.yaml)")
    import torch

    tune_allocator()
    torch.set_num_threads(a.threads)
    exp = Experiment.reopen(a.folder)
    exp.cfg.progress = False
    where = a.phantoms or a.folder.resolve().parent / f"heldout-{a.seed}-{a.n}"
    cases = heldout_cases(exp, where, a.seed, a.n)
    t0 = time.time()
    step = train_probe(exp, a.method, a.probe_steps) if a.probe_steps else (a.step or f"probe-{a.method}-f0")
    train_s = round(time.time() - t0, 1) if a.probe_steps else None
    row = {"folder": str(a.folder), "phantoms": str(where), "seed": a.seed, "n": a.n,
           **score(exp, step, a.head, cases, modes), **({"probe_s": train_s} if train_s is not None else {})}
    emit_row(row, a.out)


if __name__ == "__main__":
    main()
