import math

import pytest

from voxdiff.core.schedule import warmup_cosine


def test_warmup_is_linear_then_cosine_reaches_final_ratio():
    lrs = [warmup_cosine(s, 100, peak=2.0, warmup=10, final_ratio=0.1) for s in range(120)]
    assert lrs[:10] == pytest.approx([2.0 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(2.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # non-increasing after the warm-up
    assert lrs[100] == pytest.approx(0.2) and lrs[119] == pytest.approx(0.2)  # constant past the end
    mid = warmup_cosine(55, 100, peak=2.0, warmup=10, final_ratio=0.1)  # half-way through the decay
    assert mid == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_no_warmup_starts_at_peak():
    assert warmup_cosine(0, 50) == pytest.approx(1.0)
    assert warmup_cosine(50, 50) == pytest.approx(0.05)
