"""The interface every pretraining method implements.

The training engine (``voxdiff.pretrain.train``) owns the loop: data, optimiser, schedule, EMA,
DDP, checkpoints, logging. A task owns what differs between methods:

* how a training batch is drawn from preprocessed cases (``sample_batch``),
* how many input channels the backbone gets (``in_channels``),
* the loss (``loss``), with any extra trainable modules (e.g. a contrastive projector) held as
  sub-modules of the task so that the engine optimises and checkpoints them too,
* how the frozen backbone is fed at feature-extraction time (``feature_inputs``): for diffusion
  this noises the image to the feature timestep with a fixed noise seed and concatenates the BPR
  map; for the other methods it is the image itself.

Tasks are registered by name (``@register_task("restorative")``) so ``voxdiff pretrain --method
NAME`` and ``load_pretrained`` can find them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

TASKS: dict[str, type["PretextTask"]] = {}


def register_task(name: str):
    def deco(cls: type["PretextTask"]) -> type["PretextTask"]:
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


def get_task_class(name: str) -> type["PretextTask"]:
    # importing the modules fills the registry
    from . import diffusion, restorative, contrastive, random_init  # noqa: F401

    if name not in TASKS:
        raise KeyError(f"unknown pretraining method {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


class PretextTask(nn.Module):
    name: ClassVar[str] = "base"

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    # --- what the backbone sees -------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        """Input channels of the backbone (1 = image only)."""
        return 1

    @property
    def uses_timestep(self) -> bool:
        return False

    # --- training -----------------------------------------------------------------------------
    def sample_batch(self, cases: list, batch_size: int, patch_size: tuple[int, int, int],
                     rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Default: independent random patches. Returns at least ``image`` (B,1,X,Y,Z) in [0,1]
        and ``coords_mm`` (B,3,X,Y,Z)."""
        raise NotImplementedError

    def loss(self, backbone: nn.Module, batch: dict[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss and a dict of extra metrics to log."""
        raise NotImplementedError

    # --- frozen features ------------------------------------------------------------------------
    def feature_inputs(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(backbone input, timestep or None) for extracting features of ``image`` in [0,1]."""
        return image, None
