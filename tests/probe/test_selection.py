"""Checkpoint rules of fine-tuning / from-scratch training (``optim.selection``): each returns the
state its rule chose, the rules compared in one run match runs made with each rule, early
stopping follows the rule's score, and the smoothed rule's state survives a resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from standin import StandinExtractor
from standin import two_organ_case as _case

import voxdiff.probe.train as pt
from voxdiff.core.config import from_dict
from voxdiff.core.errors import InputError
from voxdiff.probe.train import ProbeConfig, fit_network, smoothed_score


def _cfg(**flat) -> ProbeConfig:
    base = dict(val_every=2, patch_size=(16, 16, 8), batch_size=2, warmup_steps=0, hidden=8, roi=(24, 24, 16),
                device="cpu", lr=1e-2, backbone_lr=1e-2, scratch_lr=1e-2)
    return from_dict(ProbeConfig, {**base, **flat})


def _scripted(monkeypatch, values, seen: list | None = None):
    """validate() returns the values in order (per call) and records each validated state."""
    it = iter(values)

    def fake_validate(extractor, heads, cases, cfg, device, window):
        (name, head), = heads.items()
        if seen is not None:
            seen.append((copy.deepcopy(extractor.backbone.state_dict()), copy.deepcopy(head.state_dict())))
        return {name: next(it)}

    monkeypatch.setattr(pt, "validate", fake_validate)


def _same(model: torch.nn.Module, state: dict) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# steps 2..16: a spike at step 4, the best window of three ends at step 12, the last state is step 16
VALS = [0.2, 0.7, 0.1, 0.5, 0.55, 0.6, 0.2, 0.1]


def test_smoothed_score_is_the_trailing_mean():
    hist = [{"step": 2 * (i + 1), "val_dice": {"m": v}} for i, v in enumerate(VALS)]
    assert smoothed_score(hist[:1], "m", 3) == pytest.approx(0.2)  # fewer at the start
    assert smoothed_score(hist[:6], "m", 3) == pytest.approx(0.55)
    assert smoothed_score(hist[:6], "m", 1) == pytest.approx(0.6)
    hist.append({"step": 18, "val_dice": {"m": float("nan")}})
    assert smoothed_score(hist, "m", 2) == pytest.approx(0.1)  # NaN left out
    assert np.isnan(smoothed_score([], "m", 3))


@pytest.mark.parametrize("mode", ["finetune", "scratch"])
def test_each_rule_returns_its_state_and_one_run_gives_them_all(monkeypatch, mode):
    seen: list = []
    _scripted(monkeypatch, VALS, seen)
    alts: dict = {"smoothed": None, "last": None}
    tuned, head = fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [_case(1)], mode, _cfg(steps=16),
                              progress=False, alternatives=alts)
    expect = {"best": (head, tuned, 4, 0.7), "smoothed": (alts["smoothed"][1], alts["smoothed"][0], 12, 0.55),
              "last": (alts["last"][1], alts["last"][0], 16, 0.1)}
    for rule, (h, e, step, score) in expect.items():
        assert h.selection == rule and h.best_step == step and h.steps_run == 16
        assert h.best_val_dice == pytest.approx(score)
        bb, hd = seen[step // 2 - 1]
        assert _same(h, hd) and _same(e.backbone, bb), rule
    # the three states differ, so the checks above can fail
    assert not _same(head, seen[5][1]) and not _same(head, seen[7][1]) and not _same(alts["last"][1], seen[5][1])

    # a run made with the smoothed rule trains the same and returns the same state
    _scripted(monkeypatch, VALS)
    t2, h2 = fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [_case(1)], mode,
                         _cfg(steps=16, selection="smoothed"), progress=False)
    assert h2.selection == "smoothed" and h2.best_step == 12
    assert _same(h2, seen[5][1]) and _same(t2.backbone, seen[5][0])


def test_early_stopping_watches_the_rules_score(monkeypatch):
    """Patience 3: a late spike (step 10) resets the best rule's patience, not the smoothed rule's."""
    vals = [0.2, 0.8, 0.1, 0.1, 0.9, 0.0, 0.0, 0.0, 0.0]

    def run(rule):
        _scripted(monkeypatch, vals)
        _, head = fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [_case(1)], "scratch",
                              _cfg(steps=40, patience=3, selection=rule), progress=False)
        return head.steps_run, head.best_step, head.best_val_dice

    assert run("best") == (16, 10, pytest.approx(0.9))
    assert run("smoothed") == (10, 4, pytest.approx(0.5))


def test_smoothed_state_survives_a_resume(monkeypatch, tmp_path):
    calls = {"n": 0}

    def fake_validate(extractor, heads, cases, cfg, device, window):
        (name, _), = heads.items()
        calls["n"] += 1
        return {name: VALS[calls["n"] - 1]}

    monkeypatch.setattr(pt, "validate", fake_validate)
    cfg = _cfg(steps=16, selection="smoothed")
    _, full = fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [_case(1)], "scratch", cfg, progress=False)
    calls["n"] = 0
    fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [_case(1)], "scratch", cfg, progress=False,
                state_dir=tmp_path / "ts", stop_after=12)  # the smoothed rule's best window ends at step 12
    tuned, resumed = fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [_case(1)], "scratch", cfg,
                                 progress=False, state_dir=tmp_path / "ts", resume=True)
    assert resumed.best_step == full.best_step == 12 and resumed.steps_run == 16
    assert _same(resumed, full.state_dict())


def test_bad_rules_are_refused(monkeypatch):
    with pytest.raises(InputError, match="optim.selection"):
        _cfg(selection="median")
    with pytest.raises(InputError, match="smooth_window"):
        _cfg(smooth_window=0)
    _scripted(monkeypatch, [0.5] * 4)
    with pytest.raises(ValueError, match="unknown checkpoint rule"):
        fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [_case(1)], "scratch", _cfg(steps=4),
                    progress=False, alternatives={"median": None})
