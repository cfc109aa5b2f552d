"""vox2vec's FPN3d (Goncharov et al., MICCAI 2023) with a timestep embedding (registry name ``fpn3d``).

The architecture of vox2vec's public code, rewritten here; the paper-scale setting is its default
(``base_channels=16, num_levels=6, blocks_per_level=2``: widths 16..512, 1008 feature channels,
about 47.6M parameters without the timestep embedding):

* a 3x3x3 stem conv; at every level ``blocks_per_level`` pre-activation residual blocks
  (norm-ReLU-conv3x3x3, norm-ReLU-conv3x3x3, identity skip) at the level's width ``base * 2**i``;
* down: 2x2x2 max-pooling then a 1x1x1 conv doubling the width;
* the bottom level: ``blocks_per_level`` blocks at the coarsest width;
* up (decoder, coarse to fine): a 1x1x1 conv halving the width, nearest-neighbour x2 upsampling,
  **plus** a 1x1x1 lateral conv of the encoder output of that level (summed, not concatenated),
  then ``blocks_per_level`` blocks;
* the pyramid is the decoder output of every level, finest first, the bottom level last.

Normalisation is BatchNorm as in vox2vec (``norm="batch"``), or GroupNorm (``norm="group"``, at
most ``norm_groups`` groups of >= 4 channels), which does not depend on the batch and is what
diffusion models usually use. With BatchNorm, features (``eval()``) use the running statistics
gathered during training, over every timestep that was drawn.

Additions for voxdiff's pretext tasks: with ``time_embedding=True`` a sinusoidal timestep embedding
and an MLP give every residual block a scale/shift after its second normalisation (FiLM, as in
:class:`voxdiff.pretrain.backbones.unet.Backbone`; ``t=None`` uses a learned null embedding), and a
norm-ReLU-1x1x1 head on the finest level predicts ``out_channels`` (noise, reconstruction).
``in_channels`` counts the image plus any condition channels (the BPR map).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from voxdiff.core.layers import PointwiseConv3d

from .base import LevelInfo, PyramidBackboneBase, film

NORMS = ("batch", "group")


def _norm(kind: str, channels: int, max_groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    g = max(1, min(max_groups, channels // 4 if channels >= 4 else 1))
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


class PreActBlock(nn.Module):
    """norm-ReLU-conv3, norm (+ timestep scale/shift)-ReLU-conv3, added to the input."""

    def __init__(self, channels: int, temb_dim: int | None, norm: str, groups: int):
        super().__init__()
        self.norm1 = _norm(norm, channels, groups)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2 = _norm(norm, channels, groups)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        self.temb = nn.Linear(temb_dim, 2 * channels) if temb_dim else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        h = film(self.norm2(h), self.temb, temb)
        return x + self.conv2(F.relu(h))


class FPN3d(PyramidBackboneBase):
    """vox2vec's 3D FPN with an optional timestep embedding; see the module docstring.

    Args:
        in_channels: input channels (1 image + condition channels).
        out_channels: channels predicted by the 1x1x1 head on the finest level.
        base_channels: width of the finest level; level i has ``base * 2**i``.
        num_levels: number of resolutions (strides 1 .. 2**(num_levels-1)); vox2vec: 6.
        blocks_per_level: residual blocks per level in the encoder, at the bottom and in the
            decoder; vox2vec: 2.
        time_embedding: build the timestep embedding MLP and per-block scale/shift.
        norm: ``batch`` (vox2vec) or ``group``.
        norm_groups: maximum GroupNorm groups (``norm="group"`` only).
        coord_channels: how many of ``in_channels`` are condition channels (informational).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 16, num_levels: int = 6,
                 blocks_per_level: int = 2, time_embedding: bool = True, norm: str = "batch", norm_groups: int = 8,
                 coord_channels: int = 0):
        super().__init__()
        if num_levels < 1 or base_channels < 1 or blocks_per_level < 1:
            raise ValueError("num_levels, base_channels and blocks_per_level must be >= 1")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        self._init_common(dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                               num_levels=num_levels, blocks_per_level=blocks_per_level,
                               time_embedding=time_embedding, norm=norm, norm_groups=norm_groups,
                               coord_channels=coord_channels),
                          in_channels, out_channels, time_embedding, base_channels)
        self.num_levels = num_levels
        widths = [base_channels * 2 ** i for i in range(num_levels)]
        self.widths = widths
        tdim = self.temb_dim

        def blocks(w: int) -> nn.ModuleList:
            return nn.ModuleList([PreActBlock(w, tdim, norm, norm_groups) for _ in range(blocks_per_level)])

        self.stem = nn.Conv3d(in_channels, widths[0], 3, padding=1)
        # encoder[i] runs at level i; encoder[-1] is the bottom level
        self.encoder = nn.ModuleList([blocks(w) for w in widths])
        self.down = nn.ModuleList([PointwiseConv3d(widths[i], widths[i + 1]) for i in range(num_levels - 1)])
        # decoder level i (< num_levels - 1): up[i](level i+1) + lateral[i](encoder output i) -> decoder[i]
        self.up = nn.ModuleList([PointwiseConv3d(widths[i + 1], widths[i]) for i in range(num_levels - 1)])
        self.lateral = nn.ModuleList([PointwiseConv3d(widths[i], widths[i]) for i in range(num_levels - 1)])
        self.decoder = nn.ModuleList([blocks(widths[i]) for i in range(num_levels - 1)])
        self.out_norm = _norm(norm, widths[0], norm_groups)
        self.out_conv = PointwiseConv3d(widths[0], out_channels)
        self.levels = [LevelInfo(f"level{i}", widths[i], 2 ** i) for i in range(num_levels)]

    @staticmethod
    def _run(stack: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        for blk in stack:
            h = blk(h, temb)
        return h

    def _sides(self, x: torch.Tensor, temb: torch.Tensor | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(the encoder's output at every level, the decoder pyramid), finest first; both end with
        the bottom level."""
        h = self.stem(x)
        skips = []
        for i in range(self.num_levels - 1):
            h = self._run(self.encoder[i], h, temb)
            skips.append(h)
            h = self.down[i](F.max_pool3d(h, 2))
        h = self._run(self.encoder[-1], h, temb)
        skips.append(h)
        out = [h]
        for i in reversed(range(self.num_levels - 1)):
            h = F.interpolate(self.up[i](h), scale_factor=2, mode="nearest") + self.lateral[i](skips[i])
            h = self._run(self.decoder[i], h, temb)
            out.append(h)
        return skips, out[::-1]

    def head(self, finest: torch.Tensor) -> torch.Tensor:
        return self.out_conv(F.relu(self.out_norm(finest)))

    def decoder_modules(self) -> list[nn.Module]:
        return [self.up, self.lateral, self.decoder]
