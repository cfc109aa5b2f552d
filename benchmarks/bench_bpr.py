"""Quality and speed of the body part regressors (slice and ape).

Trains each model on unlabelled-style phantoms (seeds disjoint from the held-out labelled test
phantoms), then measures:

* slice: Spearman(score, z) per held-out volume; the spread of the score at organ landmarks across
  subjects (liver centre of mass, each kidney's centre, top of the liver dome; from the labels) as a
  percentage of the calibrated range and in mm;
* ape: Pearson(embedding distance, physical distance) of body voxels within each volume (1 by
  construction for the anchor head's whole-volume map), the same with every voxel placed by one
  random patch alone (at the training size and at half of it), the RMS error of where patches put
  their centres, and the spread across subjects of the coordinates at organ centres (liver, spleen,
  kidneys) beside the spread of those centres measured from the volume centre;
* both: mean disagreement (mm) for the same voxels in two overlapping patches;
* the same on the real CTs in ../shared/data/real_ct (pseudo labels give the landmarks), for models
  trained on phantoms only and on phantoms + the real CTs (in-sample for the real CTs: there are three);
* time to predict a 512x512x300 CT (0.8 x 0.8 x 1.0 mm) end to end on this CPU.

    .venv/bin/python benchmarks/bench_bpr.py --out /tmp/bench_bpr

Models are cached in --out and reused unless --retrain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from voxdiff.bpr import BPRTrainConfig, load_bpr, predict_volume, train_bpr
from voxdiff.bpr.quality import ape_patch_quality, ape_quality, patch_disagreement, slice_quality
from voxdiff.core.cli import underscore_options
from voxdiff.core.config import from_dict
from voxdiff.core.runtime import tune_allocator

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_ct"
REAL_CASES = [  # (image, pseudo label or None)
    ("ts_a_abdomen_ct.nii.gz", "ts_a_abdomen_btcv13_pseudo.nii.gz"),
    ("ts_b_upper_abdomen_dicom", "ts_b_upper_abdomen_btcv13_pseudo.nii.gz"),
    ("ts_c_thorax_cta_ct.nii.gz", None),
]


def phantom_cases(seeds, unlabelled, pp):
    from voxdiff.data.phantom.generator import generate_phantom
    from voxdiff.data.preprocess import preprocess

    return [preprocess(generate_phantom(s, unlabelled=unlabelled), pp) for s in seeds]


def real_cases(pp):
    from voxdiff.data.io import load_image, load_label
    from voxdiff.data.preprocess import preprocess, spacing_of
    from voxdiff.data.types import Case, CaseMeta

    out = []
    if not REAL.is_dir():
        return out
    for img, lab in REAL_CASES:
        p = REAL / img
        if not p.exists():
            continue
        hu, aff = load_image(p)
        label = None
        if lab and (REAL / lab).exists():
            label = load_label(REAL / lab)[0].astype(np.uint8)
        cid = img.split(".")[0]
        meta = CaseMeta(cid, str(p), None, hu.shape, aff, aff, spacing_of(aff))
        out.append(preprocess(Case(hu, label, meta), pp))
    return out


def summarise(model, cases, tag):
    if not cases:
        return {"cases": 0}
    if model.kind == "slice":
        q = slice_quality(model, cases)
        res = {"spearman_per_case": {r["case_id"]: round(r["spearman"], 4) for r in q["per_case"]},
               "spearman_mean": round(q["spearman_mean"], 4), "spearman_min": round(q["spearman_min"], 4),
               "landmark_std_pct_of_range": {k: round(v["std_pct_range"], 2) for k, v in q["landmarks"].items()},
               "landmark_std_mm": {k: round(v["std_mm"], 1) for k, v in q["landmarks"].items()},
               # the same in mm of true z: over the cases' median slope of S (mm) against z
               "landmark_std_dz_mm": {k: round(v["std_dz_mm"], 1) for k, v in q["landmarks"].items()},
               "slope_mm_per_mm_per_case": {r["case_id"]: round(r["slope_mm_per_mm"], 3) for r in q["per_case"]},
               "mm_per_unit": round(q["mm_per_unit"], 1)}
    else:
        q = ape_quality(model, cases)
        res = {"pearson_per_case": {r["case_id"]: round(r["pearson"], 4) for r in q["per_case"]},
               "pearson_mean": round(q["pearson_mean"], 4), "pearson_min": round(q["pearson_min"], 4),
               "distance_ratio_per_case": {r["case_id"]: round(r["mm_ratio"], 3) for r in q["per_case"]},
               "landmark_std_mm_RAS": {k: [round(x, 1) for x in v["std_mm"]] for k, v in q["landmarks"].items()},
               "landmark_std_mm_RAS_from_volume_centre": {k: [round(x, 1) for x in v["std_mm_from_volume_centre"]]
                                                          for k, v in q["landmarks"].items()}}
        full = model.patch_size[0]
        for size in (full, full // 2):
            pq = ape_patch_quality(model, cases, size=size)
            res[f"patch{size}"] = {"pearson_per_case": {r["case_id"]: round(r["pearson"], 4) for r in pq["per_case"]},
                                   "pearson_mean": round(pq["pearson_mean"], 4), "pearson_min": round(pq["pearson_min"], 4),
                                   "position_rms_mm_RAS": [round(x, 1) for x in pq["position_rms_mm"]]}
    d = patch_disagreement(model, cases, n_pairs=3)
    res["overlap_disagreement_mm"] = round(d["mean_mm"], 2)
    print(f"[{tag}] {json.dumps(res)}", flush=True)
    return res


def get_model(kind, out, cases, cfg_kw, retrain):
    path = Path(out)
    if (path / "model.json").is_file() and not retrain:
        return load_bpr(path), json.loads((path / "metrics.json").read_text())["train_seconds"]
    cfg = from_dict(BPRTrainConfig, {"kind": kind, **cfg_kw})  # flat overrides
    t = time.time()
    train_bpr(cfg, path, cases=cases, force=True, progress=False)
    return load_bpr(path), time.time() - t


def time_big_predict(model_dirs, work: Path, template):
    """Upsample a phantom to 512x512x300 at 0.8x0.8x1.0 mm and time predict_volume for each model."""
    import nibabel as nib
    from scipy import ndimage

    p = work / "ct_512x512x300.nii.gz"
    if not p.exists():
        img = template.image
        zoom = [512 / img.shape[0], 512 / img.shape[1], 300 / img.shape[2]]
        big = ndimage.zoom(img, zoom, order=1).astype(np.int16)
        aff = np.diag([0.8, 0.8, 1.0, 1.0])
        nib.save(nib.Nifti1Image(big, aff), str(p))
    res = {}
    for name, d in model_dirs.items():
        s = predict_volume(d, p, work / f"map_{name}.nii.gz", force=True)
        res[name] = {k: round(v, 1) for k, v in s["seconds"].items()}
        print(f"[predict 512x512x300 {name}] {res[name]} threads={torch.get_num_threads()}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/bench_bpr")
    ap.add_argument("--n_train", type=int, default=16)
    ap.add_argument("--n_test", type=int, default=6)
    ap.add_argument("--slice_steps", type=int, default=800)
    ap.add_argument("--ape_steps", type=int, default=1200)
    ap.add_argument("--ape_batch", type=int, default=4)
    ap.add_argument("--kinds", default="slice,ape", help="comma-separated model kinds to run")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--no_real_train", action="store_true", help="skip the models trained with the real CTs added")
    ap.add_argument("--no_timing", action="store_true")
    args = ap.parse_args(underscore_options(sys.argv[1:]))  # --a-b: hidden alias of --a_b
    tune_allocator()  # the CLI's allocator setting (VOXDIFF_NO_MALLOPT=1: glibc default)
    warnings.simplefilter("ignore", UserWarning)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)

    cfg_kw = {"slice": {"steps": args.slice_steps}, "ape": {"steps": args.ape_steps, "batch_size": args.ape_batch}}
    pp = BPRTrainConfig().preprocess  # the grid BPR training works at
    t = time.time()
    train = phantom_cases(range(1000, 1000 + args.n_train), True, pp)
    test = phantom_cases(range(5000, 5000 + args.n_test), False, pp)
    real = real_cases(pp)
    print(f"data: {len(train)} training phantoms, {len(test)} held-out phantoms, {len(real)} real CTs "
          f"({time.time() - t:.0f} s)", flush=True)
    report = {"args": vars(args), "threads": torch.get_num_threads()}
    dirs = {}
    for kind in args.kinds.split(","):
        m, secs = get_model(kind, work / f"{kind}_phantoms", train, cfg_kw[kind], args.retrain)
        dirs[kind] = work / f"{kind}_phantoms"
        print(f"[{kind} phantoms-only] trained in {secs:.0f} s", flush=True)
        report[f"{kind}_phantoms_only"] = {"train_seconds": round(secs),
                                           "held_out_phantoms": summarise(m, test, f"{kind} / held-out phantoms"),
                                           "real_ct": summarise(m, real, f"{kind} / real CTs (phantom-trained)")}
        if real and not args.no_real_train:
            m2, secs2 = get_model(kind, work / f"{kind}_with_real", train + real, cfg_kw[kind], args.retrain)
            print(f"[{kind} phantoms+real] trained in {secs2:.0f} s", flush=True)
            report[f"{kind}_with_real"] = {"train_seconds": round(secs2),
                                           "held_out_phantoms": summarise(m2, test, f"{kind}+real / held-out phantoms"),
                                           "real_ct_in_sample": summarise(m2, real, f"{kind}+real / real CTs (in training set)")}
    if not args.no_timing:
        report["predict_512x512x300_seconds"] = time_big_predict(dirs, work, test[0])
    (work / "report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {work / 'report.json'}")


if __name__ == "__main__":
    main()
