"""Sliding-window feature extraction: alignment, equality with patch passes, levels, memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from voxdiff.core.errors import VoxdiffWarning
from voxdiff.data.preprocess import PreprocessConfig
from voxdiff.features import (
    DEFAULT_ROI,
    blend_weights,
    default_roi,
    estimate_memory,
    extract_volume,
    features_at,
    plan_windows,
    window_plan,
)
from voxdiff.pretrain.backbone import Backbone, LevelInfo
from voxdiff.pretrain.diffusion import index_grid, positional_noise
from voxdiff.pretrain.load import FeatureExtractor
from voxdiff.pretrain.tasks.base import get_task_class

pytestmark = pytest.mark.usefixtures("one_thread")


class PointwisePyramid:
    """A stand-in extractor without window effects: level s = average pool (s) of the image plus
    position-dependent noise, scaled per channel. Sliding windows must reproduce it exactly."""

    def __init__(self, strides=(1, 2, 4), channels=(2, 3, 4)):
        self.levels = [LevelInfo(f"level{i}", c, s) for i, (c, s) in enumerate(zip(channels, strides))]
        self.divisor = max(strides)
        self.calls = 0

    def __call__(self, x, voxel_index=None, coords=None):
        self.calls += 1
        assert voxel_index is not None, "extract_volume must pass the voxel index"
        y = x + 0.1 * positional_noise(voxel_index, seed=3)
        out = []
        for lv in self.levels:
            p = F.avg_pool3d(y, lv.stride) if lv.stride > 1 else y
            scale = torch.arange(1, lv.channels + 1, dtype=x.dtype).view(1, -1, 1, 1, 1)
            out.append(p * scale)
        return out


def whole_pass(ex, vol, divisor):
    """One pass over the volume padded at its end to a multiple of ``divisor``; cropped like extract_volume."""
    shape = vol.shape[2:]
    pad = [(-n) % divisor for n in shape]
    xp = F.pad(vol, (0, pad[2], 0, pad[1], 0, pad[0]))
    pyr = ex(xp, voxel_index=index_grid(tuple(xp.shape[2:])))
    out = []
    for f, lv in zip(pyr, ex.levels):
        s = lv.stride
        out.append(f[:, :, : -(-shape[0] // s), : -(-shape[1] // s), : -(-shape[2] // s)])
    return out


def test_plan_windows_aligns_everything_to_the_divisor():
    p = plan_windows((37, 30, 21), (16, 16, 8), 0.5, 4)
    assert p.padded == (40, 32, 24) and p.window == (16, 16, 8) and p.step == (8, 8, 4)
    assert p.starts == ((0, 8, 16, 24), (0, 8, 16), (0, 4, 8, 12, 16)) and p.count == 60 and p.exact
    p = plan_windows((10, 64, 20), (96, 96, 64), 0.5, 8)
    assert p.padded == (16, 64, 24) and p.window == (16, 64, 24) and p.counts == (1, 1, 1)  # the (padded) volume
    assert p.effective_overlap == (None, None, None) and p.exact
    with pytest.raises(ValueError):
        plan_windows((10, 10, 10), (8, 8, 8), 1.0, 2)


def test_plan_windows_paper_model_honours_overlap_half():
    """The paper model (divisor 32, training window 128 x 128 x 32) on a 512 x 512 x 300 CT at the
    1 x 1 x 2 mm grid: the step is exactly half the window on every axis. The window grows to 64 along
    z (a 32-voxel window cannot overlap aligned neighbours by half); rounding the step down instead
    (what extraction did before) gave 96^3 windows an overlap of 2/3 and 352 windows."""
    p = plan_windows((402, 276, 150), (128, 128, 32), 0.5, 32)
    assert p.window == (128, 128, 64) and p.step == (64, 64, 32) and p.effective_overlap == (0.5, 0.5, 0.5)
    assert p.starts == ((0, 64, 128, 192, 256, 288), (0, 64, 128, 160), (0, 32, 64, 96)) and p.count == 96
    d = p.describe()
    assert d["count"] == 96 and d["requested_overlap"] == 0.5 and d["exact"] and d["window"] == [128, 128, 64]
    assert "96 windows of 128x128x64" in p.summary()
    # 96^3 requested: 96 * 0.5 = 48 is not a whole number of 32, 128 is the smallest window that works
    q = plan_windows((410, 410, 150), (96, 96, 96), 0.5, 32)
    assert q.window == (128, 128, 128) and q.step == (64, 64, 64) and q.exact


def _expected_starts(p_len, w, step):
    if w >= p_len:
        return (0,)
    n = -(-(p_len - w) // step) + 1
    return tuple(min(i * step, p_len - w) for i in range(n))


@pytest.mark.parametrize("divisor", [1, 2, 4, 8, 32])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75, 0.125])
def test_plan_windows_overlap_exact_for_many_shapes(divisor, overlap):
    rng = np.random.default_rng(divisor * 1000 + int(overlap * 1000))
    for _ in range(40):
        shape = tuple(int(v) for v in rng.integers(1, 12 * divisor + 40, 3))
        roi = tuple(int(v) for v in rng.integers(1, 4 * divisor + 20, 3))
        p = plan_windows(shape, roi, overlap, divisor)
        for n, r, pl, w, st, starts in zip(shape, roi, p.padded, p.window, p.step, p.starts):
            w0 = min(-(-r // divisor) * divisor, pl)
            k0 = w0 // divisor
            exact_ks = [k for k in range(k0, max(2 * k0, 4) + 1)
                        if k * divisor >= pl or (k * (1 - overlap) % 1 == 0 and k * (1 - overlap) > 0)]
            assert pl == -(-n // divisor) * divisor
            assert w % divisor == 0 and st % divisor == 0 and all(s % divisor == 0 for s in starts)
            assert w0 <= w <= max(2 * w0, 4 * divisor) or w == pl
            if exact_ks:  # the smallest window (>= roi, aligned) with an exact aligned step
                assert w == min(exact_ks[0] * divisor, pl), (shape, roi, p.summary())
            if len(starts) > 1:  # the requested overlap exactly, the count it implies, the last window at the end
                if exact_ks:
                    assert st == w * (1 - overlap)
                else:  # e.g. 1/8 overlap of windows of at most 4 divisors: as close as possible, reported
                    assert not p.exact and abs((1 - st / w) - overlap) <= 0.5 / (w // divisor) + 1e-9
                assert starts == _expected_starts(pl, w, st)
            else:
                assert starts == (0,) and w == pl
            covered = np.zeros(pl, bool)
            for s in starts:
                covered[s:s + w] = True
            assert covered.all() and starts[-1] + w == pl
        assert p.count == int(np.prod([len(s) for s in p.starts])) == len(p.origins())


def test_plan_windows_inexact_overlap_is_reported_and_warned():
    p = plan_windows((200, 200, 200), (32, 32, 32), 0.3, 32)  # 1 - 0.3 = 7/10: needs windows of 10 divisors
    assert not p.exact and all(abs(e - 0.3) < 0.05 for e in p.effective_overlap)
    assert "not exactly possible" in p.summary()
    ex = PointwisePyramid(strides=(1, 2, 4, 8, 16, 32), channels=(1, 1, 1, 1, 1, 1))
    with pytest.warns(VoxdiffWarning, match="cannot be honoured exactly"):
        extract_volume(ex, torch.rand(1, 1, 160, 32, 32), roi=(32, 32, 32), overlap=0.3, progress=False)


def test_blend_weights_per_level():
    w = blend_weights((16, 8, 8), 1)
    assert w.shape == (1, 1, 16, 8, 8) and float(w.min()) > 0
    assert float(w[0, 0, 8, 4, 4]) > float(w[0, 0, 0, 4, 4])  # centre over border
    coarse = blend_weights((16, 8, 8), 4)
    torch.testing.assert_close(coarse, F.avg_pool3d(w, 4))
    assert torch.equal(blend_weights((16, 8, 8), 2, mode="constant"), torch.ones(1, 1, 8, 4, 4))


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap,strides", [(0.5, (1, 2, 4)), (0.25, (1, 2, 4)), (0.75, (1, 2, 4, 8)),
                                             (0.5, (1, 2, 4, 8, 16))])
def test_sliding_window_is_exact_for_a_window_independent_extractor(mode, overlap, strides):
    g = torch.Generator().manual_seed(0)
    vol = torch.rand(1, 1, 37, 30, 21, generator=g)
    ex = PointwisePyramid(strides=strides, channels=tuple(range(2, 2 + len(strides))))
    d = max(strides)
    got = extract_volume(ex, vol, roi=(16, 16, 8), overlap=overlap, out_dtype=torch.float32, progress=False,
                         mode=mode, sw_batch_size=3)
    plan = window_plan(ex, vol.shape, (16, 16, 8), overlap)
    assert plan.exact and ex.calls == -(-plan.count // 3)
    ref = whole_pass(ex, vol, d)
    assert [tuple(f.shape) for f in got] == [(1, c, -(-37 // s), -(-30 // s), -(-21 // s))
                                             for c, s in zip(range(2, 2 + len(strides)), strides)]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class WindowRecorder(PointwisePyramid):
    """The stand-in, remembering the window shapes and origins it was called with."""

    def __init__(self, patch_size=None, **kw):
        super().__init__(**kw)
        if patch_size is not None:
            self.patch_size = patch_size
        self.windows = []

    def __call__(self, x, voxel_index=None, coords=None):
        for b in range(x.shape[0]):
            self.windows.append((tuple(x.shape[2:]), tuple(int(v) for v in voxel_index[b, :, 0, 0, 0])))
        return super().__call__(x, voxel_index, coords)


def test_default_window_is_the_model_patch_size():
    vol = torch.rand(1, 1, 40, 24, 20, generator=torch.Generator().manual_seed(5))
    ex = WindowRecorder(patch_size=(16, 8, 8))
    assert default_roi(ex) == (16, 8, 8)
    got = extract_volume(ex, vol, overlap=0.0, progress=False, out_dtype=torch.float32)
    plan = window_plan(ex, vol.shape, None, 0.0)
    assert plan.window == (16, 8, 8) and plan.counts == (3, 3, 3)
    assert {w for w, _ in ex.windows} == {(16, 8, 8)}
    assert sorted(o for _, o in ex.windows) == sorted(plan.origins())  # every planned window, once
    for a, b in zip(got, whole_pass(ex, vol, 4)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # an explicit roi wins; an extractor that does not know its training window gets DEFAULT_ROI
    assert window_plan(ex, vol.shape, (8, 8, 8), 0.0).window == (8, 8, 8)
    assert default_roi(PointwisePyramid()) == DEFAULT_ROI
    # a real extractor: the patch size saved with the model
    real = FeatureExtractor(Backbone(1, 1, base_channels=4, num_levels=2), get_task_class("random")({}),
                            PreprocessConfig(), "random", {"config": {"patch_size": [24, 16, 8]}})
    assert default_roi(real) == (24, 16, 8) and window_plan(real, (64, 64, 64)).window == (24, 16, 8)


def test_levels_upsample_dtype_and_numpy_input():
    vol = np.random.default_rng(1).random((20, 18, 12)).astype(np.float32)
    ex = PointwisePyramid()
    f16 = extract_volume(ex, vol, roi=(16, 16, 8), overlap=0.25, levels=[2, 0], progress=False)
    assert [f.dtype for f in f16] == [torch.float16, torch.float16]
    assert [tuple(f.shape) for f in f16] == [(1, 4, 5, 5, 3), (1, 2, 20, 18, 12)]
    up = extract_volume(ex, vol, roi=(16, 16, 8), overlap=0.25, levels=[2], upsample=True, progress=False,
                        out_dtype=torch.float32)[0]
    assert up.shape == (1, 4, 20, 18, 12)
    coarse = extract_volume(ex, vol, roi=(16, 16, 8), overlap=0.25, levels=[2], progress=False,
                            out_dtype=torch.float32)[0]
    # upsampled voxel v equals coarse voxel v // 4; features_at reads the same without upsampling
    torch.testing.assert_close(up[0, :, 13, 2, 11], coarse[0, :, 3, 0, 2])
    vox = torch.tensor([[13, 2, 11], [0, 17, 5]])
    torch.testing.assert_close(features_at([coarse], [4], vox), up[0][:, vox[:, 0], vox[:, 1], vox[:, 2]].t())
    with pytest.raises(ValueError, match="level 3"):
        extract_volume(ex, vol, roi=(16, 16, 8), levels=[3], progress=False)


def _extractor(method: str, base=4, num_levels=3):
    torch.manual_seed(0)
    cfg = {"condition": "none", "diffusion_steps": 100, "feature_timesteps": [10, 30]} if method == "diffusion" else {}
    task = get_task_class(method)(cfg)
    bb = Backbone(task.in_channels, task.out_channels, base_channels=base, num_levels=num_levels,
                  time_embedding=task.uses_timestep)
    task.setup(bb)
    with torch.no_grad():  # non-trivial GroupNorm affine and time MLP
        for p in bb.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return FeatureExtractor(bb, task, PreprocessConfig(), method, {})


@pytest.mark.parametrize("method", ["random", "diffusion"])
def test_sliding_features_equal_patch_features(method):
    """Windows that tile the volume (overlap 0): each region's features are those of a single pass
    over that patch, with the diffusion noise of the patch's absolute position."""
    ex = _extractor(method)
    vol = torch.rand(1, 1, 32, 16, 32, generator=torch.Generator().manual_seed(1))
    got = extract_volume(ex, vol, roi=(16, 16, 16), overlap=0.0, mode="constant", out_dtype=torch.float32,
                         progress=False)
    for ox in (0, 16):
        for oz in (0, 16):
            patch = vol[:, :, ox:ox + 16, :, oz:oz + 16]
            ref = ex(patch, voxel_index=index_grid((16, 16, 16), (ox, 0, oz)))
            for f, r, lv in zip(got, ref, ex.levels):
                s = lv.stride
                torch.testing.assert_close(f[:, :, ox // s:(ox + 16) // s, :, oz // s:(oz + 16) // s], r,
                                           rtol=1e-4, atol=1e-4)
    if method == "diffusion":
        # the fixed noise really depends on the position: the patch pass with the wrong origin differs
        wrong = ex(vol[:, :, 16:, :, :16])
        assert not torch.allclose(got[0][:, :, 16:, :, :16], wrong[0], atol=1e-3)
        assert got[0].shape[1] == 2 * 4  # two timesteps concatenated


def test_overlapping_windows_blend_patch_features():
    """With overlap, every voxel is the mean (constant blending) of the patch passes covering it."""
    ex = _extractor("random")
    vol = torch.rand(1, 1, 24, 16, 24, generator=torch.Generator().manual_seed(2))
    got = extract_volume(ex, vol, roi=(16, 16, 16), overlap=0.5, mode="constant", out_dtype=torch.float32,
                         progress=False)
    acc = [torch.zeros_like(f) for f in got]
    cnt = [torch.zeros(1, 1, *f.shape[2:]) for f in got]
    for ox in (0, 8):
        for oz in (0, 8):
            ref = ex(vol[:, :, ox:ox + 16, :, oz:oz + 16])
            for k, (r, lv) in enumerate(zip(ref, ex.levels)):
                s = lv.stride
                sl = (slice(None), slice(None), slice(ox // s, (ox + 16) // s), slice(None), slice(oz // s, (oz + 16) // s))
                acc[k][sl] += r
                cnt[k][sl] += 1
    for f, a, c in zip(got, acc, cnt):
        torch.testing.assert_close(f, a / c, rtol=1e-4, atol=1e-4)
    # the interior of the volume, covered by all four windows, is not simply the first window's
    first = ex(vol[:, :, :16, :, :16])[0]
    assert not torch.allclose(got[0][:, :, 8:16, :, 8:16], first[:, :, 8:16, :, 8:16], atol=1e-4)


def test_one_window_over_the_volume_is_one_pass_without_blending():
    """A window at least the volume's size (the frozen probes' whole-volume window): the features are
    those of one pass over the volume padded to the divisor at its far ends, unblended (bit for bit,
    with gaussian weights too), for every volume of a batch."""
    ex = _extractor("diffusion")  # divisor 4
    vols = torch.rand(2, 1, 18, 12, 15, generator=torch.Generator().manual_seed(5))
    plan = window_plan(ex, (18, 12, 15), (32, 16, 16), 0.25)
    assert plan.origins() == [(0, 0, 0)] and plan.window == (20, 12, 16)
    got = extract_volume(ex, vols, roi=(32, 16, 16), overlap=0.25, out_dtype=torch.float32, progress=False)
    for b in range(2):
        ref = ex(F.pad(vols[b:b + 1], (0, 1, 0, 0, 0, 2)), voxel_index=index_grid((20, 12, 16), (0, 0, 0)))
        for f, r, lv in zip(got, ref, ex.levels):
            s = lv.stride
            want = r[:, :, : -(-18 // s), : -(-12 // s), : -(-15 // s)]
            assert f[b:b + 1].shape == want.shape and torch.equal(f[b:b + 1], want)


def test_gaussian_interior_close_to_single_pass_for_a_large_window():
    """A volume a bit larger than the window: in the interior the blended features follow a single
    pass over the whole volume (GroupNorm statistics and the windows' borders make them differ
    somewhat), much closer than the same pass shifted by one voxel."""
    ex = _extractor("random", base=4, num_levels=2)
    g = torch.Generator().manual_seed(3)
    vol = F.avg_pool3d(torch.rand(1, 1, 40, 40, 24, generator=g), 3, stride=1, padding=1)
    got = extract_volume(ex, vol, roi=(32, 32, 16), overlap=0.5, out_dtype=torch.float32, progress=False)[0]
    ref = ex(vol)[0]
    err = (got - ref)[:, :, 12:28, 12:28, 8:16].abs().mean() / ref.std()
    shifted = (got[:, :, 12:28, 12:28, 8:16] - ref[:, :, 13:29, 12:28, 8:16]).abs().mean() / ref.std()
    assert err < 0.3 and err < 0.5 * shifted, (float(err), float(shifted))


def test_memory_formula_for_the_reference_volume():
    # base-16, 4-level backbone at the defaults: far below 8 GiB; upsampled float16 too
    est = estimate_memory((256, 256, 128), [16, 32, 64, 128], [1, 2, 4, 8])
    assert est["peak"] < 2 * 2**30
    up = estimate_memory((256, 256, 128), [16, 32, 64, 128], [1, 2, 4, 8], upsample=True)
    assert up["result"] == pytest.approx(240 * 256 * 256 * 128 * 2)
    assert up["peak"] < 8 * 2**30


def StandInBPR():
    """A real, untrained ape regressor (small, random weights) at 1 mm."""
    from voxdiff.bpr.models import build_bpr

    torch.manual_seed(0)
    m = build_bpr("ape", {"channels": (4, 4, 4), "patch_size": (16, 16, 16)},
                  {"spacing": [1.0, 1.0, 1.0], "hu_window": [-1350.0, 1000.0]})
    return m.eval()


@pytest.mark.parametrize("condition", ["window", "volume"])
def test_bpr_condition_per_window_or_per_volume(condition):
    from voxdiff.pretrain.tasks.diffusion import DiffusionTask

    torch.manual_seed(0)
    task = DiffusionTask({"condition": "ape", "diffusion_steps": 100, "feature_timesteps": [10]}, bpr=StandInBPR())
    bb = Backbone(task.in_channels, 1, base_channels=4, num_levels=2, time_embedding=True)
    ex = FeatureExtractor(bb, task, PreprocessConfig(), "diffusion", {})
    vol = torch.rand(1, 1, 32, 16, 16, generator=torch.Generator().manual_seed(4))
    got = extract_volume(ex, vol, roi=(16, 16, 16), overlap=0.0, mode="constant", out_dtype=torch.float32,
                         progress=False, condition=condition, levels=[0])[0]
    whole_bpr = ex.condition_map(vol)
    for ox in (0, 16):
        patch = vol[:, :, ox:ox + 16]
        idx = index_grid((16, 16, 16), (ox, 0, 0))
        per_volume = ex(patch, voxel_index=idx, coords=whole_bpr[:, :, ox:ox + 16])[0]
        per_window = ex(patch, voxel_index=idx)[0]
        expect, other = (per_volume, per_window) if condition == "volume" else (per_window, per_volume)
        torch.testing.assert_close(got[:, :, ox:ox + 16], expect, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got[:, :, ox:ox + 16], other, atol=1e-4)
