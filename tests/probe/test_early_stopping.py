"""Early stopping of fine-tuning / from-scratch training returns the best-validation state."""

from __future__ import annotations

import copy

import pytest
import torch
from standin import StandinExtractor, cube_case

import voxdiff.probe.train as pt
from voxdiff.core.config import from_dict
from voxdiff.data.types import Case
from voxdiff.probe.train import ProbeConfig, fit_network


def _probe(**flat) -> ProbeConfig:
    """A ProbeConfig from flat field names (``steps``, ``roi``, ...), read into the sections."""
    return from_dict(ProbeConfig, flat)


def _case(seed: int, shape=(24, 24, 16)) -> Case:
    return cube_case(seed, shape)


@pytest.mark.parametrize("mode", ["finetune", "scratch"])
def test_early_stopping_returns_the_best_validation_state(monkeypatch, mode):
    """Validation Dice scripted per validation: 0.2, 0.6 (best, step 4), 0.4, 0.3, then patience 2 runs
    out at step 8 of 40. The returned backbone and head must be the state validated at step 4."""
    scripted = iter([0.2, 0.6, 0.4, 0.3, 0.9, 0.9, 0.9])
    seen = []

    def fake_validate(extractor, heads, cases, cfg, device, window):
        (name, head), = heads.items()
        seen.append((copy.deepcopy(extractor.backbone.state_dict()), copy.deepcopy(head.state_dict())))
        return {name: next(scripted)}

    monkeypatch.setattr(pt, "validate", fake_validate)
    ext = StandinExtractor(channels=(4, 8))
    cfg = _probe(steps=40, val_every=2, patience=2, patch_size=(16, 16, 8), batch_size=2, warmup_steps=0,
                 hidden=8, roi=(24, 24, 16), device="cpu", lr=1e-2, backbone_lr=1e-2, scratch_lr=1e-2)
    hist: list = []
    tuned, head = fit_network(ext, [_case(0)], [_case(1)], mode, cfg, progress=False, history=hist)
    assert [h["step"] for h in hist] == [2, 4, 6, 8]  # stopped early, not at 40
    assert head.steps_run == 8 and head.best_step == 4 and head.best_val_dice == pytest.approx(0.6)
    best_bb, best_head = seen[1]
    last_bb, last_head = seen[3]
    for k, v in head.state_dict().items():
        torch.testing.assert_close(v, best_head[k])
    for k, v in tuned.backbone.state_dict().items():
        torch.testing.assert_close(v, best_bb[k])
    # the states of step 4 and step 8 differ (so the check above can fail)
    assert any(not torch.equal(best_head[k], last_head[k]) for k in best_head)
    assert any(not torch.equal(best_bb[k], last_bb[k]) for k in best_bb if best_bb[k].is_floating_point())


def test_min_steps_holds_off_early_stopping(monkeypatch):
    """A near-zero plateau (best at the first validation, then worse) runs out patience 2 at step 6
    without ``min_steps``; with ``min_steps`` 10 training goes on to step 10, keeps the later better
    state (step 8) and then stops on patience, not at the 40-step cap."""
    def run(min_steps):
        scripted = iter([0.03, 0.0, 0.01, 0.2, 0.1, 0.1, 0.1, 0.1])
        monkeypatch.setattr(pt, "validate", lambda e, heads, *a: {n: next(scripted) for n in heads})
        cfg = _probe(steps=40, val_every=2, patience=2, min_steps=min_steps, patch_size=(16, 16, 8), batch_size=2,
                     warmup_steps=0, hidden=8, roi=(24, 24, 16), device="cpu")
        _, head = fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [_case(1)], "scratch", cfg, progress=False)
        return head.steps_run, head.best_step, head.best_val_dice

    assert run(0) == (6, 2, pytest.approx(0.03))
    assert run(10) == (12, 8, pytest.approx(0.2))


def test_without_patience_all_steps_run(monkeypatch):
    monkeypatch.setattr(pt, "validate", lambda e, heads, *a: {n: 0.1 for n in heads})
    cfg = _probe(steps=6, val_every=2, patience=0, patch_size=(16, 16, 8), batch_size=2, warmup_steps=0,
                 hidden=8, roi=(24, 24, 16), device="cpu")
    _, head = fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [_case(1)], "scratch", cfg, progress=False)
    assert head.steps_run == 6 and head.best_step == 2


def test_fine_tuning_starts_from_a_fitted_head(monkeypatch):
    """LP-FT: the first validated state is the given head moved by one step at the backbone's learning
    rate (not a random head), the caller's head is left alone, and a head of other channels is refused."""
    from voxdiff.probe.heads import make_head

    first = []

    def fake_validate(extractor, heads, cases, cfg, device, window):
        (name, head), = heads.items()
        if not first:
            first.append(copy.deepcopy(head.state_dict()))
        return {name: 0.5}

    monkeypatch.setattr(pt, "validate", fake_validate)
    ext = StandinExtractor(channels=(4, 8))
    cfg = _probe(steps=2, val_every=1, patience=0, patch_size=(16, 16, 8), batch_size=2, warmup_steps=5,
                 hidden=8, roi=(24, 24, 16), device="cpu", lr=1.0, backbone_lr=1e-4)
    fitted = make_head("nonlinear", [4, 8], cfg.n_classes, cfg.head.hidden, cfg.head.blocks)
    with torch.no_grad():
        for p in fitted.parameters():
            p.normal_()
    before = copy.deepcopy(fitted.state_dict())
    _, head = fit_network(ext, [_case(0)], [_case(1)], "finetune", cfg, progress=False, init_head=fitted)
    for k, v in fitted.state_dict().items():
        assert torch.equal(v, before[k])  # the caller's head is not trained in place
    params = [k for k, _ in fitted.named_parameters()]  # (BatchNorm's running statistics move by design)
    moved = max(float((first[0][k] - before[k]).abs().max()) for k in params)
    assert 0 < moved < 1e-2  # one step at backbone_lr (1e-4), not at the head's lr (1.0)
    assert head.upsample == "trilinear"
    other = make_head("nonlinear", [4, 16], cfg.n_classes, cfg.head.hidden, cfg.head.blocks)
    with pytest.raises(ValueError, match="channels"):
        fit_network(ext, [_case(0)], [_case(1)], "finetune", cfg, progress=False, init_head=other)
    with pytest.raises(ValueError, match="fine-tuning only"):
        fit_network(ext, [_case(0)], [_case(1)], "scratch", cfg, progress=False, init_head=fitted)
