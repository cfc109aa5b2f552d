"""Fine-tuning / from scratch on whole volumes (``sampling.whole_volume``): the batches are the
labelled volumes as the whole-volume feature path sees them, validation uses that path, and an LP-FT
head keeps the BatchNorm statistics it was fitted with."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from standin import StandinExtractor, cube_case

import voxdiff.probe.train as pt
import voxdiff.probe.voxel as pv
from voxdiff.core.config import from_dict
from voxdiff.data.types import Case
from voxdiff.pretrain.diffusion import index_grid
from voxdiff.probe.predict import unit_image
from voxdiff.probe.train import PatchSampler, ProbeConfig, fit_network


def _probe(**flat) -> ProbeConfig:
    return from_dict(ProbeConfig, flat)


def _case(seed: int, shape=(20, 18, 13)) -> Case:
    return cube_case(seed, shape, z=(3, 9))


def test_whole_volume_batches_are_the_volumes_at_voxel_0_padded_to_the_divisor():
    """Each item is a whole case from voxel 0, zeros (label 0) after its end up to the batch's size:
    the largest of its volumes rounded up to a multiple of the divisor; the voxel indices start at 0."""
    cases = [_case(0, (20, 18, 13)), _case(1, (9, 25, 16))]
    window = (-1000.0, 1000.0)
    s = PatchSampler(cases, window, (8, 8, 8), 0.5, np.random.default_rng(0), whole_volume=True, divisor=8)
    seen = set()
    for _ in range(12):
        x, y = s.sample(1)
        i = s.last[0][0]
        seen.add(i)
        shape = cases[i].image.shape
        assert x.shape[2:] == tuple(-(-n // 8) * 8 for n in shape) and s.last[1] == [[0, 0, 0]]
        X, Y, Z = shape
        np.testing.assert_allclose(x[0, 0, :X, :Y, :Z].numpy(), unit_image(cases[i], window))
        assert torch.equal(y[0, :X, :Y, :Z], torch.from_numpy(cases[i].label.astype(np.int64)))
        assert float(x[0, 0].abs().sum()) == pytest.approx(float(x[0, 0, :X, :Y, :Z].abs().sum()))  # zeros beyond
        grid = s.extractor_inputs()["voxel_index"]
        torch.testing.assert_close(grid, index_grid(tuple(x.shape[2:]), torch.zeros(1, 3, dtype=torch.int64), 1))
    assert seen == {0, 1}
    sizes = set()
    for _ in range(8):
        x, y = s.sample(2)
        picked = [cases[i].image.shape for i in s.last[0]]
        want = tuple(-(-max(sh[a] for sh in picked) // 8) * 8 for a in range(3))  # the larger of each axis
        assert x.shape[0] == 2 and x.shape[2:] == want
        sizes.add(want)
    assert (24, 32, 16) in sizes  # both volumes in one batch at least once


@pytest.mark.parametrize("mode", ["finetune", "scratch"])
def test_whole_volume_training_sees_whole_volumes_and_validates_on_whole_volume_features(monkeypatch, mode):
    """Every training batch is a whole labelled volume; validation goes through the whole-volume
    feature path (``validate_volume``), never the sliding windows."""
    shapes = []
    real_sample = PatchSampler.sample

    def sample(self, n):
        x, y = real_sample(self, n)
        shapes.append(tuple(x.shape[2:]))
        return x, y

    calls = []
    monkeypatch.setattr(PatchSampler, "sample", sample)
    monkeypatch.setattr(pt, "validate", lambda *a, **k: pytest.fail("sliding-window validation used"))
    monkeypatch.setattr(pv, "validate_volume", lambda e, heads, cases, cfg, **k: calls.append(len(cases)) or {n: 0.5 for n in heads})
    cfg = _probe(steps=4, val_every=2, patience=0, patch_size=(8, 8, 8), batch_size=1, warmup_steps=0, hidden=8,
                 roi=(24, 24, 24), device="cpu", whole_volume=True)
    _, head = fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [_case(1)], mode, cfg, progress=False)
    assert calls == [1, 1] and head.steps_run == 4
    assert set(shapes[-4:]) == {(20, 18, 14)}  # (20, 18, 13) padded to the standin's divisor 2
    shapes.clear()
    cfg = _probe(steps=2, val_every=2, patience=0, patch_size=(8, 8, 8), batch_size=1, warmup_steps=0, hidden=8,
                 roi=(16, 16, 16), device="cpu", whole_volume=True)
    fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [_case(1)], mode, cfg, progress=False)
    assert set(shapes) == {(16, 16, 14)}  # cut to the 16^3 window where longer


def test_lpft_on_whole_volumes_keeps_the_fitted_heads_batchnorm_statistics(monkeypatch):
    """A fitted head (LP-FT) trained on whole volumes keeps the running statistics it was fitted
    with; on patches (as before) they follow the batches."""
    from voxdiff.probe.heads import make_head

    monkeypatch.setattr(pt, "validate", lambda e, heads, *a: {n: 0.5 for n in heads})
    monkeypatch.setattr(pv, "validate_volume", lambda e, heads, *a, **k: {n: 0.5 for n in heads})
    fitted = make_head("nonlinear", [4, 8], 14, 8, 1)
    with torch.no_grad():
        fitted.train()
        fitted([torch.randn(2, 4, 8, 8, 8), torch.randn(2, 8, 4, 4, 4)])  # non-trivial running statistics
    fitted.eval()
    stats = {k: v.clone() for k, v in fitted.state_dict().items() if "running" in k}
    for whole, kept in ((True, True), (False, False)):
        cfg = _probe(steps=3, val_every=3, patience=0, patch_size=(8, 8, 8), batch_size=1, warmup_steps=0, hidden=8,
                     roi=(16, 16, 16), device="cpu", whole_volume=whole, backbone_lr=1e-4)
        _, head = fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [_case(1)], "finetune", cfg,
                              progress=False, init_head=copy.deepcopy(fitted))
        same = all(torch.equal(head.state_dict()[k], v) for k, v in stats.items())
        assert same == kept, whole


def test_whole_volume_batches_cut_axes_longer_than_the_window_at_random_starts():
    """A volume longer than ``max_window`` on an axis is cut to a window of that length there (at
    starts that vary and keep the window inside the volume); shorter axes stay whole from voxel 0.
    The voxel indices and the crop follow the start."""
    case = _case(2, (30, 12, 11))
    window = (-1000.0, 1000.0)
    s = PatchSampler([case], window, (8, 8, 8), 0.5, np.random.default_rng(1), whole_volume=True, divisor=4,
                     max_window=(16, 16, 16))
    unit = unit_image(case, window)
    starts = set()
    for _ in range(16):
        x, y = s.sample(1)
        (x0, y0, z0), = s.last[1]
        assert (y0, z0) == (0, 0) and 0 <= x0 <= 30 - 16
        starts.add(x0)
        assert x.shape[2:] == (16, 12, 12)  # 16 cut, 12 whole, 11 whole and padded to the divisor
        np.testing.assert_allclose(x[0, 0, :, :, :11].numpy(), unit[x0:x0 + 16])
        assert torch.equal(y[0, :, :, :11], torch.from_numpy(case.label[x0:x0 + 16].astype(np.int64)))
        grid = s.extractor_inputs()["voxel_index"]
        torch.testing.assert_close(grid, index_grid((16, 12, 12), torch.tensor([[x0, 0, 0]]), 1))
    assert len(starts) > 3


def test_the_training_sampler_cuts_whole_volumes_at_the_feature_window():
    """``make_sampler`` gives fine-tuning on whole volumes the feature window as its cut, and head
    fitting none."""
    cfg = _probe(whole_volume=True, roi=(16, 16, 16), feature_roi=(24, 24, 24))
    ext = StandinExtractor(channels=(4, 8))
    rng = np.random.default_rng(0)
    assert pt.make_sampler(ext, [_case(0)], cfg, rng, end_to_end=True).max_window == (24, 24, 24)
    assert pt.make_sampler(ext, [_case(0)], cfg, rng).max_window is None
    cfg = _probe(whole_volume=True, roi=(16, 16, 16))
    assert pt.make_sampler(ext, [_case(0)], cfg, rng, end_to_end=True).max_window == (16, 16, 16)
