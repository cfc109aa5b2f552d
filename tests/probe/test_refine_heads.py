"""Frozen heads refined on whole training volumes after the voxel probe (``optim.refine_steps``):
the whole-volume loss falls, the heads' BatchNorm statistics stay, the heads as given win when the
validation says so, and the voxel phase is untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_voxel import _Ext, _probe

from voxdiff.core.errors import InputError
from voxdiff.data.preprocess import PreprocessConfig, preprocess
from voxdiff.probe import voxel
from voxdiff.probe.predict import unit_image
from voxdiff.probe.train import check_probe_config, dice_ce_loss
from voxdiff.probe.voxel import fit_heads_voxels, refine_heads_volume, volume_pyramid

pytestmark = pytest.mark.usefixtures("one_thread")

PRE = PreprocessConfig(spacing=(4.0, 4.0, 4.0))


@pytest.fixture(scope="module")
def cases():
    from voxdiff.data.phantom import PhantomConfig, generate_phantom

    return [preprocess(generate_phantom(s, PhantomConfig(shape=(48, 48, 32))), PRE) for s in (31, 32, 33)]


def _cfg(**flat):
    base = dict(steps=60, val_every=60, roi=(32, 32, 32), overlap=0.25, lr=1e-2, bf16=False, device="cpu", hidden=8,
                fg_prob=0.5)
    return _probe(**{**base, **flat})


def _volume_loss(pyr, head, case) -> float:
    """Dice + CE of ``head`` on the whole volume of ``case``, whose features are ``pyr``."""
    y = torch.from_numpy(np.asarray(case.label, dtype=np.int64))[None]
    with torch.no_grad():
        lg = head.eval()(pyr, out_size=pyr[0].shape[2:])[:, :, :y.shape[1], :y.shape[2], :y.shape[3]]
        return float(dice_ce_loss(lg, y))


def _bn_stats(head):
    return [(m.running_mean.clone(), m.running_var.clone()) for m in head.modules()
            if isinstance(m, torch.nn.BatchNorm3d)]


def test_refinement_lowers_the_whole_volume_loss_and_keeps_the_batchnorm_statistics(cases):
    ext = _Ext(PRE)
    plain = fit_heads_voxels(ext, cases[:1], (), ["linear", "nonlinear"], _cfg(), voxels_per_step=1024, progress=False)
    hist: list = []
    refined = fit_heads_voxels(ext, cases[:1], (), ["linear", "nonlinear"], _cfg(refine_steps=20, refine_lr=1e-2),
                               voxels_per_step=1024, progress=False, history=hist)
    pyr = [p[None].float() for p in volume_pyramid(ext, unit_image(cases[0], PRE.hu_window), _cfg())]
    for n in ("linear", "nonlinear"):
        before, after = _volume_loss(pyr, plain[n], cases[0]), _volume_loss(pyr, refined[n], cases[0])
        assert after < before - 0.02, (n, before, after)
    for (m0, v0), (m1, v1) in zip(_bn_stats(plain["nonlinear"]), _bn_stats(refined["nonlinear"])):
        assert torch.equal(m0, m1) and torch.equal(v0, v1)
    assert [h["step"] for h in hist if not h.get("refine")] == [60]  # the voxel phase as without refinement
    assert [h["step"] for h in hist if h.get("refine")] == [10, 20]  # (no validation cases: no step 0)


@pytest.mark.parametrize("later_better", [False, True])
def test_the_heads_as_given_are_the_first_candidate(cases, monkeypatch, later_better):
    ext = _Ext(PRE)
    heads = fit_heads_voxels(ext, cases[:1], (), ["nonlinear"], _cfg(), voxels_per_step=1024, progress=False)
    calls = []

    def scores(extractor, hs, val_cases, cfg, pyramids=None):  # step 0 first, then the refined states
        calls.append(1)
        s = 0.5 + (0.1 if later_better else -0.1) * min(len(calls) - 1, 1)
        return {n: s for n in hs}

    monkeypatch.setattr(voxel, "validate_volume", scores)
    hist: list = []
    out = refine_heads_volume(ext, heads, cases[:1], cases[1:2], _cfg(refine_steps=10, refine_lr=1e-2,
                                                                      refine_val_every=5), history=hist)
    assert len(calls) == 3 and [h["step"] for h in hist] == [0, 5, 10]
    same = all(torch.equal(a, b) for a, b in zip(out["nonlinear"].state_dict().values(),
                                                 heads["nonlinear"].state_dict().values()))
    assert same != later_better
    assert heads["nonlinear"] is not out["nonlinear"]  # the given heads are never trained in place


def test_refinement_is_refused_where_it_cannot_be_meant():
    for bad in (dict(refine_steps=-1), dict(refine_steps=5, refine_lr=0.0), dict(refine_steps=5, refine_val_every=0)):
        with pytest.raises(InputError, match="optim.refine_steps must be >= 0"):
            check_probe_config(_cfg(**bad))
    with pytest.raises(InputError, match="refines heads fitted on voxels"):
        check_probe_config(_cfg(refine_steps=5, frozen_training="patches"))
    check_probe_config(_cfg(refine_steps=5))
    with pytest.raises(InputError, match="head.upsample must be auto, nearest or trilinear"):
        check_probe_config(_cfg(upsample="cubic"))
