"""Segmentation heads over a frozen feature pyramid (finest level first, stride 1 first).

* :class:`LinearHead`: a (fixed standardisation and a) 1x1x1 convolution per pyramid level, each upsampled to full resolution
  and summed. Every operation is linear (conv, nearest/trilinear upsampling, sum), so the logits are
  an affine function of the concatenated per-voxel feature vector: the vox2vec linear probe.
* :class:`NonLinearHead`: a light decoder. Each level is projected to ``hidden`` channels by a 1x1x1
  conv; starting from the coarsest level, the running map is upsampled to the next finer level,
  added to that level's projection and refined by kernel-1 residual blocks. A final 1x1x1 conv gives
  the logits. All convolutions have kernel 1, so at inference (BatchNorm in eval mode) the head is
  a per-voxel function of the (upsampled) pyramid: it adds no spatial context of its own.
* :class:`MixHead`: a learned mix over pyramid levels x feature passes (the "diffusion
  hyperfeatures" aggregation of Luo et al. 2023): every (level, pass) block of channels goes through
  its own kernel-1 bottleneck to ``hidden`` channels, the blocks are upsampled to the finest level
  and summed with softmax weights (one learned scalar per block, readable with
  :meth:`MixHead.mix_weights`), then kernel-1 residual blocks and a final 1x1x1 conv give the logits.
  The passes of a level are its ``groups`` equal channel blocks, in the order of the extractor's
  feature timesteps (:attr:`voxdiff.pretrain.load.FeatureExtractor.passes`).

Both take ``list[Tensor]`` shaped ``(B, C_i, X/s_i, Y/s_i, Z/s_i)`` and return logits
``(B, n_classes, X, Y, Z)`` at the size of the first (finest) level, or ``out_size`` when given.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from voxdiff.core.layers import PointwiseConv3d

HEAD_TYPES = ("linear", "nonlinear", "mix")


def _upsample(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=tuple(size), mode="nearest")
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only))


class FeatureScale(nn.Module):
    """Fixed per-channel standardisation ``(f - mean) / std`` (buffers, not trained).

    The statistics are measured once on training features before the head is trained
    (:meth:`set_stats`); identity until then. An affine map with constant coefficients, so a head
    that starts with it stays linear: it only conditions the optimisation (pyramid levels of a
    frozen backbone can differ in scale by orders of magnitude).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("inv_std", torch.ones(channels))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean.to(self.mean))
        self.inv_std.copy_(1.0 / std.to(self.inv_std).clamp_min(1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean[None, :, None, None, None].to(x.dtype)) * self.inv_std[None, :, None, None, None].to(x.dtype)


def feature_stats(pyramids: Sequence[Sequence[torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-level, per-channel (mean, std) over several pyramids (batches)."""
    out = []
    for lv in range(len(pyramids[0])):
        flat = torch.cat([p[lv].detach().float().transpose(0, 1).reshape(p[lv].shape[1], -1) for p in pyramids], 1)
        out.append((flat.mean(1), flat.std(1)))
    return out


class _Scaled:
    """Mixin: per-level FeatureScale modules in ``self.scales``."""

    def set_feature_stats(self, stats: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for sc, (m, s) in zip(self.scales, stats):
            sc.set_stats(m, s)


class LinearHead(_Scaled, nn.Module):
    """Strictly linear probe: ``sum_i up(conv1x1_i(f_i))``.

    level_channels: channels of each pyramid level, finest first.
    n_classes: output channels (14 for BTCV incl. background).
    upsample: "nearest" (vox2vec) or "trilinear"; both are linear maps.
    """

    def __init__(self, level_channels: Sequence[int], n_classes: int, upsample: str = "trilinear"):
        super().__init__()
        if upsample not in ("nearest", "trilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'trilinear', not {upsample!r}")
        self.level_channels = [int(c) for c in level_channels]
        self.n_classes = int(n_classes)
        self.upsample = upsample
        self.scales = nn.ModuleList(FeatureScale(c) for c in self.level_channels)
        self.convs = nn.ModuleList(PointwiseConv3d(c, n_classes) for c in self.level_channels)
        for conv in self.convs:  # start from constant logits (the bias): no random class noise
            nn.init.zeros_(conv.weight)

    def config(self) -> dict:
        return {"type": "linear", "level_channels": self.level_channels, "n_classes": self.n_classes,
                "upsample": self.upsample}

    def forward(self, pyramid: Sequence[torch.Tensor], out_size: Sequence[int] | None = None) -> torch.Tensor:
        if len(pyramid) != len(self.convs):
            raise ValueError(f"head expects {len(self.convs)} pyramid levels, got {len(pyramid)}")
        size = tuple(out_size) if out_size is not None else tuple(pyramid[0].shape[2:])
        out = None
        for sc, conv, f in zip(self.scales, self.convs, pyramid):
            y = _upsample(conv(sc(f)), size, self.upsample)
            out = y if out is None else out + y
        return out


class _ResBlock1(nn.Module):
    """Pre-activation residual block with kernel-1 convolutions."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm1 = nn.BatchNorm3d(ch)
        self.conv1 = PointwiseConv3d(ch, ch)
        self.norm2 = nn.BatchNorm3d(ch)
        self.conv2 = PointwiseConv3d(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class NonLinearHead(_Scaled, nn.Module):
    """Light FPN-style decoder of kernel-1 convolutions over the frozen pyramid.

    level_channels: channels of each pyramid level, finest first.
    n_classes: output channels.
    hidden: width of the decoder (same at every level).
    blocks: kernel-1 residual blocks after each skip sum.
    """

    def __init__(self, level_channels: Sequence[int], n_classes: int, hidden: int = 64, blocks: int = 1,
                 upsample: str = "trilinear"):
        super().__init__()
        self.level_channels = [int(c) for c in level_channels]
        self.n_classes = int(n_classes)
        self.hidden = int(hidden)
        self.blocks = int(blocks)
        self.upsample = upsample
        self.scales = nn.ModuleList(FeatureScale(c) for c in self.level_channels)
        self.proj = nn.ModuleList(PointwiseConv3d(c, hidden) for c in self.level_channels)
        self.refine = nn.ModuleList(
            nn.Sequential(*[_ResBlock1(hidden) for _ in range(self.blocks)]) for _ in self.level_channels
        )
        self.out_norm = nn.BatchNorm3d(hidden)
        self.out = PointwiseConv3d(hidden, n_classes)
        nn.init.zeros_(self.out.weight)

    def config(self) -> dict:
        return {"type": "nonlinear", "level_channels": self.level_channels, "n_classes": self.n_classes,
                "hidden": self.hidden, "blocks": self.blocks, "upsample": self.upsample}

    def forward(self, pyramid: Sequence[torch.Tensor], out_size: Sequence[int] | None = None) -> torch.Tensor:
        if len(pyramid) != len(self.proj):
            raise ValueError(f"head expects {len(self.proj)} pyramid levels, got {len(pyramid)}")
        x = None
        for i in range(len(pyramid) - 1, -1, -1):  # coarsest -> finest
            p = self.proj[i](self.scales[i](pyramid[i]))
            x = p if x is None else _upsample(x, p.shape[2:], self.upsample) + p
            x = self.refine[i](x)
        x = self.out(F.silu(self.out_norm(x)))
        size = tuple(out_size) if out_size is not None else tuple(pyramid[0].shape[2:])
        return _upsample(x, size, self.upsample)


class MixHead(_Scaled, nn.Module):
    """Learned softmax mix over (level, pass) blocks, each through its own kernel-1 bottleneck.

    level_channels: channels of each pyramid level, finest first (each a multiple of ``groups``).
    n_classes: output channels.
    groups: feature passes (timesteps) concatenated in every level; 1 for single-pass methods.
    hidden: width of the bottlenecks and of the refinement blocks.
    blocks: kernel-1 residual blocks after the mix.
    """

    def __init__(self, level_channels: Sequence[int], n_classes: int, groups: int = 1, hidden: int = 64,
                 blocks: int = 1, upsample: str = "trilinear"):
        super().__init__()
        self.level_channels = [int(c) for c in level_channels]
        self.n_classes = int(n_classes)
        self.groups = int(groups)
        self.hidden = int(hidden)
        self.blocks = int(blocks)
        self.upsample = upsample
        if self.groups < 1 or any(c % self.groups for c in self.level_channels):
            raise ValueError(f"every level's channels {self.level_channels} must split into {self.groups} passes")
        self.scales = nn.ModuleList(FeatureScale(c) for c in self.level_channels)
        self.bottlenecks = nn.ModuleList(
            nn.Sequential(PointwiseConv3d(c // self.groups, hidden), nn.BatchNorm3d(hidden), nn.SiLU(),
                          PointwiseConv3d(hidden, hidden))
            for c in self.level_channels for _ in range(self.groups)
        )
        self.mix = nn.Parameter(torch.zeros(len(self.bottlenecks)))  # softmax(0) = the plain mean
        self.refine = nn.Sequential(*[_ResBlock1(hidden) for _ in range(self.blocks)])
        self.out_norm = nn.BatchNorm3d(hidden)
        self.out = PointwiseConv3d(hidden, n_classes)
        nn.init.zeros_(self.out.weight)

    def config(self) -> dict:
        return {"type": "mix", "level_channels": self.level_channels, "n_classes": self.n_classes,
                "groups": self.groups, "hidden": self.hidden, "blocks": self.blocks, "upsample": self.upsample}

    def mix_weights(self) -> list[dict]:
        """The learned weight of every (level, pass) block, in level-major order."""
        w = torch.softmax(self.mix.detach().float(), 0).tolist()
        return [{"level": k // self.groups, "pass": k % self.groups, "weight": round(v, 4)} for k, v in enumerate(w)]

    def forward(self, pyramid: Sequence[torch.Tensor], out_size: Sequence[int] | None = None) -> torch.Tensor:
        if len(pyramid) != len(self.scales):
            raise ValueError(f"head expects {len(self.scales)} pyramid levels, got {len(pyramid)}")
        fine = tuple(pyramid[0].shape[2:])
        w = torch.softmax(self.mix, 0)
        x = None
        for lv, f in enumerate(pyramid):
            for g, block in enumerate(self.scales[lv](f).chunk(self.groups, dim=1)):
                k = lv * self.groups + g
                y = _upsample(self.bottlenecks[k](block), fine, self.upsample) * w[k].to(f.dtype)
                x = y if x is None else x + y
        x = self.out(F.silu(self.out_norm(self.refine(x))))
        size = tuple(out_size) if out_size is not None else fine
        return _upsample(x, size, self.upsample)


def build_head(config: dict) -> nn.Module:
    """Rebuild a head from its ``config()`` dict (as stored in a head checkpoint)."""
    cfg = dict(config)
    kind = cfg.pop("type", None)
    if kind == "linear":
        return LinearHead(**cfg)
    if kind == "nonlinear":
        return NonLinearHead(**cfg)
    if kind == "mix":
        return MixHead(**cfg)
    raise ValueError(f"unknown head type {kind!r}; known: {HEAD_TYPES}")


def make_head(name: str, level_channels: Sequence[int], n_classes: int, hidden: int = 64, blocks: int = 1,
              groups: int = 1) -> nn.Module:
    """Head by name: ``linear``, ``nonlinear`` or ``mix`` (``groups``: feature passes per level);
    fine-tune / scratch modes use the non-linear head."""
    if name == "linear":
        return LinearHead(level_channels, n_classes)
    if name == "mix":
        return MixHead(level_channels, n_classes, groups=groups, hidden=hidden, blocks=blocks)
    if name in ("nonlinear", "finetune", "scratch"):
        return NonLinearHead(level_channels, n_classes, hidden=hidden, blocks=blocks)
    raise ValueError(f"unknown head {name!r}; known: linear, nonlinear, mix, finetune, scratch")
