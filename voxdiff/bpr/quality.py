"""Quality measures of body part regressors (used by tests and ``benchmarks/bench_bpr.py``).

* slice: Spearman correlation between slice score and physical z per volume; the spread across
  subjects of the score at organ landmarks (from label maps), as a percentage of the calibrated
  score range (0..1 = the training set's 1st..99th percentile), in mm of the score (``mm_per_unit``)
  and in mm of true z (:func:`landmark_spread`: the score's spread divided by how many mm of score
  the scans give per mm of z, so that flat scores do not look tight);
* ape: Pearson correlation between embedding distances and physical distances of body voxels per
  volume, and the ratio of the two in mm;
* ape, patch by patch (:func:`ape_patch_quality`): the same Pearson when every sampled voxel is
  placed by one random patch alone (no whole-volume sliding window), and the RMS error per axis (mm)
  of where patches put their centres, after removing each volume's mean offset - the measure that
  cannot be met by exact distances inside one window;
* both: mean disagreement (mm) for the same voxels seen in two overlapping patches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data.preprocess import HU_WINDOW
from .inference import infer_volume, slice_scores_volume
from .models import BodyPartRegressor, body_threshold, coords_for_patches

# BTCV ids: 2 right kidney, 3 left kidney, 6 liver
LANDMARKS = {
    "liver_centre": (6, "com"),
    "right_kidney_centre": (2, "com"),
    "left_kidney_centre": (3, "com"),
    "liver_dome_top": (6, "top"),
}


def _unit(case, model: BodyPartRegressor) -> np.ndarray:
    from ..data.preprocess import hu_to_unit

    return hu_to_unit(case.image, tuple(model.preprocess.get("hu_window", HU_WINDOW)))


def slice_z_mm(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """World z (mm) of every axial slice (at the volume's in-plane centre)."""
    a = np.asarray(affine, dtype=np.float64)
    k = np.arange(shape[2])
    idx = np.stack([np.full_like(k, (shape[0] - 1) / 2.0, dtype=np.float64),
                    np.full_like(k, (shape[1] - 1) / 2.0, dtype=np.float64), k.astype(np.float64)])
    return (a[:3, :3] @ idx + a[:3, 3:4])[2]


def landmark_z(label: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """World z (mm) of the landmarks present in a BTCV label map."""
    out = {}
    zmm = slice_z_mm(affine, label.shape)
    for name, (lab, how) in LANDMARKS.items():
        per_slice = (label == lab).sum(axis=(0, 1))
        if per_slice.sum() < 5:
            continue
        ks = np.nonzero(per_slice)[0]
        if how == "com":
            k = float((per_slice * np.arange(len(per_slice))).sum() / per_slice.sum())
        else:
            k = float(ks.max())
        out[name] = float(np.interp(k, np.arange(len(zmm)), zmm))
    return out


def s_slope(s_mm: np.ndarray, z_mm: np.ndarray) -> float:
    """Least-squares slope of an S profile (mm) against true z (mm) over a whole scan: 1 for a score in
    true mm, below 1 for a flatter one, <= 0 for one that does not rise with z (NaN: fewer than 2 slices)."""
    s_mm, z_mm = np.asarray(s_mm, dtype=np.float64), np.asarray(z_mm, dtype=np.float64)
    if len(z_mm) < 2 or np.ptp(z_mm) == 0:
        return float("nan")
    return float(np.polyfit(z_mm, s_mm, 1)[0])


def landmark_spread(marks: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, float]]:
    """Spread across subjects of the S coordinate (mm) at each landmark, in mm of S and of true z.

    ``marks[name]``: one ``(S_mm, slope)`` per case, ``slope`` being that case's :func:`s_slope`. The
    spread in mm of true z is the standard deviation of S divided by the median slope of those cases
    (NaN when that median is not positive): a model whose scores barely rise with z has a small spread
    of S at every landmark and must not be credited for it. Landmarks seen in fewer than 2 cases are left out.
    """
    out = {}
    for name, vals in marks.items():
        if len(vals) < 2:
            continue
        s = np.array([v[0] for v in vals], dtype=np.float64)
        k = np.array([v[1] for v in vals], dtype=np.float64)
        sd = float(np.std(s, ddof=1))
        k = k[np.isfinite(k)]
        slope = float(np.median(k)) if k.size else float("nan")
        out[name] = {"n": len(vals), "mean": float(s.mean()), "std": sd, "slope_mm_per_mm": slope,
                     "std_dz_mm": sd / slope if np.isfinite(slope) and slope > 0 else float("nan")}
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def spearman_by_halves(s: np.ndarray, z: np.ndarray) -> tuple[float, float, float]:
    """Spearman of ``s`` against ``z`` over the whole scan, its inferior half and its superior half
    (the slices split by count in z order; NaN for a half of fewer than 3 slices). A score that
    reverses above the diaphragm fails the superior half while the whole scan can still look fine."""
    order = np.argsort(z)
    zs, ss = z[order], s[order]
    half = len(z) // 2
    return (spearman(s, z), spearman(ss[:half], zs[:half]) if half >= 3 else float("nan"),
            spearman(ss[half:], zs[half:]) if len(z) - half >= 3 else float("nan"))


def slice_quality(model: BodyPartRegressor, cases: list) -> dict[str, Any]:
    per_case = []
    mm = model.mm_per_unit
    marks: dict[str, list[tuple[float, float]]] = {k: [] for k in LANDMARKS}
    for c in cases:
        s = slice_scores_volume(model, _unit(c, model))
        z = slice_z_mm(c.meta.affine, c.image.shape)
        slope = s_slope(s * mm, z)
        rec = {"case_id": c.meta.case_id, "spearman": spearman(s, z), "n_slices": int(len(s)),
               "score_range": [float(s.min()), float(s.max())], "slope_mm_per_mm": slope}
        if c.label is not None:
            order = np.argsort(z)
            for name, zl in landmark_z(c.label, c.meta.affine).items():
                v = float(np.interp(zl, z[order], s[order]))
                marks[name].append((v * mm, slope))
                rec[name] = v
        per_case.append(rec)
    lm = {}
    for name, v in landmark_spread(marks).items():
        # mean and std in calibrated score units (0..1 = the training set's 1st..99th percentile)
        lm[name] = {**v, "mean": v["mean"] / mm, "std": v["std"] / mm, "std_pct_range": 100.0 * v["std"] / mm,
                    "std_mm": v["std"]}
    sp = [r["spearman"] for r in per_case]
    return {"kind": "slice", "per_case": per_case, "spearman_mean": float(np.mean(sp)) if sp else float("nan"),
            "spearman_min": float(np.min(sp)) if sp else float("nan"), "landmarks": lm, "mm_per_unit": mm}


# BTCV ids: 1 spleen, 2 right kidney, 3 left kidney, 6 liver - 3D centres of mass for the ape model
APE_LANDMARKS = {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 6}


def _landmarks_3d(label: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for name, lab in APE_LANDMARKS.items():
        idx = np.argwhere(label == lab)
        if len(idx) >= 5:
            out[name] = idx.mean(0)
    return out


def ape_quality(model: BodyPartRegressor, cases: list, n_points: int = 600, seed: int = 0) -> dict[str, Any]:
    """Whole-volume maps (``infer_volume``): Pearson of embedding vs physical distances of body voxels
    per volume, their median ratio, and - where labels exist - the spread across subjects (SD per
    axis, mm) of the coordinates at organ centres, beside the same spread of the organ centres
    measured from each volume's centre (what coordinates that know no anatomy would give)."""
    from scipy.spatial.distance import pdist
    from scipy.stats import pearsonr

    rng = np.random.default_rng(seed)
    per_case = []
    marks: dict[str, list[np.ndarray]] = {k: [] for k in APE_LANDMARKS}
    naive: dict[str, list[np.ndarray]] = {k: [] for k in APE_LANDMARKS}
    for c in cases:
        u = _unit(c, model)
        m = infer_volume(model, u)
        body = u > body_threshold(model)  # -500 HU
        idx = np.argwhere(body) if body.sum() >= 10 else np.argwhere(np.ones_like(body))
        sel = idx[rng.choice(len(idx), size=min(n_points, len(idx)), replace=False)]
        e = m[:, sel[:, 0], sel[:, 1], sel[:, 2]].T.astype(np.float64)
        a = np.asarray(c.meta.affine, dtype=np.float64)
        p = sel @ a[:3, :3].T + a[:3, 3]
        de, dp = pdist(e) * model.mm_per_unit, pdist(p)
        r = float(pearsonr(de, dp).statistic) if np.ptp(de) > 0 else 0.0
        keep = dp > 20
        ratio = float(np.median(de[keep] / dp[keep])) if keep.any() else float("nan")
        per_case.append({"case_id": c.meta.case_id, "pearson": r, "mm_ratio": ratio})
        if c.label is not None:
            centre = (np.array(u.shape) - 1) / 2.0
            for name, com in _landmarks_3d(c.label).items():
                v = np.round(com).astype(int)
                marks[name].append(m[:, v[0], v[1], v[2]].astype(np.float64) * model.mm_per_unit)
                naive[name].append(a[:3, :3] @ (com - centre))
    pr = [r["pearson"] for r in per_case]
    lm = {}
    for name, vals in marks.items():
        if len(vals) >= 2:
            sd = np.std(np.array(vals), axis=0, ddof=1)
            sd0 = np.std(np.array(naive[name]), axis=0, ddof=1)
            lm[name] = {"n": len(vals), "std_mm": sd.tolist(), "std_mm_from_volume_centre": sd0.tolist()}
    return {"kind": "ape", "per_case": per_case, "pearson_mean": float(np.mean(pr)) if pr else float("nan"),
            "pearson_min": float(np.min(pr)) if pr else float("nan"), "mm_per_unit": model.mm_per_unit,
            "landmarks": lm}


def ape_patch_quality(model: BodyPartRegressor, cases: list, size: int | None = None, n_crops: int = 24,
                      points_per_crop: int = 25, seed: int = 0) -> dict[str, Any]:
    """Pearson of embedding vs physical distances and centre-placement error with every voxel placed
    by a single random ``size``^3 patch (default: the model's training patch)."""
    from scipy.spatial.distance import pdist
    from scipy.stats import pearsonr

    rng = np.random.default_rng(seed)
    size = int(size or model.patch_size[0])
    half = size // 2
    per_case = []
    for c in cases:
        u = _unit(c, model)
        a = np.asarray(c.meta.affine, dtype=np.float64)
        body = u > body_threshold(model)
        emb, pos, centre_err = [], [], []
        for _ in range(n_crops):
            s0 = tuple(int(rng.integers(0, max(1, d - size + 1))) for d in u.shape)
            patch = torch.from_numpy(_crop(u, s0, (size,) * 3))[None, None]
            y = coords_for_patches(model, patch)[0].numpy().astype(np.float64) * model.mm_per_unit
            ctr = np.minimum(np.array(s0) + half, np.array(u.shape) - 1)
            centre_err.append(y[:, half, half, half] - (a[:3, :3] @ ctr + a[:3, 3]))
            inside = np.argwhere(body[tuple(slice(o, o + size) for o in s0)])
            if len(inside) == 0:
                continue
            sel = inside[rng.choice(len(inside), size=min(points_per_crop, len(inside)), replace=False)]
            emb.append(y[:, sel[:, 0], sel[:, 1], sel[:, 2]].T)
            pos.append((sel + np.array(s0)) @ a[:3, :3].T + a[:3, 3])
        e, p = np.concatenate(emb), np.concatenate(pos)
        de, dp = pdist(e), pdist(p)
        r = float(pearsonr(de, dp).statistic) if np.ptp(de) > 0 else 0.0
        err = np.array(centre_err)
        err -= err.mean(0)
        per_case.append({"case_id": c.meta.case_id, "pearson": r,
                         "position_rms_mm": np.sqrt((err ** 2).mean(0)).tolist()})
    pr = [r["pearson"] for r in per_case]
    rms = np.sqrt(np.mean([np.square(r["position_rms_mm"]) for r in per_case], axis=0)) if per_case else np.full(3, np.nan)
    return {"kind": "ape", "patch": size, "per_case": per_case,
            "pearson_mean": float(np.mean(pr)) if pr else float("nan"),
            "pearson_min": float(np.min(pr)) if pr else float("nan"),
            "position_rms_mm": [float(v) for v in rms]}


def _crop(unit: np.ndarray, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(size, dtype=np.float32)
    src = tuple(slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, size, unit.shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    out[dst] = unit[src]
    return out


def patch_disagreement(model: BodyPartRegressor, cases: list, n_pairs: int = 4, seed: int = 0,
                       size: tuple[int, int, int] | None = None) -> dict[str, float]:
    """Mean absolute disagreement (mm) between two overlapping patches (shifted by a random
    25-50% of the patch per axis) over their shared voxels; Euclidean over channels for ape."""
    rng = np.random.default_rng(seed)
    size = tuple(size or (model.patch_size if model.kind == "ape" else (model.patch_size[0], model.patch_size[1], 32)))
    vals = []
    for c in cases:
        u = _unit(c, model)
        for _ in range(n_pairs):
            shift = [int(rng.integers(max(1, n // 4), max(2, n // 2 + 1))) * int(rng.choice([-1, 1])) for n in size]
            a0 = [int(rng.integers(0, max(1, d - n + 1))) for d, n in zip(u.shape, size)]
            b0 = [a + s for a, s in zip(a0, shift)]
            pa = torch.from_numpy(_crop(u, tuple(a0), size))[None, None]
            pb = torch.from_numpy(_crop(u, tuple(b0), size))[None, None]
            ya, yb = coords_for_patches(model, torch.cat([pa, pb]))
            # shared voxels: a-index i <-> b-index i - shift
            sa = tuple(slice(max(0, s), n + min(0, s)) for s, n in zip(shift, size))
            sb = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, size))
            d = (ya[(slice(None),) + sa] - yb[(slice(None),) + sb]).pow(2).sum(0).sqrt()
            vals.append(float(d.mean()) * model.mm_per_unit)
    return {"mean_mm": float(np.mean(vals)), "max_pair_mm": float(np.max(vals)), "pairs": len(vals)}
