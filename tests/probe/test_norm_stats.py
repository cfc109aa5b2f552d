"""``norm_stats: fixed`` in probing: frozen heads and fine-tuning run the backbone with GroupNorm
statistics estimated on the labelled training images, the segmenter bundle keeps them, from-scratch
training does not use them, and a damaged bundle is refused with the file named."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from voxdiff.core.config import from_dict
from voxdiff.core.errors import InputError, ModelError
from voxdiff.data.preprocess import PreprocessConfig, preprocess
from voxdiff.features.norm import FixedGroupNorm, fixed_norm_stats, norm_stats_of, stats_digest
from voxdiff.probe.train import ProbeConfig, check_probe_config, fit_network

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from voxdiff.data.phantom import PhantomConfig, generate_phantom
    from voxdiff.pretrain.train import PretrainConfig, pretrain

    pre = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
    cases = [preprocess(generate_phantom(s, PhantomConfig(shape=(48, 48, 32))), pre) for s in (21, 22)]
    pt = tmp_path_factory.mktemp("pt") / "model"
    pretrain(from_dict(PretrainConfig, dict(method="diffusion", preprocess=pre, steps=2, base_channels=4, num_levels=3,
                                            patch_size=(16, 16, 16), bf16=False, device="cpu", diffusion_steps=20,
                                            feature_timesteps=(1, 10))), pt, cases=cases[:1], progress=False)
    return pt, cases, pre


def _cfg(**kw) -> ProbeConfig:
    base = dict(patch_size=(16, 16, 16), steps=2, warmup_steps=1, val_every=2, roi=(16, 16, 16), device="cpu",
                hidden=8, voxels_per_step=256, norm_stats="fixed", norm_crops=4)
    return from_dict(ProbeConfig, {**base, **kw})


def test_frozen_heads_fine_tuning_and_the_bundle_share_the_fixed_statistics(setup, tmp_path):
    from voxdiff.pretrain.load import load_pretrained
    from voxdiff.probe.bundle import NORM_STATS_FILE, load_segmenter, save_segmenter
    from voxdiff.probe.voxel import fit_heads_voxels

    pt, cases, pre = setup
    cfg = _cfg()
    ext = load_pretrained(pt)
    heads = fit_heads_voxels(ext, cases[:1], [], ("nonlinear",), cfg, progress=False)
    stats = fixed_norm_stats(ext.backbone)
    assert norm_stats_of(ext) == "fixed" and stats
    # LP-FT: fine-tuning the same cases with the same seed starts from the same statistics, trains the
    # weights (the GroupNorms' affine ones included) and leaves the statistics as they were
    fresh = load_pretrained(pt)
    tuned, head = fit_network(fresh, cases[:1], [], "finetune", replace(cfg, optim=replace(cfg.optim, backbone_lr=1e-2)),
                              progress=False, init_head=heads["nonlinear"])
    assert stats_digest(fixed_norm_stats(tuned.backbone)) == stats_digest(stats)
    assert norm_stats_of(fresh) == "window"  # the caller's extractor is not changed
    gn = [n for n, m in tuned.backbone.named_modules() if isinstance(m, FixedGroupNorm)][0]
    w0 = dict(ext.backbone.named_modules())[gn].weight
    assert not torch.equal(dict(tuned.backbone.named_modules())[gn].weight, w0)
    # other training cases give other statistics; from scratch uses each input's own
    other = load_pretrained(pt)
    fit_heads_voxels(other, cases[1:], [], ("linear",), cfg, progress=False)
    assert stats_digest(fixed_norm_stats(other.backbone)) != stats_digest(stats)
    scratch, _ = fit_network(ext, cases[:1], [], "scratch", replace(cfg, optim=replace(cfg.optim, steps=1)), progress=False)
    assert norm_stats_of(scratch) == "window" and norm_stats_of(ext) == "fixed"

    # the bundles: a frozen head's (pretrained backbone) and the tuned network's
    x = torch.rand(1, 1, 16, 16, 16)
    for name, h, tuned_ext, src in (("frozen", heads["nonlinear"], None, ext), ("tuned", head, tuned, tuned)):
        out = save_segmenter(tmp_path / name, pt, h, "nonlinear", pre, (16, 16, 16), 0.5, tuned_extractor=tuned_ext,
                             norm_stats=fixed_norm_stats(src.backbone))
        doc = json.loads((out / "segmenter.json").read_text())
        assert doc["norm_stats"] == "fixed" and doc["format_version"] == 2  # a version-1 reader must not drop them
        seg = load_segmenter(out, device="cpu")
        assert stats_digest(fixed_norm_stats(seg.extractor.backbone)) == stats_digest(stats)
        torch.testing.assert_close(seg.extractor(x)[0], src(x)[0])
    # a plain bundle says window and loads GroupNorms
    plain = save_segmenter(tmp_path / "plain", pt, heads["nonlinear"], "nonlinear", pre, (16, 16, 16), 0.5)
    doc = json.loads((plain / "segmenter.json").read_text())
    assert doc["norm_stats"] == "window" and doc["format_version"] == 1  # still readable by earlier versions
    assert norm_stats_of(load_segmenter(plain, device="cpu").extractor) == "window"

    # damaged bundles: refused with the file named
    f = tmp_path / "frozen" / NORM_STATS_FILE
    data = f.read_bytes()
    f.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="norm_stats.safetensors.*unusable normalisation statistics"):
        load_segmenter(tmp_path / "frozen", device="cpu")
    f.unlink()
    with pytest.raises(ModelError, match="norm_stats.safetensors is missing"):
        load_segmenter(tmp_path / "frozen", device="cpu")
    f.write_bytes(data)
    js = tmp_path / "frozen" / "segmenter.json"
    js.write_text(json.dumps({**json.loads(js.read_text()), "norm_stats": "batch"}))
    with pytest.raises(ModelError, match="segmenter.json.*invalid norm_stats 'batch'"):
        load_segmenter(tmp_path / "frozen", device="cpu")


def test_norm_settings_are_checked():
    check_probe_config(_cfg())
    with pytest.raises(InputError, match="norm_stats must be one of window, fixed"):
        check_probe_config(_cfg(norm_stats="batch"))
    with pytest.raises(InputError, match="norm_crops must be >= 1"):
        check_probe_config(_cfg(norm_crops=0))


def test_feature_cache_keys_tell_fixed_statistics_apart(setup):
    from voxdiff.features.cache import feature_key
    from voxdiff.features.extract import ExtractConfig
    from voxdiff.features.norm import with_norm_stats
    from voxdiff.pretrain.load import load_pretrained

    pt, cases, pre = setup
    ext = load_pretrained(pt)
    cfg = ExtractConfig()
    plain = feature_key(ext, cfg)
    units = [np.clip((c.image + 1000) / 2000, 0, 1) for c in cases]
    with_norm_stats(ext, "fixed", units, n=2, seed=0)
    one = feature_key(ext, cfg)
    with_norm_stats(ext, "fixed", units, n=2, seed=1)
    assert len({plain, one, feature_key(ext, cfg)}) == 3
    with_norm_stats(ext, "window", units)
    assert feature_key(ext, cfg) == plain
