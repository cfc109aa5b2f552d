"""``voxdiff bpr evaluate``: field-of-view consistency, Spearman, landmarks; JSON + PNG; bad input."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from bpr_helpers import z_textured_case

from voxdiff.bpr.evaluate import BPREvalConfig, crop_consistency, crop_ranges, evaluate_bpr
from voxdiff.bpr.fields import CoordinateField
from voxdiff.bpr.models import build_bpr, save_bpr
from voxdiff.cli import main

PRE = {"spacing": [3.0, 3.0, 3.0], "hu_window": [-1350.0, 1000.0]}


def _ape():
    torch.manual_seed(0)
    return build_bpr("ape", {"channels": (4, 4, 4), "patch_size": (16, 16, 16)}, PRE).eval()


def test_crop_ranges_span_min_to_whole():
    r = crop_ranges(100, 2.0, 50, 96.0, np.random.default_rng(0))
    assert r[0] == (0, 100) and len(r) == 51
    lengths = [b - a for a, b in r]
    assert min(lengths) >= 48 and max(lengths) <= 100
    assert all(0 <= a < b <= 100 for a, b in r)
    assert crop_ranges(20, 3.0, 3, 96.0, np.random.default_rng(0)) == [(0, 20)] * 4  # scan shorter than 96 mm


def test_a_rigid_field_is_perfectly_consistent_and_a_shifting_one_is_not(monkeypatch):
    """The measure itself: zero for a map that ignores the field of view, the shift for one that moves."""
    import voxdiff.bpr.evaluate as E

    m = _ape()
    case = z_textured_case(0, shape=(24, 24, 60))
    mm = m.mm_per_unit

    def fixed(model, hu, spacing, **kw):  # S = physical z (the crop's z0 is unknown to it: use intensities)
        n = hu.shape[2]
        z0 = int(np.argmin(np.abs(case.image[12, 12, :] - hu[12, 12, 0])))
        prof = (z0 + np.arange(n)) * 3.0 / mm
        return CoordinateField(tuple(hu.shape), (0, 1, 2), (np.zeros(hu.shape[0]), np.zeros(hu.shape[1]), prof))

    monkeypatch.setattr(E, "volume_field", fixed)
    cc = crop_consistency(m, case, 6, 96.0, seed=1)
    assert cc["median_abs_ds_mm"] == pytest.approx(0.0, abs=1e-6)

    def moving(model, hu, spacing, **kw):  # S relative to the crop's own first slice
        prof = np.arange(hu.shape[2]) * 3.0 / mm
        return CoordinateField(tuple(hu.shape), (0, 1, 2), (np.zeros(hu.shape[0]), np.zeros(hu.shape[1]), prof))

    monkeypatch.setattr(E, "volume_field", moving)
    cc = crop_consistency(m, case, 6, 96.0, seed=1)
    starts = [a for a, _ in cc["crops"]]
    assert cc["max_abs_ds_mm"] == pytest.approx(3.0 * (max(starts) - min(starts)), rel=1e-6)
    assert cc["median_abs_ds_mm"] > 0



def test_z_only_consistency_separates_the_scans_coverage_from_the_inplane_field_of_view(monkeypatch):
    """A map that places S by true z but shifts it with the in-plane extent of its input: with in-plane
    crops the main measure sees the shift, the ``z_only_*`` entries (the same z-ranges, whole slices)
    see none; without in-plane crops the two are the same numbers. Overall and CLI line carry both."""
    import voxdiff.bpr.evaluate as E

    m = _ape()
    case = z_textured_case(0, shape=(24, 24, 60))
    slab = z_textured_case(1, shape=(24, 24, 20))  # 60 mm: shorter than the shortest crop (96 mm)
    known = [case, slab]
    mm = m.mm_per_unit

    def inplane_biased(model, hu, spacing, **kw):
        n = hu.shape[2]
        # the noise makes every voxel's value unique: find the crop's first slice in its case
        z0 = next(int(w[0][2]) for c in known if len(w := np.argwhere(c.image == hu[0, 0, 0])))
        prof = ((z0 + np.arange(n)) * 3.0 + 2.0 * (24 - hu.shape[0])) / mm  # 2 mm of S per voxel cut in x
        return CoordinateField(tuple(hu.shape), (0, 1, 2), (np.zeros(hu.shape[0]), np.zeros(hu.shape[1]), prof))

    monkeypatch.setattr(E, "volume_field", inplane_biased)
    rec = E.case_report(m, case, BPREvalConfig(n_crops=6, inplane_min_frac=0.5), seed=1)
    direct = crop_consistency(m, case, 6, 96.0, seed=1, inplane_min_frac=1.0)
    assert direct["crops"] == rec["crops"]  # the same z-ranges
    for k in ("median", "p95", "max"):
        assert rec[f"z_only_{k}_abs_ds_mm"] == pytest.approx(direct[f"{k}_abs_ds_mm"], abs=1e-9)
    assert rec["z_only_max_abs_ds_mm"] < 1.0 < rec["max_abs_ds_mm"]
    same = E.case_report(m, case, BPREvalConfig(n_crops=6, inplane_min_frac=1.0), seed=1)
    for k in E.CONSISTENCY_KEYS:
        assert same[f"z_only_{k}"] == same[k]
    overall = E.summarise([rec])
    assert overall["z_only_p95_abs_dz_mm"]["mean"] == pytest.approx(rec["z_only_p95_abs_dz_mm"])
    assert overall["p95_abs_ds_mm"]["mean"] > overall["z_only_p95_abs_ds_mm"]["mean"]
    # a slab shorter than the shortest crop has no z-crops: NaN, left out of the overall mean (not a 0)
    short = E.case_report(m, slab, BPREvalConfig(n_crops=3, inplane_min_frac=0.5), seed=1)
    assert not short["applicable"] and np.isnan(short["z_only_p95_abs_dz_mm"]) and short["p95_abs_ds_mm"] > 0
    both = E.summarise([rec, short])
    assert both["z_only_p95_abs_dz_mm"]["mean"] == pytest.approx(rec["z_only_p95_abs_dz_mm"])
    whole_only = E.case_report(m, slab, BPREvalConfig(n_crops=3, inplane_min_frac=1.0), seed=1)
    assert all(np.isnan(whole_only[k]) and np.isnan(whole_only[f"z_only_{k}"]) for k in E.CONSISTENCY_KEYS)
    assert E.summarise([rec, whole_only])["n_cases_without_dz"] == 0  # its S rises: nothing to excuse

def test_consistency_in_mm_of_true_z_does_not_reward_a_flat_score(monkeypatch):
    """|dS| shrinks with a model whose S moves less than z does; |dz| (|dS| over the whole scan's
    slope of S against z) does not: a map that is the same up to a factor scores the same."""
    import voxdiff.bpr.evaluate as E

    m = _ape()
    case = z_textured_case(0, shape=(24, 24, 60))
    cfg = BPREvalConfig(n_crops=6)
    reports = []
    for gain in (1.0, 0.25):
        def moving(model, hu, spacing, gain=gain, **kw):  # S relative to the crop's own first slice, scaled
            n = hu.shape[2]
            prof = gain * np.arange(n) * 3.0 / m.mm_per_unit
            return CoordinateField(tuple(hu.shape), (0, 1, 2), (np.zeros(hu.shape[0]), np.zeros(hu.shape[1]), prof))

        monkeypatch.setattr(E, "volume_field", moving)
        reports.append(E.case_report(m, case, cfg, seed=1))
    full, flat = reports
    assert full["slope_mm_per_mm"] == pytest.approx(1.0, rel=1e-6) and flat["slope_mm_per_mm"] == pytest.approx(0.25, rel=1e-6)
    for k in ("median", "p95", "max"):
        assert flat[f"{k}_abs_ds_mm"] == pytest.approx(0.25 * full[f"{k}_abs_ds_mm"], rel=1e-6)
        assert flat[f"{k}_abs_dz_mm"] == pytest.approx(full[f"{k}_abs_dz_mm"], rel=1e-6)
        assert full[f"{k}_abs_dz_mm"] == pytest.approx(full[f"{k}_abs_ds_mm"], rel=1e-6)
    assert full["p95_abs_dz_mm"] > 0
    overall = E.summarise(reports)
    assert overall["p95_abs_dz_mm"]["mean"] == pytest.approx(full["p95_abs_dz_mm"], rel=1e-6)
    assert overall["n_cases_without_dz"] == 0
    reversed_case = dict(full, slope_mm_per_mm=-0.5, p95_abs_dz_mm=float("nan"), median_abs_dz_mm=float("nan"),
                         max_abs_dz_mm=float("nan"))
    assert E.summarise([full, reversed_case])["n_cases_without_dz"] == 1  # left out of the mean, not hidden


def test_landmark_spread_in_mm_of_true_z_does_not_reward_a_flat_score():
    """Three subjects whose liver sits at different true z: a model that places S in true mm and one
    whose S moves 4x less than z get the same spread in mm of true z, though the flat one's spread of
    S is 4x smaller; a case whose S falls with z gives no slope, and the spread then has no |dz| value."""
    import voxdiff.bpr.evaluate as E
    from voxdiff.bpr.quality import landmark_spread

    liver_z = (-30.0, 0.0, 42.0)
    sd_true = float(np.std(liver_z, ddof=1))
    out = {}
    for gain in (1.0, 0.25):
        recs = [{"landmarks_s_mm": {"liver_centre": gain * z + 7.0}, "slope_mm_per_mm": gain,
                 "p95_abs_dz_mm": 1.0} for z in liver_z]
        out[gain] = E.summarise(recs)["landmark_spread_mm"]["liver_centre"]
    assert out[1.0]["std"] == pytest.approx(sd_true) and out[0.25]["std"] == pytest.approx(0.25 * sd_true)
    assert out[1.0]["std_dz"] == pytest.approx(sd_true) and out[0.25]["std_dz"] == pytest.approx(sd_true)
    # the median slope of the cases, not one case's slope
    mixed = landmark_spread({"liver_centre": [(0.0, 0.5), (10.0, 0.5), (20.0, 2.0)]})["liver_centre"]
    assert mixed["slope_mm_per_mm"] == pytest.approx(0.5) and mixed["std_dz_mm"] == pytest.approx(20.0)
    rev = landmark_spread({"liver_centre": [(0.0, -0.5), (10.0, -0.5)], "liver_dome_top": [(3.0, 1.0)]})
    assert np.isnan(rev["liver_centre"]["std_dz_mm"]) and "liver_dome_top" not in rev  # one case: no spread


def test_cli_writes_json_and_png_and_refuses_bad_input(tmp_path, capsys):
    model_dir = tmp_path / "bpr"
    save_bpr(model_dir, _ape())
    data = tmp_path / "cts"
    data.mkdir()
    for s in range(2):
        c = z_textured_case(s, shape=(32, 28, 48))
        nib.save(nib.Nifti1Image(c.image.astype(np.int16), c.meta.affine), str(data / f"ct{s}.nii.gz"))
    out = tmp_path / "ev"
    args = ["bpr", "evaluate", str(model_dir), str(data), "-o", str(out), "--n_crops", "3", "--quiet"]
    assert main(args) == 0
    line = capsys.readouterr().out
    assert "crop consistency" in line and "z-crops alone" in line  # the default narrows the field of view in-plane
    doc = json.loads((out / "summary.json").read_text())
    o = doc["overall"]
    assert (f"(inferior / superior half min {o['spearman_inferior_half']['min']:.3f} / "
            f"{o['spearman_superior_half']['min']:.3f})") in line
    assert "z_only_p95_abs_dz_mm" in doc["overall"] and "z_only_p95_abs_ds_mm" in doc["per_case"][0]
    assert doc["overall"]["n_cases"] == 2 and len(doc["per_case"]) == 2
    rec = doc["per_case"][0]
    for k in ("median_abs_ds_mm", "p95_abs_ds_mm", "spearman", "spearman_superior_half", "crops"):
        assert k in rec
    assert len(rec["crops"]) == 4
    assert (out / "consistency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").is_file()
    # existing report: refused, untouched
    before = (out / "summary.json").read_text()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("voxdiff: error:") and err.count("\n") == 1
    assert (out / "summary.json").read_text() == before
    # a folder that is not a body part regressor: refused, nothing written
    assert main(["bpr", "evaluate", str(data), str(data), "-o", str(tmp_path / "ev2")]) == 2
    assert not (tmp_path / "ev2").exists()
    with pytest.raises(Exception, match="n_crops"):
        evaluate_bpr(_ape(), [z_textured_case(0)], cfg=BPREvalConfig(n_crops=0))


def test_spearman_by_halves_catches_a_score_that_reverses_in_one_half():
    from voxdiff.bpr.quality import spearman_by_halves

    z = np.arange(40, dtype=np.float64)[::-1] * 3.0  # slices stored superior first: halves go by z, not index
    s = np.where(z < 60.0, z, 120.0 - z / 4)  # rises, then falls above z = 60 mm
    whole, inferior, superior = spearman_by_halves(s, z)
    assert inferior == pytest.approx(1.0) and superior == pytest.approx(-1.0) and -1.0 < whole < 1.0
    assert np.isnan(spearman_by_halves(s[:5], z[:5])[1])  # fewer than 3 slices in a half
