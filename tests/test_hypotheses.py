"""benchmarks/hypotheses.py: the channel-block selection that lets several timestep sets share one
feature extraction (the mix and clean_mix tests)."""

import pytest
import torch
from standin import load_benchmark


def _pyramid(extracted, channels=(2, 3)):
    """Levels with one block per pass whose values name (pass, channel): 100 * t + c."""
    levels = []
    for c in channels:
        blocks = [torch.full((c, 2, 2, 2), 0.0) + 100 * t + torch.arange(c).view(c, 1, 1, 1) for t in extracted]
        levels.append(torch.cat(blocks, 0))
    return levels


def test_timestep_blocks_keeps_the_named_passes_in_the_order_asked():
    hyp = load_benchmark("hypotheses")
    extracted = (1, 100, 250, 500, 900)
    pyr = _pyramid(extracted)
    out = hyp.timestep_blocks(extracted, (900, 1))(pyr)
    assert [f.shape[0] for f in out] == [4, 6]
    assert out[0][:, 0, 0, 0].tolist() == [90000, 90001, 100, 101]
    assert out[1][:, 0, 0, 0].tolist() == [90000, 90001, 90002, 100, 101, 102]
    # batched levels (N, C, ...) are split along the channels
    b = hyp.timestep_blocks(extracted, (250,))([pyr[0].unsqueeze(0)])
    assert b[0].shape == (1, 2, 2, 2, 2) and b[0][0, :, 0, 0, 0].tolist() == [25000, 25001]


def test_timestep_blocks_refuses_a_timestep_that_was_not_extracted():
    hyp = load_benchmark("hypotheses")
    with pytest.raises(ValueError):
        hyp.timestep_blocks((1, 250), (1, 500))


def test_head_overrides_change_steps_and_width_and_nothing_else():
    from voxdiff.core.config import from_dict
    from voxdiff.probe.train import ProbeConfig

    hyp = load_benchmark("hypotheses")

    class Exp:  # the two things probe_settings reads from an Experiment, its flat overrides as it takes them
        budget = {"probe_voxels": 4096}

        def probe_cfg(self, **over):
            return from_dict(ProbeConfig, dict(over))

    base = ProbeConfig()
    try:
        hyp.HEAD.clear()
        vox, cfg = hyp.probe_settings(Exp())
        assert vox == 4096 and cfg == base
        hyp.HEAD.update(steps=base.optim.steps * 8, hidden=base.head.hidden * 2)
        _, cfg = hyp.probe_settings(Exp())
        assert cfg.optim.steps == base.optim.steps * 8 and cfg.head.hidden == base.head.hidden * 2
        # validation interval, learning rate and every other section as the experiment's
        assert cfg.optim.val_every == base.optim.val_every and cfg.optim.lr == base.optim.lr
        assert cfg.sampling == base.sampling and cfg.inference == base.inference and cfg.head.blocks == base.head.blocks
    finally:
        hyp.HEAD.clear()
