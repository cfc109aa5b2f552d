"""predict_volume / the CLI: maps on the input's exact grid, and refusal of bad input."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from bpr_helpers import REAL_CT, z_textured_case

from voxdiff.bpr import build_bpr, predict_volume, save_bpr
from voxdiff.cli import main
from voxdiff.core.errors import InputError


def _saved_model(tmp_path, kind, calib=True):
    torch.manual_seed(0)
    anchored = kind == "ape-anchored"
    kind = "ape" if anchored else kind
    arch = {"channels": (8, 8, 16, 16), "patch_size": (24, 24, 24) if kind == "ape" else (32, 32, 8)}
    if anchored:  # S from an embedded slice model (an identity score -> S curve)
        arch.update(anchor="slice", slice_arch={"channels": [8, 8], "patch_size": [16, 16, 1]})
    m = build_bpr(kind, arch)
    if anchored:
        m.s_values.copy_(torch.linspace(-1.0, 1.0, m.anchor_knots))
    m.eval()
    path = tmp_path / f"model_{kind}"
    save_bpr(path, m)
    return path


def _write_ct(path, hu, affine):
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(path))
    return path


def _lps_ct(tmp_path, shape=(50, 40, 30)):
    """A CT stored LPS-oriented with anisotropic spacing and an offset: the map must come back on it."""
    c = z_textured_case(3, shape=shape, spacing=2.0)
    aff = np.array([[-1.5, 0, 0, 100.0], [0, -1.5, 0, 80.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    return _write_ct(tmp_path / "ct.nii.gz", c.image[::-1, ::-1, :], aff), aff


@pytest.mark.parametrize("kind", ["slice", "ape", "ape-anchored"])
def test_predict_writes_map_on_input_grid(tmp_path, kind):
    model = _saved_model(tmp_path, kind)
    kind = "ape" if kind == "ape-anchored" else kind
    ct, aff = _lps_ct(tmp_path)
    out = tmp_path / "out" / "map.nii.gz"
    s = predict_volume(model, ct, out, plot=tmp_path / "map.png")
    img = nib.load(str(out))
    expect = (50, 40, 30) if kind == "slice" else (50, 40, 30, 3)
    assert img.shape == expect
    assert np.allclose(img.affine, aff, atol=1e-4)
    data = np.asarray(img.dataobj)
    assert data.dtype == np.float32 and np.isfinite(data).all()
    if kind == "slice":
        # constant within every axial slice of the input (the file's z axis is S here)
        assert np.allclose(data, data[:1, :1, :], atol=1e-4)
        assert np.ptp(data[0, 0, :]) > 0
    assert (tmp_path / "map.png").stat().st_size > 1000
    assert (tmp_path / "out" / "map.bpr.yaml").is_file()
    assert s["shape"] == list(expect)


def test_predict_refuses_bad_ct_without_output(tmp_path):
    model = _saved_model(tmp_path, "slice")
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    cases = {
        "single": (np.random.default_rng(0).normal(0, 300, (40, 40, 1)), "single axial slice"),
        "unit": (np.random.default_rng(0).random((40, 40, 20)), "0..1"),
        "const": (np.full((40, 40, 20), -1000.0), "constant"),
        "tiny": (np.random.default_rng(0).normal(0, 500, (3, 3, 4)), "too small"),
    }
    for name, (arr, msg) in cases.items():
        p = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr.astype(np.float32), aff), str(p))
        out = tmp_path / f"{name}_map.nii.gz"
        with pytest.raises(InputError, match=msg):
            predict_volume(model, p, out)
        assert not out.exists()


def test_predict_warns_for_volume_smaller_than_model_input(tmp_path):
    model = _saved_model(tmp_path, "ape")
    c = z_textured_case(1, shape=(12, 12, 10), spacing=3.0)
    p = _write_ct(tmp_path / "small.nii.gz", c.image, np.diag([3.0, 3.0, 3.0, 1.0]))
    with pytest.warns(UserWarning, match="smaller than the model input"):
        predict_volume(model, p, tmp_path / "small_map.nii.gz")
    assert nib.load(str(tmp_path / "small_map.nii.gz")).shape == (12, 12, 10, 3)


def test_cli_predict_and_refusals(tmp_path, capsys):
    model = _saved_model(tmp_path, "slice")
    ct, _ = _lps_ct(tmp_path)
    out = tmp_path / "m.nii.gz"
    assert main(["bpr", "predict", str(model), str(ct), "-o", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shape"] == [50, 40, 30]
    # existing output needs --force
    assert main(["bpr", "predict", str(model), str(ct), "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    # a folder that is not a model
    (tmp_path / "notamodel").mkdir()
    assert main(["bpr", "predict", str(tmp_path / "notamodel"), str(ct), "-o", str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("voxdiff: error:") and "not a voxdiff model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.nii.gz").exists()


@pytest.mark.realdata
def test_predict_real_dicom_series(tmp_path):
    d = REAL_CT / "ts_b_upper_abdomen_dicom"
    if not d.is_dir():
        pytest.skip("real CT samples not available")
    model = _saved_model(tmp_path, "slice")
    out = tmp_path / "dcm_map.nii.gz"
    predict_volume(model, d, out)
    from voxdiff.data.io import load_image

    hu, aff = load_image(d)
    img = nib.load(str(out))
    assert img.shape == hu.shape and np.allclose(img.affine, aff, atol=1e-4)
