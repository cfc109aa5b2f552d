"""benchmarks/bpr_anchor_swap.py: the ape model re-anchored on another slice model, evaluated on
z-crops with whole slices and narrowed in-plane."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from bpr_helpers import z_textured_case
from standin import load_benchmark

from voxdiff.bpr.models import build_bpr, save_bpr
from voxdiff.bpr.sampling import Volume
from voxdiff.bpr.train import calibrate_slice_anchor
from voxdiff.data.preprocess import hu_to_unit

PRE = {"spacing": [3.0, 3.0, 3.0], "hu_window": [-1350.0, 1000.0]}
SLICE_ARCH = {"channels": [4, 4], "patch_size": [16, 16, 1]}


def _models():
    torch.manual_seed(0)
    ape = build_bpr("ape", {"channels": (4, 4, 4), "patch_size": (16, 16, 16), "anchor": "slice",
                            "slice_arch": SLICE_ARCH, "anchor_fit": "local"}, PRE).eval()
    other = build_bpr("slice", {"channels": (4, 4), "patch_size": (16, 16, 1)}, PRE).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ape, other


def _vols(n=3):
    return [Volume(torch.from_numpy(hu_to_unit(z_textured_case(s, shape=(24, 24, 48)).image, PRE["hu_window"]))[None, None],
                   np.diag([3.0, 3.0, 3.0, 1.0]), f"v{s}") for s in range(n)]


def test_reanchor_embeds_the_slice_model_refits_g_and_leaves_the_ape_model_alone(tmp_path):
    sw = load_benchmark("bpr_anchor_swap")
    ape, other = _models()
    vols = _vols()
    before = {k: v.clone() for k, v in ape.state_dict().items()}
    m = sw.reanchor(ape, other, vols)
    for k, v in ape.state_dict().items():  # the given model is untouched
        torch.testing.assert_close(v, before[k])
    for k, v in other.state_dict().items():
        torch.testing.assert_close(m.slice_model.state_dict()[k], v)
    # g is the fit on those volumes with that slice model, not the old one
    ref = build_bpr("ape", {"channels": (4, 4, 4), "patch_size": (16, 16, 16), "anchor": "slice",
                            "slice_arch": SLICE_ARCH, "anchor_fit": "local"}, PRE).eval()
    ref.load_state_dict(before)
    ref.slice_model.load_state_dict(other.state_dict())
    calibrate_slice_anchor(ref, vols)
    torch.testing.assert_close(m.s_values, ref.s_values)
    assert not torch.allclose(m.s_values, ape.s_values)
    with pytest.raises(ValueError, match="slice model"):
        sw.reanchor(ape, ape, vols)


def test_main_writes_z_only_and_inplane_rows(tmp_path, capsys):
    sw = load_benchmark("bpr_anchor_swap")
    ape, other = _models()
    save_bpr(tmp_path / "ape", ape)
    save_bpr(tmp_path / "slice", other)
    for name, seeds in (("train", (0, 1, 2)), ("cts", (5, 6))):
        (tmp_path / name).mkdir()
        for s in seeds:
            c = z_textured_case(s, shape=(32, 28, 48))
            nib.save(nib.Nifti1Image(c.image.astype(np.int16), c.meta.affine), str(tmp_path / name / f"ct{s}.nii.gz"))
    out = tmp_path / "swap.json"
    assert sw.main([str(tmp_path / "ape"), "-", str(tmp_path / "slice"), "--train", str(tmp_path / "train"),
                    "--set", f"cts={tmp_path / 'cts'}", "--crops", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["slice_model"] != "-", r["inplane_min_frac"]) for r in rows] == [(False, 1.0), (False, 0.7), (True, 1.0), (True, 0.7)]
    for r in rows:
        assert np.isfinite(r["slope_mm_per_mm"]) and r["p95_abs_dz_mm_worst"] >= r["p95_abs_dz_mm"] - 1e-9
    assert rows[0]["slope_mm_per_mm"] != rows[2]["slope_mm_per_mm"]  # another anchor, another S
    assert "in-plane 0.7: |dz| median" in capsys.readouterr().out
    assert sw._dataset("t=runs/ph:test") == ("t", "runs/ph", "test")
    assert sw._dataset("r=../a/b.nii.gz") == ("r", "../a/b.nii.gz", "all")
