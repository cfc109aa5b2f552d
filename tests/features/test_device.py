"""Whole-volume features with the extractor on VOXDIFF_TEST_DEVICE (cpu unless set): windows run
on the extractor's device, the result is gathered on the CPU and equals one pass over the volume."""

import numpy as np
import pytest
import torch

from voxdiff.data.preprocess import PreprocessConfig
from voxdiff.features import extract_volume
from voxdiff.pretrain.backbone import Backbone
from voxdiff.pretrain.diffusion import index_grid
from voxdiff.pretrain.load import FeatureExtractor
from voxdiff.pretrain.tasks.base import get_task_class

pytestmark = [pytest.mark.device, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("method", ["random", "diffusion"])
def test_features_on_the_test_device_equal_a_single_pass(method, test_device):
    torch.manual_seed(0)
    task = get_task_class(method)({"condition": "none", "feature_timesteps": [10]} if method == "diffusion" else {})
    bb = Backbone(task.in_channels, task.out_channels, base_channels=4, num_levels=3,
                  time_embedding=task.uses_timestep)
    task.setup(bb)
    ex = FeatureExtractor(bb, task, PreprocessConfig(), method, {}).to(test_device)
    vol = np.random.default_rng(1).random((32, 24, 16), dtype=np.float32)
    got = extract_volume(ex, vol, roi=(32, 24, 16), overlap=0.0, mode="constant", out_dtype=torch.float32,
                         progress=False)
    assert all(f.device.type == "cpu" for f in got)  # gathered on the CPU whatever the device
    x = torch.from_numpy(vol)[None, None].to(test_device)
    with torch.no_grad():
        ref = ex(x, voxel_index=index_grid((32, 24, 16)).to(test_device))
    assert [tuple(f.shape) for f in got] == [tuple(r.shape) for r in ref]
    for f, r in zip(got, ref):
        assert r.device.type == test_device.type
        torch.testing.assert_close(f, r.float().cpu(), rtol=1e-4, atol=1e-4)
