"""``optim.validate_start``: the network as fine-tuning starts (LP-FT: the frozen probe's head on the
pretrained backbone) is validated before the first step and competes as step 0 of the selection rule;
a run whose steps never beat it returns its start, bit for bit; a resumed run keeps that candidate."""

from __future__ import annotations

import copy

import pytest
import torch
from standin import StandinExtractor
from standin import two_organ_case as _case
from test_selection import _cfg, _same, _scripted

import voxdiff.probe.train as pt
from voxdiff.probe.heads import make_head
from voxdiff.probe.train import fit_network

pytestmark = pytest.mark.usefixtures("one_thread")


def _fitted_head(ext):
    torch.manual_seed(3)
    head = make_head("nonlinear", [int(lv.channels) for lv in ext.levels], 14, 8, 1)
    torch.nn.init.normal_(head.out.weight, std=0.1)
    return head.eval()


def _run(monkeypatch, values, validate_start, seen=None, **kw):
    _scripted(monkeypatch, values, seen)
    ext = StandinExtractor(channels=(4, 8))
    start = copy.deepcopy(ext.backbone.state_dict())
    head0 = _fitted_head(ext)
    hist: list = []
    cfg = _cfg(steps=6, validate_start=validate_start, **kw)
    tuned, head = fit_network(ext, [_case(0)], [_case(1)], "finetune", cfg, progress=False, history=hist,
                              init_head=head0)
    return start, head0, tuned, head, hist


def test_a_start_no_step_beats_is_returned_unchanged(monkeypatch):
    start, head0, tuned, head, hist = _run(monkeypatch, [0.9, 0.5, 0.6, 0.4], True)
    assert head.best_step == 0 and head.best_val_dice == pytest.approx(0.9) and head.steps_run == 6
    assert _same(tuned.backbone, start) and _same(head, head0.state_dict())
    assert [h["step"] for h in hist] == [0, 2, 4, 6]
    assert "loss" not in hist[0] and all("loss" in h for h in hist[1:])


def test_without_it_the_first_validation_is_the_first_candidate(monkeypatch):
    start, head0, tuned, head, hist = _run(monkeypatch, [0.5, 0.6, 0.4], False)
    assert head.best_step == 4 and [h["step"] for h in hist] == [2, 4, 6]
    assert not _same(tuned.backbone, start)  # (so the check above can fail)


def test_a_step_that_beats_the_start_is_kept(monkeypatch):
    seen: list = []
    start, _, tuned, head, _ = _run(monkeypatch, [0.3, 0.5, 0.6, 0.4], True, seen)
    assert head.best_step == 4 and head.best_val_dice == pytest.approx(0.6)
    bb, hd = seen[2]  # validations at steps 0, 2, 4, 6
    assert _same(tuned.backbone, bb) and _same(head, hd) and not _same(tuned.backbone, start)
    assert _same(StandinExtractor(channels=(4, 8)).backbone, seen[0][0])  # step 0 saw the pretrained weights


def test_early_stopping_counts_the_start(monkeypatch):
    _, _, _, head, hist = _run(monkeypatch, [0.9, 0.5, 0.4, 0.3], True, patience=2)
    assert head.steps_run == 4 and head.best_step == 0 and [h["step"] for h in hist] == [0, 2, 4]


def test_patience_one_stops_at_the_first_validation_without_progress(monkeypatch):
    """The demo's LP-FT (patience 1): a first validation below the start ends the run there, with the start
    returned unchanged; a run that keeps improving goes on until its first fall and keeps the best state."""
    start, head0, tuned, head, hist = _run(monkeypatch, [0.9, 0.5, 0.95, 0.97], True, patience=1)
    assert head.steps_run == 2 and head.best_step == 0 and [h["step"] for h in hist] == [0, 2]
    assert _same(tuned.backbone, start) and _same(head, head0.state_dict())
    _, _, _, head, hist = _run(monkeypatch, [0.3, 0.5, 0.6, 0.4], True, patience=1)
    assert head.steps_run == 6 and head.best_step == 4 and [h["step"] for h in hist] == [0, 2, 4, 6]
    _, _, _, head, hist = _run(monkeypatch, [0.3, 0.5, 0.4, 0.6], True, patience=1)
    assert head.steps_run == 4 and head.best_step == 2  # the later 0.6 is never reached


def test_a_resumed_run_keeps_the_start_as_its_candidate(monkeypatch, tmp_path):
    vals = [0.9, 0.5, 0.6, 0.4]
    _, head0, full_net, full, _ = _run(monkeypatch, vals, True)
    calls = []

    def fake_validate(extractor, heads, cases, cfg, device, window):
        (name, _), = heads.items()
        calls.append(1)
        return {name: vals[len(calls) - 1]}

    monkeypatch.setattr(pt, "validate", fake_validate)
    cfg = _cfg(steps=6, validate_start=True)
    fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [_case(1)], "finetune", cfg, progress=False,
                state_dir=tmp_path / "ts", stop_after=3, init_head=_fitted_head(StandinExtractor(channels=(4, 8))))
    assert len(calls) == 2  # the start and step 2
    tuned, resumed = fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [_case(1)], "finetune", cfg,
                                 progress=False, state_dir=tmp_path / "ts", resume=True,
                                 init_head=_fitted_head(StandinExtractor(channels=(4, 8))))
    assert len(calls) == 4  # steps 4 and 6: the start is not validated again
    assert resumed.best_step == full.best_step == 0 and _same(resumed, head0.state_dict())
    assert _same(tuned.backbone, full_net.backbone.state_dict())
