"""Probing quality on the phantom benchmark: linear and non-linear probes on frozen diffusion+BPR
features against the same backbone architecture trained from scratch on the same labelled cases.

Seeds are fixed and the three sets are disjoint (the phantom generator draws unlabelled, labelled
training and held-out test cases from separate seed streams): the BPR and the diffusion backbone
see only the unlabelled images; heads and the from-scratch network see the labelled training
cases (one held out for checkpoint selection); Dice is measured on the held-out test cases on their
original grid. Every stage is cached in --out, so a rerun only redoes what is missing.

    .venv/bin/python benchmarks/bench_probe.py --out /tmp/bench_probe          # CPU defaults, ~15-20 min on 2 busy CPU cores
    .venv/bin/python benchmarks/bench_probe.py --out /tmp/bp --quick            # smoke run, ~3 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from voxdiff.core.cli import underscore_options
from voxdiff.core.config import from_dict
from voxdiff.core.runtime import tune_allocator


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/bench_probe")
    ap.add_argument("--quick", action="store_true", help="tiny settings (smoke test of the pipeline)")
    ap.add_argument("--bpr", default=None, help="use this trained APE BPR folder instead of training one")
    ap.add_argument("--n_train", type=int, default=5, help="labelled training cases (one is held out for validation)")
    ap.add_argument("--n_test", type=int, default=3)
    ap.add_argument("--n_unlabelled", type=int, default=6)
    ap.add_argument("--shape", type=int, nargs=3, default=(64, 64, 48), help="phantom array shape")
    ap.add_argument("--spacing", type=float, default=4.0, help="isotropic preprocessing spacing (mm)")
    ap.add_argument("--bpr_steps", type=int, default=100)
    ap.add_argument("--pretrain_steps", type=int, default=300)
    ap.add_argument("--probe_steps", type=int, default=200)
    ap.add_argument("--probe_lr", type=float, default=3e-3, help="learning rate of the frozen-feature heads")
    ap.add_argument("--scratch_steps", type=int, default=None, help="default: same as --probe_steps")
    ap.add_argument("--base_channels", type=int, default=8)
    ap.add_argument("--patch", type=int, nargs=3, default=(32, 32, 32), help="probe / scratch training patch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=2026)
    a = ap.parse_args(underscore_options(sys.argv[1:]))  # --a-b: hidden alias of --a_b
    tune_allocator()  # the CLI's allocator setting (VOXDIFF_NO_MALLOPT=1: glibc default)
    if a.quick:
        a.n_train, a.n_test, a.n_unlabelled, a.shape = 3, 1, 3, (48, 48, 32)
        a.bpr_steps, a.pretrain_steps, a.probe_steps, a.patch = 20, 30, 30, (32, 32, 16)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    from voxdiff.data.phantom import PhantomConfig, make_phantom_dataset
    from voxdiff.data.preprocess import PreprocessConfig

    pre = PreprocessConfig(spacing=(a.spacing,) * 3)
    ph = out / "phantoms"
    t = time.time()
    if not (ph / "dataset.json").is_file():
        log(f"phantoms: {a.n_train} labelled, {a.n_test} test, {a.n_unlabelled} unlabelled, shape {tuple(a.shape)}")
        make_phantom_dataset(ph, n_train=a.n_train, n_test=a.n_test, n_unlabelled=a.n_unlabelled, seed=a.seed,
                             cfg=PhantomConfig(shape=tuple(a.shape)), preview=False, progress=False, force=True)
    times["phantoms_s"] = round(time.time() - t, 1)

    from voxdiff.data.cache import load_preprocessed

    unl_dir = ph / "unlabelled"
    bpr_dir = Path(a.bpr) if a.bpr else out / "bpr"
    t = time.time()
    if not (bpr_dir / "model.json").is_file():
        from voxdiff.bpr.train import BPRTrainConfig, train_bpr

        log(f"BPR (ape): {a.bpr_steps} steps on the unlabelled images")
        unl = load_preprocessed(unl_dir, PreprocessConfig(spacing=(3.0, 3.0, 3.0)), kind="folder")
        bcfg = from_dict(BPRTrainConfig, {"kind": "ape", "data": str(unl_dir), "steps": a.bpr_steps,
                                          "channels": (8, 16, 32, 32), "ape_patch": 32, "ape_points": 128,
                                          "batch_size": 4, "seed": a.seed})  # flat: read into the sections
        train_bpr(bcfg, bpr_dir, cases=unl, force=True, progress=False)
    times["bpr_s"] = round(time.time() - t, 1)

    from voxdiff.core.sections import OptimConfig, RuntimeConfig
    from voxdiff.pretrain.train import BackboneConfig, PretrainConfig, PretrainData, TaskOptions, pretrain

    pt = out / "pretrained"
    t = time.time()
    if not (pt / "backbone" / "model.json").is_file():
        log(f"diffusion + BPR pretraining: {a.pretrain_steps} steps, base {a.base_channels}")
        pretrain(PretrainConfig(method="diffusion", seed=a.seed, preprocess=pre,
                                data=PretrainData(paths=[str(unl_dir)], kind="folder", patch_size=(32, 32, 32), batch_size=2),
                                optim=OptimConfig(steps=a.pretrain_steps, lr=1e-3, warmup_steps=min(50, a.pretrain_steps // 5)),
                                backbone=BackboneConfig(base_channels=a.base_channels, num_levels=4),
                                task=TaskOptions(condition="ape", bpr_path=str(bpr_dir)),
                                runtime=RuntimeConfig(bf16=True, device="cpu")),
                 pt, progress=False, force=True)
    times["pretrain_s"] = round(time.time() - t, 1)

    from voxdiff.probe.train import ProbeConfig, train_probe

    runs = out / "probe"
    scratch_steps = a.scratch_steps or a.probe_steps
    flat = dict(heads=("linear", "nonlinear"), patch_size=tuple(a.patch), batch_size=2, steps=a.probe_steps, lr=a.probe_lr,
                val_every=max(1, a.probe_steps // 3), roi=(64, 64, 64), overlap=0.25, bf16=False, device="cpu",
                seed=a.seed, val_from_train=1)
    cfg = from_dict(ProbeConfig, flat)  # flat names, read into the sections
    t = time.time()
    if not (runs / "nonlinear" / "segmenter.json").is_file():
        log(f"probes (linear + nonlinear, one pass): {a.probe_steps} steps")
        train_probe(cfg, pt, ph, runs, fold=None, force=True, progress=False)
    times["probe_s"] = round(time.time() - t, 1)
    t = time.time()
    scratch = out / "scratch"
    if not (scratch / "scratch" / "segmenter.json").is_file():
        log(f"from scratch (same backbone architecture, same cases): {scratch_steps} steps")
        train_probe(from_dict(ProbeConfig, {**flat, "heads": ("scratch",), "steps": scratch_steps,
                                            "val_every": max(1, scratch_steps // 3)}), pt, ph, scratch, fold=None,
                    force=True, progress=False)
    times["scratch_s"] = round(time.time() - t, 1)

    from voxdiff.evaluate.report import EvaluateConfig, evaluate_models

    results = {}
    t = time.time()
    for name, model in (("linear", runs / "linear"), ("nonlinear", runs / "nonlinear"), ("scratch", scratch / "scratch")):
        ev = out / f"eval_{name}"
        if not (ev / "summary.json").is_file():
            log(f"evaluate {name} on the {a.n_test} held-out test cases")
            evaluate_models(model, ph, ev, EvaluateConfig(cases="test", device="cpu", figures=1), force=True,
                            progress=False)
        results[name] = json.loads((ev / "summary.json").read_text())["pooled"]
    times["evaluate_s"] = round(time.time() - t, 1)

    probe_doc = json.loads((runs / "probe.json").read_text())
    s = results["scratch"]["mean"] or float("nan")
    nl = results["nonlinear"]["mean"] or float("nan")
    summary = {
        "settings": vars(a) | {"shape": list(a.shape)},
        "parameters": {"backbone": probe_doc["backbone_parameters"],
                       **{k: v["parameters"] for k, v in probe_doc["heads"].items()}},
        "dice": {k: {"mean": v["mean"], "groups": v["groups"], "per_organ": v["per_organ"]} for k, v in results.items()},
        "nonlinear_over_scratch": nl / s if s == s and s > 0 else None,
        "seconds": times,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "bench_probe.json").write_text(json.dumps(summary, indent=2))
    log("results (mean Dice over the 13 organs on the held-out test cases)")
    print(f"{'model':<12}{'mean':>8}{'Big':>8}{'Medium':>8}{'Small':>8}{'params':>12}")
    for k, v in results.items():
        g = v["groups"]
        f = lambda x: "n/a" if x is None else f"{x:.3f}"
        params = summary["parameters"].get(k, summary["parameters"]["backbone"])
        print(f"{k:<12}{f(v['mean']):>8}{f(g['Big']):>8}{f(g['Medium']):>8}{f(g['Small']):>8}{params:>12,}")
    r = summary["nonlinear_over_scratch"]
    print(f"non-linear probe / from scratch: {'n/a' if r is None else f'{r:.2f}'} (target >= 0.90)")
    print(json.dumps(times))
    real_ct(out / "probe" / "nonlinear", out)


def real_ct(model: Path, out: Path) -> dict | None:
    """Segment the real CT samples (../shared/data/real_ct) with the phantom-trained model and score
    against their pseudo-labels (agreement with another model, not a benchmark); the rows per CT
    (also written to ``out/real_ct.json``), None when the samples are absent."""
    from voxdiff.data.io import load_label
    from voxdiff.data.labels import ORGAN_NAMES
    from voxdiff.evaluate.metrics import dice_per_class, mean_over_organs
    from voxdiff.segment import load_segmenter, segment_ct

    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_ct"
    if not root.is_dir():
        log(f"real CT samples not found at {root}: skipped")
        return None
    seg = load_segmenter(model)
    rows = {}
    for ct, lab in (("ts_a_abdomen_ct.nii.gz", "ts_a_abdomen_btcv13_pseudo.nii.gz"),
                    ("ts_b_upper_abdomen_dicom", "ts_b_upper_abdomen_btcv13_pseudo.nii.gz"),
                    ("ts_c_thorax_cta_ct.nii.gz", None)):
        t = time.time()
        o = out / "real_ct" / (ct.split(".")[0] + "_seg.nii.gz")
        res = segment_ct(seg, root / ct, o, preview=o.with_suffix("").with_suffix(".png"), force=True, progress=False)
        row = {"seconds": round(time.time() - t, 1), "volumes_ml": res["volumes_ml"]}
        if lab:
            import nibabel as nib

            pred = np.asarray(nib.load(str(o)).dataobj)
            gt, _ = load_label(root / lab)
            d = dice_per_class(pred, gt, 14)
            row["dice"] = {ORGAN_NAMES[k]: (None if v != v else round(v, 3)) for k, v in d.items()}
            row["mean"] = mean_over_organs(d)
        rows[ct] = row
        log(f"real CT {ct}: mean Dice vs pseudo-labels {row.get('mean', float('nan')):.3f} ({row['seconds']} s)")
    (out / "real_ct.json").write_text(json.dumps(rows, indent=2))
    for ct, row in rows.items():
        if "dice" in row:
            print(ct, json.dumps(row["dice"]))
    return rows


if __name__ == "__main__":
    main()
