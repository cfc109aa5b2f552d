"""DICOM series reading: slice order, fallbacks with warnings, rescale to HU, affine (LPS -> RAS)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from data_helpers import write_dicom_series

from voxdiff.core.errors import InputError
from voxdiff.data.io import load_dicom_series, load_image


def _volume(shape=(12, 10, 7), seed=0):
    rng = np.random.default_rng(seed)
    v = rng.integers(-1000, 1500, size=shape).astype(np.float32)
    v[:, :, :] += np.arange(shape[2])[None, None, :] * 3  # slices differ
    return v


def expected_ras_affine(spacing, origin_lps, iop, normal_sign=1.0):
    iop = np.asarray(iop, float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[0]
    lps[:3, 1] = col * spacing[1]
    lps[:3, 2] = normal * spacing[2] * normal_sign
    lps[:3, 3] = origin_lps
    return np.diag([-1, -1, 1, 1.0]) @ lps


def test_shuffled_files_are_ordered_by_position(tmp_path):
    vol = _volume()
    write_dicom_series(tmp_path / "s", vol, spacing=(0.8, 0.7, 2.5), shuffle_seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning expected
        arr, aff, info = load_dicom_series(tmp_path / "s")
    assert info["order_by"] == "position"
    np.testing.assert_array_equal(arr, vol)
    np.testing.assert_allclose(aff, expected_ras_affine((0.8, 0.7, 2.5), (-100, -80, 50), (1, 0, 0, 0, 1, 0)), atol=1e-6)


def test_position_beats_instance_number(tmp_path):
    # instance numbers run opposite to the positions: positions must win
    vol = _volume()
    write_dicom_series(tmp_path / "s", vol, shuffle_seed=1)
    import pydicom

    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = 100 - int(ds.InstanceNumber)
        ds.save_as(f)
    arr, _, info = load_dicom_series(tmp_path / "s")
    assert info["order_by"] == "position"
    np.testing.assert_array_equal(arr, vol)


def test_oblique_orientation_affine(tmp_path):
    t = np.deg2rad(20)
    iop = (np.cos(t), np.sin(t), 0.0, 0.0, np.cos(t * 0.5), -np.sin(t * 0.5))
    vol = _volume((8, 9, 5))
    write_dicom_series(tmp_path / "s", vol, spacing=(1.0, 1.2, 3.0), iop=iop, shuffle_seed=0)
    arr, aff, _ = load_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(arr, vol)
    iop_n = np.asarray(iop)
    iop_n = np.concatenate([iop_n[:3] / np.linalg.norm(iop_n[:3]), iop_n[3:] / np.linalg.norm(iop_n[3:])])
    np.testing.assert_allclose(aff, expected_ras_affine((1.0, 1.2, 3.0), (-100, -80, 50), iop_n), atol=1e-4)


def test_degenerate_positions_fall_back_to_instance_number(tmp_path):
    vol = _volume()
    write_dicom_series(tmp_path / "s", vol, positions="equal", shuffle_seed=5)
    with pytest.warns(UserWarning, match="InstanceNumber"):
        arr, aff, info = load_dicom_series(tmp_path / "s")
    assert info["order_by"] == "InstanceNumber"
    np.testing.assert_array_equal(arr, vol)
    # spacing comes from SliceThickness when positions cannot give it
    np.testing.assert_allclose(np.linalg.norm(aff[:3, 2]), 2.5)


def test_missing_positions_and_numbers_fall_back_to_file_name(tmp_path):
    vol = _volume()
    write_dicom_series(tmp_path / "s", vol, positions="missing", instance_numbers=False,
                       names=lambda k: f"slice_{int(k) * 7 + 3}.dcm", shuffle_seed=2)
    with pytest.warns(UserWarning, match="file name"):
        arr, _, info = load_dicom_series(tmp_path / "s")
    assert info["order_by"] == "file name"
    np.testing.assert_array_equal(arr, vol)


def test_rescale_slope_intercept_to_hu(tmp_path):
    vol = (np.round(_volume() / 2) * 2).astype(np.float32)  # representable with slope 2
    write_dicom_series(tmp_path / "s", vol, slope=2.0, intercept=-2048.0)
    arr, _ = load_image(tmp_path / "s")
    np.testing.assert_array_equal(arr, vol)


def test_mixed_series_refused(tmp_path):
    vol = _volume((6, 6, 3))
    write_dicom_series(tmp_path / "s", vol, series_uid="1.2.3.4")
    write_dicom_series(tmp_path / "s", vol, series_uid="1.2.3.5", origin_lps=(0, 0, 200))
    with pytest.raises(InputError, match="mixed DICOM series"):
        load_image(tmp_path / "s")


def test_truncated_dicom_slice(tmp_path):
    vol = _volume((6, 6, 3))
    paths = write_dicom_series(tmp_path / "s", vol)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 40])
    with pytest.raises(InputError) as e:
        load_image(tmp_path / "s")
    assert paths[1].name in str(e.value)


def test_feet_first_descending_positions(tmp_path):
    # slices written with positions decreasing along the normal: order must still be by position
    vol = _volume((6, 5, 4))
    write_dicom_series(tmp_path / "s", vol[:, :, ::-1], origin_lps=(0, 0, 100), spacing=(1, 1, -2.0))
    arr, aff, _ = load_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(arr, vol)
    assert aff[2, 2] == pytest.approx(2.0)
    assert aff[2, 3] == pytest.approx(100 - 2.0 * 3)


def test_files_without_preamble_or_extension(tmp_path):
    import pydicom

    vol = _volume((6, 5, 4))
    paths = write_dicom_series(tmp_path / "s", vol, names=lambda k: f"IM{int(k):04d}", shuffle_seed=4)
    for p in paths:  # rewrite as old-style files: no preamble, no file meta
        ds = pydicom.dcmread(p)
        ds.preamble = None
        del ds.file_meta
        pydicom.dcmwrite(p, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
        assert p.read_bytes()[128:132] != b"DICM"
    (tmp_path / "s" / "notes").write_text("scanner notes, not DICOM")
    from voxdiff.data.io import is_dicom_dir

    assert is_dicom_dir(tmp_path / "s")
    arr, _ = load_image(tmp_path / "s")
    np.testing.assert_array_equal(arr, vol)
