"""bpr predict on inputs that are not what they seem: a mask is refused by the shared CT check
(exit 2, one line, no output) unless --allow_non_ct; an ape volume one slice short of the model
input gives no warning, one less than half of it along z does (once, in the CLI's format); the plot names
the case and keys the map colours."""

import nibabel as nib
import numpy as np
import torch
from bpr_helpers import z_textured_case
from PIL import Image

from voxdiff.bpr import build_bpr, save_bpr
from voxdiff.cli import main

PATCH = (24, 24, 24)


def _model(tmp_path):
    torch.manual_seed(0)
    m = build_bpr("ape", {"channels": (8, 8, 16, 16), "patch_size": PATCH})
    m.eval()
    save_bpr(tmp_path / "ape", m)
    return tmp_path / "ape"


def _ct(path, shape, spacing=3.0, values=None):
    c = z_textured_case(1, shape=shape, spacing=spacing)
    img = c.image if values is None else values(c.image)
    nib.save(nib.Nifti1Image(img.astype(np.int16), np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return path


def test_mask_refused_and_allow_flag(tmp_path, capsys):
    model = _model(tmp_path)
    mask = _ct(tmp_path / "liver_mask.nii.gz", (30, 30, 30), values=lambda a: np.where(a > 100, 255, 0))
    out = tmp_path / "map.nii.gz"
    assert main(["bpr", "predict", str(model), str(mask), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"voxdiff: error: {mask}: only 2 distinct values") and "--allow_non_ct" in err[0]
    assert not out.exists()
    assert main(["bpr", "predict", str(model), str(mask), "-o", str(out), "--allow_non_ct", "--quiet"]) == 0
    assert out.is_file() and capsys.readouterr().err.count("warning") == 0


def test_small_volume_warning_only_when_much_is_missing(tmp_path, capsys):
    model = _model(tmp_path)
    # one slice short of the model input along z (at the model's 3 mm): no warning
    ct = _ct(tmp_path / "short.nii.gz", (30, 28, PATCH[2] - 1))
    plot = tmp_path / "short.png"
    assert main(["bpr", "predict", str(model), str(ct), "-o", str(tmp_path / "a.nii.gz"), "--plot", str(plot)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert Image.open(plot).text["Title"] == "ape model: short.nii.gz"
    # less than half of it: one warning, in the CLI's format
    ct = _ct(tmp_path / "thin.nii.gz", (30, 28, PATCH[2] // 2 - 2))
    assert main(["bpr", "predict", str(model), str(ct), "-o", str(tmp_path / "b.nii.gz")]) == 0
    warn = [l for l in capsys.readouterr().err.splitlines() if "warning" in l]
    assert len(warn) == 1 and warn[0].startswith(f"voxdiff: warning: {ct}: volume") and "smaller than the model input" in warn[0]
    assert f"along z: {PATCH[2] // 2 - 2} voxels, under 50% of {PATCH[2]}" in warn[0]
