"""A tiny stand-in feature extractor that follows the ``FeatureExtractor`` contract.

``StandinExtractor(channels=(4, 8, 16))`` is a small random conv pyramid: called on
``(B, 1, X, Y, Z)`` images in [0, 1] it returns ``[f_1, f_2, f_4, ...]`` (finest first, strides
1, 2, 4, ...). It has ``levels``, ``preprocess``, ``method`` and ``backbone`` like the extractors of
:func:`voxdiff.pretrain.load_pretrained`. Tests use it to exercise heads, probing and prediction
without a pretrained model; ``pointwise=True`` gives kernel-1 convolutions (no spatial context),
for which sliding-window and whole-volume predictions must agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StandinLevel:
    name: str
    channels: int
    stride: int


class _Pyramid(nn.Module):
    def __init__(self, channels: Sequence[int], in_channels: int = 1, pointwise: bool = False):
        super().__init__()
        k = 1 if pointwise else 3
        self.pointwise = pointwise
        self.stem = nn.Conv3d(in_channels, channels[0], k, padding=k // 2)
        self.down = nn.ModuleList(
            nn.Conv3d(channels[i - 1], channels[i], k, padding=k // 2) for i in range(1, len(channels))
        )
        # a norm layer whose running statistics tests can watch (identity statistics, eval mode)
        self.norm = nn.BatchNorm3d(channels[-1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.tanh(self.stem((x - 0.5) * 10.0)) * 2.0
        out = [h]
        for i, conv in enumerate(self.down):
            # pointwise: plain subsampling keeps every output voxel a function of one input voxel
            h = h[:, :, ::2, ::2, ::2] if self.pointwise else F.avg_pool3d(h, 2)
            h = torch.tanh(conv(h)) * 2.0
            if i == len(self.down) - 1:
                h = self.norm(h)
            out.append(h)
        return out


class StandinExtractor:
    """Random conv pyramid with the ``FeatureExtractor`` call contract."""

    method = "standin"

    def __init__(self, channels: Sequence[int] = (4, 8, 16), seed: int = 0, pointwise: bool = False, preprocess=None):
        from voxdiff.data.preprocess import PreprocessConfig

        g = torch.random.fork_rng(devices=[])
        with g:
            torch.manual_seed(seed)
            self.backbone = _Pyramid(list(channels), pointwise=pointwise)
        self.backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.levels = [StandinLevel(f"level{i}", int(c), 2**i) for i, c in enumerate(channels)]
        self.preprocess = preprocess if preprocess is not None else PreprocessConfig()

    @property
    def divisor(self) -> int:
        return self.levels[-1].stride

    def __call__(self, image_unit: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(image_unit)
