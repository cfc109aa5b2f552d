"""Voxel-sampled probing on cached whole-volume features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxdiff.core.config import from_dict
from voxdiff.core.metrics import mean_dice
from voxdiff.data.preprocess import PreprocessConfig, preprocess
from voxdiff.probe.heads import NonLinearHead
from voxdiff.probe.predict import logits_to_labels, unit_image
from voxdiff.probe.train import ProbeConfig
from voxdiff.probe.voxel import (
    VoxelSampler,
    fit_heads_voxels,
    gather,
    make_voxel_head,
    predict_logits_volume,
    voxel_logits,
    voxel_tables,
)


def _probe(**flat) -> ProbeConfig:
    """A ProbeConfig from flat field names (``steps``, ``roi``, ...), read into the sections."""
    return from_dict(ProbeConfig, flat)

pytestmark = pytest.mark.usefixtures("one_thread")


class _Ext:
    """A random real Backbone with the extractor call contract."""

    def __init__(self, pre):
        from voxdiff.pretrain.backbone import Backbone

        torch.manual_seed(0)
        self.backbone = Backbone(in_channels=1, base_channels=8, num_levels=3).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.levels = self.backbone.levels
        self.preprocess = pre
        self.method = "random"

    def __call__(self, x, voxel_index=None, coords=None):
        with torch.no_grad():
            return self.backbone.pyramid(x)


@pytest.mark.parametrize("kind", ["linear", "nonlinear", "mix"])
def test_gathered_voxels_give_the_same_logits_as_the_full_volume(kind):
    """With nearest upsampling a head is a per-voxel function of the pyramid: training on gathered
    feature vectors is exactly training the head that inference applies to whole volumes."""
    rng = np.random.default_rng(0)
    chans, strides = [4, 8, 16], [1, 2, 4]
    shape = (16, 12, 8)
    pyr = [torch.randn(c, *(s // st for s in shape)) for c, st in zip(chans, strides)]
    label = rng.integers(0, 3, size=shape).astype(np.uint8)
    cfg = _probe(n_classes=3, hidden=8, upsample="nearest")
    head = make_voxel_head(kind, chans, cfg).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
        full = head([p[None] for p in pyr], out_size=shape)[0]  # (C, X, Y, Z)
        flat = rng.choice(label.size, 50, replace=False)
        g, y = gather([voxel_tables(pyr)], [label], strides, [(0, flat)])
        vox = voxel_logits(head, g)
    xyz = np.unravel_index(flat, shape)
    torch.testing.assert_close(vox, full[:, xyz[0], xyz[1], xyz[2]].t(), atol=1e-4, rtol=1e-4)
    for lv, (p, st) in enumerate(zip(pyr, strides)):  # each level read at voxel // stride
        want = p[:, xyz[0] // st, xyz[1] // st, xyz[2] // st]
        assert torch.equal(g[lv][0, :, :, 0, 0], want)
    assert torch.equal(y, torch.from_numpy(label.ravel()[flat].astype(np.int64)))


def test_sampler_balances_organs():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[:15] = 1  # a big organ
    lab[19, 19, 19] = 2  # a one-voxel organ
    s = VoxelSampler([lab], fg_prob=1.0, rng=np.random.default_rng(0))
    (i, flat), = s.sample(2000)
    got = lab.ravel()[flat]
    assert 0.35 < (got == 2).mean() < 0.65  # the tiny organ gets about half of the organ voxels


def test_voxel_probe_beats_untrained_head_on_phantoms():
    from voxdiff.data.phantom import PhantomConfig, generate_phantom

    pre = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
    cases = [preprocess(generate_phantom(s, PhantomConfig(shape=(48, 48, 32))), pre) for s in (21, 22, 23, 24)]
    ext = _Ext(pre)
    before = {k: v.clone() for k, v in ext.backbone.state_dict().items()}
    cfg = _probe(steps=500, val_every=250, roi=(32, 32, 32), overlap=0.25, lr=1e-2, bf16=False, device="cpu",
                 hidden=16, fg_prob=0.5)
    hist: list = []
    heads = fit_heads_voxels(ext, cases[:2], cases[2:3], ["linear", "nonlinear", "mix"], cfg, voxels_per_step=2048,
                             progress=False, history=hist)
    for k, v in before.items():
        torch.testing.assert_close(ext.backbone.state_dict()[k], v, rtol=0, atol=0)
    assert [h["step"] for h in hist] == [250, 500]
    test = cases[3]
    untrained = NonLinearHead([lv.channels for lv in ext.levels], 14, hidden=16, upsample="nearest").eval()
    unit = unit_image(test, pre.hu_window)
    lg = predict_logits_volume(ext, {"untrained": untrained, **heads}, unit, cfg)
    d = {n: mean_dice(logits_to_labels(v), test.label, 14) for n, v in lg.items()}
    # a random 8-channel backbone on 48x48x32 phantoms at 4 mm: small numbers, but an untrained head is ~0
    assert d["nonlinear"] > d["untrained"] + 0.01
    assert d["linear"] > d["untrained"] + 0.01
    assert d["mix"] > d["untrained"] + 0.01


def test_feature_roi_covering_the_volume_extracts_it_in_one_window():
    from voxdiff.probe.train import volume_roi
    from voxdiff.probe.voxel import volume_pyramid

    pre = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
    ext = _Ext(pre)
    rng = np.random.default_rng(0)
    vol = rng.random((40, 36, 28)).astype(np.float32)  # padded to 40 x 36 x 28 (divisor 4: no padding)
    whole = volume_pyramid(ext, vol, _probe(roi=(16, 16, 16), overlap=0.25, feature_roi=(1024, 1024, 1024)))
    direct = ext(torch.from_numpy(vol)[None, None])
    for a, b in zip(whole, direct):
        torch.testing.assert_close(a.float(), b[0].float(), rtol=0, atol=2e-3)  # fp16 storage
    windows = volume_pyramid(ext, vol, _probe(roi=(16, 16, 16), overlap=0.25))
    assert (windows[0].float() - whole[0].float()).abs().max() > 1e-2  # small windows see other statistics
    assert volume_roi(_probe(roi=(8, 8, 8))) == (8, 8, 8)
    assert volume_roi(_probe(roi=(8, 8, 8), feature_roi=(64, 64, 32))) == (64, 64, 32)


def test_feature_source_routes_volume_pyramids_and_none_restores():
    from voxdiff.probe import voxel

    pre = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
    ext = _Ext(pre)
    vol = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    cfg = _probe(roi=(16, 16, 16), overlap=0.25)
    calls = []

    def source(extractor, image_unit, c):
        calls.append(image_unit.shape)
        return [torch.zeros(1, 2, 2, 2)]

    voxel.set_feature_source(source)
    try:
        got = voxel.volume_pyramid(ext, vol, cfg)
    finally:
        voxel.set_feature_source(None)
    assert calls == [(16, 16, 16)] and got[0].shape == (1, 2, 2, 2)
    plain = voxel.volume_pyramid(ext, vol, cfg)
    assert len(calls) == 1 and len(plain) == len(ext.levels)


class _CondExt:
    """An extractor whose features are its condition: channel 0 of ``coords`` (the x index about the
    centre of the volume it was given), averaged to strides 1, 2 and 4."""

    def __init__(self, pre):
        from types import SimpleNamespace

        self.levels = [SimpleNamespace(stride=s) for s in (1, 2, 4)]
        self.preprocess = pre
        self.seen: list[tuple[int, ...]] = []

    def condition_map(self, x, size=None):
        self.seen.append(tuple(x.shape[2:]))
        size = tuple(x.shape[2:]) if size is None else size
        i = torch.arange(size[0], dtype=torch.float32) - (x.shape[2] - 1) / 2
        return i[:, None, None].expand(*size)[None, None].clone()

    def __call__(self, x, voxel_index=None, coords=None):
        c = coords[:, :1]
        return [c, torch.nn.functional.avg_pool3d(c, 2), torch.nn.functional.avg_pool3d(c, 4)]


def test_whole_volume_condition_is_the_volumes_own_not_the_padded_ones():
    """The voxel probe's whole-volume features see the condition map of the volume itself, centred as
    in pretraining, even when the volume is not a multiple of the largest stride; the levels still
    cover the rounded-up grid exactly."""
    from voxdiff.probe.voxel import compute_volume_pyramid

    ext = _CondExt(PreprocessConfig(spacing=(4.0, 4.0, 4.0)))
    vol = np.random.default_rng(0).random((30, 20, 13)).astype(np.float32)
    pyr = compute_volume_pyramid(ext, vol, _probe(roi=(16, 16, 16), overlap=0.25))
    assert ext.seen == [(30, 20, 13)]  # the map of the unpadded volume
    assert [tuple(p.shape) for p in pyr] == [(1, 32, 20, 16), (1, 16, 10, 8), (1, 8, 5, 4)]
    x0 = pyr[0][0, :30, 0, 0].float()
    torch.testing.assert_close(x0, torch.arange(30, dtype=torch.float32) - 14.5)  # centre of 30, not of 32
    assert pyr[0][:, 30:].abs().max() == 0 and pyr[0][:, :, :, 13:].abs().max() == 0  # beyond the volume


def test_deformed_copies_are_extracted_and_sampled_like_the_training_cases(monkeypatch):
    """``sampling.deformed_copies``: the voxel probe reads the features of each copy as of a case of
    its own, and end-to-end training samples its patches from the cases and their copies."""
    from standin import two_organ_case

    from voxdiff.probe import train as train_mod
    from voxdiff.probe import voxel as voxel_mod

    pre = PreprocessConfig(spacing=(1.0, 1.0, 1.0))
    cases = [two_organ_case(s) for s in (1, 2)]
    ext = _Ext(pre)
    seen: list[np.ndarray] = []

    def source(extractor, image_unit, cfg):
        seen.append(np.asarray(image_unit))
        return voxel_mod.compute_volume_pyramid(extractor, image_unit, cfg)

    voxel_mod.set_feature_source(source)
    try:
        cfg = _probe(steps=2, val_every=100, roi=(24, 24, 16), overlap=0.25, bf16=False, device="cpu", hidden=8,
                     deformed_copies=2, fov_crops=2)
        fit_heads_voxels(ext, cases[:1], (), ["nonlinear"], cfg, voxels_per_step=256, progress=False)
    finally:
        voxel_mod.set_feature_source(None)
    assert len(seen) == 5  # the case, its two copies and its two field-of-view crops, each its own window
    assert not np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[1], seen[2])
    assert all(s.size < seen[0].size for s in seen[3:])  # the crops are smaller volumes

    sampled: list[list[str]] = []
    real = train_mod.make_sampler

    class Sampled(Exception):
        pass

    def spy(extractor, cs, *a, **k):
        sampled.append([c.case_id for c in cs])
        real(extractor, cs, *a, **k)
        raise Sampled  # what is sampled from is all this test needs

    monkeypatch.setattr(train_mod, "make_sampler", spy)
    tcfg = _probe(steps=1, val_every=100, patch_size=(16, 16, 16), roi=(24, 24, 16), bf16=False, device="cpu",
                  hidden=8, deformed_copies=1, fov_crops=3)
    with pytest.raises(Sampled):
        train_mod.fit_network(ext, cases, (), "scratch", tcfg, progress=False)
    assert sampled == [["c1", "c2", "c1-def0", "c2-def0"]]  # no crops: end-to-end patches are crops already


def test_voxel_heads_train_alike_whatever_their_upsampling_and_differ_on_whole_volumes():
    from voxdiff.data.phantom import PhantomConfig, generate_phantom

    pre = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
    case = preprocess(generate_phantom(41, PhantomConfig(shape=(48, 48, 32))), pre)
    ext = _Ext(pre)
    got = {}
    for up in ("nearest", "trilinear", "auto"):
        cfg = _probe(steps=20, val_every=20, roi=(32, 32, 32), overlap=0.25, lr=1e-2, bf16=False, device="cpu",
                     hidden=8, upsample=up)
        got[up] = fit_heads_voxels(ext, [case], (), ["linear", "nonlinear"], cfg, voxels_per_step=512, progress=False)
    unit = unit_image(case, pre.hu_window)
    auto = {"linear": "nearest", "nonlinear": "trilinear"}  # what held-out phantoms favoured per head
    # every head's whole-volume logits from one extraction of the volume's features
    logits = predict_logits_volume(ext, {f"{n}-{up}": got[up][n] for n in auto for up in got}, unit, cfg)
    for n in ("linear", "nonlinear"):
        a, b, c = got["nearest"][n], got["trilinear"][n], got["auto"][n]
        assert (a.upsample, b.upsample, c.upsample) == ("nearest", "trilinear", auto[n])
        for (k, v), w, x in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
            assert torch.equal(v, w) and torch.equal(v, x), k  # the same training
        la, lb, lc = (logits[f"{n}-{up}"] for up in ("nearest", "trilinear", "auto"))
        assert float((la - lb).abs().max()) > 1e-3  # but not the same whole-volume logits
        assert torch.equal(lc, la if auto[n] == "nearest" else lb)


def test_auto_upsampling_is_the_default_and_resolved_per_head():
    from voxdiff.probe.voxel import make_voxel_head

    cfg = _probe()
    assert cfg.head.upsample == "auto"
    built = {n: make_voxel_head(n, [4, 8, 16], cfg, groups=2 if n == "mix" else 1).upsample
             for n in ("linear", "nonlinear", "mix")}
    assert built == {"linear": "nearest", "nonlinear": "trilinear", "mix": "trilinear"}
    forced = _probe(upsample="trilinear")
    assert {make_voxel_head(n, [4, 8, 16], forced).upsample for n in ("linear", "nonlinear")} == {"trilinear"}
    with pytest.raises(ValueError, match="frozen heads only"):
        make_voxel_head("finetune", [4, 8, 16], cfg)
