"""Diffusion pretraining conditioned on the phantoms' true anatomical S coordinate (an oracle BPR).

How much can a better body part regressor give the frozen features at all? This script pretrains
the diffusion + APE backbone of a finished ``voxdiff experiment compare`` folder on generated
phantoms again, with the S channel of every BPR field replaced by the truth the phantom generator
knows: the slice's world z minus the z of one vertebral landmark of that subject (``--landmark``,
from ``phantoms.json``), in the APE model's units. The R and A channels stay the APE model's. The
same oracle is used for the feature windows of the head's training, validation and test phantoms.
It then refits the non-linear probe as ``benchmarks/probe_variants.py`` does and prints its Dice.

    python benchmarks/oracle_condition.py runs/bench/seed-0 [--landmark L1_bottom] [--threads 2]

``--mode`` picks the condition: ``true_s`` (above), ``no_s`` (the S channel set to 0: the APE's R and
A only), ``no_ra`` (R and A set to 0: the APE's S only), to tell which channels carry the gain of
the APE condition over none, or ``plain_ra`` (no BPR output at all: R and A are each voxel's position
about the centre of its preprocessed, body-cropped volume, S is 0).

Phantoms only (a real CT has no such truth). The oracle backbone is a resumable step kept in
``EXPERIMENT/variants/`` (an extra ``log_every`` override keeps it apart from the experiment's own
backbone; logging does not change training). A volume whose field is asked for and that is not one
of the experiment's phantoms stops the run.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch

import voxdiff.bpr.fields as F
from voxdiff.bpr.quality import slice_z_mm
from voxdiff.core.runtime import tune_allocator
from voxdiff.data.preprocess import HU_WINDOW
from voxdiff.experiments.base import Experiment, mean_of_cases
from voxdiff.pretrain.load import load_pretrained


def _profile(hu) -> np.ndarray:
    a = hu.detach().cpu().numpy() if torch.is_tensor(hu) else np.asarray(hu)
    return np.clip(a.astype(np.float32), *HU_WINDOW).mean(axis=(0, 1))


class Oracle:
    """Finds a volume among the experiment's preprocessed phantoms and gives the true S of its slices.

    A volume matches a phantom when its first ``X, Y, Z`` voxels (the phantom's shape; feature
    extraction pads volumes at their far end to a multiple of the largest stride) have the same mean
    HU per slice within 1 HU. Padded slices continue the phantom's z grid."""

    def __init__(self, cases: list, meta: dict, landmark: str):
        self.table = []
        for c in cases:
            info = meta.get(c.meta.case_id)
            if info is None or landmark not in info.get("landmarks_z_mm", {}):
                raise SystemExit(f"{c.meta.case_id}: no {landmark} in phantoms.json")
            self.table.append((tuple(c.image.shape), _profile(c.image), np.asarray(c.meta.affine, dtype=np.float64),
                               float(info["landmarks_z_mm"][landmark]), c.meta.case_id))
        self.hits: dict[str, int] = {}

    def s_mm(self, hu) -> np.ndarray:
        shape = tuple(hu.shape)
        best = None
        for sh, p, aff, zref, cid in self.table:
            if all(0 <= q - n < 16 for q, n in zip(shape, sh)):
                d = float(np.abs(_profile(hu[: sh[0], : sh[1], : sh[2]]) - p).max())
                if best is None or d < best[0]:
                    best = (d, aff, zref, cid)
        if best is None or best[0] > 1.0:
            raise SystemExit(f"oracle: a volume of shape {shape} is not one of the experiment's phantoms "
                             f"(closest: {None if best is None else (round(best[0], 2), best[3])})")
        self.hits[best[3]] = self.hits.get(best[3], 0) + 1
        self.last_shape = next(sh for sh, _, _, _, cid in self.table if cid == best[3])
        return slice_z_mm(best[1], shape) - best[2]


MODES = {"true_s": 99, "no_s": 98, "no_ra": 97, "plain_ra": 96}  # mode -> the log_every that keeps its backbone apart


def install(oracle: Oracle, mode: str = "true_s") -> None:
    original = F.volume_field

    def volume_field(model, hu, spacing, *a, **kw):
        f = original(model, hu, spacing, *a, **kw)
        if 2 not in f.axes:
            raise SystemExit("oracle: the field has no channel along z")
        if mode == "true_s":
            s = oracle.s_mm(hu) / float(model.mm_per_unit)
            prof = tuple(s if ax == 2 else p for ax, p in zip(f.axes, f.profiles))
        elif mode == "no_s":
            oracle.s_mm(hu)  # only to check that every volume is one of the phantoms
            prof = tuple(np.zeros_like(p) if ax == 2 else p for ax, p in zip(f.axes, f.profiles))
        elif mode == "no_ra":
            oracle.s_mm(hu)
            prof = tuple(p if ax == 2 else np.zeros_like(p) for ax, p in zip(f.axes, f.profiles))
        else:  # plain_ra: no BPR at all, R and A the position about the phantom volume's centre, S 0
            oracle.s_mm(hu)
            sh = oracle.last_shape
            prof = tuple(np.zeros_like(p) if ax == 2 else
                         (np.arange(len(p)) - (sh[ax] - 1) / 2.0) * float(spacing[ax]) / float(model.mm_per_unit)
                         for ax, p in zip(f.axes, f.profiles))
        return F.CoordinateField(f.shape, f.axes, prof)

    def get(self, hu, affine, spacing, *a, **kw):  # no cache: the cached fields are the model's
        return volume_field(self.model, hu, spacing)

    F.volume_field = volume_field
    F.FieldCache.get = get


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment")
    ap.add_argument("--method", default="diffusion-ape")
    ap.add_argument("--landmark", default="L1_bottom")
    ap.add_argument("--mode", default="true_s", choices=sorted(MODES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the per-case test scores (JSON) here")
    args = ap.parse_args()
    tune_allocator()
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(args.threads)
    exp = Experiment.reopen(args.experiment)
    train, val, test = exp.folds()[0]
    unl = exp.cases("unlabelled")
    meta = json.loads((exp.data_dir() / "phantoms.json").read_text())
    oracle = Oracle(unl + train + val + test, meta, args.landmark)
    install(oracle, args.mode)
    t0 = time.time()
    model_dir = exp.pretrained(args.method, log_every=MODES[args.mode])
    ext = load_pretrained(model_dir)
    sc = exp.refit_frozen(ext)
    sv, st = sc["val"]["nonlinear"], sc["test"]["nonlinear"]
    res = {"experiment": str(exp.out), "method": args.method, "condition": {"true_s": f"oracle S (z - {args.landmark})", "no_s": "APE R, A only",
                                                                   "no_ra": "APE S only",
                                                                   "plain_ra": "volume-centred R, A"}[args.mode],
           "val_dice": round(100 * mean_of_cases(sv), 1), "mean_dice": round(100 * mean_of_cases(st), 1),
           "volumes_looked_up": len(oracle.hits), "seconds": round(time.time() - t0)}
    print(json.dumps(res), flush=True)
    if args.out:
        from voxdiff.core.outputs import atomic_write_json

        atomic_write_json(args.out, {**res, "scores": {"nonlinear": st}})


if __name__ == "__main__":
    main()
