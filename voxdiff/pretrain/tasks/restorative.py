"""Restorative pretraining (Models Genesis style): reconstruct the original patch from a distorted copy.

Distortions (``genesis_transforms``): local voxel shuffling, a non-linear (Bezier) intensity curve,
in-painting or out-painting, each with its probability (``RestorativeConfig``). The backbone's output
convolution (one channel) predicts the original patch; loss = mean squared error. Frozen features are
taken from the undistorted image, without a timestep. Numbers and sizes follow the Models Genesis code
scaled to the patch (see ``genesis_transforms``); its random flips of input and target are not applied
(no other method here flips, and left/right organs need side-specific features; docs/PRETRAIN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import PretextTask, options_from_config, random_patches, register_task
from .genesis_transforms import GenesisConfig, genesis_distort


@dataclass
class RestorativeConfig(GenesisConfig):
    """Options of the restorative task (the Models Genesis distortion probabilities and sizes)."""


@register_task("restorative")
class RestorativeTask(PretextTask):
    """Models Genesis: L2 reconstruction of the clean patch from a distorted one."""

    Config = RestorativeConfig

    def __init__(self, config: dict | None = None):
        super().__init__(config if config is not None else {})
        self.opts: RestorativeConfig = options_from_config(RestorativeConfig, config, "restorative")

    def sample_batch(self, cases: list, batch_size: int, patch_size: tuple[int, int, int],
                     rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Random patches of HU cases mapped to [0, 1] with the model's window; ``image`` = clean (the
        target), ``input`` = distorted, plus ``coords_mm`` and ``origin`` as in :func:`random_patches`."""
        batch = random_patches(cases, batch_size, patch_size, rng, window=self.hu_window)
        batch["input"] = torch.from_numpy(np.stack([self.distort(x[0].numpy(), rng) for x in batch["image"]]))[:, None]
        return batch

    def distort(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Distort one ``(X, Y, Z)`` patch in [0, 1] (exposed for figures and tests)."""
        return genesis_distort(image, rng, self.opts)[0]

    def loss(self, backbone: nn.Module, batch: dict[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        target = batch["image"]
        x = batch.get("input")
        if x is None:  # a batch drawn by someone else: distort here, seeded from the generator
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())
            rng = np.random.default_rng(seed)
            x = torch.from_numpy(np.stack([self.distort(p[0].cpu().numpy(), rng) for p in target]))[:, None]
            x = x.to(target.device)
        pred = _prediction(backbone(x, t=None))
        if pred.shape != target.shape:
            raise RuntimeError(f"restorative task needs a 1-channel full-resolution prediction, got {tuple(pred.shape)}")
        loss = F.mse_loss(pred.float(), target.float())
        with torch.no_grad():
            identity = F.mse_loss(x.float(), target.float())
        # 0-d tensors: summed on the device by the engine (no host synchronisation per step)
        return loss, {"mse": loss.detach(), "mse_identity": identity}


def _prediction(out: Any) -> torch.Tensor:
    """The prediction of ``Backbone.forward`` (which returns ``(prediction, pyramid)``)."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return out
