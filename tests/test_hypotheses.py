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
