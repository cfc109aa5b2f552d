"""Voxel probing with its heads on VOXDIFF_TEST_DEVICE (cpu unless set): the whole-volume features
stay on the CPU, the heads train on the device, validation and prediction feed each slab of the
pyramid to the head's device and return logits on the CPU. (On a GPU this caught the demo failing at
its first validation: CPU features into CUDA heads.)"""

import numpy as np
import pytest
import torch

from voxdiff.core.config import from_dict
from voxdiff.data.phantom import PhantomConfig, generate_phantom
from voxdiff.data.preprocess import PreprocessConfig, preprocess
from voxdiff.probe.predict import unit_image
from voxdiff.probe.train import ProbeConfig
from voxdiff.probe.voxel import compute_volume_pyramid, fit_heads_voxels, predict_logits_volume

pytestmark = [pytest.mark.device, pytest.mark.usefixtures("one_thread")]


class _Ext:
    """A random Backbone on the CPU with the extractor call contract."""

    def __init__(self, pre):
        from voxdiff.pretrain.backbone import Backbone

        torch.manual_seed(0)
        self.backbone = Backbone(in_channels=1, base_channels=4, num_levels=3).eval()
        self.levels = self.backbone.levels
        self.preprocess = pre
        self.method = "random"

    def parameters(self):  # where extract_volume runs the windows
        return self.backbone.parameters()

    def __call__(self, x, voxel_index=None, coords=None):
        with torch.no_grad():
            return self.backbone.pyramid(x)


def test_voxel_heads_train_validate_and_predict_on_the_test_device(test_device):
    pre = PreprocessConfig(spacing=(6.0, 6.0, 6.0))
    cases = [preprocess(generate_phantom(s, PhantomConfig(shape=(40, 40, 24))), pre) for s in (31, 32)]
    ext = _Ext(pre)
    cfg = from_dict(ProbeConfig, {"steps": 4, "val_every": 2, "roi": (16, 16, 16), "overlap": 0.25, "hidden": 8,
                                  "bf16": False, "device": str(test_device)})
    hist: list = []
    heads = fit_heads_voxels(ext, cases[:1], cases[1:], ["linear", "nonlinear"], cfg, voxels_per_step=512,
                             history=hist)
    assert [h["step"] for h in hist] == [2, 4]  # validated on the whole validation volume twice
    unit = unit_image(cases[1], pre.hu_window)
    pyr = compute_volume_pyramid(ext, unit, cfg)
    assert next(ext.parameters()).device.type == test_device.type  # moved where the probe runs
    assert all(p.device.type == "cpu" for p in pyr)  # features gathered on the CPU
    for n, h in heads.items():
        assert next(h.parameters()).device.type == test_device.type
        got = predict_logits_volume(ext, {n: h}, unit, cfg, pyramid=pyr)[n]
        assert got.device.type == "cpu" and tuple(got.shape[1:]) == unit.shape
        ref = predict_logits_volume(ext, {n: h.cpu()}, unit, cfg, pyramid=pyr)[n]  # the same head on the CPU
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert np.isfinite(got.numpy()).all()
