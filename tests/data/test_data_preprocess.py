"""Orientation, resampling, HU windowing, body crop and the exact way back to the source grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import affine_for, synthetic_ct

from voxdiff.data.preprocess import (
    PreprocessConfig,
    axcodes,
    body_mask,
    hu_to_unit,
    preprocess,
    resample_to_spacing,
    restore_to_original,
    to_ras,
    unit_to_hu,
)
from voxdiff.data.types import Case, CaseMeta


def _case(img, lab, aff):
    meta = CaseMeta("c", None, None, tuple(img.shape), aff.copy(), aff.copy(), tuple(np.linalg.norm(aff[:3, :3], axis=0)))
    return Case(img, lab, meta)


def _world(aff, idx):
    return (aff @ np.array([*idx, 1.0]))[:3]


def test_hu_to_unit_numpy_and_torch():
    hu = np.array([-3000, -1350, -175, 1000, 4000], dtype=np.float32)
    u = hu_to_unit(hu, (-1350, 1000))
    np.testing.assert_allclose(u, [0, 0, 0.5, 1, 1], atol=1e-6)
    assert u.dtype == np.float32
    t = hu_to_unit(torch.tensor(hu), (-1350, 1000))
    np.testing.assert_allclose(t.numpy(), u, atol=1e-6)
    np.testing.assert_allclose(unit_to_hu(u[1:4], (-1350, 1000)), hu[1:4], atol=1e-3)
    with pytest.raises(ValueError):
        hu_to_unit(hu, (10, 10))


@pytest.mark.parametrize("codes", ["RAS", "LAS", "LPS", "PIR", "SLA"])
def test_to_ras_keeps_world_positions(codes):
    img, _ = synthetic_ct((10, 12, 14))
    aff = affine_for(codes, (0.7, 1.3, 2.9), (5, -7, 11))
    out, oaff = to_ras(img, aff)
    assert axcodes(oaff) == ("R", "A", "S")
    # every voxel value sits at the same world position as before
    src = (3, 4, 5)
    w = _world(aff, src)
    dst = np.round(np.linalg.solve(oaff, np.array([*w, 1.0]))[:3]).astype(int)
    assert out[tuple(dst)] == img[src]
    assert sorted(out.shape) == sorted(img.shape)


@pytest.mark.parametrize("codes", ["RAS", "LAS", "LPS"])
def test_round_trip_without_resampling_is_exact(codes):
    img, lab = synthetic_ct((40, 36, 24))
    aff = affine_for(codes, (0.8, 0.9, 2.5), (10, -20, 30))
    p = preprocess(_case(img, lab, aff), PreprocessConfig(spacing=None, crop_to_body=True, body_margin_mm=2))
    assert axcodes(p.meta.affine) == ("R", "A", "S")
    assert p.image.size < img.size  # the body crop did something
    back_l = restore_to_original(p.label, p.meta, is_label=True)
    back_i = restore_to_original(p.image, p.meta, is_label=False, fill=-1000)
    assert back_l.shape == img.shape and back_l.dtype == np.uint8
    np.testing.assert_array_equal(back_l, lab)
    body = img > -500
    np.testing.assert_allclose(back_i[body], img[body], atol=1e-4)


@pytest.mark.parametrize("codes", ["RAS", "LAS", "LPS"])
def test_round_trip_with_resampling(codes):
    img, lab = synthetic_ct((48, 40, 20))
    aff = affine_for(codes, (0.75, 0.9, 3.0), (1, 2, 3))
    cfg = PreprocessConfig(spacing=(1.0, 1.0, 2.0), crop_to_body=True)
    p = preprocess(_case(img, lab, aff), cfg)
    np.testing.assert_allclose(p.meta.spacing, (1.0, 1.0, 2.0), atol=1e-6)
    back = restore_to_original(p.label, p.meta, is_label=True)
    assert back.shape == img.shape
    for organ in (1, 6, 13):
        a, b = back == organ, lab == organ
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.85, (organ, dice)
    # the labels stay in place in world space: centroid shift below one source voxel
    for organ in (1, 6):
        c0 = np.argwhere(lab == organ).mean(0)
        c1 = np.argwhere(back == organ).mean(0)
        assert np.all(np.abs(c0 - c1) < 1.0)
    # multi-channel float arrays (e.g. class probabilities) map back too
    probs = np.stack([(p.label == 6).astype(np.float32), (p.label == 1).astype(np.float32)])
    pb = restore_to_original(probs, p.meta, is_label=False, fill=0.0)
    assert pb.shape == (2, *img.shape)
    assert ((pb[0] > 0.5) == (lab == 6)).mean() > 0.98
    with pytest.raises(ValueError, match="does not match"):
        restore_to_original(p.label[:-1], p.meta, is_label=True)


def test_resample_keeps_extent_and_is_linear():
    aff = affine_for("RAS", (0.5, 1.0, 2.0), (0, 0, 0))
    x = np.arange(40, dtype=np.float32)
    ramp = np.broadcast_to(x[:, None, None], (40, 6, 5)).copy()
    out, oaff = resample_to_spacing(ramp, aff, (1.0, 1.0, 1.0), order=1)
    assert out.shape == (20, 6, 10)
    np.testing.assert_allclose(np.linalg.norm(oaff[:3, :3], axis=0), (1, 1, 1))
    # physical extent (first voxel edge to last voxel edge) is kept
    lo_old = _world(aff, (-0.5, -0.5, -0.5))
    lo_new = _world(oaff, (-0.5, -0.5, -0.5))
    np.testing.assert_allclose(lo_old, lo_new, atol=1e-9)
    # linear data resampled linearly: value at each new voxel = the world position's ramp value
    for i in range(1, 19):
        wx = _world(oaff, (i, 0, 0))[0]
        assert out[i, 0, 0] == pytest.approx(wx / 0.5, abs=1e-4)


def test_resample_speed_large_volume():
    # 512x512x120 at 0.7 x 0.7 x 1.25 mm -> 1 x 1 x 2 mm should take about a second, not minutes
    import time

    a = np.random.default_rng(0).normal(size=(512, 512, 120)).astype(np.float32)
    t = time.perf_counter()
    out, _ = resample_to_spacing(a, affine_for("RAS", (0.7, 0.7, 1.25)), (1, 1, 2), order=1)
    assert time.perf_counter() - t < 10
    assert out.shape == (358, 358, 75)


def test_body_mask_largest_component_and_holes():
    hu = np.full((30, 30, 10), -1000.0, dtype=np.float32)
    hu[5:20, 5:20, :] = 40  # body
    hu[9:13, 9:13, :] = -900  # air inside (bowel gas / lung): filled
    hu[25:29, 2:28, :] = 200  # table: separate component, dropped
    m = body_mask(hu, -500)
    assert m[10, 10, 5] and m[6, 6, 5]
    assert not m[26, 10, 5]
    assert m.sum() == 15 * 15 * 10


def test_crop_keeps_margin_and_organs():
    img, lab = synthetic_ct((60, 50, 20))
    aff = affine_for("RAS", (1.0, 1.0, 2.0))
    p = preprocess(_case(img, lab, aff), PreprocessConfig(spacing=None, body_margin_mm=3))
    assert p.image.shape[0] < 60 and p.image.shape[1] < 50
    for organ in (1, 6, 13):
        assert (p.label == organ).sum() == (lab == organ).sum()
    crop = p.meta.extra["preprocess"]["crop"]
    # at least 3 mm of margin around the body's bounding box
    xs = np.nonzero((img > -500).any(axis=(1, 2)))[0]
    assert crop[0][0] <= xs[0] - 3 and crop[0][1] >= xs[-1] + 1 + 3


def test_resample_to_grid_oblique_fallback_and_edge_fill():
    from voxdiff.data.preprocess import resample_to_grid

    img, lab = synthetic_ct((20, 18, 10))
    aff = affine_for("RAS", (1.0, 1.0, 2.0))
    t = np.deg2rad(10)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    out_aff = rot @ aff  # rotated grid: not separable
    out = resample_to_grid(lab, aff, lab.shape, out_aff, order=0, fill=0)
    assert out.dtype == lab.dtype and set(np.unique(out)) <= set(np.unique(lab))
    back = resample_to_grid(out, out_aff, lab.shape, aff, order=0, fill=0)
    inner = np.zeros(lab.shape, bool)
    inner[4:-4, 4:-4, :] = True
    assert (back[inner] == lab[inner]).mean() > 0.95
    # fill=None: outside voxels take the nearest edge value instead of a constant
    shifted = aff.copy()
    shifted[0, 3] += 5.0
    e = resample_to_grid(img, aff, img.shape, shifted, order=1, fill=None)
    np.testing.assert_allclose(e[-1], img[-1], atol=1e-4)


def test_resampling_to_an_absurd_grid_is_refused_with_the_file_named():
    from voxdiff.core.errors import InputError
    from voxdiff.data.preprocess import MAX_GRID_VOXELS, PreprocessConfig, preprocess, resample_to_spacing
    from voxdiff.data.types import Case, CaseMeta

    a = np.zeros((40, 40, 30), np.float32)
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    with pytest.raises(InputError, match=r"would make \(12000, 12000, 9000\) voxels .*coarser spacing"):
        resample_to_spacing(a, aff, (0.01, 0.01, 0.01))
    # the limit counts leading axes too (class scores resampled together)
    n = int(np.ceil((MAX_GRID_VOXELS / 8) ** (1 / 3))) + 1  # n^3 voxels fit alone, 8 channels of them do not
    with pytest.raises(InputError, match="GiB as float32"):
        resample_to_spacing(np.zeros((8, 2, 2, 2), np.float32), np.diag([n / 2, n / 2, n / 2, 1.0]), (1.0, 1.0, 1.0))
    meta = CaseMeta(case_id="c", image_path="/data/ct_0001.nii.gz", label_path=None, original_shape=a.shape,
                    original_affine=aff, affine=aff, spacing=(3.0, 3.0, 3.0))
    with pytest.raises(InputError) as e:
        preprocess(Case(image=a, label=None, meta=meta), PreprocessConfig(spacing=(0.01, 0.01, 0.01)))
    assert str(e.value).startswith("/data/ct_0001.nii.gz: resampling a (40, 40, 30) grid")
