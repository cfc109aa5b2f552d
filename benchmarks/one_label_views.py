"""Why frozen heads fail with one labelled phantom: how each row holds up when the field of view of
its own training phantom changes, and what field-of-view crops of that phantom give a frozen head.

On the seed folders of a ``voxdiff experiment compare --seeds`` run (``runs/bench56/seed-S``: its
backbones, cache and split), for each row (a frozen non-linear head on a pretrained backbone, fitted
as the experiment's probe step fits it; or ``scratch``, the network trained end to end with early
stopping as the experiment's label rows train it) trained on the first labelled phantom alone:

* Dice (%) on that same phantom and on copies of it that change the field of view but not the
  anatomy: a HU shift (+30), the field of view moved along z by 4 and 8 slices (rows cut at one end,
  air at the other), the body scaled in-plane by 0.9 and 1.1;
* Dice on the validation phantom and the test phantoms;
* with ``--views K`` (frozen rows only) the head is fitted on the phantom plus K random crops of it
  (each axis keeps a random ``--z_min``..1 (z) or ``--xy_min``..1 (x, y) of its length): each crop
  is its own feature window, so the head sees the same anatomy in other fields of view; ``--scale S``
  also resizes each crop in-plane by a random factor in 1 -/+ S;
* with ``--fixed_norm`` (frozen rows) every GroupNorm of the backbone normalises with fixed
  statistics instead of each window's own (the probe's ``norm_stats: fixed``: averaged over 48
  random training-size crops of the phantoms the head is fitted on, :mod:`voxdiff.features.norm`),
  so that a voxel's features no longer depend on the window's content. Result files end in
  ``-normfixed`` (``-fixednorm`` files came from this script's own earlier version, which took the
  statistics from all the fold's labelled phantoms).

``--labels N`` fits every row on the fold's first N labelled phantoms instead (crops: K per
phantom; the perturbed copies stay those of the first), as in docs/RESULTS.md, "Field-of-view crops
at 1, 2 and all labelled phantoms".

``--tta K`` (frozen rows) also scores the validation and test phantoms with test-time crops: the
softmax of the whole volume averaged, voxel by voxel, with those of K random field-of-view crops of
it (the same ``--z_min`` / ``--xy_min`` draws as the training crops, each its own feature window),
reported beside the plain scores (``val_tta``, ``test_tta``). ``--extra_val`` also scores the fold's
labelled phantoms that the fit did not use (``val_extra``, and ``val_extra_tta``): with one or two
labels, a validation set of five or six phantoms instead of the fold's one.

``--head_steps N`` trains the frozen heads N steps instead of the budget's (validated every
``val_every``, best state kept); ``--probe JSON --tag T`` changes other probe settings of the frozen
rows (e.g. ``{"feature_input": "clean", "feature_side": "both"}``); ``--head mix`` fits the learned
mix over levels x timesteps instead of the non-linear head (file names end in ``-mix``).
``--coord_jitter S,RA`` (conditioned rows with crops) shifts the BPR coordinates the frozen backbone
is given for each training crop by a random offset (within +-S mm along S, +-RA mm along R and A),
so that the head cannot tie an organ to the exact coordinates of the labelled subject.

No experiment step is run or written for these fits (they are run directly, not as the
experiment's steps; the seed folder's pretraining steps are only looked up). Results: one JSON per
run under ``--out`` (resumable: finished entries are skipped) and a table on stdout
(docs/RESULTS.md, "Why frozen heads fail with one labelled phantom").

    python benchmarks/one_label_views.py runs/bench56 --seeds 5,6 --rows contrastive,diffusion-ape,scratch \
        --views 0,4 --threads 2 --out runs/bench56/one-label-views
    python benchmarks/one_label_views.py runs/bench56 --seeds 5,6 --rows contrastive,diffusion-ape \
        --views 0,64 --head_steps 2400 --threads 2 --out runs/bench56/one-label-views
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxdiff.core.runtime import tune_allocator  # noqa: E402


def variant(case, name: str, image: np.ndarray, label: np.ndarray):
    """A copy of preprocessed ``case`` holding ``image`` / ``label`` under the id ``<id>-<name>``."""
    c = copy.copy(case)
    c.image = np.ascontiguousarray(image, dtype=np.float32)
    c.label = np.ascontiguousarray(label, dtype=np.uint8)
    c.meta = dataclasses.replace(case.meta, case_id=f"{case.case_id}-{name}")
    return c


def perturbations(case) -> list:
    """The phantom itself and copies with the same anatomy in another field of view or intensity."""
    a, lab = case.image, case.label
    air = float(a.min())
    out = [variant(case, "same", a, lab), variant(case, "hu+30", a + 30.0, lab)]
    for dz in (4, 8):  # the scan starts dz slices higher: the lowest rows are cut, air above the top
        out.append(variant(case, f"z+{dz}", np.concatenate([a[:, :, dz:], np.full_like(a[:, :, :dz], air)], 2),
                           np.concatenate([lab[:, :, dz:], np.zeros_like(lab[:, :, :dz])], 2)))
    for f in (0.9, 1.1):  # a smaller / larger body in-plane (the grid changes size with it)
        out.append(variant(case, f"xy*{f}", *scaled_in_plane(a, lab, f)))
    return out


def scaled_in_plane(image: np.ndarray, label: np.ndarray, f: float) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (linear) and ``label`` (nearest) resized in-plane by ``f`` on the same voxel grid."""
    from scipy.ndimage import zoom

    return (zoom(image, (f, f, 1.0), order=1, mode="nearest", grid_mode=True),
            zoom(label, (f, f, 1.0), order=0, mode="nearest", grid_mode=True))


def fov_views(case, k: int, rng: np.random.Generator, z_min: float = 0.5, xy_min: float = 0.8,
              scale: float = 0.0) -> list:
    """``k`` random crops of ``case`` (image and label alike), each axis keeping a random fraction of
    its length (``xy_min``..1 in-plane, ``z_min``..1 along z) at a random position; with ``scale`` > 0
    each crop is also resized in-plane by a random factor in 1 -/+ ``scale`` (a smaller / larger body)."""
    from voxdiff.data.augment import crop_box

    views = []
    for i in range(k):
        box = crop_box(case.image.shape, rng, z_min, xy_min)  # (the library's crops: sampling.fov_crops)
        img, lab = case.image[box], case.label[box]
        if scale > 0:
            img, lab = scaled_in_plane(img, lab, float(rng.uniform(1.0 - scale, 1.0 + scale)))
        views.append(variant(case, f"fov{i}", img, lab))
    return views


def _volume_key(x) -> tuple:
    """What identifies a whole unit volume handed to ``condition_map``: its shape and the sum of its
    values (zero padding keeps the sum)."""
    t = torch.as_tensor(x)
    return tuple(int(n) for n in t.shape[-3:]), round(float(t.double().sum()), 2)


def jitter_crop_conditions(ext, crops: list, mm: tuple[float, float], rng: np.random.Generator) -> dict:
    """Shift the BPR coordinates that the frozen backbone is given for each training crop by a random
    offset (uniform in +-``mm[0]`` along S, +-``mm[1]`` along R and A), as if the same anatomy lay
    elsewhere in another subject; every other volume (the phantoms themselves, validation, test) keeps
    its own map. Returns the offsets (in the map's units) by volume key."""
    from voxdiff.probe.predict import unit_image

    if getattr(ext, "bpr", None) is None:
        raise ValueError("--coord_jitter needs a row whose backbone is given BPR coordinates (e.g. diffusion-ape)")
    unit_mm = float(ext.bpr.mm_per_unit)
    offsets = {}
    for c in crops:
        off = np.array([rng.uniform(-mm[1], mm[1]), rng.uniform(-mm[1], mm[1]), rng.uniform(-mm[0], mm[0])]) / unit_mm
        offsets[_volume_key(unit_image(c, ext.preprocess.hu_window))] = torch.tensor(off, dtype=torch.float32)
    base = ext.condition_map
    hits = {"n": 0}

    def shifted(x, size=None):
        m = base(x, size)
        off = offsets.get(_volume_key(x)) if m is not None else None
        if off is None:
            return m
        hits["n"] += 1
        return m + off.to(m.dtype).view(1, -1, 1, 1, 1)

    ext.condition_map = shifted
    ext.jitter_hits = hits
    return offsets


def tta_scores(ext, head, cases, pcfg, k: int, seed: int, z_min: float,
               xy_min: float) -> tuple[dict, dict]:
    """Dice per case and organ of ``head`` on whole-volume features, plain and with test-time crops:
    the softmax of the whole volume averaged, voxel by voxel, with those of ``k`` random crops
    (:func:`crop_box`, each its own feature window; drawn per case from ``seed``). The plain scores
    come from the same whole-volume pass (the experiment's voxel-mode scoring path)."""
    import zlib

    from voxdiff.data.augment import crop_box
    from voxdiff.evaluate.metrics import dice_per_class
    from voxdiff.probe.predict import logits_to_labels, unit_image
    from voxdiff.probe.voxel import predict_logits_volume

    def dice(lg: torch.Tensor, case) -> dict:
        pred = logits_to_labels(lg)
        return {str(c): v for c, v in dice_per_class(pred, case.label, pcfg.n_classes).items()}

    plain, out = {}, {}
    for case in cases:
        rng = np.random.default_rng([seed, zlib.crc32(case.case_id.encode()), 7])
        unit = unit_image(case, ext.preprocess.hu_window)
        whole = predict_logits_volume(ext, {"h": head}, unit, pcfg)["h"]
        plain[case.case_id] = dice(whole, case)
        prob = torch.softmax(whole, 0)
        count = torch.ones(unit.shape)
        for _ in range(k):
            box = crop_box(unit.shape, rng, z_min, xy_min)
            lg = predict_logits_volume(ext, {"h": head}, np.ascontiguousarray(unit[box]), pcfg)["h"]
            prob[(slice(None), *box)] += torch.softmax(lg, 0)
            count[box] += 1
        out[case.case_id] = dice(prob / count, case)
    return plain, out


def mean_dice(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per case: mean Dice (%) over the organs present (NaN / None entries are absent organs)."""
    from voxdiff.evaluate.stats import case_means

    return {cid: round(100.0 * v, 1) for cid, v in case_means(scores).items()}


def run_row(exp, row: str, views: int, z_min: float, xy_min: float, seed: int,
            fixed_norm: bool = False, scale: float = 0.0, head_steps: int | None = None,
            probe: dict[str, Any] | None = None, labels: int = 1, tta: int = 0,
            extra_val: bool = False, head: str = "nonlinear",
            coord_jitter: tuple[float, float] | None = None) -> dict[str, Any]:
    """Fit ``row`` on the first ``labels`` labelled phantoms (plus ``views`` crops of each for a frozen
    ``head``: ``nonlinear`` or ``mix``); score it (the perturbed copies are of the first phantom)."""
    from voxdiff.features.extract import with_feature_settings
    from voxdiff.pretrain.load import load_pretrained

    train, val, test = exp.folds()[0]
    if not 1 <= labels <= len(train):
        raise ValueError(f"--labels {labels}: the fold has {len(train)} labelled phantoms")
    fit_cases, c0 = train[:labels], train[0]
    t0 = time.time()
    if row == "scratch":
        if views or fixed_norm or head_steps or probe or head != "nonlinear" or coord_jitter:
            raise ValueError("--views, --fixed_norm, --head_steps, --probe, --head and --coord_jitter apply to frozen rows only")
        from voxdiff.probe.train import fit_network

        pcfg = exp.tuned_cfg("scratch", True)
        ext = load_pretrained(exp.pretrained("random"), device="cpu")
        net, head = fit_network(ext, fit_cases, val, "scratch", pcfg, progress=False)

        def score(cases):
            return exp.score(net, {"scratch": head}, cases, pcfg)["scratch"]
    else:
        from voxdiff.probe.voxel import fit_heads_voxels

        pcfg = exp.probe_cfg(**(probe or {}), **({"steps": int(head_steps)} if head_steps else {}),
                             **({"norm_stats": "fixed"} if fixed_norm else {}))
        ext = load_pretrained(exp.pretrained(row), device="cpu")
        with_feature_settings(ext, pcfg)  # feature side, and --probe's feature_input / t
        rng = np.random.default_rng(1000 + seed)  # (with one label: the same crops as before --labels)
        crops = [v for c in fit_cases for v in fov_views(c, views, rng, z_min, xy_min, scale)]
        fit_on = list(fit_cases) + crops
        if coord_jitter:
            jitter_crop_conditions(ext, crops, coord_jitter, np.random.default_rng(2000 + seed))
        heads = fit_heads_voxels(ext, fit_on, val, (head,), pcfg, progress=False,
                                 voxels_per_step=int(exp.budget.get("probe_voxels", 8192)))

        def score(cases):
            return exp.score(ext, heads, cases, pcfg, volume=exp.voxel_mode)[head]

        if tta and not exp.voxel_mode:
            raise ValueError("--tta needs heads on whole-volume features (the budget's voxel probing)")
    tta = tta if row != "scratch" else 0
    rest = list(train[labels:]) if extra_val else []  # the fold's labelled phantoms this fit did not use
    res: dict[str, Any] = {"row": row, "head": head, "coord_jitter": list(coord_jitter or ()), "views": views, "z_min": z_min, "xy_min": xy_min, "fixed_norm": fixed_norm,
                           "scale": scale, "head_steps": head_steps,  # None: the budget's
                           "probe": probe or {},
                           "labels": labels, "train_case": c0.case_id,
                           "train_cases": [c.case_id for c in fit_cases],
                           "own": mean_dice(score(perturbations(c0)))}
    for key, cases in (("val", val), ("test", test), ("val_extra", rest)):
        if key == "val_extra" and not cases:
            continue
        if tta:  # one whole-volume pass per case gives both scores
            plain, crops = tta_scores(ext, heads[head], cases, pcfg, tta, seed, z_min, xy_min)
            res[key], res[f"{key}_tta"] = mean_dice(plain), mean_dice(crops)
        else:
            res[key] = mean_dice(score(cases))
    res["test_mean"] = round(float(np.nanmean(list(res["test"].values()))), 2)
    if coord_jitter:  # how many whole-volume condition maps were shifted (one per training crop expected)
        res["jitter_hits"] = int(ext.jitter_hits["n"])
    if tta:
        res["tta"] = tta
        res["test_tta_mean"] = round(float(np.nanmean(list(res["test_tta"].values()))), 2)
    res["seconds"] = round(time.time() - t0, 1)
    return res


def tta_cell(r: dict[str, Any], split: str) -> str:
    """`` (K crops: X)``: a split's mean Dice with test-time crops, when the run measured it."""
    if not r.get("tta"):
        return ""
    return f" ({r['tta']} crops: {np.nanmean(list(r[f'{split}_tta'].values())):.1f})"


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one line per run (seed, row, views), the perturbed copies of the training phantom,
    validation and test means."""
    keys = ["same", "hu+30", "z+4", "z+8", "xy*0.9", "xy*1.1"]
    lines = ["| seed | labels | row | crops | " + " | ".join(f"own, {k}" for k in keys) + " | validation | test |",
             "|---" * (len(keys) + 6) + "|"]
    order = sorted(results, key=lambda n: (results[n]["seed"], results[n].get("labels", 1), results[n]["row"],
                                           results[n]["views"] or 0, n))
    for name in order:
        r = results[name]
        own = {k.split("-", 1)[1]: v for k, v in r["own"].items()}
        row = r["row"] + (f", {r['head']} head" if r.get("head", "nonlinear") != "nonlinear" else "") + (", fixed norm" if r.get("fixed_norm") else "") \
            + (f", scale ±{r['scale']}" if r.get("scale") else "") \
            + (f", {r['head_steps']} head steps" if r.get("head_steps") else "") \
            + "".join(f", {k} {v}" for k, v in (r.get("probe") or {}).items())
        lines.append(f"| {r['seed']} | {r.get('labels', 1)} | {row} | {r['views'] or ''} | "
                     + " | ".join(f"{own.get(k, float('nan')):.1f}" for k in keys)
                     + f" | {np.nanmean(list(r['val'].values())):.1f}{tta_cell(r, 'val')}"
                     + f" | {r['test_mean']:.1f}{tta_cell(r, 'test')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path, help="folder of a compare --seeds run (with seed-S subfolders)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--rows", default="contrastive,diffusion-ape,scratch",
                    help="comma-separated: pretrained methods (frozen heads) and/or scratch")
    ap.add_argument("--views", default="0", help="comma-separated numbers of field-of-view crops (frozen rows)")
    ap.add_argument("--z_min", type=float, default=0.5, help="shortest crop along z, fraction of the phantom")
    ap.add_argument("--xy_min", type=float, default=0.8, help="narrowest crop in-plane, fraction of the phantom")
    ap.add_argument("--scale", type=float, default=0.0,
                    help="crops also resized in-plane by a random factor in 1 -/+ SCALE (default 0: no)")
    ap.add_argument("--head_steps", type=int, default=None,
                    help="frozen rows: head training steps (default: the budget's; validated every val_every)")
    ap.add_argument("--probe", default=None,
                    help="frozen rows: JSON ProbeConfig overrides, e.g. '{\"feature_input\": \"clean\"}' (needs --tag)")
    ap.add_argument("--tag", default="", help="appended to the names of this run's result files")
    ap.add_argument("--fixed_norm", action="store_true", help="frozen rows: fixed GroupNorm statistics")
    ap.add_argument("--labels", type=int, default=1,
                    help="labelled phantoms to fit on: the fold's first N (default 1); crops are per phantom")
    ap.add_argument("--tta", type=int, default=0,
                    help="frozen rows: also score with this many test-time field-of-view crops per case")
    ap.add_argument("--extra_val", action="store_true",
                    help="also score the fold's labelled phantoms the fit did not use (a larger validation set)")
    ap.add_argument("--head", default="nonlinear", choices=("nonlinear", "mix"),
                    help="frozen rows: the head fitted (default nonlinear; mix: a learned mix over levels x timesteps)")
    ap.add_argument("--coord_jitter", default=None,
                    help="frozen rows with crops: S_MM,RA_MM - shift each crop's BPR coordinates by a random offset "
                         "(uniform within +-S_MM along S, +-RA_MM along R and A)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", type=Path, required=True, help="folder of the per-run JSON files")
    a = ap.parse_args(argv)
    probe = json.loads(a.probe) if a.probe else None
    jitter = tuple(float(v) for v in a.coord_jitter.split(",")) if a.coord_jitter else None
    if jitter is not None and len(jitter) != 2:
        ap.error("--coord_jitter takes S_MM,RA_MM")
    if probe and not a.tag:
        ap.error("--probe needs --tag (the result files of other settings must not be taken for these)")

    from voxdiff.experiments.base import Experiment

    tune_allocator()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for s in (int(x) for x in a.seeds.split(",")):
        folder = a.bench / f"seed-{s}"
        if not (folder / "config.yaml").is_file():
            raise SystemExit(f"{folder}: not a seed folder of a compare run (no config.yaml)")
        exp = None
        for row in a.rows.split(","):
            for k in ([0] if row == "scratch" else [int(v) for v in a.views.split(",")]):
                name = f"seed-{s}-{row}" + (f"-views{k}-z{a.z_min}-xy{a.xy_min}" if k else "") \
                    + (f"-scale{a.scale}" if k and a.scale else "") \
                    + (f"-steps{a.head_steps}" if a.head_steps and row != "scratch" else "") \
                    + (f"-{a.tag}" if a.tag and row != "scratch" else "") \
                    + ("-normfixed" if a.fixed_norm and row != "scratch" else "") \
                    + (f"-labels{a.labels}" if a.labels != 1 else "") \
                    + (f"-tta{a.tta}" if a.tta and row != "scratch" else "") \
                    + ("-xval" if a.extra_val else "") \
                    + (f"-{a.head}" if a.head != "nonlinear" and row != "scratch" else "") \
                    + (f"-jit{a.coord_jitter.replace(',', '_')}" if a.coord_jitter and row != "scratch" else "")
                path = a.out / f"{name}.json"
                if not path.is_file():
                    exp = exp or Experiment.reopen(folder, log=print)
                    r = dict(run_row(exp, row, k, a.z_min, a.xy_min, s, a.fixed_norm and row != "scratch", a.scale,
                                     a.head_steps if row != "scratch" else None,
                                     probe if row != "scratch" else None, a.labels, a.tta, a.extra_val,
                                     a.head if row != "scratch" else "nonlinear",
                                     jitter if row != "scratch" else None),
                             seed=s)
                    path.write_text(json.dumps(r, indent=1))
                    print(f"{name}: test {r['test_mean']:.1f}{tta_cell(r, 'test')} ({r['seconds']:.0f} s)", flush=True)
                results[name] = json.loads(path.read_text())
    print(table(results))


if __name__ == "__main__":
    main()
