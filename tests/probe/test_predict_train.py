"""Sliding-window prediction vs direct prediction; frozen probing; a short probe run learns."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from standin import StandinExtractor

from voxdiff.core.config import from_dict
from voxdiff.core.errors import ModelError
from voxdiff.core.metrics import mean_dice
from voxdiff.data.preprocess import PreprocessConfig, preprocess
from voxdiff.probe.heads import LinearHead, NonLinearHead
from voxdiff.probe.predict import predict_case, predict_logits
from voxdiff.probe.train import PatchSampler, ProbeConfig, dice_ce_loss, fit_heads, fit_network


def _probe(**flat) -> ProbeConfig:
    """A ProbeConfig from flat field names (``steps``, ``roi``, ...), read into the sections."""
    return from_dict(ProbeConfig, flat)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sliding_window_equals_direct_prediction():
    # pointwise extractor + nearest-upsampling linear head: every logit depends on one voxel, so
    # overlapping, blended windows must reproduce the whole-volume result exactly
    ext = StandinExtractor((4, 8, 16), pointwise=True)
    torch.manual_seed(0)
    head = LinearHead([4, 8, 16], 5, upsample="nearest").eval()
    vol = np.random.default_rng(0).random((40, 40, 24)).astype(np.float32)
    direct = head(ext(torch.from_numpy(vol)[None, None]))[0]
    sw = predict_logits(ext, head, vol, roi=(16, 16, 8), overlap=0.5)
    assert sw.shape == direct.shape
    torch.testing.assert_close(sw, direct.detach(), atol=1e-4, rtol=1e-4)


def test_single_window_equals_direct_with_real_backbone():
    from voxdiff.pretrain.backbone import Backbone

    class Ext:
        def __init__(self):
            torch.manual_seed(0)
            self.backbone = Backbone(in_channels=1, base_channels=4, num_levels=3).eval()
            self.levels = self.backbone.levels
            self.preprocess = PreprocessConfig()

        def __call__(self, x):
            return self.backbone.pyramid(x)

    ext = Ext()
    head = NonLinearHead([lv.channels for lv in ext.levels], 4, hidden=8).eval()
    vol = np.random.default_rng(1).random((16, 16, 8)).astype(np.float32)
    with torch.no_grad():
        direct = head(ext(torch.from_numpy(vol)[None, None]))[0]
    sw = predict_logits(ext, head, vol, roi=(16, 16, 8), overlap=0.5)
    torch.testing.assert_close(sw, direct, atol=1e-4, rtol=1e-4)


def test_sampler_centres_on_every_organ():
    lab = np.zeros((40, 40, 20), np.uint8)
    lab[2:4, 2:4, 2:4] = 12  # a tiny "adrenal" in a corner
    lab[20:36, 5:35, 3:18] = 6  # a big "liver"
    from voxdiff.data.types import Case, CaseMeta

    meta = CaseMeta("c", None, None, lab.shape, np.eye(4), np.eye(4), (1.0, 1.0, 1.0))
    case = Case(np.zeros(lab.shape, np.float32), lab, meta)
    s = PatchSampler([case], (-1000, 1000), (8, 8, 8), fg_prob=1.0, rng=np.random.default_rng(0))
    _, y = s.sample(40)
    has_small = sum(int((yi == 12).any()) for yi in y)
    assert has_small >= 10  # class-uniform: about half of the patches see the tiny organ
    assert y.shape == (40, 8, 8, 8)


def test_dice_ce_loss_prefers_the_right_answer():
    y = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    y[0, :2] = 3
    good = torch.nn.functional.one_hot(y, 5).movedim(-1, 1).float() * 10
    bad = torch.zeros_like(good)
    assert dice_ce_loss(good, y) < 0.1 < dice_ce_loss(bad, y)


@pytest.fixture(scope="module")
def phantom_cases():
    from voxdiff.data.phantom import PhantomConfig, generate_phantom

    pre = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
    cfg = PhantomConfig(shape=(48, 48, 32))
    return [preprocess(generate_phantom(s, cfg), pre) for s in (11, 12, 13)], pre


def test_short_probe_run_beats_untrained_head_and_keeps_backbone_frozen(phantom_cases):
    cases, pre = phantom_cases
    ext = StandinExtractor((8, 16, 32), seed=0, preprocess=pre)
    before = {k: v.clone() for k, v in ext.backbone.state_dict().items()}
    cfg = _probe(patch_size=(32, 32, 16), batch_size=2, steps=60, val_every=30, roi=(32, 32, 32), lr=1e-2,
                 bf16=False, device="cpu", hidden=16, fg_prob=0.5)
    history = []
    heads = fit_heads(ext, cases[:2], cases[2:], ["linear", "nonlinear"], cfg, progress=False, history=history)
    after = ext.backbone.state_dict()
    for k, v in before.items():  # weights and BatchNorm running statistics untouched
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    assert not ext.backbone.training
    assert [h["step"] for h in history] == [30, 60]
    assert all(not h.training for h in heads.values())
    test = cases[2]
    torch.manual_seed(123)
    untrained = NonLinearHead([8, 16, 32], 14, hidden=16).eval()
    pred0 = predict_case(ext, untrained, test, roi=(32, 32, 32))
    pred = predict_case(ext, heads["nonlinear"], test, roi=(32, 32, 32))
    # the best validation checkpoint was kept: its score is the one recorded
    assert heads["nonlinear"].best_val_dice == pytest.approx(max(h["val_dice"]["nonlinear"] for h in history))
    assert mean_dice(pred, test.label, 14) > mean_dice(pred0, test.label, 14) + 0.02
    liver = lambda p: 2 * ((p == 6) & (test.label == 6)).sum() / ((p == 6).sum() + (test.label == 6).sum())
    assert liver(pred) > 0.2 > liver(pred0)


def test_finetune_and_scratch_change_the_backbone_copy_only(phantom_cases):
    cases, pre = phantom_cases
    ext = StandinExtractor((4, 8, 8), seed=0, preprocess=pre)
    for p in ext.backbone.parameters():  # the stand-in freezes itself; fit_network must unfreeze the copy
        assert not p.requires_grad
    before = {k: v.clone() for k, v in ext.backbone.state_dict().items()}
    cfg = _probe(patch_size=(16, 16, 16), steps=4, warmup_steps=2, val_every=4, roi=(16, 16, 16), bf16=False,
                 device="cpu", hidden=8)
    tuned, head = fit_network(ext, cases[:1], [], "finetune", cfg, progress=False)
    changed = any(not torch.equal(before[k], v) for k, v in tuned.backbone.state_dict().items())
    assert changed
    for k, v in ext.backbone.state_dict().items():
        assert torch.equal(before[k], v)
    scratch, _ = fit_network(ext, cases[:1], [], "scratch", replace(cfg, optim=replace(cfg.optim, steps=1)), progress=False)
    assert not torch.equal(scratch.backbone.stem.weight, ext.backbone.stem.weight)


def test_finetune_real_feature_extractor_and_bundle(phantom_cases, tmp_path):
    """Gradients reach a voxdiff FeatureExtractor's backbone (whose call is no-grad) and the tuned
    weights land in the bundle's backbone/."""
    from voxdiff.core.config import from_dict
    from voxdiff.pretrain.load import load_pretrained
    from voxdiff.pretrain.train import PretrainConfig, pretrain
    from voxdiff.probe.bundle import load_segmenter, save_segmenter

    cases, pre = phantom_cases
    pretrain(from_dict(PretrainConfig, dict(method="random", preprocess=pre, steps=1, base_channels=4, num_levels=3,
                            patch_size=(16, 16, 16), bf16=False, device="cpu")), tmp_path / "pt", cases=cases[:1],
             progress=False)
    ext = load_pretrained(tmp_path / "pt")
    cfg = _probe(patch_size=(16, 16, 16), steps=3, warmup_steps=1, val_every=3, roi=(16, 16, 16), device="cpu",
                 hidden=8, backbone_lr=1e-2)
    tuned, head = fit_network(ext, cases[:1], [], "finetune", cfg, progress=False)
    w0, w1 = ext.backbone.stem.weight, tuned.backbone.stem.weight
    assert not torch.equal(w0, w1)
    save_segmenter(tmp_path / "m", tmp_path / "pt", head, "finetune", pre, (16, 16, 16), 0.5, tuned_extractor=tuned)
    seg = load_segmenter(tmp_path / "m")
    torch.testing.assert_close(seg.extractor.backbone.stem.weight, w1)


def test_feature_side_is_trained_through_and_kept_by_the_bundle(phantom_cases, tmp_path):
    """``cfg.feature_side`` decides the pyramid fine-tuning trains through (and the head's input
    channels); the bundle records it and loads an extractor with the same pyramid."""
    from voxdiff.core.config import from_dict
    from voxdiff.pretrain.load import load_pretrained
    from voxdiff.pretrain.train import PretrainConfig, pretrain
    from voxdiff.probe.bundle import load_segmenter, save_segmenter

    cases, pre = phantom_cases
    pretrain(from_dict(PretrainConfig, dict(method="random", preprocess=pre, steps=1, base_channels=4, num_levels=3,
                            patch_size=(16, 16, 16), bf16=False, device="cpu")), tmp_path / "pt", cases=cases[:1],
             progress=False)
    ext = load_pretrained(tmp_path / "pt")
    cfg = replace(_probe(patch_size=(16, 16, 16), steps=2, warmup_steps=1, val_every=2, roi=(16, 16, 16), device="cpu",
                         hidden=8), feature_side="both")
    tuned, head = fit_network(ext, cases[:1], [], "finetune", cfg, progress=False)
    assert ext.feature_side == "decoder" and tuned.feature_side == "both"
    assert head.level_channels == [8, 16, 16]
    save_segmenter(tmp_path / "m", tmp_path / "pt", head, "finetune", pre, (16, 16, 16), 0.5, tuned_extractor=tuned,
                   feature_side="both")
    seg = load_segmenter(tmp_path / "m")
    assert seg.extractor.feature_side == "both" and [lv.channels for lv in seg.extractor.levels] == [8, 16, 16]
    x = torch.rand(1, 1, 16, 16, 16)
    torch.testing.assert_close(seg.extractor(x)[0], tuned(x)[0])
    # an unknown side is refused with the file named; a bundle that does not say which side its head
    # was fitted on is refused by its channels
    doc = json.loads((tmp_path / "m" / "segmenter.json").read_text())
    (tmp_path / "m" / "segmenter.json").write_text(json.dumps({**doc, "feature_side": "middle"}))
    with pytest.raises(ModelError, match="segmenter.json.*invalid feature_side 'middle'"):
        load_segmenter(tmp_path / "m")
    doc.pop("feature_side")
    (tmp_path / "m" / "segmenter.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="head expects pyramid channels"):
        load_segmenter(tmp_path / "m")


def test_finetune_takes_the_configured_feature_timesteps(phantom_cases, tmp_path):
    """``cfg.t`` decides which diffusion passes fine-tuning trains through (one pass at t = 1 instead
    of the model's two); the caller's extractor keeps its own."""
    from voxdiff.core.config import from_dict
    from voxdiff.pretrain.load import load_pretrained
    from voxdiff.pretrain.train import PretrainConfig, pretrain

    cases, pre = phantom_cases
    pretrain(from_dict(PretrainConfig, dict(method="diffusion", preprocess=pre, steps=1, base_channels=4, num_levels=3,
                                            patch_size=(16, 16, 16), bf16=False, device="cpu", diffusion_steps=20,
                                            feature_timesteps=(1, 10))), tmp_path / "pt", cases=cases[:1], progress=False)
    ext = load_pretrained(tmp_path / "pt")
    two = [lv.channels for lv in ext.levels]
    cfg = _probe(patch_size=(16, 16, 16), steps=2, warmup_steps=1, val_every=2, roi=(16, 16, 16), device="cpu",
                 hidden=8, t=(1,))
    tuned, head = fit_network(ext, cases[:1], [], "finetune", cfg, progress=False)
    assert tuned.passes == 1 and [lv.channels for lv in tuned.levels] == [c // 2 for c in two]
    assert head.level_channels == [c // 2 for c in two]
    assert ext.passes == 2 and [lv.channels for lv in ext.levels] == two


def test_logits_to_labels_is_argmax_with_the_first_class_on_ties():
    from voxdiff.probe.predict import logits_to_labels

    g = torch.Generator().manual_seed(0)
    lg = torch.randn(14, 9, 8, 7, generator=g)
    lg[5, :3] = lg[2, :3] = 10.0  # ties: the lower class wins, as with argmax
    lg[13, 4] = 11.0
    out = logits_to_labels(lg)
    assert out.dtype == np.uint8 and out.shape == (9, 8, 7)
    np.testing.assert_array_equal(out, lg.argmax(0).numpy())
    assert (out[:3] == 2).all() and (out[4] == 13).all()
    with pytest.raises(ValueError, match="expected logits"):
        logits_to_labels(lg[0])


def test_whole_volume_fine_tuning_of_a_real_extractor_lands_in_a_volume_bundle(phantom_cases, tmp_path):
    """``sampling.whole_volume``: a voxdiff FeatureExtractor fine-tuned on whole volumes validates on
    whole-volume features, and its bundle (``inference: volume``, as ``voxdiff probe`` writes it)
    predicts a case as the tuned network's whole-volume logits do."""
    from voxdiff.core.config import from_dict
    from voxdiff.pretrain.load import load_pretrained
    from voxdiff.pretrain.train import PretrainConfig, pretrain
    from voxdiff.probe.bundle import load_segmenter, save_segmenter
    from voxdiff.probe.predict import logits_to_labels, unit_image
    from voxdiff.probe.voxel import predict_logits_volume

    cases, pre = phantom_cases
    pretrain(from_dict(PretrainConfig, dict(method="random", preprocess=pre, steps=1, base_channels=4, num_levels=3,
                            patch_size=(16, 16, 16), bf16=False, device="cpu")), tmp_path / "pt", cases=cases[:1],
             progress=False)
    ext = load_pretrained(tmp_path / "pt")
    cfg = _probe(steps=2, warmup_steps=0, val_every=2, roi=(16, 16, 16), feature_roi=(64, 64, 64), device="cpu",
                 hidden=8, backbone_lr=1e-2, whole_volume=True, batch_size=1)
    hist: list = []
    tuned, head = fit_network(ext, cases[:1], cases[1:2], "finetune", cfg, progress=False, history=hist)
    assert not torch.equal(ext.backbone.stem.weight, tuned.backbone.stem.weight)
    assert [h["step"] for h in hist] == [2] and np.isfinite(hist[0]["val_dice"]["finetune"])
    save_segmenter(tmp_path / "m", tmp_path / "pt", head, "finetune", pre, (64, 64, 64), 0.5, tuned_extractor=tuned,
                   inference="volume")
    seg = load_segmenter(tmp_path / "m")
    case = cases[1]
    want = logits_to_labels(predict_logits_volume(tuned, {"h": head}, unit_image(case, pre.hu_window), cfg)["h"])
    got = logits_to_labels(predict_logits_volume(seg.extractor, {"h": seg.head}, unit_image(case, pre.hu_window), cfg)["h"])
    np.testing.assert_array_equal(got, want)
    assert seg.info["inference"] == "volume"
