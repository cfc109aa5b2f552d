"""The default backbone (registry name ``unet``): a GroupNorm/SiLU 3D UNet with a pyramid decoder.

``Backbone`` is a pre-activation residual 3D UNet whose decoder returns the whole feature pyramid
(like vox2vec's FPN3d): ``pyramid[0]`` has stride 1 (full resolution), ``pyramid[i]`` stride
``2**i``, the last entry is the bottleneck. The finest level feeds a GroupNorm-SiLU-1x1x1 conv that
predicts the noise (diffusion) or the reconstruction (restorative).

A sinusoidal timestep embedding goes through an MLP and modulates every residual block by a
scale/shift after its second normalisation (FiLM, as in improved DDPM). Methods that have no
timestep (restorative, contrastive, random) either build the network with
``time_embedding=False`` or call it with ``t=None``, which uses a learned "null" embedding.

The constructor arguments are the configuration saved beside the weights (``config()``), so a
checkpoint rebuilds the network with ``Backbone(**config)``. Encoder and decoder are joined by
concatenation, downsampling is a stride-2 2x2x2 conv, upsampling a stride-2 transposed conv. The
vox2vec architecture is :class:`voxdiff.pretrain.backbones.fpn3d.FPN3d`.

CPU notes (see docs/PRETRAIN.md): use batch >= 2 or bf16 autocast (batch-1 fp32 3D convs take a
slow path), and keep full-resolution activations small (base width 8-16 for CPU budgets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from voxdiff.core.layers import PointwiseConv3d

from .base import LevelInfo, PyramidBackboneBase, film


def _groups(channels: int, max_groups: int) -> int:
    """Largest divisor of ``channels`` <= max_groups with >= 4 channels per group when possible."""
    g = max(1, min(max_groups, channels // 4 if channels >= 4 else 1))
    while channels % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """GN-SiLU-conv3, GN (+ timestep scale/shift)-SiLU-conv3, plus a (1x1x1 projected) skip."""

    def __init__(self, cin: int, cout: int, temb_dim: int | None, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, 2 * cout) if temb_dim else None
        self.skip = PointwiseConv3d(cin, cout) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = film(self.norm2(h), self.temb, temb)
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class Backbone(PyramidBackboneBase):
    """3D UNet/FPN returning the decoder pyramid (registry name ``unet``); see the module docstring.

    Args:
        in_channels: input channels (1 image + condition channels).
        out_channels: channels predicted by the 1x1x1 head on the finest level.
        base_channels: width of the finest level; level i has ``base * 2**i`` (capped by max_channels).
        num_levels: number of resolutions (strides 1 .. 2**(num_levels-1)).
        blocks_per_level: residual blocks per level in the encoder and in the decoder.
        time_embedding: build the timestep embedding MLP and per-block scale/shift.
        norm_groups: maximum GroupNorm groups (at least 4 channels per group are kept).
        max_channels: cap on the width of any level.
        coord_channels: how many of ``in_channels`` are condition channels that
            :meth:`features` concatenates after the image (informational; ``in_channels`` rules).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 16, num_levels: int = 4,
                 blocks_per_level: int = 1, time_embedding: bool = True, norm_groups: int = 8,
                 max_channels: int = 512, coord_channels: int = 0):
        super().__init__()
        if num_levels < 1 or base_channels < 1 or blocks_per_level < 1:
            raise ValueError("num_levels, base_channels and blocks_per_level must be >= 1")
        self._init_common(dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                               num_levels=num_levels, blocks_per_level=blocks_per_level,
                               time_embedding=time_embedding, norm_groups=norm_groups, max_channels=max_channels,
                               coord_channels=coord_channels),
                          in_channels, out_channels, time_embedding, base_channels)
        self.num_levels = num_levels
        widths = [min(base_channels * 2 ** i, max_channels) for i in range(num_levels)]
        self.widths = widths
        tdim = self.temb_dim

        self.stem = nn.Conv3d(in_channels, widths[0], 3, padding=1)
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        for i, w in enumerate(widths):
            cin = widths[0] if i == 0 else widths[i]
            self.enc.append(nn.ModuleList([ResBlock(cin if b == 0 else w, w, tdim, norm_groups)
                                           for b in range(blocks_per_level)]))
            if i + 1 < num_levels:
                self.down.append(nn.Conv3d(w, widths[i + 1], 2, stride=2))
        # decoder: from the bottleneck upwards; level i gets up(level i+1) + skip(i)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(num_levels - 1):
            w = widths[i]
            self.up.append(nn.ConvTranspose3d(widths[i + 1], w, 2, stride=2))
            self.dec.append(nn.ModuleList([ResBlock(2 * w if b == 0 else w, w, tdim, norm_groups)
                                           for b in range(blocks_per_level)]))
        self.out_norm = nn.GroupNorm(_groups(widths[0], norm_groups), widths[0])
        self.out_conv = PointwiseConv3d(widths[0], out_channels)
        self.levels = [LevelInfo(f"level{i}", widths[i], 2 ** i) for i in range(num_levels)]
        self.num_skips = num_levels - 1

    # ------------------------------------------------------------------------------------------
    def _sides(self, x: torch.Tensor, temb: torch.Tensor | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(the encoder's output at every level, the decoder pyramid), finest first; both end with
        the bottleneck."""
        h = self.stem(x)
        skips = []
        for i in range(self.num_levels):
            for blk in self.enc[i]:
                h = blk(h, temb)
            skips.append(h)
            if i + 1 < self.num_levels:
                h = self.down[i](h)
        out = [h]
        for i in reversed(range(self.num_levels - 1)):
            h = torch.cat([self.up[i](h), self._skip(skips[i], i)], dim=1)
            for blk in self.dec[i]:
                h = blk(h, temb)
            out.append(h)
        return skips, out[::-1]

    def head(self, finest: torch.Tensor) -> torch.Tensor:
        return self.out_conv(F.silu(self.out_norm(finest)))

    def decoder_modules(self) -> list[nn.Module]:
        return [self.up, self.dec]
