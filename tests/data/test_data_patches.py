"""Patch sampling: mm coordinates from the affine, padding, foreground bias, batches."""

from __future__ import annotations

import numpy as np
import torch
from data_helpers import affine_for

from voxdiff.data.patches import class_locations, sample_batch, sample_patch
from voxdiff.data.preprocess import hu_to_unit
from voxdiff.data.types import Case, CaseMeta

AFF = affine_for("RAS", (0.8, 1.1, 2.0), (-50.0, 20.0, 300.0))


def test_patch_content_and_coords():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(30, 25, 20)).astype(np.float32)
    p = sample_patch(img, (8, 6, 4), rng, affine=AFF)
    o = p.origin
    np.testing.assert_array_equal(p.image, img[o[0]:o[0] + 8, o[1]:o[1] + 6, o[2]:o[2] + 4])
    assert p.coords_mm.shape == (3, 8, 6, 4) and p.coords_mm.dtype == np.float32
    for idx in [(0, 0, 0), (7, 5, 3), (3, 2, 1)]:
        expect = (AFF @ np.array([o[0] + idx[0], o[1] + idx[1], o[2] + idx[2], 1.0]))[:3]
        np.testing.assert_allclose(p.coords_mm[(slice(None),) + idx], expect, atol=1e-3)


def test_padding_small_volume_coords_extrapolate():
    rng = np.random.default_rng(1)
    img = np.full((5, 6, 3), 100.0, dtype=np.float32)
    lab = np.ones((5, 6, 3), dtype=np.uint8)
    for _ in range(5):
        p = sample_patch(img, (8, 8, 8), rng, label=lab, affine=AFF, pad_value=-1350)
        o = p.origin
        assert all(-s <= oi <= 0 for oi, s in zip(o, (3, 2, 5)))
        inside = np.zeros((8, 8, 8), bool)
        inside[-o[0]:-o[0] + 5, -o[1]:-o[1] + 6, -o[2]:-o[2] + 3] = True
        assert np.all(p.image[inside] == 100) and np.all(p.image[~inside] == -1350)
        assert np.all(p.label[inside] == 1) and np.all(p.label[~inside] == 0)
        # coordinates keep following the affine into the padding (constant step per voxel)
        np.testing.assert_allclose(np.diff(p.coords_mm[0], axis=0), 0.8, atol=1e-4)
        np.testing.assert_allclose(np.diff(p.coords_mm[2], axis=2), 2.0, atol=1e-4)
        np.testing.assert_allclose(p.coords_mm[:, -o[0], -o[1], -o[2]], AFF[:3, 3], atol=1e-4)


def test_same_seed_same_patch():
    img = np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
    a = sample_patch(img, (8, 8, 8), np.random.default_rng(5))
    b = sample_patch(img, (8, 8, 8), np.random.default_rng(5))
    assert a.origin == b.origin
    np.testing.assert_array_equal(a.image, b.image)


def test_foreground_bias_picks_classes_uniformly():
    img = np.zeros((64, 64, 32), dtype=np.float32)
    lab = np.zeros(img.shape, dtype=np.uint8)
    lab[5:60, 5:60, 2:30] = 6  # huge organ
    lab[40:42, 10:12, 20:21] = 13  # 4-voxel organ
    rng = np.random.default_rng(0)
    locs = class_locations(lab)
    hits = 0
    n = 200
    for _ in range(n):
        p = sample_patch(img, (16, 16, 8), rng, label=lab, fg_prob=1.0, locations=locs)
        assert p.label.any()
        hits += bool((p.label == 13).any())
    assert 0.35 < hits / n < 0.65  # the tiny organ is centred about half of the time
    # without bias the tiny organ is almost never seen
    rng = np.random.default_rng(0)
    seen = sum(bool((sample_patch(img, (16, 16, 8), rng, label=lab).label == 13).any()) for _ in range(n))
    assert seen / n < 0.2


def test_sample_batch_tensors():
    rng = np.random.default_rng(0)
    cases = []
    for i in range(3):
        img = rng.uniform(-1200, 1200, size=(20, 18, 10)).astype(np.float32)
        lab = (rng.random((20, 18, 10)) > 0.9).astype(np.uint8) * 6
        meta = CaseMeta(f"c{i}", None, None, img.shape, AFF, AFF, (0.8, 1.1, 2.0))
        cases.append(Case(img, lab, meta))
    b = sample_batch(cases, 4, (16, 16, 16), rng, window=(-1350, 1000), fg_prob=0.5)
    assert b["image"].shape == (4, 1, 16, 16, 16) and b["image"].dtype == torch.float32
    assert float(b["image"].min()) >= 0 and float(b["image"].max()) <= 1
    assert b["label"].shape == (4, 16, 16, 16) and b["label"].dtype == torch.int64
    assert b["coords"].shape == (4, 3, 16, 16, 16)
    # padding along z (10 < 16) is the window minimum -> 0 after scaling
    assert float(b["image"][0, 0].min()) == 0.0
    i = b["case_ids"].index(b["case_ids"][0])
    o = b["origins"][i]
    c = cases[int(b["case_ids"][i][1:])]
    x0, y0 = max(o[0], 0), max(o[1], 0)
    assert float(b["image"][i, 0, x0 - o[0], y0 - o[1], -o[2]]) == float(hu_to_unit(c.image[x0, y0, 0], (-1350, 1000)))
