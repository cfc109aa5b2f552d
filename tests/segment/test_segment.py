"""voxdiff segment: output on the input's exact grid (RAS, LAS, LPS NIfTI, DICOM folder), volumes,
preview, refusal of bad model folders with a one-line error and no output."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from standin import tiny_segmenter

from voxdiff.cli import main
from voxdiff.core.errors import ModelError
from voxdiff.data.io import load_image, save_nifti
from voxdiff.data.preprocess import axcodes, to_ras
from voxdiff.segment import load_segmenter, segment_ct

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_ct"
if not REAL.exists():  # the shared data folder sits beside the repository root
    REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real_ct"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_segmenter(tmp_path_factory.mktemp("m") / "model", head="nonlinear")


@pytest.fixture(scope="module")
def ras_ct(tmp_path_factory):
    from voxdiff.data.phantom import PhantomConfig, generate_phantom

    c = generate_phantom(5, PhantomConfig(shape=(40, 36, 24)))
    p = tmp_path_factory.mktemp("ct") / "ras.nii.gz"
    save_nifti(p, c.image, c.meta.affine, dtype=np.int16)
    return p


def _reorient(src: Path, dst: Path, flips: tuple[int, ...]) -> Path:
    """Same physical image stored with the given voxel axes flipped (e.g. RAS -> LAS / LPS)."""
    img = nib.load(str(src))
    arr = np.asarray(img.dataobj)
    aff = img.affine.copy()
    for ax in flips:
        arr = np.flip(arr, ax)
        n = arr.shape[ax]
        aff[:3, 3] = aff[:3, 3] + aff[:3, ax] * (n - 1)
        aff[:3, ax] = -aff[:3, ax]
    save_nifti(dst, np.ascontiguousarray(arr), aff, dtype=np.int16)
    return dst


def test_output_grid_equals_input_grid_for_ras_las_lps(model, ras_ct, tmp_path):
    seg = load_segmenter(model)
    las = _reorient(ras_ct, tmp_path / "las.nii.gz", (0,))
    lps = _reorient(ras_ct, tmp_path / "lps.nii.gz", (0, 1))
    results = {}
    for name, src, codes in (("ras", ras_ct, "RAS"), ("las", las, "LAS"), ("lps", lps, "LPS")):
        assert "".join(axcodes(nib.load(str(src)).affine)) == codes
        out = tmp_path / f"seg_{name}.nii.gz"
        res = segment_ct(seg, src, out, progress=False)
        inp, o = nib.load(str(src)), nib.load(str(out))
        assert o.shape == inp.shape
        np.testing.assert_allclose(o.affine, inp.affine, atol=1e-5)
        assert o.get_data_dtype() == np.uint8
        lab = np.asarray(o.dataobj)
        assert set(np.unique(lab)) <= set(range(14))
        vox_ml = abs(np.linalg.det(inp.affine[:3, :3])) / 1000
        assert res["volumes_ml"]["liver"] == pytest.approx((lab == 6).sum() * vox_ml)
        results[name] = to_ras(lab, o.affine)[0]
    # the same physical image gives the same labels whatever the storage orientation
    np.testing.assert_array_equal(results["las"], results["ras"])
    np.testing.assert_array_equal(results["lps"], results["ras"])


def write_dicom(folder: Path, hu: np.ndarray, spacing=(0.9, 0.8, 2.5), origin=(-30.0, -20.0, 40.0)) -> Path:
    """One CT slice per file, axial, LPS patient frame; x = columns, y = rows, z = slices."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series = generate_uid()
    for k in range(hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"s{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID = "CT", series
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.InstanceNumber = k + 1
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray((hu[:, :, k].T + 1024).clip(0, 4000).astype(np.uint16)).tobytes()
        ds.save_as(str(folder / f"s{k:03d}.dcm"), enforce_file_format=True)
    return folder


def test_dicom_folder_input(model, ras_ct, tmp_path):
    hu, _ = load_image(ras_ct)
    d = write_dicom(tmp_path / "dicom", hu)
    ref_hu, ref_aff = load_image(d)
    out = tmp_path / "seg.nii.gz"
    segment_ct(model, d, out, preview=tmp_path / "p.png", progress=False)
    o = nib.load(str(out))
    assert o.shape == ref_hu.shape
    np.testing.assert_allclose(o.affine, ref_aff, atol=1e-4)
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.realdata
def test_real_dicom_series_matches_pseudo_label_grid(model, tmp_path):
    d = REAL / "ts_b_upper_abdomen_dicom"
    if not d.is_dir():
        pytest.skip("real CT samples not available")
    out = tmp_path / "b.nii.gz"
    segment_ct(model, d, out, progress=False)
    o, ref = nib.load(str(out)), nib.load(str(REAL / "ts_b_upper_abdomen_btcv13_pseudo.nii.gz"))
    hu, aff = load_image(d)
    assert o.shape == hu.shape == ref.shape
    np.testing.assert_allclose(o.affine, aff, atol=1e-4)  # the series' own grid (LPS storage)
    # the same physical grid as the pseudo-labels (stored LAS): equal once both are in RAS
    lab = np.asarray(o.dataobj)
    _, a1 = to_ras(lab, o.affine)
    _, a2 = to_ras(np.asarray(ref.dataobj), ref.affine)
    np.testing.assert_allclose(a1, a2, atol=1e-3)


def test_cli_prints_volumes_and_writes_preview(model, ras_ct, tmp_path, capsys):
    out, png = tmp_path / "s.nii.gz", tmp_path / "s.png"
    assert main(["segment", str(model), str(ras_ct), "-o", str(out), "--preview", str(png), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "liver" in text and "mL" in text
    assert out.is_file() and png.is_file()
    # existing output refused without --force
    assert main(["segment", str(model), str(ras_ct), "-o", str(out)]) == 2


def _broken(model: Path, tmp_path: Path, how: str) -> Path:
    bad = tmp_path / how
    shutil.copytree(model, bad)
    if how == "no_head":
        shutil.rmtree(bad / "head")
    elif how == "no_backbone_weights":
        (bad / "backbone" / "model.safetensors").unlink()
    elif how == "no_json":
        (bad / "segmenter.json").unlink()
    elif how == "new_version":
        doc = json.loads((bad / "segmenter.json").read_text())
        doc["format_version"] = 99
        (bad / "segmenter.json").write_text(json.dumps(doc))
    elif how == "head_kind":
        doc = json.loads((bad / "head" / "model.json").read_text())
        doc["kind"] = "bpr"
        (bad / "head" / "model.json").write_text(json.dumps(doc))
    elif how == "needs_bpr":
        doc = json.loads((bad / "segmenter.json").read_text())
        doc["bpr"] = True
        (bad / "segmenter.json").write_text(json.dumps(doc))
    return bad


@pytest.mark.parametrize("how,words", [
    ("no_head", "head/ part is missing"), ("no_backbone_weights", "backbone/ part is missing"),
    ("no_json", "segmenter.json is missing"), ("new_version", "format version 99"),
    ("head_kind", "expected 'head'"), ("needs_bpr", "bpr/ part is missing"),
])
def test_bad_model_folder_refused(model, ras_ct, tmp_path, capsys, how, words):
    bad = _broken(model, tmp_path, how)
    with pytest.raises(ModelError, match=words.replace("(", r"\(")):
        load_segmenter(bad)
    out = tmp_path / "out.nii.gz"
    assert main(["segment", str(bad), str(ras_ct), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("voxdiff: error:") and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_missing_input_refused(model, tmp_path, capsys):
    assert main(["segment", str(model), str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "o.nii.gz")]) == 2
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_segmenter_fitted_on_phantoms_says_so_on_other_ct_but_not_on_a_phantom(model, ras_ct, tmp_path, capsys):
    """A bundle whose record says it was fitted on phantoms warns on a CT that is not a phantom image
    (one line from the CLI; the output is still written), and stays quiet on a phantom; a bundle
    without that record never warns."""
    import warnings

    from voxdiff.core.errors import VoxdiffWarning
    from voxdiff.data.phantom import PHANTOM_DESCRIPTION, PhantomConfig, generate_phantom

    ph_model = tiny_segmenter(tmp_path / "ph_model", head="nonlinear", meta={"training_data": "phantoms"})
    c = generate_phantom(5, PhantomConfig(shape=(40, 36, 24)))
    phantom = save_nifti(tmp_path / "phantom.nii.gz", c.image, c.meta.affine, dtype=np.int16,
                         description=PHANTOM_DESCRIPTION)
    with pytest.warns(VoxdiffWarning, match="fitted on synthetic phantoms only"):
        segment_ct(ph_model, ras_ct, tmp_path / "a.nii.gz", progress=False)
    assert (tmp_path / "a.nii.gz").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error", VoxdiffWarning)
        segment_ct(ph_model, phantom, tmp_path / "b.nii.gz", progress=False)
        segment_ct(model, ras_ct, tmp_path / "c.nii.gz", progress=False)
    # the same labels whatever the warning: it only informs
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "a.nii.gz")).dataobj),
                                  np.asarray(nib.load(str(tmp_path / "c.nii.gz")).dataobj))
    capsys.readouterr()
    assert main(["segment", str(ph_model), str(ras_ct), "-o", str(tmp_path / "d.nii.gz"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if "synthetic phantoms only" in ln]
    assert len(warned) == 1 and warned[0].startswith("voxdiff: warning: ") and (tmp_path / "d.nii.gz").is_file()
