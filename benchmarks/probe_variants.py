"""Non-linear probe variants on the pretrained backbone of a finished experiment folder.

Refits the frozen non-linear head (voxel sampling, as `voxdiff experiment compare` does) with
changed probe settings and prints the mean Dice of each on the validation case(s) (``val_dice``:
what a choice may be made on) and on the test cases (``mean_dice``), to tell whether the probe or
the features limit a result:

    .venv/bin/python benchmarks/probe_variants.py runs/cmp_long --method diffusion-ape \
        --variants '[{"steps": 300}, {"steps": 1000}, {"steps": 1000, "hidden": 64}, {"timesteps": [1]}]'

A variant is a dict of ProbeConfig overrides, plus "timesteps" (feature timesteps), "voxels"
(voxels per step), "pretrain": PretrainConfig overrides, e.g. {"patch_size": [48, 48, 32]}, for
a backbone pretrained again on the experiment's unlabelled cases (or on the "data" folders the
overrides name, preprocessed as the experiment's) and BPR with those changes, and
"bpr": BPRTrainConfig overrides, e.g. {"steps": 1200}, for a BPR trained again before that
pretraining. Both are resumable steps of the experiment kept in EXPERIMENT/variants/ and reused by
later variants with the same overrides. Runs on one CPU thread unless --threads.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from voxdiff.core.runtime import tune_allocator
from voxdiff.experiments.base import Experiment, mean_of_cases, method_parts
from voxdiff.features.extract import with_timesteps
from voxdiff.pretrain.load import load_pretrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", help="a finished `voxdiff experiment compare` folder")
    ap.add_argument("--method", default="diffusion-ape")
    ap.add_argument("--variants", default='[{}]', help="JSON list of override dicts")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    tune_allocator()  # the CLI's allocator setting (VOXDIFF_NO_MALLOPT=1: glibc default)
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(args.threads)
    exp = Experiment.reopen(args.experiment)
    for var in json.loads(args.variants):
        var = dict(var)
        t = time.time()
        pre = dict(var.pop("pretrain", None) or {})
        bpr_over = var.pop("bpr", None)
        if bpr_over:
            pre["bpr_path"] = str(exp.bpr(method_parts(args.method)[1], **bpr_over))
        model_dir = exp.pretrained(args.method, **pre)  # the experiment's own backbone without overrides
        ext = load_pretrained(model_dir)
        ts = var.pop("timesteps", None)
        vox = int(var.pop("voxels", exp.budget.get("probe_voxels", 8192)))
        if ts:
            with_timesteps(ext, tuple(ts))
        sc = exp.refit_frozen(ext, exp.probe_cfg(**var), voxels=vox)
        print(json.dumps({"overrides": var, "bpr": bpr_over, "pretrain": pre, "timesteps": ts, "voxels": vox,
                          "val_dice": round(100 * mean_of_cases(sc["val"]["nonlinear"]), 1),
                          "mean_dice": round(100 * mean_of_cases(sc["test"]["nonlinear"]), 1),
                          "seconds": round(time.time() - t)}), flush=True)


if __name__ == "__main__":
    main()
