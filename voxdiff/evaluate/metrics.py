"""Segmentation metrics (pure numpy/scipy, no IO).

Conventions (per case and organ):

* Dice = 2|P & G| / (|P| + |G|); **NaN** when the organ is absent from both ground truth and
  prediction (nothing to score), **0** when it is absent from exactly one of them.
* Means ignore NaN: the mean over organs of a case, the mean of an organ over cases, size-group
  means (``voxdiff.data.labels.SIZE_GROUPS``) are all ``nanmean``; an all-NaN mean is NaN.
* HD95 (mm): the larger of the two directed 95th-percentile surface distances; NaN when the organ is
  missing from either side (undefined). Normalised surface Dice at tolerance ``tau`` mm: NaN when
  absent from both, 0 when absent from one.

MONAI's ``DiceMetric(ignore_empty=True)`` gives NaN whenever the ground truth is empty, even when
the prediction is not; we need 0 there (a false-positive organ must cost), hence this module. Dice itself lives in
``voxdiff.core.metrics`` (every stage scores with it) and is re-exported here.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from voxdiff.core.metrics import dice_per_class, dice_score  # noqa: F401  (the one Dice; re-exported here)
from voxdiff.data.labels import SIZE_GROUPS


def _nanmean(values: Iterable[float]) -> float:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0 or not np.isfinite(v).any():
        return float("nan")
    return float(np.nanmean(v))


def mean_over_organs(scores: Mapping[int, float], organs: Sequence[int] | None = None) -> float:
    ids = list(scores) if organs is None else [o for o in organs if o in scores]
    return _nanmean(scores[o] for o in ids)


def size_group_means(scores: Mapping[int, float], groups: Mapping[str, Sequence[int]] = SIZE_GROUPS) -> dict[str, float]:
    return {g: mean_over_organs(scores, ids) for g, ids in groups.items()}


def _surfaces(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask, border_value=0)


def _surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances (mm) pred-surface -> gt-surface and gt-surface -> pred-surface."""
    from scipy.ndimage import distance_transform_edt

    both = pred | gt
    idx = np.argwhere(both)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = idx.max(0) + 2
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    p, g = pred[sl], gt[sl]
    sp, sg = _surfaces(p), _surfaces(g)
    dt_g = distance_transform_edt(~sg, sampling=spacing)
    dt_p = distance_transform_edt(~sp, sampling=spacing)
    return dt_g[sp], dt_p[sg]


def hd95(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    p = np.asarray(pred_mask, dtype=bool)
    g = np.asarray(gt_mask, dtype=bool)
    if not p.any() or not g.any():
        return float("nan")
    d_pg, d_gp = _surface_distances(p, g, spacing)
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def surface_dice(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 tau: float = 2.0) -> float:
    p = np.asarray(pred_mask, dtype=bool)
    g = np.asarray(gt_mask, dtype=bool)
    if not p.any() and not g.any():
        return float("nan")
    if not p.any() or not g.any():
        return 0.0
    d_pg, d_gp = _surface_distances(p, g, spacing)
    return float(((d_pg <= tau).sum() + (d_gp <= tau).sum()) / (d_pg.size + d_gp.size))


def case_metrics(pred: np.ndarray, gt: np.ndarray, n_classes: int = 14, spacing: Sequence[float] | None = None,
                 surface: bool = False, tau: float = 2.0) -> dict[str, dict[int, float]]:
    """``{"dice": {id: v}, ["hd95": {...}, "surface_dice": {...}]}`` for one case."""
    out: dict[str, dict[int, float]] = {"dice": dice_per_class(pred, gt, n_classes)}
    if surface:
        sp = tuple(spacing) if spacing is not None else (1.0, 1.0, 1.0)
        out["hd95"] = {c: hd95(pred == c, gt == c, sp) for c in range(1, n_classes)}
        out["surface_dice"] = {c: surface_dice(pred == c, gt == c, sp, tau) for c in range(1, n_classes)}
    return out


def aggregate_cases(per_case: Mapping[str, Mapping[int, float]], n_classes: int = 14) -> dict:
    """Aggregate ``{case_id: {organ: score}}``.

    Returns ``per_organ`` (mean over cases), ``mean`` (mean of the per-organ means: the usual
    "average Dice"), ``mean_of_cases`` (mean of each case's organ mean), ``groups`` (size groups over
    the per-organ means), and ``n_cases``.
    """
    organs = list(range(1, n_classes))
    per_organ = {o: _nanmean(per_case[c].get(o, float("nan")) for c in per_case) for o in organs}
    return {
        "per_organ": per_organ,
        "mean": mean_over_organs(per_organ),
        "mean_of_cases": _nanmean(mean_over_organs(per_case[c]) for c in per_case),
        "groups": size_group_means(per_organ),
        "n_cases": len(per_case),
    }


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) ignoring NaN."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def aggregate_folds(fold_aggregates: Sequence[Mapping]) -> dict:
    """Mean +- std over folds of the fold-level aggregates from :func:`aggregate_cases`."""
    if not fold_aggregates:
        return {}
    organs = list(fold_aggregates[0]["per_organ"])
    groups = list(fold_aggregates[0]["groups"])
    return {
        "mean": mean_std([f["mean"] for f in fold_aggregates]),
        "per_organ": {o: mean_std([f["per_organ"][o] for f in fold_aggregates]) for o in organs},
        "groups": {g: mean_std([f["groups"][g] for f in fold_aggregates]) for g in groups},
        "n_folds": len(fold_aggregates),
    }
