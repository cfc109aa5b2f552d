"""The interface every pretraining backbone implements, and what the implementations share.

A backbone is a 3D network that maps ``x`` ``(B, in_channels, X, Y, Z)`` (the [0, 1] or [-1, 1]
image, followed by the condition channels, e.g. the BPR map) and an optional timestep ``t`` to a
feature pyramid, finest level first. The rest of voxdiff only relies on :class:`PyramidBackbone`:

* ``pyramid(x, t=None, side="decoder") -> list[Tensor]``: level ``i`` is ``(B, C_i, X/s, Y/s, Z/s)``
  with ``s = levels[i].stride`` (1, 2, 4, ...); the last entry is the coarsest level. ``side`` says
  which outputs of an encoder-decoder network form it (:data:`FEATURE_SIDES`): ``decoder`` (the
  FPN pyramid of vox2vec, ``C_i = levels[i].channels``), ``encoder`` (the encoder's output at each
  level, the same widths) or ``both`` (the two concatenated per level, the coarsest level once);
  ``side_channels(side)`` gives the ``C_i``.
* ``forward(x, t=None) -> (prediction, pyramid)``: ``prediction`` ``(B, out_channels, X, Y, Z)`` is
  the pretext output of the 1x1x1 head on the finest level (noise, velocity, reconstruction).
* ``levels: list[LevelInfo]`` (name, channels, stride); ``strides`` (``[lv.stride ...]``);
  ``divisor`` (the largest stride: every spatial input size must be a multiple of it).
* ``in_channels`` / ``out_channels``.
* ``config() -> dict``: the constructor arguments, saved in ``model.json`` beside the weights
  together with the registry name, so that ``build_backbone(name, **config)`` rebuilds the network.

* optional: ``decoder_modules() -> list[nn.Module]``, the modules of the decoder path alone, for
  fine-tuning that re-initialises (``voxdiff probe --transfer encoder``) or trains (``--tune
  decoder``) the decoder only; a backbone without it refuses those options in one line.

``t`` is a scalar, a ``(B,)`` tensor of (possibly fractional) timesteps, or ``None`` (methods
without a timestep; a backbone built with ``time_embedding=True`` then uses a learned "null"
embedding). :class:`PyramidBackboneBase` implements everything but ``pyramid`` and ``head``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

Timestep = torch.Tensor | float | int | None


@dataclass(frozen=True)
class LevelInfo:
    name: str
    channels: int
    stride: int


FEATURE_SIDES = ("decoder", "encoder", "both")


def check_side(side: str) -> str:
    if side not in FEATURE_SIDES:
        raise ValueError(f"feature side must be one of {', '.join(FEATURE_SIDES)}, not {side!r}")
    return side


def join_sides(encoder: list[torch.Tensor], decoder: list[torch.Tensor], side: str) -> list[torch.Tensor]:
    """The pyramid of ``side`` from an encoder's and a decoder's outputs per level (finest first; the
    coarsest level is where they meet, so ``both`` holds it once)."""
    if check_side(side) == "decoder":
        return decoder
    if side == "encoder":
        return encoder
    return [torch.cat([e, d], 1) for e, d in zip(encoder[:-1], decoder[:-1])] + [decoder[-1]]


@runtime_checkable
class PyramidBackbone(Protocol):
    """What voxdiff needs from a backbone (see the module docstring)."""

    in_channels: int
    out_channels: int
    levels: list[LevelInfo]

    @property
    def strides(self) -> list[int]: ...

    @property
    def divisor(self) -> int: ...

    def config(self) -> dict[str, Any]: ...

    def pyramid(self, x: torch.Tensor, t: Timestep = None, side: str = "decoder") -> list[torch.Tensor]: ...

    def side_channels(self, side: str = "decoder") -> list[int]: ...

    def forward(self, x: torch.Tensor, t: Timestep = None) -> tuple[torch.Tensor, list[torch.Tensor]]: ...


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``t`` (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def film(h: torch.Tensor, proj: nn.Module | None, temb: torch.Tensor | None) -> torch.Tensor:
    """``h * (1 + scale) + shift`` with ``(scale, shift) = proj(silu(temb))`` (FiLM, improved DDPM);
    ``h`` unchanged without a projection or an embedding."""
    if proj is None or temb is None:
        return h
    scale, shift = proj(F.silu(temb)).to(h.dtype)[:, :, None, None, None].chunk(2, dim=1)
    return h * (1 + scale) + shift


class PyramidBackboneBase(nn.Module):
    """Shared implementation: timestep embedding, input checks, ``forward``, ``features``.

    Subclasses call :meth:`_init_common` in their constructor, set ``self.levels`` and implement
    ``head(finest)`` and either ``_sides(x, temb) -> (encoder outputs, decoder pyramid)`` (every
    feature side) or ``_pyramid(x, temb)`` (the decoder side only).
    """

    in_channels: int
    out_channels: int
    levels: list[LevelInfo]
    time_embedding: bool
    temb_dim: int | None
    name: str = ""  # registry name, set by voxdiff.pretrain.backbones.register
    num_skips: int = 0  # decoder levels fed by an encoder skip that skip_masks can scale (0: none)
    _skip_keep: list[torch.Tensor] | None = None

    def _init_common(self, config: dict[str, Any], in_channels: int, out_channels: int, time_embedding: bool,
                     base_channels: int) -> None:
        self._config = dict(config)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.time_embedding = bool(time_embedding)
        self.temb_dim = 4 * base_channels if time_embedding else None
        if time_embedding:
            self.temb_in = base_channels
            self.time_mlp = nn.Sequential(nn.Linear(base_channels, 4 * base_channels), nn.SiLU(),
                                          nn.Linear(4 * base_channels, 4 * base_channels))
            self.null_embedding = nn.Parameter(torch.zeros(4 * base_channels))

    # ------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able): ``type(self)(**config())`` is the same network."""
        return dict(self._config)

    @property
    def strides(self) -> list[int]:
        return [int(lv.stride) for lv in self.levels]

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this (the largest stride)."""
        return max(self.strides)

    def embed(self, t: Timestep, batch: int, device: torch.device) -> torch.Tensor | None:
        if not self.time_embedding:
            return None
        if t is None:
            return self.null_embedding[None].expand(batch, -1)
        t = torch.as_tensor(t, device=device).float()
        if t.ndim == 0:
            t = t.expand(batch)
        return self.time_mlp(timestep_embedding(t, self.temb_in))

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        d = self.divisor
        if any(s % d for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be a multiple of {d}")

    def _pyramid(self, x: torch.Tensor, temb: torch.Tensor | None) -> list[torch.Tensor]:
        return self._sides(x, temb)[1]

    def _sides(self, x: torch.Tensor, temb: torch.Tensor | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        raise NotImplementedError(f"the {self.name or type(self).__name__} backbone gives its decoder pyramid only")

    @property
    def feature_sides(self) -> tuple[str, ...]:
        """The pyramids :meth:`pyramid` can give: every side when the subclass implements ``_sides``,
        else the decoder's only."""
        return FEATURE_SIDES if type(self)._sides is not PyramidBackboneBase._sides else ("decoder",)

    def side_channels(self, side: str = "decoder") -> list[int]:
        """Channels of every level of the ``side`` pyramid (see :meth:`pyramid`)."""
        ch = [int(lv.channels) for lv in self.levels]
        return [2 * c for c in ch[:-1]] + ch[-1:] if check_side(side) == "both" else ch

    @contextlib.contextmanager
    def skip_masks(self, keep: list[torch.Tensor]) -> Iterator[None]:
        """Within the block, the encoder skip into decoder level ``i`` (finest first) is multiplied
        per sample by ``keep[i]`` (shape ``(B,)``, 0 drops it): skip dropout during training."""
        if not self.num_skips:
            raise ValueError(f"the {self.name or type(self).__name__} backbone has no skip connections to mask")
        if len(keep) != self.num_skips:
            raise ValueError(f"expected {self.num_skips} skip masks, got {len(keep)}")
        self._skip_keep = list(keep)
        try:
            yield
        finally:
            self._skip_keep = None

    def _skip(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """Encoder skip ``h`` into decoder level ``i``, masked inside :meth:`skip_masks`."""
        keep = self._skip_keep
        return h if keep is None else h * keep[i].to(h.dtype).view(-1, *([1] * (h.ndim - 1)))

    def head(self, finest: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decoder_modules(self) -> list[nn.Module]:
        """The modules of the decoder path alone (from the coarsest level up to the finest decoder
        level; not the stem, the encoder, the time embedding or the pretext head): what fine-tuning
        re-initialises when it transfers the encoder only (``voxdiff probe --transfer encoder``)."""
        raise NotImplementedError(f"the {self.name or type(self).__name__} backbone does not name its decoder modules")

    def pyramid(self, x: torch.Tensor, t: Timestep = None, side: str = "decoder") -> list[torch.Tensor]:
        """Feature pyramid of ``x``, finest level first (strides ``self.strides``): the decoder's
        outputs, the encoder's, or both concatenated per level (``side``, :data:`FEATURE_SIDES`)."""
        self.check_input(x)
        temb = self.embed(t, x.shape[0], x.device)
        if check_side(side) == "decoder":
            return self._pyramid(x, temb)
        return join_sides(*self._sides(x, temb), side)

    def forward(self, x: torch.Tensor, t: Timestep = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(prediction (B, out_channels, X, Y, Z), pyramid)``."""
        pyr = self.pyramid(x, t)
        return self.head(pyr[0]), pyr

    def features(self, image: torch.Tensor, coords: torch.Tensor | None = None, t: Timestep = None) -> list[torch.Tensor]:
        """The pyramid for ``image`` (B, C, ...); ``coords`` (condition channels) are concatenated
        when the backbone expects more channels than ``image`` has."""
        x = image
        if coords is not None and image.shape[1] < self.in_channels:
            x = torch.cat([image, coords.to(image.dtype)], dim=1)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"backbone expects {self.in_channels} input channels, got {x.shape[1]}"
                             + (" (missing coordinate channels?)" if coords is None else ""))
        return self.pyramid(x, t)
