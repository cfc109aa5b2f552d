"""The real CT samples in ../shared/data/real_ct (skipped when absent).

ts_a: abdomen CT (RAS) + BTCV-13 pseudo-labels; ts_b: upper abdomen DICOM series (LPS) + pseudo-labels
stored LAS on the same physical grid; ts_c: thorax CTA (LPS), no labels.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from voxdiff.data.adapters import align_label, open_dataset
from voxdiff.data.io import load_image, load_label
from voxdiff.data.preprocess import (
    PreprocessConfig,
    axcodes,
    body_mask,
    preprocess,
    restore_to_original,
    to_ras,
)

pytestmark = pytest.mark.realdata

LIVER, SPLEEN, R_KIDNEY, L_KIDNEY = 6, 1, 2, 3


def world_extent(shape, affine):
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                        for k in (-0.5, shape[2] - 0.5)]).T
    w = (affine @ corners)[:3]
    return w.min(axis=1), w.max(axis=1)


def centroid_world(mask, affine):
    c = np.argwhere(mask).mean(axis=0)
    return (affine @ np.r_[c, 1.0])[:3]


def check_alignment(hu, label, affine):
    """Organs inside the body, liver on the patient's right, soft-tissue HU in liver and spleen."""
    body = body_mask(hu, -500)
    organs = label > 0
    assert organs.sum() > 1000
    assert (body[organs]).mean() > 0.97
    liver, spleen = label == LIVER, label == SPLEEN
    assert liver.sum() > spleen.sum() > 0
    # RAS world: +x is the patient's right: liver right of spleen
    assert centroid_world(liver, affine)[0] > centroid_world(spleen, affine)[0] + 50
    for organ in (liver, spleen):
        assert -20 < np.median(hu[organ]) < 200
        assert np.percentile(hu[organ], 90) < 300
    # air and fat are not labelled as liver
    assert (hu[liver] < -200).mean() < 0.02


def test_nifti_files_orientation_and_extent(real_ct_dir):
    expected = {"ts_a_abdomen_ct.nii.gz": "RAS", "ts_a_abdomen_btcv13_pseudo.nii.gz": "RAS",
                "ts_b_upper_abdomen_btcv13_pseudo.nii.gz": "LAS", "ts_c_thorax_cta_ct.nii.gz": "LPS"}
    for name, codes in expected.items():
        arr, aff = (load_label if "pseudo" in name else load_image)(real_ct_dir / name)
        assert arr.ndim == 3 and np.isfinite(arr).all()
        assert "".join(axcodes(aff)) == codes, name
        ras, raff = to_ras(arr, aff)
        assert axcodes(raff) == ("R", "A", "S")
        lo0, hi0 = world_extent(arr.shape, aff)
        lo1, hi1 = world_extent(ras.shape, raff)
        np.testing.assert_allclose(lo0, lo1, atol=1e-3)
        np.testing.assert_allclose(hi0, hi1, atol=1e-3)
        if "pseudo" not in name:
            assert arr.min() < -900 and arr.max() > 500  # HU: air and bone present


def test_dicom_series_and_its_pseudo_label(real_ct_dir):
    folder = real_ct_dir / "ts_b_upper_abdomen_dicom"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # positions are valid: no fallback warning
        hu, aff = load_image(folder)
    assert hu.shape == (512, 512, 20)
    assert "".join(axcodes(aff)) == "LPS"
    np.testing.assert_allclose(np.linalg.norm(aff[:3, :3], axis=0), (0.9765625, 0.9765625, 2.0), atol=1e-6)
    assert -1100 < hu.min() < -900 and hu.max() > 500
    lab, laff = load_label(real_ct_dir / "ts_b_upper_abdomen_btcv13_pseudo.nii.gz")
    # same physical grid, other axis direction: the label is flipped onto the DICOM grid exactly
    on_grid = align_label(lab, laff, hu.shape, aff, "label", folder)
    assert on_grid.shape == hu.shape
    assert (on_grid > 0).sum() == (lab > 0).sum()
    check_alignment(hu, on_grid, aff)
    # in the file's LPS voxel order the liver has *smaller* x indices than the spleen
    assert np.argwhere(on_grid == LIVER)[:, 0].mean() < np.argwhere(on_grid == SPLEEN)[:, 0].mean()
    # after canonicalisation: RAS, liver at larger x index
    ras, raff = to_ras(hu, aff)
    rlab, _ = to_ras(on_grid, aff)
    assert axcodes(raff) == ("R", "A", "S")
    assert np.argwhere(rlab == LIVER)[:, 0].mean() > np.argwhere(rlab == SPLEEN)[:, 0].mean()
    check_alignment(ras, rlab, raff)


def test_abdomen_pseudo_label_alignment_and_round_trip(real_ct_dir):
    hu, aff = load_image(real_ct_dir / "ts_a_abdomen_ct.nii.gz")
    lab, laff = load_label(real_ct_dir / "ts_a_abdomen_btcv13_pseudo.nii.gz")
    np.testing.assert_allclose(aff, laff, atol=1e-3)
    check_alignment(hu, lab, aff)
    # kidneys: right kidney on the patient's right
    assert centroid_world(lab == R_KIDNEY, aff)[0] > centroid_world(lab == L_KIDNEY, aff)[0]


def test_real_cases_through_adapters_preprocess_and_back(real_ct_dir, tmp_path):
    # a BTCV-style folder of symlinks (nothing copied) with the DICOM series as an unlabelled extra
    root = tmp_path / "btcv"
    (root / "img").mkdir(parents=True)
    (root / "label").mkdir()
    os.symlink(real_ct_dir / "ts_a_abdomen_ct.nii.gz", root / "img" / "img0001.nii.gz")
    os.symlink(real_ct_dir / "ts_a_abdomen_btcv13_pseudo.nii.gz", root / "label" / "label0001.nii.gz")
    os.symlink(real_ct_dir / "ts_c_thorax_cta_ct.nii.gz", root / "img" / "img0002.nii.gz")
    ds = open_dataset(root)
    assert ds.kind == "btcv" and ds.case_ids == ["0001", "0002"]
    cfg = PreprocessConfig(spacing=(2.0, 2.0, 3.0))
    raw = ds.load(ds.refs[0])
    p = preprocess(raw, cfg)
    assert axcodes(p.meta.affine) == ("R", "A", "S")
    np.testing.assert_allclose(p.meta.spacing, (2.0, 2.0, 3.0), atol=1e-6)
    check_alignment(p.image, p.label, p.meta.affine)
    back = restore_to_original(p.label, p.meta, is_label=True)
    assert back.shape == raw.image.shape
    for organ in (LIVER, SPLEEN, R_KIDNEY):
        a, b = back == organ, raw.label == organ
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85
    c = preprocess(ds.load(ds.refs[1]), cfg)  # LPS thorax CTA
    assert axcodes(c.meta.affine) == ("R", "A", "S") and c.label is None
    lo0, hi0 = world_extent(c.meta.original_shape, c.meta.original_affine)
    lo1, hi1 = world_extent(c.image.shape, c.meta.affine)
    # inside the original box, up to the half voxel that rounding the resampled size may add
    assert np.all(lo1 >= lo0 - 1.0) and np.all(hi1 <= hi0 + 1.0)
    dicom = open_dataset(real_ct_dir / "ts_b_upper_abdomen_dicom")
    assert dicom.kind == "folder" and len(dicom) == 1
    d = preprocess(dicom.load(dicom.refs[0]), PreprocessConfig())
    assert axcodes(d.meta.affine) == ("R", "A", "S") and d.image.shape[2] == 20
    back = restore_to_original(d.image, d.meta, is_label=False, fill=-1024)
    assert back.shape == (512, 512, 20)
