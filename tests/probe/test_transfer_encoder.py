"""Fine-tuning that transfers the encoder only (``transfer encoder``): the decoder path of the
pretrained backbone is re-initialised at random and trains at ``scratch_lr``, the rest keeps its
pretrained weights and trains at ``backbone_lr``; refused where it cannot be meant."""

from __future__ import annotations

import pytest
import torch
from standin import StandinExtractor
from standin import body_box_case as _case

from voxdiff.bpr.models import build_bpr
from voxdiff.core.config import from_dict
from voxdiff.core.errors import InputError
from voxdiff.data.preprocess import PreprocessConfig
from voxdiff.pretrain.backbones import build_backbone
from voxdiff.pretrain.load import FeatureExtractor
from voxdiff.pretrain.tasks.diffusion import DiffusionTask
from voxdiff.probe.heads import make_head
from voxdiff.probe.train import ProbeConfig, check_probe_config, fit_network, reinit_

pytestmark = pytest.mark.usefixtures("one_thread")

PRE = {"spacing": [3.0, 3.0, 3.0], "hu_window": [-1350.0, 1000.0]}


def _extractor(name: str = "unet"):
    torch.manual_seed(0)
    bpr = build_bpr("ape", {"channels": (4, 4, 4), "patch_size": (16, 16, 16)}, PRE).eval()
    task = DiffusionTask({"preprocess": PRE, "condition": "ape", "diffusion_steps": 100, "feature_timesteps": [1]},
                         bpr=bpr)
    bb = build_backbone(name, in_channels=task.in_channels, out_channels=1, base_channels=4, num_levels=2,
                        time_embedding=True)
    return FeatureExtractor(bb, task, PreprocessConfig(spacing=(3.0, 3.0, 3.0)), "diffusion", {})


def _cfg(**flat) -> ProbeConfig:
    base = dict(val_every=100, patch_size=(16, 16, 16), batch_size=2, warmup_steps=0, hidden=8, roi=(16, 16, 16),
                device="cpu", bf16=False, lr=1e-2, transfer="encoder")
    return from_dict(ProbeConfig, {**base, **flat})


def _decoder_names(backbone) -> set[str]:
    ids = {id(p) for m in backbone.decoder_modules() for p in m.parameters()}
    return {k for k, p in backbone.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("name", ["unet", "fpn3d"])
def test_the_decoder_modules_are_what_the_decoder_pyramid_alone_depends_on(name):
    bb = _extractor(name).backbone.eval()
    dec = _decoder_names(bb)
    assert dec and len(dec) < len(dict(bb.named_parameters()))
    assert not any(k.startswith(("stem", "time_mlp", "out_")) for k in dec)
    x = torch.rand(1, bb.in_channels, 16, 16, 16)
    with torch.no_grad():
        enc0, dec0 = bb.pyramid(x, 1, side="encoder"), bb.pyramid(x, 1)
        for m in bb.decoder_modules():
            reinit_(m, 7)
        enc1, dec1 = bb.pyramid(x, 1, side="encoder"), bb.pyramid(x, 1)
    assert all(torch.equal(a, b) for a, b in zip(enc0, enc1))  # the encoder is untouched
    assert not torch.allclose(dec0[0], dec1[0])  # the finest decoder level is new
    assert torch.equal(dec0[-1], dec1[-1])  # the coarsest level is the encoder's bottom


def test_the_decoder_starts_at_random_and_the_encoder_where_pretraining_left_it():
    ext = _extractor()
    start = {k: v.clone() for k, v in ext.backbone.named_parameters()}
    dec = _decoder_names(ext.backbone)
    # learning rates so small that one step moves no weight by more than ~1e-9
    tiny = _cfg(steps=1, backbone_lr=1e-9, scratch_lr=1e-9)
    enc_tuned, _ = fit_network(ext, [_case(0)], [], "finetune", tiny, progress=False)
    again, _ = fit_network(ext, [_case(0)], [], "finetune", tiny, progress=False)
    kept, _ = fit_network(ext, [_case(0)], [], "finetune", _cfg(steps=1, backbone_lr=1e-9, scratch_lr=1e-9,
                                                                transfer="all"), progress=False)
    tuned = dict(enc_tuned.backbone.named_parameters())
    for k, w0 in start.items():
        torch.testing.assert_close(dict(kept.backbone.named_parameters())[k], w0, rtol=0, atol=1e-7)
        if k in dec:
            if w0.ndim > 1:  # weights (GroupNorm's ones and zeros are reset to the same values)
                assert (tuned[k] - w0).abs().max() > 1e-3, k
        else:
            torch.testing.assert_close(tuned[k], w0, rtol=0, atol=1e-7)
    # seeded: the same re-initialisation every run
    for k, v in again.backbone.named_parameters():
        assert torch.equal(v, tuned[k]), k


def test_the_new_decoder_trains_at_scratch_lr_and_the_encoder_at_backbone_lr():
    ext = _extractor()
    start = {k: v.clone() for k, v in ext.backbone.named_parameters()}
    dec = _decoder_names(ext.backbone)
    fresh, _ = fit_network(ext, [_case(0)], [], "finetune", _cfg(steps=1, backbone_lr=1e-9, scratch_lr=1e-9),
                           progress=False)
    trained, _ = fit_network(ext, [_case(0)], [], "finetune", _cfg(steps=3, backbone_lr=1e-9, scratch_lr=1e-2),
                             progress=False)
    f, t = dict(fresh.backbone.named_parameters()), dict(trained.backbone.named_parameters())
    moved = max(float((t[k] - f[k]).abs().max()) for k in dec)
    assert moved > 1e-3  # three Adam steps at 1e-2
    for k, w0 in start.items():
        if k not in dec:
            torch.testing.assert_close(t[k], w0, rtol=0, atol=1e-7)


def test_refused_where_it_cannot_be_meant():
    for flat, word in [({"transfer": "decoder"}, "transfer must be one of"),
                       ({"feature_side": "encoder"}, "feature_side"),
                       ({"norm_stats": "fixed"}, "norm_stats window")]:
        with pytest.raises(InputError, match=word):
            check_probe_config(_cfg(**flat))
    ext = _extractor()
    head = make_head("nonlinear", [int(lv.channels) for lv in ext.levels], 14, 8, 1)
    with pytest.raises(InputError, match="fitted head"):
        fit_network(ext, [_case(0)], [], "finetune", _cfg(steps=1), progress=False, init_head=head)
    with pytest.raises(InputError, match="norm_stats window"):  # the function itself, not only the CLI's check
        fit_network(ext, [_case(0)], [], "finetune", _cfg(steps=1, norm_stats="fixed"), progress=False)
    with pytest.raises(InputError, match="does not name its decoder"):
        fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [], "finetune", _cfg(steps=1), progress=False)
    # from scratch re-initialises everything anyway: the setting changes nothing there
    a, _ = fit_network(ext, [_case(0)], [], "scratch", _cfg(steps=1), progress=False)
    b, _ = fit_network(ext, [_case(0)], [], "scratch", _cfg(steps=1, transfer="all"), progress=False)
    for (k, v), w in zip(a.backbone.named_parameters(), b.backbone.parameters()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("transfer", ["all", "encoder"])
def test_tune_decoder_trains_the_decoder_alone(transfer):
    ext = _extractor()
    start = {k: v.clone() for k, v in ext.backbone.named_parameters()}
    dec = _decoder_names(ext.backbone)
    cfg = _cfg(steps=3, backbone_lr=1e-2, scratch_lr=1e-2, transfer=transfer, tune="decoder", anchor_decay=10.0)
    tuned, _ = fit_network(ext, [_case(0)], [], "finetune", cfg, progress=False)
    t = dict(tuned.backbone.named_parameters())
    for k, w0 in start.items():
        if k not in dec:
            assert torch.equal(t[k], w0), k  # frozen exactly, even under L2-SP
    assert max(float((t[k] - start[k]).abs().max()) for k in dec) > 1e-3
    if transfer == "all":  # the pretrained decoder, trained: a few steps of 1e-2 from where it was
        assert max(float((t[k] - start[k]).abs().max()) for k in dec) < 0.1


def test_tune_decoder_is_refused_where_it_cannot_be_meant():
    with pytest.raises(InputError, match="tune must be one of"):
        check_probe_config(_cfg(transfer="all", tune="encoder"))
    with pytest.raises(InputError, match="feature_side encoder never reads"):
        check_probe_config(_cfg(transfer="all", tune="decoder", feature_side="encoder"))
    ext = _extractor()
    with pytest.raises(InputError, match="from scratch"):
        fit_network(ext, [_case(0)], [], "scratch", _cfg(steps=1, transfer="all", tune="decoder"), progress=False)
    with pytest.raises(InputError, match="tune decoder: .*does not name its decoder"):
        fit_network(StandinExtractor(channels=(4, 8)), [_case(0)], [], "finetune",
                    _cfg(steps=1, transfer="all", tune="decoder"), progress=False)
