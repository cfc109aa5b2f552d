"""Non-linear probe variants on the pretrained backbone of a finished experiment folder.

Refits the frozen non-linear head (voxel sampling, as `voxdiff experiment compare` does) with
changed probe settings and prints the mean test Dice of each, to tell whether the probe or the
features limit a result:

    .venv/bin/python benchmarks/probe_variants.py runs/cmp_long --method diffusion-ape \
        --variants '[{"steps": 300}, {"steps": 1000}, {"steps": 1000, "hidden": 64}, {"timesteps": [1]}]'

A variant is a dict of ProbeConfig overrides, plus "timesteps" (feature timesteps), "voxels"
(voxels per step), "pretrain": PretrainConfig overrides, e.g. {"patch_size": [48, 48, 32]}, for
a backbone pretrained again on the experiment's unlabelled cases and BPR with those changes, and
"bpr": BPRTrainConfig overrides, e.g. {"steps": 1200}, for a BPR trained again before that
pretraining (both kept in EXPERIMENT/variants/ and reused by later variants with the same overrides). Runs on one CPU
thread unless --threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from voxdiff.core.config import from_dict
from voxdiff.bpr.train import train_bpr
from voxdiff.experiments.core import Experiment, ExperimentConfig, method_parts
from voxdiff.features.extract import with_timesteps
from voxdiff.pretrain.load import load_pretrained
from voxdiff.pretrain.train import pretrain
from voxdiff.probe.voxel import fit_heads_voxels


def _key(overrides: dict) -> str:
    return hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", help="a finished `voxdiff experiment compare` folder")
    ap.add_argument("--method", default="diffusion-ape")
    ap.add_argument("--variants", default='[{}]', help="JSON list of override dicts")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(args.threads)
    out = Path(args.experiment)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    cfg = from_dict(ExperimentConfig, saved["config"])
    exp = Experiment(cfg, out, log=lambda *a: None, budget=saved["budget_settings"])
    train, val, test = exp.folds()[0]
    for var in json.loads(args.variants):
        var = dict(var)
        t = time.time()
        pre = var.pop("pretrain", None)
        bpr_over = var.pop("bpr", None)
        if bpr_over:
            kind = method_parts(args.method)[1]
            bdir = out / "variants" / f"bpr-{kind}-{_key(bpr_over)}"
            if not (bdir / "done.json").is_file():
                t_bpr = time.time()
                train_bpr(exp.bpr_config(kind, **bpr_over), bdir / "model", cases=exp.cases("unlabelled"),
                          force=True, progress=False)
                (bdir / "done.json").write_text(json.dumps({"bpr": bpr_over, "seconds": round(time.time() - t_bpr)}))
            pre = {**(pre or {}), "bpr_path": str(bdir / "model")}
        model_dir = out / f"pretrain-{args.method}" / "model"
        if pre:
            vdir = out / "variants" / f"pretrain-{args.method}-{_key(pre)}"
            model_dir = vdir / "model"
            if not (vdir / "done.json").is_file():
                pcfg = exp.pretrain_config(args.method, **pre)
                t_pre = time.time()
                pretrain(pcfg, model_dir, progress=False, force=True, cases=exp.cases("unlabelled"))
                (vdir / "done.json").write_text(json.dumps({"pretrain": pre, "seconds": round(time.time() - t_pre)}))
        ext = load_pretrained(model_dir)
        ts = var.pop("timesteps", None)
        vox = int(var.pop("voxels", exp.budget.get("probe_voxels", 8192)))
        if ts:
            with_timesteps(ext, tuple(ts))
        pcfg = exp.probe_cfg(**var)
        fitted = fit_heads_voxels(ext, train, val, ("nonlinear",), pcfg, progress=False, voxels_per_step=vox)
        scores = exp._score(ext, fitted, test, pcfg, volume=True)["nonlinear"]
        mean = float(np.mean([np.nanmean(list(organs.values())) for organs in scores.values()]))
        print(json.dumps({"overrides": var, "bpr": bpr_over, "pretrain": pre, "timesteps": ts, "voxels": vox, "mean_dice": round(100 * mean, 1),
                          "seconds": round(time.time() - t)}), flush=True)


if __name__ == "__main__":
    main()
