"""`voxdiff data ...` commands, and every kind of bad input: one line on stderr naming the file,
exit code 2, no partial output."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from data_helpers import affine_for, patch_pixdim, synthetic_ct, write_dicom_series, write_nifti

from voxdiff.cli import main

AFF = affine_for("RAS", (1.5, 1.5, 3.0))
SHAPE = (16, 14, 8)


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(err, *needles):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("voxdiff: error: ")
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


# ------------------------------------------------------------------ builders of bad inputs


def _img():
    return synthetic_ct(SHAPE)[0]


def missing(tmp):
    return tmp / "does_not_exist", tmp / "does_not_exist", "no such file"


def empty_folder(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty", tmp / "empty", "empty folder"


def garbage_file(tmp):
    p = tmp / "garbage.nii.gz"
    p.write_bytes(gzip.compress(b"this is not a nifti file at all" * 3))
    return p, p, "unreadable"


def truncated_file(tmp):
    p = write_nifti(tmp / "trunc.nii.gz", _img(), AFF)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p, p, "truncated"


def two_d(tmp):
    p = write_nifti(tmp / "flat.nii.gz", _img()[:, :, 0], AFF)
    return p, p, "not a 3D image"


def four_d(tmp):
    p = write_nifti(tmp / "dyn.nii.gz", np.stack([_img()] * 2, axis=-1), AFF)
    return p, p, "not a 3D image"


def nan_voxels(tmp):
    a = _img()
    a[3, 4, 5] = np.nan
    p = write_nifti(tmp / "nan.nii.gz", a, AFF)
    return p, p, "NaN or Inf"


def inf_voxels(tmp):
    a = _img()
    a[1, 1, 1] = np.inf
    p = write_nifti(tmp / "inf.nii.gz", a, AFF)
    return p, p, "NaN or Inf"


def zero_spacing(tmp):
    p = write_nifti(tmp / "zero.nii", _img(), AFF)
    patch_pixdim(p, (1.5, 0.0, 3.0))
    return p, p, "zero or negative voxel spacing"


def negative_spacing(tmp):
    p = write_nifti(tmp / "neg.nii", _img(), AFF)
    patch_pixdim(p, (1.5, -1.5, 3.0))
    return p, p, "zero or negative voxel spacing"


def spacing_in_wrong_unit(tmp):
    # 300 mm voxels (a header in the wrong unit): 4.8 x 4.2 x 2.4 m, which resampling would blow up
    p = write_nifti(tmp / "metres.nii.gz", _img(), affine_for("RAS", (300.0, 300.0, 300.0)))
    return p, p, "implausible size for a CT"


def dicom_spacing_in_wrong_unit(tmp):
    f = tmp / "dicom_far"
    write_dicom_series(f, _img(), spacing=(300.0, 300.0, 300.0))
    return f, f, "implausible size for a CT"


def _btcv(tmp, lab, lab_aff=AFF):
    root = tmp / "btcv"
    write_nifti(root / "img" / "img0001.nii.gz", _img(), AFF)
    lp = write_nifti(root / "label" / "label0001.nii.gz", lab, lab_aff)
    return root, lp


def shape_mismatch(tmp):
    root, lp = _btcv(tmp, np.zeros((16, 14, 9), np.uint8))
    return root, lp, "shape"


def affine_mismatch(tmp):
    aff = AFF.copy()
    aff[:3, 3] += (0.0, 4.0, 0.0)
    root, lp = _btcv(tmp, np.zeros(SHAPE, np.uint8), aff)
    return root, lp, "affine differs"


def label_outside_schema(tmp):
    lab = np.zeros(SHAPE, np.uint8)
    lab[2, 2, 2] = 14
    root, lp = _btcv(tmp, lab)
    return root, lp, "outside the"


def mixed_dicom(tmp):
    f = tmp / "dicom"
    write_dicom_series(f, _img(), series_uid="1.2.3.1")
    write_dicom_series(f, _img(), series_uid="1.2.3.2", origin_lps=(0, 0, 300))
    return f, f, "mixed DICOM series"


BAD = [missing, empty_folder, garbage_file, truncated_file, two_d, four_d, nan_voxels, inf_voxels,
       zero_spacing, negative_spacing, spacing_in_wrong_unit, dicom_spacing_in_wrong_unit, shape_mismatch,
       affine_mismatch, label_outside_schema, mixed_dicom]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__ for f in BAD])
def test_bad_input_check(make, tmp_path, capsys):
    data, named, problem = make(tmp_path)
    rc, out, err = run(["data", "check", str(data), "--json", str(tmp_path / "report.json")], capsys)
    assert rc == 2
    assert_one_line_error(err, named, problem)


@pytest.mark.parametrize("make", BAD, ids=[f.__name__ for f in BAD])
def test_bad_input_prepare_leaves_nothing(make, tmp_path, capsys):
    data, named, problem = make(tmp_path)
    cache = tmp_path / "cache"
    rc, out, err = run(["data", "prepare", str(data), "--cache", str(cache), "--workers", "1"], capsys)
    assert rc == 2
    assert_one_line_error(err, named, problem)
    assert not cache.exists()


def test_output_folder_not_empty(tmp_path, capsys):
    data = write_nifti(tmp_path / "ct.nii.gz", _img(), AFF)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    rc, _, err = run(["data", "prepare", str(data), "--cache", str(busy)], capsys)
    assert rc == 2
    assert_one_line_error(err, busy, "not empty")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    rc, out, _ = run(["data", "prepare", str(data), "--cache", str(busy), "--force"], capsys)
    assert rc == 0 and "prepared 1 new" in out

    # existing splits file / report file: refused without --force
    root, _ = _btcv(tmp_path, synthetic_ct(SHAPE)[1])
    target = tmp_path / "splits_final.json"
    target.write_text("[]")
    rc, _, err = run(["data", "splits", str(root), "--out", str(target), "--k", "2"], capsys)
    assert rc == 2
    assert_one_line_error(err, target, "exists")
    assert target.read_text() == "[]"
    rep = tmp_path / "report.json"
    rep.write_text("{}")
    rc, _, err = run(["data", "check", str(root), "--json", str(rep)], capsys)
    assert rc == 2 and rep.read_text() == "{}"
    assert_one_line_error(err, rep, "exists")


def test_check_good_dataset_report(tmp_path, capsys):
    root = tmp_path / "btcv"
    for i in (1, 2):
        img, lab = synthetic_ct(SHAPE, seed=i)
        write_nifti(root / "img" / f"img{i:04d}.nii.gz", img.astype(np.int16), AFF)
        write_nifti(root / "label" / f"label{i:04d}.nii.gz", lab, AFF)
    rep = tmp_path / "report.json"
    rc, out, err = run(["data", "check", str(root), "--json", str(rep)], capsys)
    assert rc == 0, err
    assert "0001" in out and "0002" in out and "2 cases (btcv)" in out and "all ok" in out
    doc = json.loads(rep.read_text())
    assert doc["ok"] and doc["n_cases"] == 2 and doc["kind"] == "btcv"
    assert doc["cases"][0]["labels"] == [1, 6, 13]
    assert doc["cases"][0]["shape"] == list(SHAPE)
    assert doc["cases"][0]["spacing"] == [1.5, 1.5, 3.0]


def test_check_reports_every_bad_case(tmp_path, capsys):
    root = tmp_path / "btcv"
    for i in (1, 2, 3):
        img, lab = synthetic_ct(SHAPE, seed=i)
        if i == 3:
            lab[0, 0, 0] = 99
        write_nifti(root / "img" / f"img{i:04d}.nii.gz", img.astype(np.int16), AFF)
        write_nifti(root / "label" / f"label{i:04d}.nii.gz", lab, AFF)
    rep = tmp_path / "r.json"
    rc, out, err = run(["data", "check", str(root), "--json", str(rep)], capsys)
    assert rc == 2
    assert_one_line_error(err, "1 of 3 cases has problems", "label0003.nii.gz", "99")
    assert "3 cases (btcv)" in out and "1 with problems" in out
    doc = json.loads(rep.read_text())
    assert [c["ok"] for c in doc["cases"]] == [True, True, False]
    assert "PROBLEM" in out


def test_check_of_one_file_speaks_of_one_case(tmp_path, capsys):
    data, _, _ = garbage_file(tmp_path)
    rc, out, err = run(["data", "check", str(data)], capsys)
    assert rc == 2
    assert "1 case (" in out and "1 of 1 case has problems" in err, (out, err)


def test_prepare_partial_failure_exit_zero_and_lists(tmp_path, capsys):
    root = tmp_path / "ct"
    write_nifti(root / "good.nii.gz", _img(), AFF)
    bad = write_nifti(root / "bad.nii.gz", _img(), AFF)
    bad.write_bytes(bad.read_bytes()[:100])
    cache = tmp_path / "cache"
    rc, out, err = run(["data", "prepare", str(root), "--cache", str(cache), "--spacing", "[2,2,3]"], capsys)
    assert rc == 0
    assert "1 new" in out and "1 failed" in out and "bad.nii.gz" in out
    cfgs = list(cache.glob("prepare-*.yaml"))
    assert len(cfgs) == 1 and "spacing" in cfgs[0].read_text()


def test_splits_command(tmp_path, capsys):
    root = tmp_path / "btcv"
    for i in range(1, 11):
        write_nifti(root / "img" / f"img{i:04d}.nii.gz", np.zeros((4, 4, 4), np.int16), AFF)
        write_nifti(root / "label" / f"label{i:04d}.nii.gz", np.zeros((4, 4, 4), np.uint8), AFF)
    rc, out, err = run(["data", "splits", str(root), "--out", str(tmp_path / "s"), "--scheme", "btcv-vox2vec"], capsys)
    assert rc == 0, err
    s = json.loads((tmp_path / "s" / "splits_final.json").read_text())
    assert len(s) == 5 and all(len(f["test"]) == 2 and len(f["val"]) == 1 for f in s)
    assert (tmp_path / "s" / "splits_final.config.yaml").is_file()
