"""voxdiff.core.metrics: the one Dice (numpy and torch inputs)."""

import math

import numpy as np
import pytest
import torch

from voxdiff.core.metrics import dice_per_class, dice_score, mean_dice


def _labels():
    gt = np.zeros((8, 8, 8), np.uint8)
    pred = np.zeros_like(gt)
    gt[:4] = 1            # 256 voxels
    pred[:2] = 1          # 128 voxels, all inside gt: Dice 2*128/384 = 2/3
    gt[6:, :2] = 2        # organ 2 only in gt: Dice 0
    pred[6:, 6:] = 3      # organ 3 only in pred: Dice 0
    return pred, gt       # organ 4..: absent from both: NaN


def test_dice_per_class_values():
    pred, gt = _labels()
    d = dice_per_class(pred, gt, 6)
    assert d[1] == pytest.approx(2 / 3)
    assert d[2] == 0.0 and d[3] == 0.0
    assert math.isnan(d[4]) and math.isnan(d[5])
    assert mean_dice(pred, gt, 6) == pytest.approx((2 / 3) / 3)


def test_torch_inputs_match_numpy():
    pred, gt = _labels()
    assert dice_per_class(torch.from_numpy(pred), torch.from_numpy(gt), 6) == pytest.approx(dice_per_class(pred, gt, 6),
                                                                                             nan_ok=True)
    assert mean_dice(torch.from_numpy(pred).long(), torch.from_numpy(gt), 6) == pytest.approx(mean_dice(pred, gt, 6))


def test_empty_and_masks():
    z = np.zeros((4, 4, 4), np.uint8)
    assert math.isnan(mean_dice(z, z, 14))
    assert math.isnan(dice_score(z, z))
    m = z.copy()
    m[0] = 1
    assert dice_score(m, m) == 1.0
    assert dice_score(m, z) == 0.0
    with pytest.raises(ValueError, match="differs"):
        dice_per_class(z, np.zeros((4, 4, 3), np.uint8))
