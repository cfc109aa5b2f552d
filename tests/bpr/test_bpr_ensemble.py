"""``voxdiff bpr ensemble``: several slice models as one, the mean of their calibrated scores."""

import json

import numpy as np
import pytest
import torch

from voxdiff.bpr import BPREnsembleConfig, ensemble_slice_models, load_bpr, save_bpr, write_ensemble
from voxdiff.bpr.fields import model_signature, volume_field
from voxdiff.bpr.inference import slice_scores_volume
from voxdiff.bpr.models import build_bpr
from voxdiff.core.errors import InputError, ModelError

PRE = {"spacing": [3.0, 3.0, 3.0], "hu_window": [-1350.0, 1000.0]}


def _slice(seed, scale, offset, **arch):
    torch.manual_seed(seed)
    m = build_bpr("slice", {"channels": (4, 8), "patch_size": (16, 16, 1), **arch}, PRE)
    m.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        m(torch.rand(3, 1, 24, 20, 12))
    m.calib_scale.fill_(scale)
    m.calib_offset.fill_(offset)
    m.calibration_info = {"method": "percentiles", "scale": scale, "offset": offset}
    return m.eval()


@pytest.mark.parametrize("arch", [{}, {"context": 2, "context_step": 2}, {"context": 2, "context_step": 2, "context_fill": "mask"}])
def test_ensemble_scores_are_the_mean_of_the_members_calibrated_scores(tmp_path, arch):
    members = [_slice(s, sc, off, **arch) for s, sc, off in ((0, 2.0, -0.5), (1, 0.5, 0.3), (2, 1.5, 0.0))]
    for k, m in enumerate(members):
        save_bpr(tmp_path / f"m{k}", m)
    out = write_ensemble(BPREnsembleConfig(models=[str(tmp_path / f"m{k}") for k in range(3)]), tmp_path / "ens")
    ens = load_bpr(out, kind="slice")
    assert ens.n_members == 3 and not ens.training and all(not p.requires_grad for p in ens.parameters())
    x = torch.rand(2, 1, 24, 20, 15)
    want = torch.stack([m.slice_scores(x) for m in members]).mean(0)
    torch.testing.assert_close(ens.slice_scores(x), want, atol=1e-5, rtol=1e-5)
    # the whole-volume path too (tiles along z with the members' context)
    unit = np.random.default_rng(0).random((30, 26, 40)).astype(np.float32)
    want_v = np.mean([slice_scores_volume(m, unit) for m in members], axis=0)
    np.testing.assert_allclose(slice_scores_volume(ens, unit), want_v, atol=1e-5)
    # one unit: the harmonic mean of the members' mm per unit
    mm = [m.mm_per_unit for m in members]
    assert ens.mm_per_unit == pytest.approx(3 / sum(1 / v for v in mm))
    doc = json.loads((out / "model.json").read_text())
    assert doc["config"]["bpr_version"] == 3 and doc["config"]["arch"]["members"] == 3
    assert [m["calibration"]["scale"] for m in doc["config"]["calibration"]["members"]] == [2.0, 0.5, 1.5]
    assert (out / "config.yaml").is_file()
    # the condition cache tells the ensemble from any member and from another ensemble
    other = ensemble_slice_models([members[0], members[1]])
    sigs = {model_signature(ens), model_signature(other), *(model_signature(m) for m in members)}
    assert len(sigs) == 5


def test_an_ape_model_anchored_on_an_ensemble_is_version_3_and_round_trips(tmp_path):
    ens = ensemble_slice_models([_slice(0, 2.0, -0.5), _slice(1, 0.5, 0.3)])
    torch.manual_seed(0)
    ape = build_bpr("ape", {"channels": (4, 4, 4), "patch_size": (16, 16, 16), "anchor": "slice",
                            "slice_arch": ens.arch(), "anchor_fit": "line"}, PRE)
    ape.slice_model.load_state_dict(ens.state_dict())
    ape.s_values.copy_(torch.linspace(-1, 1, ape.anchor_knots))
    ape.eval()
    save_bpr(tmp_path / "a", ape)
    doc = json.loads((tmp_path / "a" / "model.json").read_text())
    assert doc["config"]["bpr_version"] == 3 and doc["config"]["arch"]["slice_arch"]["members"] == 2
    back = load_bpr(tmp_path / "a", kind="ape")
    hu = np.linspace(-900, 200, 30 * 24 * 40, dtype=np.float32).reshape(30, 24, 40)
    np.testing.assert_allclose(volume_field(back, hu, (3.0,) * 3).dense(), volume_field(ape, hu, (3.0,) * 3).dense(), atol=1e-5)
    # a file that claims an older version with an ensemble inside is refused
    doc["config"]["bpr_version"] = 2
    (tmp_path / "a" / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="ensemble of 2 members in a version-2"):
        load_bpr(tmp_path / "a")


def test_ensembles_of_models_that_do_not_fit_together_are_refused(tmp_path):
    save_bpr(tmp_path / "a", _slice(0, 1.0, 0.0))
    save_bpr(tmp_path / "b", _slice(1, 1.0, 0.0, context=1))
    save_bpr(tmp_path / "c", build_bpr("ape", {"channels": (4, 4, 4), "patch_size": (16, 16, 16)}, PRE))
    wide = _slice(2, 1.0, 0.0)
    wide.preprocess = dict(PRE, hu_window=[-1000.0, 1000.0])
    save_bpr(tmp_path / "d", wide)
    save_bpr(tmp_path / "e", ensemble_slice_models([_slice(0, 1.0, 0.0), _slice(3, 1.0, 0.0)]))
    save_bpr(tmp_path / "f", _slice(4, 1.0, 0.0, context=1, context_fill="mask"))
    cases = [([tmp_path / "a"], None, "at least two"),
             ([tmp_path / "a", tmp_path / "b"], tmp_path / "b", "context 1 differs from the first member's 0"),
             ([tmp_path / "a", tmp_path / "c"], tmp_path / "c", "'ape' body part regressor, expected 'slice'"),
             ([tmp_path / "a", tmp_path / "d"], tmp_path / "d", "preprocessing differs from the first member's (hu_window)"),
             ([tmp_path / "a", tmp_path / "e"], tmp_path / "e", "already an ensemble of 2"),
             ([tmp_path / "b", tmp_path / "f"], tmp_path / "f", "context_fill 'mask' differs from the first member's 'repeat'")]
    for models, where, msg in cases:
        with pytest.raises((InputError, ModelError), match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
            write_ensemble(BPREnsembleConfig(models=[str(m) for m in models]), tmp_path / "out")
        if where is not None:
            assert str(where) in str(e.value)
        assert not (tmp_path / "out").exists()
    ape = build_bpr("ape", {"channels": (4, 4, 4), "patch_size": (16, 16, 16)}, PRE)
    with pytest.raises(InputError, match="<model 1>: not a slice body part regressor"):
        ensemble_slice_models([_slice(0, 1.0, 0.0), ape])


def test_cli_writes_an_ensemble_and_refuses_bad_members_in_one_line(tmp_path, capsys):
    from voxdiff.cli import main

    for k in range(2):
        save_bpr(tmp_path / f"m{k}", _slice(k, 1.0 + k, 0.0))
    assert main(["bpr", "ensemble", str(tmp_path / "m0"), str(tmp_path / "m1"), "-o", str(tmp_path / "e")]) == 0
    assert load_bpr(tmp_path / "e").n_members == 2
    # an existing output is kept unless --force; a missing member names itself
    assert main(["bpr", "ensemble", str(tmp_path / "m0"), str(tmp_path / "m1"), "-o", str(tmp_path / "e")]) == 2
    assert main(["bpr", "ensemble", str(tmp_path / "m0"), str(tmp_path / "nothing"), "-o", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not empty" in err[0] and "nothing" in err[1], err
    assert not (tmp_path / "f").exists()


def test_benchmark_scores_every_subset_as_the_saved_ensemble_would(tmp_path, capsys):
    import nibabel as nib
    from bpr_helpers import z_textured_case
    from standin import load_benchmark

    from voxdiff.bpr.evaluate import BPREvalConfig, evaluate_bpr

    be = load_benchmark("bpr_ensembles")
    for k in range(3):
        save_bpr(tmp_path / f"m{k}", _slice(k, 1.0 + k, 0.1 * k))
    (tmp_path / "cts").mkdir()
    for s in (5, 6):
        c = z_textured_case(s, shape=(32, 28, 40))
        nib.save(nib.Nifti1Image(c.image.astype(np.int16), c.meta.affine), str(tmp_path / "cts" / f"ct{s}.nii.gz"))
    out = tmp_path / "rows.json"
    assert be.main([str(tmp_path / f"m{k}") for k in range(3)] + ["--set", f"cts={tmp_path / 'cts'}", "--k", "2",
                                                                 "--whole", "cts", "--target", "-1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [len(r["members"]) for r in rows] == [1, 1, 1, 2, 2, 2] and all(r["meets"] for r in rows)
    assert "2-model: 3 of 3 meet the target" in capsys.readouterr().out
    # the 0+2 row is what 'voxdiff bpr evaluate' gives the written ensemble of m0 and m2
    write_ensemble(BPREnsembleConfig(models=[str(tmp_path / "m0"), str(tmp_path / "m2")]), tmp_path / "e02")
    ev = evaluate_bpr(tmp_path / "e02", tmp_path / "cts", cfg=BPREvalConfig(n_crops=1), progress=False)["overall"]
    got = rows[4]["sets"]["cts"]
    assert rows[4]["members"] == [str(tmp_path / "m0"), str(tmp_path / "m2")]
    np.testing.assert_allclose(got, [ev["spearman"]["mean"], ev["spearman_inferior_half"]["mean"],
                                     ev["spearman_superior_half"]["mean"]], atol=1e-6)
    assert len({tuple(r["sets"]["cts"]) for r in rows}) > 1  # the subsets differ


def test_an_ape_model_trains_on_an_ensemble_anchor(tmp_path, tiny_phantoms):
    from voxdiff.bpr import BPRTrainConfig, train_bpr
    from voxdiff.core.config import from_dict

    train, _ = tiny_phantoms
    pre = dict(PRE, spacing=[6.0, 6.0, 6.0])
    for k in range(2):
        m = _slice(k, 1.0 + k, 0.0)
        m.preprocess = dict(m.preprocess, **pre)
        save_bpr(tmp_path / f"s{k}", m)
    write_ensemble(BPREnsembleConfig(models=[str(tmp_path / "s0"), str(tmp_path / "s1")]), tmp_path / "ens")
    cfg = from_dict(BPRTrainConfig, dict(kind="ape", steps=2, ape_patch=24, ape_input_pool=1, ape_points=32,
                                         channels=(4, 4, 4), spacing=(6.0, 6.0, 6.0), batch_size=2, seed=0,
                                         anchor="slice", slice_model=str(tmp_path / "ens")))
    train_bpr(cfg, tmp_path / "ape", cases=train, progress=False)
    ape = load_bpr(tmp_path / "ape", kind="ape")
    ens = load_bpr(tmp_path / "ens", kind="slice")
    assert ape.slice_model.n_members == 2 and ape.format_version == 3
    for k, v in ens.state_dict().items():  # the whole ensemble travels inside the ape model, unchanged
        torch.testing.assert_close(ape.slice_model.state_dict()[k], v)
    assert np.isfinite(volume_field(ape, np.asarray(train[0].image, dtype=np.float32), (6.0,) * 3).dense()).all()


def _members_cfg(**kw):
    from voxdiff.bpr import BPRTrainConfig
    from voxdiff.core.config import from_dict

    return from_dict(BPRTrainConfig, dict(kind="slice", steps=4, slice_patch=16, slices_per_sample=4, batch_size=2,
                                          channels=(4, 4, 4), checkpoint_every=2, spacing=(3.0, 3.0, 3.0), seed=3, **kw))


def test_training_with_members_writes_the_ensemble_of_one_run_per_seed_and_resumes(tmp_path, monkeypatch):
    from dataclasses import replace

    from bpr_helpers import z_textured_case

    import voxdiff.bpr.train as train_mod
    from voxdiff.bpr import train_bpr

    cases = [z_textured_case(s, shape=(24, 24, 20)) for s in range(3)]
    cfg = _members_cfg(members=3)
    out = train_bpr(cfg, tmp_path / "ens", cases=cases, progress=False)
    ens = load_bpr(out, kind="slice")
    assert ens.n_members == 3
    folders = [out / "members" / f"seed-{s}" for s in (3, 4, 5)]
    assert sorted(p.name for p in (out / "members").iterdir()) == [f.name for f in folders]
    # each member is the model that one run with its seed gives
    single = train_bpr(replace(cfg, members=1, seed=4), tmp_path / "s4", cases=cases, progress=False)
    for k, v in load_bpr(single).state_dict().items():
        torch.testing.assert_close(load_bpr(folders[1]).state_dict()[k], v)
    x = torch.rand(2, 1, 20, 20, 9)
    want = torch.stack([load_bpr(f).slice_scores(x) for f in folders]).mean(0)
    torch.testing.assert_close(ens.slice_scores(x), want, atol=1e-5, rtol=1e-5)
    doc = json.loads((out / "model.json").read_text())
    assert [m["model"] for m in doc["config"]["calibration"]["members"]] == [f"members/{f.name}" for f in folders]
    assert set(json.loads((out / "metrics.json").read_text())["members"]) == {f.name for f in folders}

    # interrupted in the second member: the first stays, no ensemble is written, --resume finishes it
    real_step, calls = train_mod.slice_step, {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # member 2, step 3 (after its checkpoint at step 2)
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "slice_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_bpr(cfg, tmp_path / "cut", cases=cases, progress=False)
    cut = tmp_path / "cut"
    assert (cut / "members" / "seed-3" / "model.json").is_file() and not (cut / "model.json").exists()
    assert not (cut / "members" / "seed-4" / "model.json").exists() and not (cut / "members" / "seed-5").exists()
    monkeypatch.setattr(train_mod, "slice_step", real_step)
    with pytest.raises(InputError, match="not empty"):
        train_bpr(cfg, cut, cases=cases, progress=False)  # neither resume nor force
    with pytest.raises(InputError, match="seed differ"):
        train_bpr(replace(cfg, seed=4), cut, cases=cases, resume=True, progress=False)
    with pytest.raises(InputError, match=r"seed-3: --resume: this finished member was trained with other settings \(optim\.lr\)"):
        train_bpr(replace(cfg, optim=replace(cfg.optim, lr=1e-2)), cut, cases=cases, resume=True, progress=False)
    assert "lr: 0.01" not in (cut / "config.yaml").read_text()  # refused before anything was written
    train_bpr(cfg, cut, cases=cases, resume=True, progress=False)
    for k, v in ens.state_dict().items():  # the same ensemble as the uninterrupted run
        torch.testing.assert_close(load_bpr(cut).state_dict()[k], v)


def test_members_settings_are_refused_before_training(tmp_path):
    from dataclasses import replace

    from bpr_helpers import z_textured_case

    from voxdiff.bpr import train_bpr
    from voxdiff.cli import main

    cases = [z_textured_case(0, shape=(24, 24, 20))]
    with pytest.raises(InputError, match="members must be >= 1"):
        train_bpr(_members_cfg(members=0), tmp_path / "a", cases=cases, progress=False)
    with pytest.raises(InputError, match="slice models"):
        train_bpr(replace(_members_cfg(members=2), kind="ape"), tmp_path / "b", cases=cases, progress=False)
    with pytest.raises(InputError, match="no members/ folder"):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "x.txt").write_text("user data")
        train_bpr(_members_cfg(members=2), tmp_path / "c", cases=cases, resume=True, progress=False)
    assert (tmp_path / "c" / "x.txt").read_text() == "user data"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main(["bpr", "train", "--kind", "ape", "--members", "2", "--data", str(tmp_path), "--out",
                 str(tmp_path / "d")]) == 2
