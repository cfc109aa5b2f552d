"""The training engine (voxdiff.core.engine) on tiny inputs, and every loop that runs on it:
schedule values, EMA against a reference, exact resume, NaN stop, metrics, compile flag."""

from __future__ import annotations

import json
import math

import pytest
import torch
from standin import two_organ_case
from torch import nn

from voxdiff.core.config import from_dict
from voxdiff.core.engine import EMA, Engine, EngineConfig, TrainTask, lr_factor_at
from voxdiff.core.errors import InputError, TrainingError
from voxdiff.core.trainstate import latest_train_state, read_train_state

pytestmark = pytest.mark.usefixtures("one_thread")


class Regression(TrainTask):
    """y = x @ w_true with random batches from the engine's generator; loss NaN from ``nan_at`` on."""

    def __init__(self, nan_at: int | None = None):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.w = torch.arange(1.0, 5.0)[:, None] / 4
        self.nan_at = nan_at
        self.calls = 0

    def module(self):
        return self.net

    def step(self, model, batch, step, gen):
        self.calls += 1
        x = torch.randn(16, 4, generator=gen)
        noise = torch.randn(16, 1)  # the global torch generator: restored on resume too
        loss = ((model(x) - x @ self.w - 0.01 * noise) ** 2).mean()
        if self.nan_at is not None and step >= self.nan_at:
            loss = loss * float("nan")
        return loss, {"abs": loss.detach().sqrt()}


def _cfg(**kw) -> EngineConfig:
    base = dict(steps=12, lr=1e-2, warmup_steps=3, weight_decay=0.01, no_decay_1d=True, grad_clip=1.0,
                ema_decay=0.9, device="cpu", log_every=2, checkpoint_every=4, progress=False, seed=3)
    base.update(kw)
    return EngineConfig(**base)


def _state(folder):
    return read_train_state(latest_train_state(folder))


# ------------------------------------------------------------------------------------ pieces


def test_schedule_values():
    cfg = _cfg(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [lr_factor_at(s, cfg, 2.0) for s in range(12)]
    assert lrs[:2] == pytest.approx([1.0, 2.0])  # linear warm-up to the group's peak
    assert lrs[2] == pytest.approx(2.0)
    assert lrs[6] == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lrs[10] == pytest.approx(0.2) and lrs[11] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    const = _cfg(schedule="constant")
    assert [lr_factor_at(s, const, 0.3) for s in (0, 5, 100)] == [0.3, 0.3, 0.3]


def test_each_group_follows_the_schedule_from_its_own_peak():
    class TwoLr(Regression):
        def param_groups(self, module, cfg):
            return [{"params": list(module[0].parameters()), "base_lr": 1.0},
                    {"params": list(module[2].parameters())}]

    eng = Engine(_cfg(steps=10, lr=0.5, warmup_steps=0, min_lr_ratio=0.0), TwoLr())
    eng.set_lr(5)
    got = [g["lr"] for g in eng.optimizer.param_groups]
    assert got == pytest.approx([0.5, 0.25])


def test_ema_update_equals_a_reference_loop():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(m, 0.95)
    ref = {k: v.clone().double() for k, v in m.state_dict().items()}
    for step in range(30):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        m.train()
        m(torch.randn(5, 3))  # moves the BatchNorm statistics and its counter
        ema.update(m, step)
        d = min(0.95, (1 + step) / (10 + step))
        for k, v in m.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v.double() if v.is_floating_point() else v.clone().double()
    for k, v in ema.state().items():
        torch.testing.assert_close(v.double(), ref[k], atol=1e-5, rtol=1e-5)
    assert ema.state()["1.num_batches_tracked"].item() == 30


# ------------------------------------------------------------------------------------ the loop


def test_training_reduces_the_loss_and_logs(tmp_path):
    eng = Engine(_cfg(steps=40, lr=5e-2, checkpoint_every=0), Regression(), state_dir=tmp_path / "ts",
                 metrics_path=tmp_path / "m.jsonl")
    assert eng.fit() == 40
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 41, 2))
    assert rows[-1]["loss"] < 0.2 * rows[0]["loss"]
    assert {"loss", "abs", "lr", "grad_norm"} <= set(rows[-1])
    assert [p.name for p in (tmp_path / "ts").iterdir() if p.name.startswith("step_")] == ["step_00000040"]


def test_exact_resume_gives_the_uninterrupted_run(tmp_path):
    full = Engine(_cfg(), Regression(), state_dir=tmp_path / "a", metrics_path=tmp_path / "a.jsonl")
    full.fit()
    cut = Engine(_cfg(), Regression(), state_dir=tmp_path / "b", metrics_path=tmp_path / "b.jsonl")
    assert cut.fit(5) == 5  # stops after step 5 (checkpointed there)
    assert read_train_state(latest_train_state(tmp_path / "b"))[1]["meta"]["step"] == 5
    (tmp_path / "b.jsonl").open("a").write('{"step": 6, "loss": 123}\n')  # a line past the checkpoint
    resumed = Engine(_cfg(), Regression(), state_dir=tmp_path / "b", metrics_path=tmp_path / "b.jsonl", resume=True)
    assert resumed.start == 5
    resumed.fit()
    sa, _ = _state(tmp_path / "a")
    sb, _ = _state(tmp_path / "b")
    assert sa.keys() == sb.keys()
    for k in sa:
        if not k.startswith("rng."):
            assert torch.equal(sa[k], sb[k]), k
    la = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [2, 4, 5, 6, 8, 10, 12]
    assert [r["loss"] for r in la if r["step"] in (8, 10, 12)] == [r["loss"] for r in lb if r["step"] in (8, 10, 12)]


class ConvFit(TrainTask):
    """A 3D convolution fitted to a fixed target; on the CPU the engine stores its weights channels-last."""

    def __init__(self):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.SiLU(), nn.Conv3d(8, 2, 3, padding=1))

    def module(self):
        return self.net

    def step(self, model, batch, step, gen):
        x = torch.randn(2, 2, 8, 8, 8, generator=gen)
        return ((model(x) - x.flip(2)) ** 2).mean(), {}


def test_fused_adamw_resumes_channels_last_weights_exactly(tmp_path, monkeypatch):
    """The CPU optimiser is the fused AdamW, which walks each weight and its moments as flat arrays. The
    engine keeps conv weights channels-last while a train state stores the moments contiguous: a resume
    must give the moments their weights' layout again, or the update pairs the wrong elements."""
    import voxdiff.core.engine as eng

    def resumed_run(folder):
        Engine(_cfg(ema_decay=None), ConvFit(), state_dir=folder).fit(5)
        engine = Engine(_cfg(ema_decay=None), ConvFit(), state_dir=folder, resume=True)
        engine.fit()
        return engine

    full = Engine(_cfg(ema_decay=None), ConvFit(), state_dir=tmp_path / "a")
    assert full.optimizer.defaults.get("fused") is True
    assert full.module[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    full.fit()
    resumed = resumed_run(tmp_path / "b")
    w = resumed.module[0].weight
    assert resumed.optimizer.state[w]["exp_avg"].stride() == w.stride()
    for a, b in zip(full.module.parameters(), resumed.module.parameters()):
        assert torch.equal(a, b)
    # without the layout match the same resume drifts (what the helper exists for)
    monkeypatch.setattr(eng, "match_state_layout", lambda opt: None)
    drift = resumed_run(tmp_path / "c")
    assert not all(torch.equal(a, b) for a, b in zip(full.module.parameters(), drift.module.parameters()))


def test_resume_without_a_train_state_is_refused(tmp_path):
    with pytest.raises(InputError, match="nothing to resume"):
        Engine(_cfg(), Regression(), state_dir=tmp_path / "none", resume=True)


def test_nan_stop_keeps_the_last_good_state(tmp_path):
    task = Regression(nan_at=5)
    eng = Engine(_cfg(log_every=3, checkpoint_every=4), task, state_dir=tmp_path / "ts",
                 metrics_path=tmp_path / "m.jsonl")
    with pytest.raises(TrainingError, match=r"loss is nan at step 6: .*last good checkpoint \(step 4\)"):
        eng.fit()
    assert task.calls == 6  # found at the next log step, not at every step
    tensors, info = _state(tmp_path / "ts")
    assert info["meta"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    assert [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [3]


def test_compile_flag_compiles_the_module(monkeypatch):
    seen = []

    def fake_compile(m):
        seen.append(m)
        return m

    monkeypatch.setattr(torch, "compile", fake_compile)
    task = Regression()
    Engine(_cfg(steps=2, compile=True), task).fit()
    assert seen == [task.net]
    seen.clear()
    Engine(_cfg(steps=2), Regression()).fit()
    assert seen == []


# ------------------------------------------------------------------------------------ BPR


def _bpr_cfg(**kw):
    from voxdiff.bpr import BPRTrainConfig

    base = dict(kind="slice", steps=6, slice_patch=16, slices_per_sample=4, batch_size=2, channels=(4, 4, 4),
                checkpoint_every=2, spacing=(3.0, 3.0, 3.0))
    base.update(kw)
    return from_dict(BPRTrainConfig, base)  # flat names, read into the sections


@pytest.fixture(scope="module")
def bpr_cases():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "bpr"))
    from bpr_helpers import z_textured_case

    return [z_textured_case(s, shape=(24, 24, 20)) for s in range(3)]


def test_bpr_resume_with_stop_is_exact_and_old_format_is_refused(tmp_path, bpr_cases, monkeypatch):
    import voxdiff.bpr.train as bt
    from voxdiff.bpr import load_bpr, train_bpr

    cfg = _bpr_cfg()
    train_bpr(cfg, tmp_path / "full", cases=bpr_cases, progress=False)
    real_fit = bt.Engine.fit
    monkeypatch.setattr(bt.Engine, "fit", lambda self, end=None: real_fit(self, 3))  # an interrupted run
    train_bpr(cfg, tmp_path / "cut", cases=bpr_cases, progress=False)
    monkeypatch.setattr(bt.Engine, "fit", real_fit)
    train_bpr(cfg, tmp_path / "cut", cases=bpr_cases, progress=False, resume=True)
    a, b = load_bpr(tmp_path / "full"), load_bpr(tmp_path / "cut")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert (tmp_path / "full" / "log.csv").read_text() == (tmp_path / "cut" / "log.csv").read_text()

    old = tmp_path / "old"
    old.mkdir()
    (old / "train_state.safetensors").write_bytes(b"x")
    (old / "train_state.json").write_text("{}")
    with pytest.raises(InputError, match="older train-state format") as e:
        train_bpr(cfg, old, cases=bpr_cases, progress=False, resume=True)
    assert "\n" not in str(e.value)
    assert not bt.can_resume(old)  # the experiments runner trains such a model again instead
    train_bpr(cfg, old, cases=bpr_cases, progress=False, force=True)
    assert bt.can_resume(old) and not (old / "train_state.safetensors").exists()


def test_bpr_nan_stop_keeps_the_last_good_state(tmp_path, bpr_cases, monkeypatch):
    import voxdiff.bpr.train as bt

    real = bt.slice_step

    def nan_from_step_3(model, vols, cfg, rng, teacher=None):
        loss, parts = real(model, vols, cfg, rng, teacher=teacher)
        nan_from_step_3.n += 1
        return (loss * float("nan") if nan_from_step_3.n > 3 else loss), parts

    nan_from_step_3.n = 0
    monkeypatch.setattr(bt, "slice_step", nan_from_step_3)
    with pytest.raises(TrainingError, match=r"loss is nan at step 4: .*last good checkpoint \(step 2\)"):
        bt.train_bpr(_bpr_cfg(), tmp_path / "m", cases=bpr_cases, progress=False)
    tensors, info = _state(tmp_path / "m" / "train_state")
    assert info["meta"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    assert not (tmp_path / "m" / "model.json").exists()



def test_bpr_nan_before_the_first_checkpoint_leaves_no_model_folder(tmp_path, bpr_cases, monkeypatch):
    import voxdiff.bpr.train as bt

    real = bt.slice_step

    def nan_at_once(model, vols, cfg, rng, teacher=None):
        loss, parts = real(model, vols, cfg, rng, teacher=teacher)
        return loss * float("nan"), parts

    monkeypatch.setattr(bt, "slice_step", nan_at_once)
    with pytest.raises(TrainingError, match=r"loss is nan at step 1: .*no checkpoint had been written"):
        bt.train_bpr(_bpr_cfg(checkpoint_every=4), tmp_path / "m", cases=bpr_cases, progress=False)
    assert not (tmp_path / "m").exists()
    keep = tmp_path / "k"
    keep.mkdir()
    (keep / "README").write_text("the user's")
    with pytest.raises(TrainingError):
        bt.train_bpr(_bpr_cfg(checkpoint_every=4), keep, cases=bpr_cases, progress=False, force=True)
    assert sorted(p.name for p in keep.iterdir()) == ["README"]

# ------------------------------------------------------------------------------------ probes


def _probe_cfg(**kw):
    from voxdiff.probe.train import ProbeConfig

    base = dict(steps=8, val_every=3, patch_size=(16, 16, 8), batch_size=2, warmup_steps=2, hidden=8,
                roi=(24, 24, 16), device="cpu", lr=1e-2, backbone_lr=1e-2, n_classes=7, voxels_per_step=256)
    base.update(kw)
    return from_dict(ProbeConfig, base)  # flat names, read into the sections


class _VoxelExt:
    """A random real Backbone with the extractor call contract (whole-volume features)."""

    def __init__(self):
        from voxdiff.data.preprocess import PreprocessConfig
        from voxdiff.pretrain.backbone import Backbone

        torch.manual_seed(0)
        self.backbone = Backbone(in_channels=1, base_channels=4, num_levels=2).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.levels = self.backbone.levels
        self.preprocess = PreprocessConfig()
        self.method = "random"

    def __call__(self, x, voxel_index=None, coords=None):
        with torch.no_grad():
            return self.backbone.pyramid(x)


@pytest.mark.parametrize("kind", ["voxels", "patches", "finetune"])
def test_probe_runs_resume_exactly(tmp_path, kind):
    from standin import StandinExtractor

    from voxdiff.probe.train import fit_heads, fit_network
    from voxdiff.probe.voxel import fit_heads_voxels

    train, val = [two_organ_case(0)], [two_organ_case(1)]
    cfg = _probe_cfg()

    def run(**kw):
        hist: list = []
        ext = _VoxelExt() if kind == "voxels" else StandinExtractor(channels=(4, 8))
        if kind == "voxels":
            out = fit_heads_voxels(ext, train, val, ("linear", "nonlinear"), cfg, voxels_per_step=256,
                                   progress=False, history=hist, **kw)
        elif kind == "patches":
            out = fit_heads(ext, train, val, ("linear", "nonlinear"), cfg, progress=False, history=hist, **kw)
        else:
            tuned, head = fit_network(ext, train, val, "finetune", cfg, progress=False, history=hist, **kw)
            out = {"head": head, "backbone": tuned.backbone}
        return out, hist

    full, hist_full = run()
    run(state_dir=tmp_path / "ts", stop_after=4)
    assert read_train_state(latest_train_state(tmp_path / "ts"))[1]["meta"]["step"] == 4
    resumed, hist_resumed = run(state_dir=tmp_path / "ts", resume=True)
    assert hist_resumed == hist_full and [h["step"] for h in hist_full] == [3, 6, 8]
    for name, m in full.items():
        for k, v in m.state_dict().items():
            assert torch.equal(v, resumed[name].state_dict()[k]), (name, k)


@pytest.mark.parametrize("kind", ["voxels", "finetune"])
def test_probe_nan_stop(tmp_path, kind, monkeypatch):
    from standin import StandinExtractor

    import voxdiff.probe.train as pt
    import voxdiff.probe.voxel as pv

    calls = {"n": 0}
    if kind == "voxels":
        real = pv.F.cross_entropy

        def bad(*a, **k):
            calls["n"] += 1
            out = real(*a, **k)
            return out * float("nan") if calls["n"] > 8 else out  # two heads: step 5 on

        monkeypatch.setattr(pv.F, "cross_entropy", bad)
        with pytest.raises(TrainingError, match=r"linear\+nonlinear: loss is nan at step 5: .*checkpoint \(step 3\)"):
            pv.fit_heads_voxels(_VoxelExt(), [two_organ_case(0)], [two_organ_case(1)],
                                ("linear", "nonlinear"), _probe_cfg(), voxels_per_step=256, progress=False,
                                state_dir=tmp_path / "ts")
    else:
        real = pt.dice_ce_loss

        def bad(*a, **k):
            calls["n"] += 1
            out = real(*a, **k)
            return out * float("nan") if calls["n"] > 4 else out

        monkeypatch.setattr(pt, "dice_ce_loss", bad)
        with pytest.raises(TrainingError, match=r"finetune: loss is nan at step 5: .*no checkpoint"):
            pt.fit_network(StandinExtractor(channels=(4, 8)), [two_organ_case(0)], [two_organ_case(1)], "finetune",
                           _probe_cfg(), progress=False)
