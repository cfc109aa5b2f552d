"""Learning-rate schedule shared by every training loop (BPR, pretraining, probing)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, steps: int, peak: float = 1.0, warmup: int = 0, final_ratio: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` steps to ``peak``, then cosine decay to ``final_ratio * peak``
    at ``steps`` (and constant after it). ``step`` counts from 0."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    prog = min(1.0, max(0.0, (step - warmup) / max(1, steps - warmup)))
    lo = peak * final_ratio
    return lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * prog))
