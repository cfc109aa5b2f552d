"""Images that are not CT in HU (masks, 0..1 or 8-bit images, constant volumes, a lost rescale
intercept) are refused by the shared check with a one-line reason naming the file, exit 2 and
nothing written; --allow_non_ct lets them through. Real CTs and phantoms pass. Folder mode does
not take mask series for CTs and says what it skipped."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from data_helpers import affine_for, synthetic_ct, write_dicom_series, write_nifti

from voxdiff.cli import main
from voxdiff.core.cli import WarningPrinter, one_line
from voxdiff.core.errors import InputError
from voxdiff.data.adapters import open_dataset
from voxdiff.data.ctcheck import check_ct, ct_problem
from voxdiff.data.io import load_image, source_name

AFF = affine_for("RAS", (1.5, 1.5, 3.0))
SHAPE = (20, 18, 10)


def _ct():
    return synthetic_ct(SHAPE)[0]


def _mask255():
    return np.where(_ct() > 45, 255, 0).astype(np.float32)


NOT_CT = {
    "mask 0/255": (_mask255, "distinct values (0, 255)"),
    "mask 0/1 int": (lambda: (_ct() > 45).astype(np.float32), "0..1"),
    "labels 0..13": (lambda: synthetic_ct(SHAPE)[1].astype(np.float32), "label map or mask"),
    "unit float": (lambda: np.clip((_ct() + 1000) / 2000, 0, 1).astype(np.float32), "0..1"),
    "z-scored": (lambda: (_ct() - _ct().mean()) / _ct().std(), "too narrow"),
    "constant": (lambda: np.full(SHAPE, -1000, np.float32), "constant image"),
    "8-bit image": (lambda: np.random.default_rng(0).integers(0, 256, SHAPE).astype(np.float32), "8-bit image"),
    "no intercept": (lambda: _ct() + 1024, "no negative values"),
    "narrow": (lambda: np.random.default_rng(0).normal(-20, 5, SHAPE).astype(np.float32), "too narrow"),
    "scaled x10": (lambda: _ct() * 10, "implausible histogram"),
}


@pytest.mark.parametrize("name", list(NOT_CT))
def test_ct_problem_names_what_is_wrong(name):
    make, words = NOT_CT[name]
    p = ct_problem(make())
    assert p is not None and words in p, p


def test_ct_like_volumes_pass(real_ct_dir):
    from voxdiff.data.phantom import PhantomConfig, generate_phantom

    assert ct_problem(_ct()) is None
    assert ct_problem(generate_phantom(1, PhantomConfig(shape=(48, 40, 24))).image) is None
    for f in ("ts_a_abdomen_ct.nii.gz", "ts_b_upper_abdomen_dicom", "ts_c_thorax_cta_ct.nii.gz"):
        hu, _ = load_image(real_ct_dir / f)
        assert ct_problem(hu) is None, f
        assert ct_problem(hu + 1024) is not None, f  # the same scan with its rescale intercept lost
    # the pseudo-label maps beside them are refused
    lab, _ = load_image(real_ct_dir / "ts_a_abdomen_btcv13_pseudo.nii.gz")
    assert "label map" in ct_problem(lab)


def test_check_ct_raises_naming_the_file_and_override_warns():
    with pytest.raises(InputError) as e:
        check_ct(_mask255(), "/x/mask.nii.gz")
    assert str(e.value).startswith("/x/mask.nii.gz: only 2 distinct values") and "--allow_non_ct" in str(e.value)
    with pytest.warns(UserWarning, match="accepted: --allow_non_ct"):
        check_ct(_mask255(), "/x/mask.nii.gz", allow_non_ct=True)


def _one_error_line(err, *needles):
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("voxdiff: error: ")]
    assert len(errors) == 1 and len(lines) == 1, err
    for n in needles:
        assert str(n) in errors[0], (n, errors[0])


def test_prepare_and_check_refuse_a_mask_and_allow_flag_accepts(tmp_path, capsys):
    p = write_nifti(tmp_path / "liver.nii.gz", _mask255(), AFF)
    cache = tmp_path / "cache"
    assert main(["data", "prepare", str(p), "--cache", str(cache)]) == 2
    _one_error_line(capsys.readouterr().err, p, "distinct values (0, 255)", "--allow_non_ct")
    assert not cache.exists()
    assert main(["data", "check", str(p)]) == 2
    out, err = capsys.readouterr()
    assert "PROBLEM" in out and "label map or mask" in out
    _one_error_line(err, p, "label map or mask")
    # an unusual but real CT: let through
    assert main(["data", "prepare", str(p), "--cache", str(cache), "--allow_non_ct", "--quiet"]) == 0
    assert any(cache.glob("*_image.npy"))
    assert main(["data", "check", str(p), "--allow_non_ct", "--quiet"]) == 0
    assert "accepted: --allow_non_ct" in capsys.readouterr().out


def test_warning_printer_once_one_line_and_quiet(capsys):
    with WarningPrinter():
        for _ in range(3):
            warnings.warn("/data/a: something\nodd", UserWarning)
        warnings.warn("/data/b: other", UserWarning)
    err = capsys.readouterr().err
    assert err.splitlines() == ["voxdiff: warning: /data/a: something odd", "voxdiff: warning: /data/b: other"]
    with WarningPrinter(quiet=True):
        warnings.warn("/data/a: something", UserWarning)
    assert capsys.readouterr().err == ""


def test_long_messages_are_cut_at_a_word_boundary():
    text = "unreadable DICOM pixel data (" + " ".join(["thequickbrownfox"] * 40) + ")"
    s = one_line(text, limit=100)
    assert s.endswith(" ...") and len(s) <= 104
    assert s[:-4].split(" ")[-1] == "thequickbrownfox"  # whole words only


def test_truncated_pixel_data_gives_the_key_fact(tmp_path, capsys):
    vol = np.rint(synthetic_ct((16, 14, 4))[0])
    paths = write_dicom_series(tmp_path / "s", vol)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 100])
    assert main(["data", "prepare", str(tmp_path / "s"), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    _one_error_line(err, paths[2].name, "bytes of pixel data present: truncated file")
    assert err.strip().endswith(")")  # the reason is complete, not cut mid-word


# --------------------------------------------------------------------------- folder mode


def _mask_series(folder, vol, **kw):
    """A DICOM series of a mask stored like a CT (values 0/255 after rescale)."""
    return write_dicom_series(folder, np.where(vol > 45, 255.0, 0.0), intercept=0.0, **kw)


def _structure_set(path):
    """A DICOM file without pixel data (an RT structure set)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path.parent.mkdir(parents=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "RTSTRUCT"
    ds.save_as(str(path), enforce_file_format=True)


def test_folder_mode_skips_mask_series_and_lists_them(tmp_path, capsys):
    vol = np.rint(_ct())
    root = tmp_path / "3Dircadb1.1"
    write_dicom_series(root / "PATIENT_DICOM", vol, series_uid="1.2.3.1")
    _mask_series(root / "MASKS_DICOM" / "liver", vol, series_uid="1.2.3.2")
    _mask_series(root / "MASKS_DICOM" / "portalvein", vol, series_uid="1.2.3.3")
    _mask_series(root / "extra" / "organ", vol, series_uid="1.2.3.4")  # name says nothing: values do
    write_nifti(root / "pseudo.nii.gz", (vol > 45).astype(np.uint8), AFF)  # 8-bit label map
    _structure_set(root / "contours" / "rs.dcm")
    with pytest.warns(UserWarning, match="skipped 4 mask or label") as rec:
        ds = open_dataset(root)
    assert [r.case_id for r in ds.refs] == ["PATIENT_DICOM"]
    skipped = {p.split("3Dircadb1.1/")[1]: why for p, why in ds.skipped}
    assert skipped == {"MASKS_DICOM": "mask or label folder name", "extra/organ": "values 0/255 only: a mask",
                       "pseudo.nii.gz": "uint8 voxels: a label map",
                       "contours": "no image pixel data (a structure set or report)"}
    assert len(rec) == 1
    # the check command lists what it skipped, and the CLI prints the warning in its own format
    assert main(["data", "check", str(root)]) == 0
    out, err = capsys.readouterr()
    assert "skipped (not a CT):" in out and "extra/organ" in out
    warn = [l for l in err.splitlines() if "warning" in l]
    assert len(warn) == 1 and warn[0].startswith(f"voxdiff: warning: {root}: skipped 4 mask or label")


def test_source_name_uses_series_description(tmp_path):
    vol = np.rint(_ct())
    paths = write_dicom_series(tmp_path / "case7" / "PATIENT_DICOM", vol)
    import pydicom

    for p in paths:
        ds = pydicom.dcmread(p)
        ds.SeriesDescription = "ABDOMEN 2.0 B30f"
        ds.save_as(p)
    assert source_name(tmp_path / "case7" / "PATIENT_DICOM") == "case7/PATIENT_DICOM: ABDOMEN 2.0 B30f"
    assert source_name(tmp_path / "x" / "ct.nii.gz") == "ct.nii.gz"


@pytest.mark.parametrize("modality, refused", [("MR", True), ("PT", True), ("SEG", True), ("CT", False), ("OT", False)])
def test_dicom_series_of_another_modality_refused_unless_allowed(tmp_path, capsys, modality, refused):
    import pydicom

    folder = tmp_path / f"series_{modality}"
    for f in write_dicom_series(folder, _ct()):  # CT-like values: only the tag says what it is
        ds = pydicom.dcmread(f)
        ds.Modality = modality
        ds.save_as(f)
    hu, _ = load_image(folder)
    if not refused:
        check_ct(hu, folder)
        return
    with pytest.raises(InputError, match=f"DICOM Modality is {modality}, not CT; if this is CT, pass --allow_non_ct"):
        check_ct(hu, folder)
    with pytest.warns(UserWarning, match="accepted: --allow_non_ct"):
        check_ct(hu, folder, allow_non_ct=True)
    cache = tmp_path / "cache"
    assert main(["data", "prepare", str(folder), "--cache", str(cache)]) == 2
    assert f"DICOM Modality is {modality}, not CT" in capsys.readouterr().err
