"""voxdiff segment on inputs that are not what they seem: a mask series is refused (exit 2, one line
naming the folder, nothing written), --allow_non_ct lets an unusual but real CT through, missing
slices give one warning in the CLI's format (--quiet silences it), and the preview names the case
and keys the organ colours."""

import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from standin import tiny_segmenter

from voxdiff.cli import main
from voxdiff.data.io import save_nifti

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from data_helpers import write_dicom_series  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_segmenter(tmp_path_factory.mktemp("m") / "model", head="nonlinear")


@pytest.fixture(scope="module")
def phantom():
    from voxdiff.data.phantom import PhantomConfig, generate_phantom

    c = generate_phantom(5, PhantomConfig(shape=(40, 36, 24)))
    return np.rint(c.image), c.meta.affine


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_mask_series_refused_nothing_written(model, phantom, tmp_path, capsys):
    hu, _ = phantom
    mask = tmp_path / "MASKS_DICOM" / "liver"
    write_dicom_series(mask, np.where(hu > 30, 255.0, 0.0), intercept=0.0)
    out, png = tmp_path / "seg.nii.gz", tmp_path / "seg.png"
    rc, text, err = _run(["segment", str(model), str(mask), "-o", str(out), "--preview", str(png)], capsys)
    assert rc == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"voxdiff: error: {mask}: only 2 distinct values (0, 255)")
    assert "--allow_non_ct" in lines[0]
    assert "mL" not in text and not out.exists() and not png.exists()


def test_allow_non_ct_lets_an_unusual_real_ct_through(model, phantom, tmp_path, capsys):
    hu, aff = phantom
    ct = save_nifti(tmp_path / "no_intercept.nii.gz", hu + 1024, aff, dtype=np.int16)  # lost rescale intercept
    out = tmp_path / "seg.nii.gz"
    rc, _, err = _run(["segment", str(model), str(ct), "-o", str(out), "--device", "cpu"], capsys)
    assert rc == 2 and "no negative values" in err and not out.exists()
    rc, text, err = _run(["segment", str(model), str(ct), "-o", str(out), "--device", "cpu", "--allow_non_ct"], capsys)
    assert rc == 0 and out.is_file() and "liver" in text
    warn = [l for l in err.splitlines() if l.startswith("voxdiff: warning:")]
    assert sum("accepted: --allow_non_ct" in w for w in warn) == 1
    assert all(w.startswith(f"voxdiff: warning: {ct}: ") for w in warn) and len(set(warn)) == len(warn)


def test_missing_slice_warned_once_and_quiet(model, phantom, tmp_path, capsys):
    hu, _ = phantom
    d = tmp_path / "PATIENT_DICOM"
    paths = write_dicom_series(d, hu, positions="equal", names=lambda k: f"IM{int(k):04d}.dcm")
    paths[10].unlink()  # InstanceNumber 11
    out = tmp_path / "seg.nii.gz"
    rc, _, err = _run(["segment", str(model), str(d), "-o", str(out), "--device", "cpu"], capsys)
    assert rc == 0
    warn = [l for l in err.splitlines() if "warning" in l.lower()]
    assert sum("1 slice(s) missing between InstanceNumber 10 and 12" in l for l in warn) == 1, err
    assert all(l.startswith(f"voxdiff: warning: {d}: ") for l in warn), err
    assert "UserWarning" not in err and ".py:" not in err
    # the output is on the complete grid (the gap filled)
    import nibabel as nib

    assert nib.load(str(out)).shape == hu.shape
    rc, _, err = _run(["segment", str(model), str(d), "-o", str(out), "--device", "cpu", "--force", "--quiet"], capsys)
    assert rc == 0 and "warning" not in err


def test_preview_names_the_case_and_keys_the_colours(model, phantom, tmp_path, capsys):
    from voxdiff.evaluate.figures import overlay_figure

    hu, _ = phantom
    d = tmp_path / "case7" / "PATIENT_DICOM"
    for p in write_dicom_series(d, hu):
        ds = pydicom.dcmread(p)
        ds.SeriesDescription = "ABDOMEN 2.0 B30f"
        ds.save_as(p)
    out, png = tmp_path / "seg.nii.gz", tmp_path / "seg.png"
    rc, _, _ = _run(["segment", str(model), str(d), "-o", str(out), "--preview", str(png), "--device", "cpu"], capsys)
    assert rc == 0
    title = Image.open(png).text["Title"]
    assert title.startswith("case7/PATIENT_DICOM: ABDOMEN 2.0 B30f")
    # the colour key widens the figure by a column of organ names
    lab = np.asarray(__import__("nibabel").load(str(out)).dataobj)
    assert lab.max() > 0
    plain = overlay_figure(hu, lab, tmp_path / "plain.png", title="x")
    keyed = overlay_figure(hu, lab, tmp_path / "keyed.png", title="x", legend={i: f"organ {i}" for i in range(1, 14)})
    assert Image.open(keyed).size[0] > Image.open(plain).size[0] + 30


def test_spacing_in_the_wrong_unit_refused_nothing_written(model, phantom, tmp_path, capsys):
    # a header whose spacing is in cm read as mm would be fine; one 100x too large (here 0.2 m voxels
    # taken as mm) makes an 8 x 7 x 5 m "CT" that resampling would turn into terabytes
    hu, aff = phantom
    far = aff.copy()
    far[:3, :3] *= 200.0 / np.linalg.norm(aff[:3, :3], axis=0)
    ct = save_nifti(tmp_path / "metres.nii.gz", hu, far, dtype=np.int16)
    out, png = tmp_path / "seg.nii.gz", tmp_path / "seg.png"
    out.write_bytes(b"keep me")  # an earlier result is not touched (the error comes before --force matters)
    rc, text, err = _run(["segment", str(model), str(ct), "-o", str(out), "--preview", str(png), "--force"], capsys)
    assert rc == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"voxdiff: error: {ct}: implausible size for a CT: 8,000 x 7,200 x 4,800 mm")
    assert "check the voxel spacing" in lines[0]
    assert out.read_bytes() == b"keep me" and not png.exists() and "mL" not in text


def test_out_of_memory_is_one_line_and_writes_nothing(model, phantom, tmp_path, capsys, monkeypatch):
    import importlib

    pre = importlib.import_module("voxdiff.data.preprocess")  # the module (the package exports a function of that name)
    hu, aff = phantom
    ct = save_nifti(tmp_path / "ct.nii.gz", hu, aff, dtype=np.int16)

    def no_memory(*a, **k):
        raise MemoryError("Unable to allocate 179. GiB for an array with shape (4000, 4000, 3000) and data type float32")

    monkeypatch.setattr(pre, "resample_to_spacing", no_memory)
    out = tmp_path / "seg.nii.gz"
    rc, text, err = _run(["segment", str(model), str(ct), "-o", str(out)], capsys)
    assert rc == 1
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("voxdiff: error: out of memory (Unable to allocate 179. GiB")
    assert not out.exists() and "mL" not in text


@pytest.mark.parametrize("option, value, problem", [("--overlap", "1.5", "overlap must lie in [0, 1), got 1.5"),
                                                    ("--sw_batch_size", "0", "sw_batch_size must be >= 1, got 0")])
def test_bad_window_settings_refused_nothing_written(model, phantom, tmp_path, capsys, option, value, problem):
    hu, aff = phantom
    ct = save_nifti(tmp_path / "ct.nii.gz", hu, aff, dtype=np.int16)
    out = tmp_path / "seg.nii.gz"
    rc, _, err = _run(["segment", str(model), str(ct), "-o", str(out), option, value], capsys)
    assert rc == 2 and [l for l in err.splitlines() if l.strip()] == [f"voxdiff: error: {problem}"]
    assert not out.exists()


@pytest.mark.parametrize("edit, problem", [
    (lambda d: d["preprocess"].update(hu_window=[1000, -1000]),
     "invalid preprocessing config (preprocess.hu_window must be two finite HU values, low < high"),
    (lambda d: d.update(labels={"1": "spleen"}), "label ids [1] do not match the head's 14 classes"),
    (lambda d: d.update(labels={"spleen": 1}), "labels must map integer label ids to organ names"),
])
def test_hand_edited_segmenter_description_refused(model, phantom, tmp_path, capsys, edit, problem):
    import json
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(model, bad)
    doc = json.loads((bad / "segmenter.json").read_text())
    edit(doc)
    (bad / "segmenter.json").write_text(json.dumps(doc))
    hu, aff = phantom
    ct = save_nifti(tmp_path / "ct.nii.gz", hu, aff, dtype=np.int16)
    out = tmp_path / "seg.nii.gz"
    rc, _, err = _run(["segment", str(bad), str(ct), "-o", str(out)], capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"voxdiff: error: {bad / 'segmenter.json'}: {problem}")
    assert not out.exists()


def test_force_never_overwrites_the_input_ct(model, phantom, tmp_path, capsys):
    hu, aff = phantom
    ct = save_nifti(tmp_path / "ct.nii.gz", hu, aff, dtype=np.int16)
    before = ct.read_bytes()
    rc, text, err = _run(["segment", str(model), str(ct), "-o", str(ct), "--force"], capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and "the output is an input of this command" in lines[0]
    assert ct.read_bytes() == before and "mL" not in text
    # refused before the model runs: nothing was written beside it either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_force_never_replaces_a_folder_holding_the_inputs(model, phantom, tmp_path, capsys):
    hu, aff = phantom
    folder = tmp_path / "scans"
    ct = save_nifti(folder / "ct.nii.gz", hu, aff, dtype=np.int16)
    rc, _, err = _run(["features", str(model), str(ct), "-o", str(folder), "--force", "--device", "cpu"], capsys)
    assert rc == 2 and "the output holds an input of this command" in err
    assert sorted(p.name for p in folder.iterdir()) == ["ct.nii.gz"]
    rc, _, err = _run(["data", "prepare", str(folder), "--cache", str(folder), "--force"], capsys)
    assert rc == 2 and "the cache folder is, or holds, the data set" in err
    assert sorted(p.name for p in folder.iterdir()) == ["ct.nii.gz"]
