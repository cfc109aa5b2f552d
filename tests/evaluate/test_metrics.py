"""Dice per case x organ against hand-computed values, incl. empty organs; aggregates; surfaces."""

import math

import numpy as np
import pytest
import torch

from voxdiff.evaluate.metrics import (
    aggregate_cases,
    aggregate_folds,
    dice_per_class,
    hd95,
    mean_std,
    size_group_means,
    surface_dice,
)


def nan(x):
    return isinstance(x, float) and math.isnan(x)


def test_dice_hand_computed_with_empty_organs():
    gt = np.zeros((4, 4, 4), np.uint8)
    pr = np.zeros_like(gt)
    gt[0, 0, :4] = 1  # spleen: 4 voxels
    pr[0, 0, :2] = 1  # 2 right -> 2*2/(4+2)
    gt[1, 1, :3] = 6  # liver only in GT -> 0
    pr[2, 2, :1] = 7  # stomach only in prediction -> 0
    gt[3, 3, :2] = 8  # aorta perfect
    pr[3, 3, :2] = 8
    d = dice_per_class(pr, gt, 14)
    assert set(d) == set(range(1, 14))
    assert d[1] == pytest.approx(4 / 6)
    assert d[6] == 0.0 and d[7] == 0.0
    assert d[8] == 1.0
    for o in (2, 3, 4, 5, 9, 10, 11, 12, 13):  # absent from both
        assert nan(d[o])
    g = size_group_means(d)
    assert g["Big"] == pytest.approx((4 / 6 + 0 + 0) / 3)  # spleen, liver, stomach scored; kidneys NaN
    assert g["Medium"] == pytest.approx(1.0)
    assert nan(g["Small"])


def test_dice_agrees_with_monai_where_both_are_defined():
    from monai.metrics import DiceMetric

    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (12, 12, 12))
    pr = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 4, gt.shape))
    d = dice_per_class(pr, gt, 4)
    oh = lambda a: torch.nn.functional.one_hot(torch.as_tensor(a), 4).permute(3, 0, 1, 2)[None].float()
    m = DiceMetric(include_background=False, reduction="none")(oh(pr), oh(gt))[0].numpy()
    np.testing.assert_allclose([d[1], d[2], d[3]], m, rtol=1e-6)


def test_aggregates_ignore_nan_and_fold_std():
    per_case = {"a": {1: 1.0, 2: float("nan")}, "b": {1: 0.5, 2: 0.0}}
    agg = aggregate_cases(per_case, n_classes=3)
    assert agg["per_organ"] == {1: 0.75, 2: 0.0}
    assert agg["mean"] == pytest.approx(0.375)
    assert agg["mean_of_cases"] == pytest.approx((1.0 + 0.25) / 2)
    f = aggregate_folds([agg, aggregate_cases({"c": {1: 0.25, 2: 1.0}}, n_classes=3)])
    assert f["mean"]["mean"] == pytest.approx((0.375 + 0.625) / 2)
    assert f["mean"]["std"] == pytest.approx(np.std([0.375, 0.625], ddof=1))
    assert mean_std([float("nan")])["n"] == 0


def test_surface_metrics():
    gt = np.zeros((20, 20, 20), bool)
    gt[5:15, 5:15, 5:15] = True
    shifted = np.roll(gt, 2, axis=0)
    assert hd95(gt, gt) == 0.0
    assert hd95(shifted, gt, spacing=(1.5, 1, 1)) == pytest.approx(3.0)
    assert surface_dice(gt, gt, tau=0.5) == 1.0
    assert surface_dice(shifted, gt, spacing=(1, 1, 1), tau=2.0) == 1.0
    assert surface_dice(shifted, gt, spacing=(1, 1, 1), tau=1.0) < 1.0
    empty = np.zeros_like(gt)
    assert nan(hd95(empty, gt)) and surface_dice(empty, gt) == 0.0 and nan(surface_dice(empty, empty))
