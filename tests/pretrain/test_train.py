"""The pretraining engine: learning, resume, atomic checkpoints, NaN handling, outputs, loading."""

import json
import shutil

import numpy as np
import pytest
import torch
from pretrain_synth import synthetic_cases

from voxdiff.core import trainstate as state_mod
from voxdiff.core.checkpoint import load_checkpoint, save_checkpoint
from voxdiff.core.config import from_dict
from voxdiff.core.errors import InputError, ModelError, TrainingError
from voxdiff.core.trainstate import latest_train_state, read_train_state
from voxdiff.pretrain.load import load_pretrained
from voxdiff.pretrain.train import PretrainConfig, lr_at, pretrain


def tiny(**kw) -> PretrainConfig:
    base = dict(method="diffusion", patch_size=(16, 16, 16), batch_size=2, steps=6, base_channels=4, num_levels=3,
                log_every=1, checkpoint_every=3, warmup_steps=2, lr=2e-3, bf16=False, diffusion_steps=100)
    base.update(kw)
    return from_dict(PretrainConfig, base)


@pytest.fixture(scope="module")
def cases():
    return synthetic_cases(3)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.device
def test_loss_decreases(tmp_path, cases, test_device):
    cfg = tiny(steps=60, log_every=10, checkpoint_every=100, base_channels=8, lr=3e-3, warmup_steps=5,
               prediction="epsilon", device=str(test_device))
    out = pretrain(cfg, tmp_path / "run", cases=cases, progress=False)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    for key in ("lr", "patches_per_s", "voxels_per_s", "grad_norm"):
        assert key in rows[-1]
    assert any(k.startswith("loss_t") for k in rows[-1])
    # outputs
    assert (out / "config.yaml").is_file() and (out / "backbone" / "model.safetensors").is_file()
    info = json.loads((out / "backbone" / "model.json").read_text())
    assert info["kind"] == "backbone" and info["config"]["method"] == "diffusion"
    assert info["config"]["preprocess"]["hu_window"] == [-1350.0, 1000.0]
    assert info["config"]["task"]["diffusion_steps"] == 100
    ex = load_pretrained(out, device=test_device)
    assert ex.method == "diffusion" and [lv.stride for lv in ex.levels] == [1, 2, 4]
    assert not any(p.requires_grad for p in ex.parameters())
    feats = ex(torch.rand(1, 1, 16, 16, 8, device=test_device))
    assert [f.shape[1] for f in feats] == [8, 16, 32]
    # the final weights are the EMA, not the online weights
    ts, _ = read_train_state(latest_train_state(out / "train_state"))
    w, _ = load_checkpoint(out / "backbone", kind="backbone")
    assert torch.equal(w["stem.weight"], ts["ema.stem.weight"])
    assert not torch.equal(w["stem.weight"], ts["model.backbone.stem.weight"])


def test_lr_schedule():
    cfg = tiny(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_resume_equals_uninterrupted(tmp_path, cases):
    cfg = tiny(steps=6, checkpoint_every=3)
    a = pretrain(cfg, tmp_path / "a", cases=cases, progress=False)
    b = pretrain(cfg, tmp_path / "b", cases=cases, progress=False, stop_after=3)
    assert not (b / "backbone").exists()
    assert read_train_state(latest_train_state(b / "train_state"))[1]["meta"]["step"] == 3
    pretrain(cfg, b, cases=cases, progress=False, resume=True)
    wa, _ = load_checkpoint(a / "backbone", kind="backbone")
    wb, _ = load_checkpoint(b / "backbone", kind="backbone")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    sa, _ = read_train_state(latest_train_state(a / "train_state"))
    sb, _ = read_train_state(latest_train_state(b / "train_state"))
    for k in sa:
        if k.startswith(("model.", "optim.")):
            assert torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6), k
    la = [r["loss"] for r in _metrics(a)]
    lb = [r["loss"] for r in _metrics(b)]
    assert len(la) == len(lb) == 6 and np.allclose(la, lb, atol=1e-6)


def test_resume_refuses_other_config_and_missing_state(tmp_path, cases):
    cfg = tiny(steps=4, checkpoint_every=2)
    out = pretrain(cfg, tmp_path / "r", cases=cases, progress=False, stop_after=2)
    with pytest.raises(InputError, match="different configuration.*base_channels"):
        pretrain(tiny(steps=4, checkpoint_every=2, base_channels=8), out, cases=cases, progress=False, resume=True)
    with pytest.raises(InputError, match="beyond --steps 1"):
        pretrain(tiny(steps=1, checkpoint_every=2), out, cases=cases, progress=False, resume=True)
    with pytest.raises(InputError, match="nothing to resume"):
        pretrain(cfg, tmp_path / "empty", cases=cases, progress=False, resume=True)


def test_output_folder_is_refused_unless_force(tmp_path, cases):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        pretrain(tiny(steps=1), out, cases=cases, progress=False)
    assert (out / "x").read_text() == "keep me"
    pretrain(tiny(steps=1), out, cases=cases, progress=False, force=True)
    assert not (out / "x").exists() and (out / "backbone").is_dir()


def test_bad_config_leaves_no_output(tmp_path, cases):
    with pytest.raises(InputError, match="multiple of 4"):
        pretrain(tiny(patch_size=(18, 16, 16)), tmp_path / "p", cases=cases, progress=False)
    with pytest.raises(InputError, match="unknown method"):
        pretrain(tiny(method="nope"), tmp_path / "p", cases=cases, progress=False)
    with pytest.raises(InputError, match="body part regressor"):
        pretrain(tiny(condition="ape"), tmp_path / "p", cases=cases, progress=False)
    with pytest.raises(InputError, match="data folder not found"):
        pretrain(tiny(data=[str(tmp_path / "nodata")]), tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()


def test_atomic_checkpoint_survives_a_failed_write(tmp_path, cases, monkeypatch):
    out = pretrain(tiny(steps=6, checkpoint_every=3), tmp_path / "c", cases=cases, progress=False, stop_after=3)
    good = latest_train_state(out / "train_state")
    calls = {"n": 0}
    real = state_mod.save_checkpoint

    def dying_save(path, tensors, *a, **kw):
        # write half of the new checkpoint, then "crash"
        calls["n"] += 1
        (path / "model.safetensors").write_bytes(b"\x00" * 100)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(state_mod, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny(steps=6, checkpoint_every=3), out, cases=cases, progress=False, resume=True)
    monkeypatch.setattr(state_mod, "save_checkpoint", real)
    assert calls["n"] == 1
    assert latest_train_state(out / "train_state") == good
    tensors, info = read_train_state(good)
    assert info["meta"]["step"] == 3 and "model.backbone.stem.weight" in tensors
    assert not [p for p in (out / "train_state").iterdir() if "partial" in p.name]
    # and it resumes from there
    pretrain(tiny(steps=6, checkpoint_every=3), out, cases=cases, progress=False, resume=True)
    assert (out / "backbone" / "model.json").is_file()


def test_nan_loss_stops_with_a_clear_message(tmp_path, cases, nan_task):
    out = tmp_path / "n"
    with pytest.raises(TrainingError, match=r"loss is nan at step 5.*last good checkpoint \(step 3\)"):
        pretrain(tiny(method="nan_after_3", steps=8, checkpoint_every=3), out, cases=cases, progress=False)
    assert latest_train_state(out / "train_state").name == "step_00000003"
    tensors, _ = read_train_state(latest_train_state(out / "train_state"))
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.dtype.is_floating_point)
    assert not (out / "backbone").exists()



def test_nan_before_the_first_checkpoint_leaves_no_run_folder(tmp_path, cases, nan_task):
    out = tmp_path / "n"
    with pytest.raises(TrainingError, match=r"loss is nan at step 5.*no checkpoint had been written"):
        pretrain(tiny(method="nan_after_3", steps=8, checkpoint_every=10), out, cases=cases, progress=False)
    assert not out.exists()  # nothing to resume: the folder does not block the next attempt
    pretrain(tiny(steps=2), out, cases=cases, progress=False)  # no --force needed
    assert (out / "backbone" / "model.json").is_file()

def test_random_method_writes_initial_weights(tmp_path, cases):
    out = pretrain(tiny(method="random", steps=100), tmp_path / "rnd", progress=False)  # no data needed
    assert not (out / "metrics.jsonl").exists()
    ex = load_pretrained(out)
    assert ex.method == "random" and ex.backbone.in_channels == 1 and not ex.backbone.time_embedding
    out2 = pretrain(tiny(method="random", steps=100), tmp_path / "rnd2", cases=cases, progress=False)
    w1, _ = load_checkpoint(out / "backbone", kind="backbone")
    w2, _ = load_checkpoint(out2 / "backbone", kind="backbone")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # seeded
    out3 = pretrain(tiny(method="random", seed=1), tmp_path / "rnd3", cases=cases, progress=False)
    w3, _ = load_checkpoint(out3 / "backbone", kind="backbone")
    assert not torch.equal(w1["stem.weight"], w3["stem.weight"])


def test_conditioned_run_bundles_the_bpr(tmp_path, cases):
    from voxdiff.bpr.models import build_bpr, save_bpr

    bpr = build_bpr("ape", {"channels": [4, 4, 4, 4]})
    bpr_dir = save_bpr(tmp_path / "bpr_model", bpr)
    cfg = tiny(condition="ape", bpr_path=str(bpr_dir), steps=2, feature_timesteps=(5, 20))
    out = pretrain(cfg, tmp_path / "cond", cases=cases, progress=False)
    assert (out / "bpr" / "model.json").is_file()
    shutil.rmtree(bpr_dir)  # the output folder is self-contained
    ex = load_pretrained(out / "backbone")
    assert ex.backbone.in_channels == 4 and ex.bpr is not None and ex.bpr.kind == "ape"
    assert [lv.channels for lv in ex.levels] == [8, 16, 32]  # two timesteps concatenated
    img = torch.rand(1, 1, 16, 16, 16)
    f = ex(img)
    assert [x.shape[1] for x in f] == [8, 16, 32]
    assert torch.equal(ex(img)[0], f[0])  # fixed noise: deterministic
    cond = ex.condition_map(img)
    assert cond.shape == (1, 3, 16, 16, 16)
    assert torch.equal(ex(img, coords=cond)[0], f[0])
    # without the bundled BPR the model cannot be rebuilt
    shutil.rmtree(out / "bpr")
    with pytest.raises(ModelError, match="body part regressor"):
        load_pretrained(out)


def test_position_conditioned_run_loads_without_a_bpr(tmp_path, cases):
    cfg = tiny(condition="position", steps=2)
    out = pretrain(cfg, tmp_path / "pos", cases=cases, progress=False)
    assert not (out / "bpr").exists()
    ex = load_pretrained(out / "backbone")
    assert ex.backbone.in_channels == 3 and ex.bpr is None and ex.condition_channels == 2
    img = torch.rand(1, 1, 16, 16, 16)
    cond = ex.condition_map(img)
    assert cond.shape == (1, 2, 16, 16, 16)
    f = ex(img)
    assert torch.equal(ex(img, coords=cond)[0], f[0])  # the map it computes is the one it is given
    assert not torch.equal(ex(img, coords=torch.zeros_like(cond))[0], f[0])  # and it is used


def test_incompatible_checkpoints_are_refused(tmp_path, cases):
    out = pretrain(tiny(steps=1), tmp_path / "m", cases=cases, progress=False)
    with pytest.raises(ModelError, match="not found"):
        load_pretrained(tmp_path / "missing")
    # another kind of model
    save_checkpoint(tmp_path / "head", {"w": torch.zeros(1)}, "head", {"x": 1})
    with pytest.raises(ModelError, match="'head' model, expected 'backbone'"):
        load_pretrained(tmp_path / "head")
    tensors, info = load_checkpoint(out / "backbone", kind="backbone")
    # newer format
    save_checkpoint(tmp_path / "newer", tensors, "backbone", info["config"], format_version=99)
    with pytest.raises(ModelError, match="newer"):
        load_pretrained(tmp_path / "newer")
    # unknown method
    save_checkpoint(tmp_path / "unk", tensors, "backbone", dict(info["config"], method="telepathy"))
    with pytest.raises(ModelError, match="unknown pretraining method 'telepathy'"):
        load_pretrained(tmp_path / "unk")
    # weights that do not fit the architecture
    bad = dict(info["config"], backbone=dict(info["config"]["backbone"], base_channels=8))
    save_checkpoint(tmp_path / "mismatch", tensors, "backbone", bad)
    with pytest.raises(ModelError, match="weights do not match"):
        load_pretrained(tmp_path / "mismatch")
    # a description without the backbone section
    save_checkpoint(tmp_path / "old", tensors, "backbone", {"method": "diffusion"})
    with pytest.raises(ModelError, match="incompatible"):
        load_pretrained(tmp_path / "old")
    # garbage weights
    (tmp_path / "garbage").mkdir()
    shutil.copy(out / "backbone" / "model.json", tmp_path / "garbage" / "model.json")
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="unreadable"):
        load_pretrained(tmp_path / "garbage")


def test_online_probe_logs_dice(tmp_path, cases):
    labelled = synthetic_cases(2)
    for c in labelled:  # label = the bright organ and the dark blob
        c.label = ((c.image > 120).astype(np.uint8) + 2 * (c.image < -700).astype(np.uint8) * (c.image > -900)).astype(np.uint8)
    cfg = tiny(steps=4, probe_every=2, log_every=2)
    out = pretrain(cfg, tmp_path / "p", cases=cases, probe_set=labelled, progress=False)
    rows = [r for r in _metrics(out) if "probe_dice" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(0 <= r["probe_dice"] <= 1 and r["probe_classes"] >= 1 for r in rows)
    with pytest.raises(InputError, match="probe.data"):
        pretrain(tiny(steps=2, probe_every=1), tmp_path / "q", cases=cases, progress=False)


def test_loss_decreases_on_phantoms(tmp_path):
    gen = pytest.importorskip("voxdiff.data.phantom.generator")
    pcfg = gen.PhantomConfig(shape=(48, 48, 32))
    phantoms = [gen.generate_phantom(s, pcfg, unlabelled=True) for s in (100, 101)]
    cfg = tiny(steps=40, log_every=10, checkpoint_every=100, base_channels=8, lr=3e-3, warmup_steps=5,
               batch_size=4)
    out = pretrain(cfg, tmp_path / "ph", cases=phantoms, progress=False)
    rows = _metrics(out)
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]


@pytest.mark.parametrize("prediction,schedule", [("v", "cosine"), ("sample", "linear")])
def test_bf16_and_other_targets_train(tmp_path, cases, prediction, schedule):
    cfg = tiny(steps=3, bf16=True, prediction=prediction, beta_schedule=schedule, log_every=1)
    out = pretrain(cfg, tmp_path / prediction, cases=cases, progress=False)
    rows = _metrics(out)
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    ex = load_pretrained(out)
    assert ex.task.process.prediction == prediction and ex.task.process.schedule == schedule
