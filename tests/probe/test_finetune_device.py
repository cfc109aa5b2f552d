"""Fine-tuning (and sliding-window prediction of the tuned network) on VOXDIFF_TEST_DEVICE (cpu
unless set), with a diffusion extractor conditioned on a whole-volume APE map: the part of the demo
after the frozen probes, which had never run on a GPU."""

import numpy as np
import pytest
import torch
from standin import body_box_case as _case

from voxdiff.bpr.models import build_bpr
from voxdiff.core.config import from_dict
from voxdiff.data.preprocess import PreprocessConfig
from voxdiff.pretrain.backbone import Backbone
from voxdiff.pretrain.load import FeatureExtractor
from voxdiff.pretrain.tasks.diffusion import DiffusionTask
from voxdiff.probe.predict import predict_logits, unit_image
from voxdiff.probe.train import ProbeConfig, fit_network

pytestmark = [pytest.mark.device, pytest.mark.usefixtures("one_thread")]

PRE = {"spacing": [3.0, 3.0, 3.0], "hu_window": [-1350.0, 1000.0]}


def _extractor():
    torch.manual_seed(0)
    bpr = build_bpr("ape", {"channels": (4, 4, 4), "patch_size": (16, 16, 16)}, PRE).eval()
    task = DiffusionTask({"preprocess": PRE, "condition": "ape", "diffusion_steps": 100, "feature_timesteps": [1, 50]},
                         bpr=bpr)
    bb = Backbone(task.in_channels, 1, base_channels=4, num_levels=2, time_embedding=True)
    return FeatureExtractor(bb, task, PreprocessConfig(spacing=(3.0, 3.0, 3.0)), "diffusion", {})


def test_finetuning_and_prediction_run_on_the_test_device(test_device):
    ext = _extractor()
    cfg = from_dict(ProbeConfig, {"steps": 4, "val_every": 2, "patch_size": (16, 16, 16), "batch_size": 2,
                                  "warmup_steps": 1, "hidden": 8, "roi": (16, 16, 16), "overlap": 0.25,
                                  "device": str(test_device), "bf16": False, "lr": 1e-2, "backbone_lr": 1e-3})
    hist: list = []
    before = {k: v.clone() for k, v in ext.backbone.state_dict().items()}
    tuned, head = fit_network(ext, [_case(0)], [_case(1)], "finetune", cfg, progress=False, history=hist)
    assert [h["step"] for h in hist] == [2, 4] and all(np.isfinite(h["val_dice"]["finetune"]) for h in hist)
    assert next(tuned.backbone.parameters()).device.type == test_device.type
    assert next(head.parameters()).device.type == test_device.type
    changed = [k for k, v in tuned.backbone.state_dict().items() if not torch.equal(v.cpu(), before[k])]
    assert changed  # the backbone was trained, not only the head
    case = _case(2)
    lg = predict_logits(tuned, head, unit_image(case, tuple(PRE["hu_window"])), roi=(16, 16, 16), overlap=0.25)
    assert lg.device.type == "cpu" and tuple(lg.shape) == (14, *case.image.shape) and torch.isfinite(lg).all()
