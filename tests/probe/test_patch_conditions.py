"""Probe and fine-tuning patches see the BPR condition and the noise of their own volume."""

import numpy as np
import torch
from standin import body_box_case as _case

from voxdiff.bpr.fields import case_fields
from voxdiff.bpr.models import build_bpr
from voxdiff.core.config import from_dict
from voxdiff.pretrain.backbone import Backbone
from voxdiff.pretrain.load import FeatureExtractor
from voxdiff.pretrain.tasks.diffusion import DiffusionTask
from voxdiff.probe.train import ProbeConfig, fit_heads, make_sampler


def _probe(**flat) -> ProbeConfig:
    """A ProbeConfig from flat field names (``steps``, ``roi``, ...), read into the sections."""
    return from_dict(ProbeConfig, flat)


def _extractor(source):
    torch.manual_seed(0)
    bpr = build_bpr("ape", {"channels": (4, 4, 4), "patch_size": (16, 16, 16)},
                    {"spacing": [3.0, 3.0, 3.0], "hu_window": [-1350.0, 1000.0]}).eval()
    task = DiffusionTask({"preprocess": {"spacing": [3.0, 3.0, 3.0], "hu_window": [-1350.0, 1000.0]},
                          "condition": "ape", "diffusion_steps": 100, "feature_timesteps": [5],
                          "condition_source": source}, bpr=bpr)
    bb = Backbone(task.in_channels, 1, base_channels=4, num_levels=2, time_embedding=True)
    from voxdiff.data.preprocess import PreprocessConfig

    return FeatureExtractor(bb, task, PreprocessConfig(spacing=(3.0, 3.0, 3.0)), "diffusion", {})


def test_sampler_hands_each_patch_its_volume_field_and_voxel_indices():
    ex = _extractor("volume")
    cases = [_case(0), _case(1)]
    s = make_sampler(ex, cases, _probe(patch_size=(16, 16, 16), fg_prob=0.5), np.random.default_rng(0))
    x, y = s.sample(6)
    inp = s.extractor_inputs()
    fields = case_fields(ex.task.bpr, cases)
    where, starts = s.last
    assert inp["coords"].shape == (6, 3, 16, 16, 16) and inp["voxel_index"].shape == (6, 3, 16, 16, 16)
    for b, (i, o) in enumerate(zip(where, starts)):
        np.testing.assert_array_equal(inp["coords"][b].numpy(), fields[i].crop(o, (16, 16, 16)))
        assert [int(v) for v in inp["voxel_index"][b, :, 0, 0, 0]] == list(o)
    # an extractor pretrained on per-patch maps gets no fields (each patch is mapped alone)
    s2 = make_sampler(_extractor("patch"), cases, _probe(patch_size=(16, 16, 16)), np.random.default_rng(0))
    s2.sample(2)
    assert "coords" not in s2.extractor_inputs()


def test_fit_heads_runs_on_a_conditioned_extractor():
    ex = _extractor("volume")
    cfg = _probe(patch_size=(16, 16, 16), steps=3, batch_size=2, val_every=100, hidden=4, roi=(16, 16, 16))
    heads = fit_heads(ex, [_case(0), _case(1)], heads=("linear",), cfg=cfg, progress=False)
    assert set(heads) == {"linear"}


def test_fresh_noise_gives_each_training_patch_a_new_noise_draw_at_its_true_condition():
    ex = _extractor("volume")
    cases = [_case(0)]
    cfg = _probe(patch_size=(16, 16, 16), fg_prob=0.0, fresh_noise=True)
    fields = case_fields(ex.task.bpr, cases)
    fresh = make_sampler(ex, cases, cfg, np.random.default_rng(0), end_to_end=True)
    fixed = make_sampler(ex, cases, cfg, np.random.default_rng(0))  # head fitting: the option does not apply
    noises = []
    for s in (fresh, fresh, fixed):
        x, _ = s.sample(2)
        inp = s.extractor_inputs()
        where, starts = s.last
        for b, (i, o) in enumerate(zip(where, starts)):  # the condition stays that of the patch's voxels
            np.testing.assert_array_equal(inp["coords"][b].numpy(), fields[i].crop(o, (16, 16, 16)))
        noises.append((starts, ex.task.feature_noise(x, inp["voxel_index"])))
    (s0, n0), (s1, n1), (s2, n2) = noises
    assert [int(v) for v in fixed.extractor_inputs()["voxel_index"][0, :, 0, 0, 0]] == list(s2[0])
    assert abs(float(n0.std()) - 1) < 0.1 and abs(float(n1.std()) - 1) < 0.1  # still unit normal noise
    # the same box of the volume gets another draw at every step, and not the fixed one
    same = ex.task.feature_noise(torch.zeros(1, 1, 16, 16, 16), torch.as_tensor(
        np.array(s0[0])[None, :, None, None, None] + np.indices((16, 16, 16))[None]))
    assert float(torch.corrcoef(torch.stack([n0[0].ravel(), same[0].ravel()]))[0, 1]) < 0.1
    assert not torch.equal(n0, n1)
