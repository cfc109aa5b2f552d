"""Dice, in one place for every stage (numpy; torch tensors are accepted and moved to the CPU).

* Dice = 2|P & G| / (|P| + |G|); **NaN** when the organ is absent from both prediction and ground
  truth (nothing to score), **0** when it is absent from exactly one of them.
* :func:`mean_dice` is the ``nanmean`` over the foreground organs: organs absent from both are left
  out; NaN when no organ is present in either.

``voxdiff.evaluate.metrics`` builds the reported metrics (HD95, surface Dice, aggregation) on these.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def dice_score(pred_mask: Any, gt_mask: Any) -> float:
    """Dice of two binary masks; NaN when both are empty."""
    p = _numpy(pred_mask).astype(bool, copy=False)
    g = _numpy(gt_mask).astype(bool, copy=False)
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, g).sum()) / denom


def dice_per_class(pred: Any, gt: Any, n_classes: int = 14) -> dict[int, float]:
    """Dice of every organ id ``1 .. n_classes-1`` (background excluded) -> ``{id: dice}``."""
    pred = _numpy(pred)
    gt = _numpy(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    # one pass: joint histogram of (gt, pred) labels
    n = int(n_classes)
    p = np.clip(pred.astype(np.int64, copy=False).ravel(), 0, n)  # ids >= n go to an overflow bin
    g = np.clip(gt.astype(np.int64, copy=False).ravel(), 0, n)
    joint = np.bincount(g * (n + 1) + p, minlength=(n + 1) ** 2).reshape(n + 1, n + 1)
    out: dict[int, float] = {}
    for c in range(1, n):
        inter = int(joint[c, c])
        denom = int(joint[c, :].sum()) + int(joint[:, c].sum())
        out[c] = float("nan") if denom == 0 else 2.0 * inter / denom
    return out


def mean_dice(pred: Any, gt: Any, n_classes: int) -> float:
    """Mean foreground Dice over the organs present in ``gt`` or ``pred``; NaN when there is none."""
    scores = [v for v in dice_per_class(pred, gt, n_classes).values() if not np.isnan(v)]
    return float(np.mean(scores)) if scores else float("nan")
