"""Missing slices in a DICOM series: detected from ImagePositionPatient and from InstanceNumber
(when the positions are degenerate), said in one warning, and the volume placed on the regular
grid of the complete series (the missing planes interpolated), so geometry matches the truth."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from data_helpers import synthetic_ct, write_dicom_series

from voxdiff.cli import main
from voxdiff.core.errors import InputError
from voxdiff.data.io import MAX_FILLED_SLICES, load_dicom_series, load_image

SPACING = (0.8, 0.7, 2.5)
ORIGIN = (-100.0, -80.0, 50.0)


def _truth(tmp_path, nz=16):
    """The complete series: its volume and affine (as read back), and the volume as written."""
    vol = synthetic_ct((20, 18, nz), seed=2)[0]
    vol = np.rint(vol)  # int16 on disk: exact round trip
    full = tmp_path / "full"
    write_dicom_series(full, vol, spacing=SPACING, origin_lps=ORIGIN)
    arr, aff, _ = load_dicom_series(full)
    np.testing.assert_array_equal(arr, vol)
    return vol, aff


def _series_without(tmp_path, vol, missing, positions):
    d = tmp_path / f"gap_{positions}_{len(missing)}"
    write_dicom_series(d, vol, spacing=SPACING, origin_lps=ORIGIN, positions=positions, shuffle_seed=7)
    for f in d.iterdir():
        if int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) - 1 in missing:
            f.unlink()
    return d


def _load(d):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        arr, aff, info = load_dicom_series(d)
    return arr, aff, info, [str(w.message) for w in rec]


@pytest.mark.parametrize("positions", ["normal", "equal"])
@pytest.mark.parametrize("n_missing", [1, 3])
def test_gap_detected_and_geometry_matches_truth(tmp_path, positions, n_missing):
    vol, true_aff = _truth(tmp_path)
    first = 6
    missing = set(range(first, first + n_missing))
    d = _series_without(tmp_path, vol, missing, positions)
    arr, aff, info, msgs = _load(d)
    gap = [m for m in msgs if "missing between" in m]
    assert len(gap) == 1, msgs
    # InstanceNumbers are 1-based: the slices around the gap are first and first + n_missing + 1
    if positions == "normal":
        z0, z1 = ORIGIN[2] + SPACING[2] * (first - 1), ORIGIN[2] + SPACING[2] * (first + n_missing)
        assert f"{n_missing} slice(s) missing between z={z0:.1f} mm and z={z1:.1f} mm" in gap[0]
        assert f"(InstanceNumber {first} and {first + n_missing + 1})" in gap[0]
    else:
        assert f"{n_missing} slice(s) missing between InstanceNumber {first} and {first + n_missing + 1}" in gap[0]
        assert any("ordering slices by InstanceNumber" in m for m in msgs)
    assert "interpolation" in gap[0] and gap[0].startswith(str(d))
    assert info["missing_slices"] == n_missing and info["n_files"] == vol.shape[2] - n_missing
    # the grid of the complete series: same shape and affine, every acquired slice at its true index
    assert arr.shape == vol.shape
    np.testing.assert_allclose(aff, true_aff, atol=1e-6)
    kept = [k for k in range(vol.shape[2]) if k not in missing]
    np.testing.assert_array_equal(arr[:, :, kept], vol[:, :, kept])
    # the missing planes: linear interpolation between the neighbours
    lo, hi = vol[:, :, first - 1], vol[:, :, first + n_missing]
    for j, k in enumerate(sorted(missing), start=1):
        w = j / (n_missing + 1)
        np.testing.assert_allclose(arr[:, :, k], (1 - w) * lo + w * hi, atol=1e-3)


def test_complete_series_gives_no_gap_warning(tmp_path):
    vol = np.rint(synthetic_ct((12, 10, 9))[0])
    for positions in ("normal", "equal"):
        d = tmp_path / positions
        write_dicom_series(d, vol, positions=positions, shuffle_seed=1)
        arr, _, info, msgs = _load(d)
        assert not [m for m in msgs if "missing" in m]
        assert info["missing_slices"] == 0
        np.testing.assert_array_equal(arr, vol)


def test_instance_numbers_starting_anywhere_are_not_gaps(tmp_path):
    vol = np.rint(synthetic_ct((12, 10, 9))[0])
    write_dicom_series(tmp_path / "s", vol, positions="equal", start_index=40)
    arr, _, info, msgs = _load(tmp_path / "s")
    assert info["missing_slices"] == 0 and arr.shape == vol.shape


def test_too_many_missing_slices_refused(tmp_path):
    vol = np.rint(synthetic_ct((12, 10, 20))[0])
    n = MAX_FILLED_SLICES + 1
    d = _series_without(tmp_path, vol, set(range(5, 5 + n)), "normal")
    with pytest.raises(InputError, match=f"{n} slices missing between .* too many to fill"):
        load_image(d)


def test_irregular_spacing_resampled_on_true_positions(tmp_path):
    # slices at z = 0, 2, 4, 6, 9, 12 mm (2 mm then 3 mm): not a gap; placed on a regular grid
    vol = np.zeros((6, 5, 6), np.float32)
    zs = np.array([0, 2, 4, 6, 9, 12], float)
    for k in range(6):
        vol[:, :, k] = 10 * zs[k]  # intensity = 10 x z: interpolation is exact
    d = tmp_path / "irr"
    write_dicom_series(d, vol, spacing=(1, 1, 1), origin_lps=(0, 0, 0))
    for f in d.iterdir():
        ds = pydicom.dcmread(f)
        k = int(ds.InstanceNumber) - 1
        ds.ImagePositionPatient = [0.0, 0.0, float(zs[k])]
        ds.save_as(f)
    arr, aff, info, msgs = _load(d)
    assert any("non-uniform slice spacing" in m for m in msgs)
    n = arr.shape[2]
    step = aff[2, 2]
    assert step * (n - 1) == pytest.approx(12.0) and aff[2, 3] == pytest.approx(0.0)
    # every plane holds the intensity of its true z
    np.testing.assert_allclose(arr[0, 0, :], 10 * step * np.arange(n), atol=1e-3)


def test_cli_warns_once_in_its_own_format_and_quiet_silences(tmp_path, capsys):
    vol = np.rint(synthetic_ct((16, 14, 12))[0])
    d = _series_without(tmp_path, vol, {5}, "equal")
    cache = tmp_path / "cache"
    assert main(["data", "prepare", str(d), "--cache", str(cache)]) == 0
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "warning" in l.lower()]
    gap = [l for l in lines if "missing between" in l]
    assert len(gap) == 1, err
    assert gap[0].startswith(f"voxdiff: warning: {d}: 1 slice(s) missing between InstanceNumber 5 and 7")
    assert all(l.startswith("voxdiff: warning: ") for l in lines), err
    assert "UserWarning" not in err and ".py:" not in err and "warnings.warn" not in err
    # --quiet, after the command or before it: no warning at all
    for argv in (["data", "prepare", str(d), "--cache", str(tmp_path / "c2"), "--quiet"],
                 ["--quiet", "data", "prepare", str(d), "--cache", str(tmp_path / "c3")]):
        assert main(argv) == 0
        assert "warning" not in capsys.readouterr().err
