"""The ``random`` baseline: the same backbone with random (seeded) weights, never trained.

``voxdiff pretrain --method random`` writes the initial weights as a backbone checkpoint so the
probing protocol can be run on an untrained network ("random init, frozen"). Features are taken
from the clean image without a timestep.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import PretextTask, register_task


@register_task("random")
class RandomInitTask(PretextTask):
    """No pretext: zero training steps."""

    trains = False

    def __init__(self, config: Any = None):
        super().__init__(config)

    def loss(self, backbone: nn.Module, batch: dict[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        raise RuntimeError("the random-init baseline has no training loss")
