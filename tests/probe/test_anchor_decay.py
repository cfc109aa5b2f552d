"""L2-SP fine-tuning (``optim.anchor_decay``): after each step the backbone moves the configured share
of the way back to its pretrained weights, the pull survives a resume, and it is refused where it
cannot be meant."""

from __future__ import annotations

import pytest
import torch
from standin import StandinExtractor
from standin import two_organ_case as _case

from voxdiff.core.config import from_dict
from voxdiff.core.errors import InputError
from voxdiff.probe.train import ProbeConfig, check_probe_config, fit_network

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**flat) -> ProbeConfig:
    base = dict(val_every=100, patch_size=(16, 16, 8), batch_size=2, warmup_steps=0, hidden=8, roi=(24, 24, 16),
                device="cpu", lr=1e-2, backbone_lr=1e-2, scratch_lr=1e-2)
    return from_dict(ProbeConfig, {**base, **flat})


def _tuned(cfg: ProbeConfig, **kw) -> dict[str, torch.Tensor]:
    tuned, _ = fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [], "finetune", cfg, progress=False, **kw)
    return {k: v.clone() for k, v in tuned.backbone.named_parameters()}


def test_one_step_is_pulled_back_by_lr_times_anchor_decay():
    start = {k: v.clone() for k, v in StandinExtractor(channels=(4, 8)).backbone.named_parameters()}
    plain = _tuned(_cfg(steps=1))
    pulled = _tuned(_cfg(steps=1, anchor_decay=30.0))  # rate 1e-2 * 30 = 0.3
    moved = 0.0
    for k, w0 in start.items():
        torch.testing.assert_close(pulled[k], w0 + 0.7 * (plain[k] - w0), rtol=1e-5, atol=1e-7)
        moved += float((plain[k] - w0).abs().sum())
    assert moved > 0  # the step moved the backbone, so the check above could fail


def test_the_pull_keeps_the_backbone_nearer_its_start_over_a_run():
    start = {k: v.clone() for k, v in StandinExtractor(channels=(4, 8)).backbone.named_parameters()}

    def drift(w):
        return sum(float((w[k] - w0).pow(2).sum()) for k, w0 in start.items()) ** 0.5

    plain, pulled = drift(_tuned(_cfg(steps=12))), drift(_tuned(_cfg(steps=12, anchor_decay=50.0)))
    assert 0 < pulled < 0.5 * plain


def test_an_anchored_run_resumes_exactly(tmp_path):
    cfg = _cfg(steps=8, anchor_decay=20.0)
    full = _tuned(cfg)
    _tuned(cfg, state_dir=tmp_path / "ts", stop_after=5)
    resumed = _tuned(cfg, state_dir=tmp_path / "ts", resume=True)
    for k, v in full.items():
        assert torch.equal(resumed[k], v), k


def test_refused_from_scratch_and_beyond_a_full_step():
    with pytest.raises(InputError, match="anchor_decay"):
        fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [], "scratch", _cfg(steps=1, anchor_decay=1.0),
                    progress=False)
    for bad in (-1.0, 100.0):  # 100 * 1e-2 = a full step back: the fine-tuning could not move
        with pytest.raises(InputError, match="anchor_decay"):
            check_probe_config(_cfg(anchor_decay=bad))
    check_probe_config(_cfg(anchor_decay=99.0))
