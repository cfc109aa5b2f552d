"""Training: a tiny run on phantoms improves the quality measures; resume; bad data; CLI."""

from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from bpr_helpers import z_textured_case

import voxdiff.bpr.train as train_mod
from voxdiff.bpr import BPRTrainConfig, build_bpr, load_bpr, train_bpr
from voxdiff.bpr.quality import ape_patch_quality, ape_quality, landmark_z, patch_disagreement, slice_quality
from voxdiff.cli import main
from voxdiff.core.config import from_dict
from voxdiff.core.errors import InputError, ModelError

TINY = dict(spacing=(6.0, 6.0, 6.0), channels=(8, 16, 16, 16), batch_size=4, checkpoint_every=1000, seed=0)


def _cfg(**flat) -> BPRTrainConfig:
    """A config from flat field names (``steps``, ``slice_patch``, ...), read into the sections."""
    return from_dict(BPRTrainConfig, flat)


def _untrained(cfg):
    torch.manual_seed(cfg.seed)
    d = cfg.data
    patch = (d.slice_patch, d.slice_patch, d.slices_per_sample) if cfg.kind == "slice" else (d.ape_patch,) * 3
    arch = {"channels": cfg.model.channels, "patch_size": patch}
    if cfg.kind == "slice" and cfg.model.slice_context:
        arch.update(context=cfg.model.slice_context, context_step=cfg.model.slice_context_step,
                    context_fill=cfg.model.slice_context_fill)
    if cfg.kind == "ape":
        arch["input_pool"] = cfg.model.ape_input_pool
    pp = cfg.preprocess
    m = build_bpr(cfg.kind, arch, preprocess={"spacing": list(pp.spacing), "hu_window": list(pp.hu_window)})
    return m.eval()


@pytest.mark.xdist_group("tiny_slice")
@pytest.mark.parametrize("context, step, fill", [(0, 1, "repeat"), (1, 2, "repeat"), (2, 2, "mask")])
def test_tiny_slice_training_improves_spearman(tiny_phantoms, tiny_slice_model, context, step, fill):
    _, test = tiny_phantoms
    cfg, folder = tiny_slice_model(context, step, fill)  # 300 steps of the tiny recipe (tests/bpr/conftest.py)
    assert (cfg.kind, cfg.optim.steps, cfg.model.slice_context, cfg.seed) == ("slice", 300, context, 0)
    before = slice_quality(_untrained(cfg), test)["spearman_mean"]
    m = load_bpr(folder, kind="slice")
    assert (m.context, m.context_step, m.context_fill) == (context, step if context else 1, fill)
    q = slice_quality(m, test)
    assert q["spearman_mean"] > before + 0.1, (before, q["spearman_mean"])
    # calibration: training scores span about 0..1, and the score grows toward the head
    cal = m.calibration_info
    assert cal["method"] == "percentiles" and cal["scale"] > 0
    assert set(q["landmarks"]) >= {"liver_centre", "liver_dome_top"}
    assert q["landmarks"]["liver_dome_top"]["mean"] > q["landmarks"]["liver_centre"]["mean"]
    # the trained score rises with z (a tiny model: on most test cases), and the landmark spread is
    # also given in mm of true z
    slopes = [r["slope_mm_per_mm"] for r in q["per_case"]]
    assert np.median(slopes) > 0, slopes
    lc = q["landmarks"]["liver_centre"]
    with_liver = [r["slope_mm_per_mm"] for r in q["per_case"] if "liver_centre" in r]
    assert lc["std_dz_mm"] == pytest.approx(lc["std_mm"] / np.median(with_liver), rel=1e-6)
    for f in ("model.safetensors", "model.json", "config.yaml", "log.csv", "metrics.json", "metrics.jsonl", "train_state/latest"):
        assert (folder / f).is_file()


def test_tiny_ape_training_improves_placement_and_consistency(tmp_path, tiny_phantoms):
    train, test = tiny_phantoms
    cfg = _cfg(kind="ape", steps=200, ape_patch=24, ape_input_pool=1, ape_points=96, lr=3e-3, **TINY)
    untrained = _untrained(cfg)
    before = ape_patch_quality(untrained, test, n_crops=12)
    d_before = patch_disagreement(untrained, test, n_pairs=2)["mean_mm"]
    train_bpr(cfg, tmp_path / "m", cases=train, progress=False)
    m = load_bpr(tmp_path / "m", kind="ape")
    assert m.head_kind == "anchor" and m.arch()["input_pool"] == cfg.model.ape_input_pool
    # every voxel placed by one patch alone: distances follow physical ones far better than untrained
    after = ape_patch_quality(m, test, n_crops=12)
    assert after["pearson_mean"] > before["pearson_mean"] + 0.1, (before["pearson_mean"], after["pearson_mean"])
    assert np.mean(after["position_rms_mm"]) < 0.85 * np.mean(before["position_rms_mm"])
    # same voxel in two overlapping patches
    d = patch_disagreement(m, test, n_pairs=2)["mean_mm"]
    assert d < 0.8 * d_before, (d_before, d)
    # the whole-volume map (sliding window) too
    assert ape_quality(m, test, n_points=300)["pearson_mean"] > 0.5
    # field-of-view consistency: random z-crops of a scan place the same slice alike
    from voxdiff.bpr.evaluate import crop_consistency

    cc_before = np.mean([crop_consistency(untrained, c, 4, 96.0)["median_abs_ds_mm"] for c in test])
    cc_after = np.mean([crop_consistency(m, c, 4, 96.0)["median_abs_ds_mm"] for c in test])
    assert cc_after < 0.85 * cc_before, (cc_before, cc_after)  # measured: 24.7 -> 17.7 mm


def test_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    cases = [z_textured_case(s, shape=(24, 24, 20)) for s in range(3)]
    cfg = _cfg(kind="slice", steps=6, slice_patch=16, slices_per_sample=4, batch_size=2,
                         channels=(4, 4, 4), checkpoint_every=2, spacing=(3.0, 3.0, 3.0))
    train_bpr(cfg, tmp_path / "full", cases=cases, progress=False)

    real_step = train_mod.slice_step
    calls = {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "slice_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_bpr(cfg, tmp_path / "cut", cases=cases, progress=False)
    assert not (tmp_path / "cut" / "model.json").exists()  # no final model from a crashed run
    monkeypatch.setattr(train_mod, "slice_step", real_step)
    with pytest.raises(InputError, match="not empty"):
        train_bpr(cfg, tmp_path / "cut", cases=cases, progress=False)  # neither resume nor force
    with pytest.raises(ModelError, match="cannot resume"):
        train_bpr(replace(cfg, data=replace(cfg.data, slice_patch=20)), tmp_path / "cut", cases=cases,
                  resume=True, progress=False)
    train_bpr(cfg, tmp_path / "cut", cases=cases, resume=True, progress=False)
    a, b = load_bpr(tmp_path / "full"), load_bpr(tmp_path / "cut")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-6), k
    assert len((tmp_path / "cut" / "log.csv").read_text().strip().splitlines()) == 1 + 6


def test_unusable_training_data(tmp_path):
    ok = z_textured_case(0, shape=(24, 24, 20))
    single = z_textured_case(1, shape=(24, 24, 1))
    unit = z_textured_case(2, shape=(24, 24, 20))
    unit.image = np.random.default_rng(0).random(unit.image.shape).astype(np.float32)
    const = z_textured_case(3, shape=(24, 24, 20))
    const.image[:] = 40.0
    cfg = _cfg(kind="slice", steps=1, slice_patch=16, slices_per_sample=4, batch_size=2, channels=(4, 4, 4))
    with pytest.warns(UserWarning) as rec:
        train_bpr(cfg, tmp_path / "m", cases=[ok, single, unit, const], progress=False)
    msgs = " ".join(str(w.message) for w in rec)
    assert "single axial slice" in msgs and "0..1" in msgs and "constant" in msgs
    assert load_bpr(tmp_path / "m").kind == "slice"
    with pytest.warns(UserWarning), pytest.raises(InputError, match="no usable CT"):
        train_bpr(cfg, tmp_path / "none", cases=[single, unit], progress=False)
    assert not (tmp_path / "none").exists()
    with pytest.raises(InputError, match="kind"):
        train_bpr(_cfg(kind="banana"), tmp_path / "k", cases=[ok])


def test_landmarks_from_labels():
    lab = np.zeros((10, 10, 20), np.uint8)
    lab[2:5, 2:5, 4:9] = 6  # liver slices 4..8
    lab[6:8, 6:8, 2:5] = 2
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    aff[2, 3] = -100.0
    z = landmark_z(lab, aff)
    assert z["liver_centre"] == pytest.approx(-100 + 2 * 6)
    assert z["liver_dome_top"] == pytest.approx(-100 + 2 * 8)
    assert z["right_kidney_centre"] == pytest.approx(-100 + 2 * 3)
    assert "left_kidney_centre" not in z


def test_cli_train_and_resume(tmp_path, capsys):
    data = tmp_path / "cts"
    data.mkdir()
    for s in range(3):
        c = z_textured_case(s, shape=(24, 24, 20))
        nib.save(nib.Nifti1Image(c.image.astype(np.int16), c.meta.affine), str(data / f"ct{s}.nii.gz"))
    out = tmp_path / "model"
    args = ["bpr", "train", "--kind", "slice", "--data", str(data), "--out", str(out), "--quiet",
            "--data.slice_patch", "16", "--data.slices_per_sample", "4", "--data.batch_size", "2",
            "--model.channels", "[4,4,4]", "--runtime.checkpoint_every", "2"]
    assert main(args + ["--optim.steps", "2"]) == 0
    assert load_bpr(out).kind == "slice"
    assert main(args + ["--optim.steps", "4"]) == 2  # exists, no --resume/--force
    assert "not empty" in capsys.readouterr().err
    assert main(args + ["--optim.steps", "4", "--resume"]) == 0
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + 4
    assert main(["bpr", "train", "--kind", "slice", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_ape_crop_sizes_cover_every_cell_count():
    """Crop sizes stay in [ape_patch_min, ape_patch] and every number of encoder cells per axis that
    fits (2, 3, 4 for 32..64 voxels and 16-voxel cells) is drawn about equally often."""
    cfg = _cfg(kind="ape", ape_patch=64, ape_patch_min=32)
    rng = np.random.default_rng(0)
    sizes = np.array([train_mod.ape_crop_size(cfg, 16, rng) for _ in range(3000)])
    assert sizes.min() >= 32 and sizes.max() <= 64
    counts = np.bincount(sizes // 16, minlength=5)[2:5]
    assert (counts > 800).all(), counts
    assert (sizes == 64).sum() > 800  # the sliding-window size itself is trained often


def test_extra_ratio_sets_how_often_extra_data_is_drawn():
    from voxdiff.bpr.sampling import Volume
    from voxdiff.bpr.train import draw_volumes

    vols = [Volume(torch.zeros(1, 1, 8, 8, 8), np.eye(4), f"p{i}", 0) for i in range(9)] + \
        [Volume(torch.zeros(1, 1, 8, 8, 8), np.eye(4), "real", 1)]
    rng = np.random.default_rng(0)
    uniform = draw_volumes(vols, 20000, rng)
    assert abs(np.mean(uniform == 9) - 0.1) < 0.01
    half = draw_volumes(vols, 20000, rng, extra_ratio=0.5)
    assert abs(np.mean(half == 9) - 0.5) < 0.02
    assert set(np.unique(half[half != 9])) == set(range(9))
    with pytest.raises(InputError, match="extra_ratio"):
        train_bpr(_cfg(kind="slice", extra_ratio=1.5), "/nonexistent", cases=[])


def test_slice_context_settings_are_checked_before_training(tmp_path):
    for flat, match in (({"slice_context_step": 0, "slice_context": 2}, "slice_context_step"),
                        ({"slice_fov_aug": 0.5}, "slice_fov_aug needs"),
                        ({"slice_fov_aug": 1.5, "slice_context": 2}, r"slice_fov_aug must be in \[0, 1\]"),
                        ({"slice_fov_pair": True, "slice_context": 2}, "slice_fov_pair needs"),
                        ({"slice_trunc_aug": -0.1}, r"slice_trunc_aug must be in \[0, 1\]"),
                        ({"slice_fov_aug": 0.5, "slice_context": 2, "slice_fov_pair": True, "slice_fov_pair_range": "all"},
                         "slice_fov_pair_range must be"),
                        ({"slice_fov_aug": 0.5, "slice_context": 2, "slice_fov_pair_range": "whole"},
                         "slice_fov_pair_range needs"),
                        ({"slice_context": 2, "slice_context_fill": "zeros"}, "slice_context_fill must be one of"),
                        ({"slice_context_fill": "mask"}, "slice_context_fill needs a slice model with neighbouring")):
        with pytest.raises(InputError, match=match):
            train_bpr(_cfg(kind="slice", **flat), tmp_path / "m", cases=[])
        assert not (tmp_path / "m").exists()
    with pytest.raises(InputError, match="slice_trunc_aug is for the slice model"):
        train_bpr(_cfg(kind="ape", slice_trunc_aug=0.5), tmp_path / "m", cases=[])
    with pytest.raises(InputError, match="consistency_stop_grad is for the slice model"):
        train_bpr(_cfg(kind="ape", consistency_stop_grad=True), tmp_path / "m", cases=[])
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("stop_grad", [False, True])
def test_consistency_stop_grad_sends_no_gradient_through_the_fuller_view(monkeypatch, stop_grad):
    """``task.consistency_stop_grad``: with only the agreement term weighted, view b's input gets no
    gradient (its scores are a fixed target) while view a's does; without it both views get one."""
    from voxdiff.bpr.sampling import Volume

    real = train_mod.slice_views
    seen = []

    def views(*args, **kwargs):
        a, b, z, *outside = real(*args, **kwargs)
        a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        seen.append((a, b))
        return (a, b, z, *outside)

    monkeypatch.setattr(train_mod, "slice_views", views)
    cfg = train_mod.resolved(_cfg(kind="slice", slice_context=1, slice_fov_aug=1.0, slice_fov_pair=True, batch_size=2,
                                  w_order=0.0, w_distance=0.0, w_consistency=1.0, consistency_stop_grad=stop_grad,
                                  slice_patch=16, slices_per_sample=4, intensity_aug=0.0, channels=(4, 8)))
    model = _untrained(cfg)  # eval: BatchNorm's batch statistics would couple the views otherwise
    g = torch.Generator().manual_seed(0)
    vol = Volume(torch.rand(1, 1, 24, 24, 40, generator=g), np.diag([3.0, 3.0, 3.0, 1.0]), "v")
    loss, _ = train_mod.slice_step(model, [vol], cfg, np.random.default_rng(0))
    assert float(loss.detach()) > 0
    loss.backward()
    grads_a = [float(a.grad.abs().sum()) for a, _ in seen]
    grads_b = [float(b.grad.abs().sum()) if b.grad is not None else 0.0 for _, b in seen]
    assert min(grads_a) > 0
    assert (max(grads_b) == 0.0) if stop_grad else (min(grads_b) > 0)


@pytest.mark.xdist_group("tiny_slice")
def test_slice_teacher_distils_its_ordering_into_a_model_trained_on_no_other_loss(tmp_path, tiny_phantoms,
                                                                                   tiny_slice_model):
    """``task.slice_teacher``: with the order, distance and agreement losses off, a model trained only
    to match a trained teacher's scores of view b (in mm) orders the test phantoms' slices, and its
    scores in mm follow the teacher's; a teacher with other neighbouring slices, a teacher for an ape
    model and a negative weight are refused before anything is written."""
    from voxdiff.bpr.inference import slice_scores_volume
    from voxdiff.bpr.quality import _unit

    train, test = tiny_phantoms
    # the teacher: the tiny recipe with one neighbouring slice on each side, two voxels apart
    common = dict(kind="slice", steps=300, slice_patch=24, slices_per_sample=8, lr=3e-3, slice_context=1,
                  slice_context_step=2, **TINY)
    _, teacher_dir = tiny_slice_model(1, 2, "repeat")
    assert _cfg(**common) == tiny_slice_model(1, 2, "repeat")[0]
    teacher = load_bpr(teacher_dir, kind="slice")
    # the students: 150 steps (measured at 120 steps: Spearman -0.37 -> -0.03 and 0.35, distillation loss
    # 0.29-0.33 of its start, correlation with the teacher 0.99 and 0.89; at 300: 0.16 / 0.19, 0.18-0.29, 0.99 / 0.87)
    cfg = _cfg(**{**common, "steps": 150}, slice_teacher=str(teacher_dir), w_order=0.0, w_distance=0.0,
               w_consistency=0.0, slice_fov_aug=0.5, slice_fov_pair=True, slice_fov_pair_range="whole")
    cfg = replace(cfg, seed=1)
    before = slice_quality(_untrained(cfg), test)["spearman_mean"]
    train_bpr(cfg, tmp_path / "student", cases=train, progress=False)
    student = load_bpr(tmp_path / "student", kind="slice")
    from voxdiff.bpr.fields import model_signature

    saved = yaml.safe_load((tmp_path / "student" / "config.yaml").read_text())
    assert saved["slice_teacher_signature"] == model_signature(teacher)  # which teacher, not only its path
    q = slice_quality(student, test)
    assert q["spearman_mean"] > before + 0.1, (before, q["spearman_mean"])
    log = (tmp_path / "student" / "log.csv").read_text().splitlines()
    col = log[0].split(",").index("distill")
    first, last = (np.mean([float(r.split(",")[col]) for r in rows]) for rows in (log[1:21], log[-20:]))
    assert last < 0.5 * first, (first, last)
    # its scores in mm follow the teacher's over the test phantoms' slices (pooled)
    t_mm, s_mm = (np.concatenate([slice_scores_volume(m, _unit(c, teacher)) * m.mm_per_unit for c in test])
                  for m in (teacher, student))
    assert np.corrcoef(t_mm, s_mm)[0, 1] > 0.8, np.corrcoef(t_mm, s_mm)[0, 1]
    # a student told which neighbours lie beyond the scan ("mask") learns from a teacher that sees them
    # repeated: each scores the same stacked views its own way
    train_bpr(replace(cfg, model=replace(cfg.model, slice_context_fill="mask")), tmp_path / "masked", cases=train,
              progress=False)
    masked = load_bpr(tmp_path / "masked", kind="slice")
    assert masked.context_fill == "mask" and slice_quality(masked, test)["spearman_mean"] > before + 0.1
    m_mm = np.concatenate([slice_scores_volume(masked, _unit(c, teacher)) * masked.mm_per_unit for c in test])
    assert np.corrcoef(t_mm, m_mm)[0, 1] > 0.8, np.corrcoef(t_mm, m_mm)[0, 1]

    for flat, match in (({"slice_context": 2}, "neighbouring slices"), ({"w_distill": -1.0}, "w_distill must be")):
        with pytest.raises(InputError, match=match):
            train_bpr(_cfg(**{**common, "slice_teacher": str(teacher_dir), **flat}), tmp_path / "bad", cases=train)
        assert not (tmp_path / "bad").exists()
    with pytest.raises(InputError, match="slice_teacher is for the slice model"):
        train_bpr(_cfg(kind="ape", slice_teacher=str(teacher_dir)), tmp_path / "bad", cases=[])
    assert not (tmp_path / "bad").exists()


def test_resume_refuses_a_slice_teacher_whose_weights_changed(tmp_path, tiny_phantoms):
    """The teacher's weight signature is checked on --resume: another model at the same path is refused
    and the interrupted run is left as it was; the same teacher resumes."""
    import shutil

    train, _ = tiny_phantoms
    common = dict(kind="slice", steps=4, slice_patch=16, slices_per_sample=4, slice_context=1, **{**TINY, "checkpoint_every": 2})
    for name, seed in (("teacher", 0), ("other", 1)):
        train_bpr(_cfg(**{**common, "seed": seed}), tmp_path / name, cases=train, progress=False)
    student = tmp_path / "student"
    cfg = _cfg(**common, slice_teacher=str(tmp_path / "teacher"), slice_fov_aug=0.5, slice_fov_pair=True,
               slice_fov_pair_range="whole")
    train_bpr(cfg, student, cases=train, progress=False)
    shutil.copytree(tmp_path / "teacher", tmp_path / "teacher.bak")
    for f in ("model.safetensors", "model.json"):
        shutil.copy(tmp_path / "other" / f, tmp_path / "teacher" / f)
    before = (student / "model.safetensors").read_bytes()
    longer = replace(cfg, optim=replace(cfg.optim, steps=6))
    with pytest.raises(ModelError, match="cannot resume: this teacher"):
        train_bpr(longer, student, cases=train, resume=True, progress=False)
    assert (student / "model.safetensors").read_bytes() == before
    for f in ("model.safetensors", "model.json"):
        shutil.copy(tmp_path / "teacher.bak" / f, tmp_path / "teacher" / f)
    train_bpr(longer, student, cases=train, resume=True, progress=False)
    assert len((student / "log.csv").read_text().splitlines()) == 1 + 6
