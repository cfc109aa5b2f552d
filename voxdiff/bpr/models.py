"""Body part regressor networks, saving and loading.

Both kinds take ``(B, 1, X, Y, Z)`` intensities in [0, 1] (``hu_to_unit`` with the model's
preprocessing window, at the model's spacing) and return ``(B, C, X, Y, Z)`` maps of the same size:

* ``slice`` (C = 1): a small 2D CNN scores every axial slice (k x k in-plane convolutions only, so a
  slice's score never depends on the other slices of the patch); the score is the mean of local
  scores over the slice and is broadcast over it. Calibrated so that the training set's 1st..99th
  percentile of scores maps to 0..1 (``mm_per_unit`` mm per unit).
* ``ape`` (C = 3): a 3D encoder estimates where the patch lies in the body; every voxel gets that
  position plus its known physical displacement from the patch centre (``head="anchor"``; the v1
  ``"dense"`` encoder-decoder regresses every voxel freely). Channel 0/1/2 follow the R/A/S axes;
  calibrated so that one unit is ``mm_per_unit`` mm and the training set's median maps to 0.5.

Normalisation layers are BatchNorm (a fixed affine map at inference), so the output at a voxel does
not depend on the rest of the batch and, away from patch borders, not on the rest of the patch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.checkpoint import load_checkpoint, save_checkpoint
from ..core.errors import ModelError
from ..core.layers import freeze
from ..core.outputs import note_input
from ..core.runtime import prefer_channels_last
from ..data.preprocess import HU_WINDOW

BPR_KINDS = ("slice", "ape")
BPR_VERSION = 3  # bump when the architecture or the meaning of the outputs changes
# v2: the ape anchor head may take its S offset from an embedded slice model (``anchor="slice"``);
# v3: a slice model may be an ensemble of several (``members``; an ape model anchored on one is v3 too).
# Models without these are still written as v1 / v2, so older voxdiff versions keep reading them.
CHECKPOINT_KIND = "bpr"


def _default_preprocess() -> dict[str, Any]:
    return {
        "spacing": [3.0, 3.0, 3.0],
        "hu_window": list(HU_WINDOW),
        "crop_to_body": True,
        "body_threshold_hu": -500.0,
        "body_margin_mm": 10.0,
    }


class BodyPartRegressor(nn.Module):
    """Common interface. Subclasses implement :meth:`raw` (uncalibrated outputs, full size)."""

    kind: str = ""
    out_channels: int = 1
    stride: tuple[int, int, int] = (1, 1, 1)  # inputs are padded to multiples of this internally

    def __init__(self, preprocess: dict[str, Any] | None = None, calibration: dict[str, Any] | None = None,
                 patch_size: tuple[int, int, int] = (48, 48, 48)):
        super().__init__()
        self.preprocess = dict(preprocess or _default_preprocess())
        self.patch_size = tuple(int(v) for v in patch_size)  # the training input size: sliding-window ROI
        c = self.out_channels
        self.register_buffer("calib_scale", torch.ones(c))
        self.register_buffer("calib_offset", torch.zeros(c))
        self.calibration_info: dict[str, Any] = dict(calibration or {})

    # -- to implement --------------------------------------------------------------------------
    def raw(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def arch(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- common ----------------------------------------------------------------------------------
    @property
    def raw_unit_mm(self) -> float:
        """mm per raw output unit (set by the loss scale)."""
        return float(self.arch().get("unit_mm", 100.0))

    @property
    def mm_per_unit(self) -> float:
        """mm per calibrated output unit (the same for every channel)."""
        return self.raw_unit_mm / float(self.calib_scale[0])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.preprocess["spacing"])  # type: ignore[return-value]

    @property
    def min_size(self) -> tuple[int, int, int]:
        return (4, 4, 1) if self.kind == "slice" else (4, 4, 4)

    def calibrate(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.calib_scale.view(shape) + self.calib_offset.view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.calibrate(self.raw(x))

    @property
    def format_version(self) -> int:
        """The BPR version this model needs to be read (the lowest that knows everything in it)."""
        return 1

    def model_config(self) -> dict[str, Any]:
        return {
            "bpr_kind": self.kind,
            "bpr_version": self.format_version,
            "out_channels": self.out_channels,
            "arch": self.arch(),
            "preprocess": dict(self.preprocess),
            "calibration": dict(self.calibration_info),
        }


def tile_starts(n: int, t: int, overlap: float) -> list[int]:
    """Start indices of tiles of size ``t`` covering ``n`` with at least ``overlap`` between neighbours."""
    if n <= t:
        return [0]
    step = max(1, int(round(t * (1.0 - overlap))))
    k = math.ceil((n - t) / step) + 1
    return sorted({int(round(v)) for v in np.linspace(0, n - t, k)})


def body_threshold(model: "BodyPartRegressor") -> float:
    """-500 HU in the model's [0, 1] intensity window (body vs air)."""
    lo, hi = (float(v) for v in model.preprocess.get("hu_window", HU_WINDOW))
    return (-500.0 - lo) / (hi - lo)


def _pad_to_multiple(x: torch.Tensor, mult: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    size = x.shape[2:]
    pads: list[int] = []
    for s, m in reversed(list(zip(size, mult))):
        pads += [0, (-s) % m]
    if any(pads):
        x = F.pad(x, pads)  # zeros = the window minimum (air)
    return x, tuple(size)


def slice_neighbourhoods(z: torch.Tensor, context: int, first: float, last: float, step: int = 1) -> torch.Tensor:
    """Z positions (voxels; integer or fractional) of each slice in ``z`` with its ``context``
    neighbours on each side, ``step`` voxels apart, clamped to ``[first, last]`` (the end slices of
    that range repeated beyond it): ``(len(z) * (2 * context + 1),)``, grouped by slice, each group centred on it."""
    return _neighbour_positions(z, context, step).clamp(first, last)


def _neighbour_positions(z: torch.Tensor, context: int, step: int) -> torch.Tensor:
    """Each slice of ``z`` with its ``context`` neighbours on each side, ``step`` apart, unclamped
    (flat, grouped by slice, in ``z``'s dtype)."""
    offsets = torch.arange(-context, context + 1, dtype=z.dtype, device=z.device) * step
    return (z[:, None] + offsets[None]).flatten()


def slice_neighbourhood_outside(z: torch.Tensor, context: int, first: float, last: float, step: int = 1) -> torch.Tensor:
    """Which of the positions :func:`slice_neighbourhoods` gives lie beyond ``[first, last]`` (where
    it repeats an end slice): a bool ``(len(z) * (2 * context + 1),)`` in the same order."""
    p = _neighbour_positions(z.double(), context, step)
    return (p < first - 1e-6) | (p > last + 1e-6)


# the input value of a neighbouring slice beyond the scan for a model with context_fill "mask": below
# the intensity window's floor (0), so that no real slice looks like it
CONTEXT_MASK_VALUE = -1.0
CONTEXT_FILLS = ("repeat", "mask")


class _SliceNet(nn.Module):
    """One slice scorer: stride-2 2x2 conv then a 3x3 conv per level (BatchNorm, ReLU), a 1x1 head."""

    def __init__(self, cin: int, channels: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        for c in channels:
            # stride-2 2x2 conv (no padding: output j covers input [2j, 2j+1]) then a 3x3 conv
            layers += [nn.Conv2d(cin, c, 2, stride=2), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            cin = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(cin, 1, 1)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """(N, C, X, Y) slices -> (N,) mean of the local scores."""
        return self.head(self.features(xs)).mean(dim=(1, 2, 3))


class SliceRegressor(BodyPartRegressor):
    """Slice scores; ``members`` > 1 is an ensemble of independently trained slice models of the same
    architecture (``ensemble_slice_models``): the raw score of a slice is the mean of the members'
    calibrated scores (``member_scale``/``member_offset``), so every member counts on one scale."""

    kind = "slice"
    out_channels = 1

    def __init__(self, channels: tuple[int, ...] = (16, 32, 48, 64), unit_mm: float = 100.0, context: int = 0,
                 context_step: int = 1, members: int = 1, context_fill: str = "repeat", **kw: Any):
        super().__init__(**kw)
        self.channels = tuple(int(c) for c in channels)
        self.unit_mm = float(unit_mm)
        # ``context`` neighbouring slices on each side, ``context_step`` voxels of the model spacing
        # apart, join each slice as input channels, so that the network sees which way the anatomy
        # changes (a lung apex from a lung base)
        self.context = int(context)
        self.context_step = int(context_step)
        # what stands for a neighbour beyond the scan's end: the end slice repeated ("repeat") or
        # CONTEXT_MASK_VALUE everywhere ("mask": the network is told the anatomy there is unseen)
        self.context_fill = str(context_fill)
        self.n_members = int(members)
        if self.context < 0:
            raise ValueError(f"slice context must be >= 0, got {context}")
        if self.context_step < 1:
            raise ValueError(f"slice context step must be >= 1, got {context_step}")
        if self.context_fill not in CONTEXT_FILLS:
            raise ValueError(f"unknown slice context_fill {context_fill!r}; known: {list(CONTEXT_FILLS)}")
        if self.n_members < 1:
            raise ValueError(f"slice ensemble members must be >= 1, got {members}")
        cin = 2 * self.context + 1
        if self.n_members == 1:  # a single model keeps the parameter names it always had
            net = _SliceNet(cin, self.channels)
            self.features, self.head = net.features, net.head
        else:
            self.members = nn.ModuleList(_SliceNet(cin, self.channels) for _ in range(self.n_members))
            self.register_buffer("member_scale", torch.ones(self.n_members))
            self.register_buffer("member_offset", torch.zeros(self.n_members))
        s = 2 ** len(self.channels)
        self.stride = (s, s, 1)

    @property
    def format_version(self) -> int:
        return 3 if self.n_members > 1 else 1

    def arch(self) -> dict[str, Any]:
        a = {"channels": list(self.channels), "unit_mm": self.unit_mm, "patch_size": list(self.patch_size)}
        if self.context:
            a["context"] = self.context
            if self.context_step != 1:
                a["context_step"] = self.context_step
            if self.context_fill != "repeat":
                a["context_fill"] = self.context_fill
        if self.n_members > 1:
            a["members"] = self.n_members
        return a

    def _slice_means(self, xs: torch.Tensor) -> torch.Tensor:
        """(N, 2c + 1, X, Y) slices with their neighbours -> (N,) raw scores."""
        if self.n_members == 1:
            return self.head(self.features(xs)).mean(dim=(1, 2, 3))
        scores = [net(xs) * self.member_scale[k] + self.member_offset[k] for k, net in enumerate(self.members)]
        return torch.stack(scores).mean(dim=0)

    def neighbourhoods(self, z: torch.Tensor, nz: float) -> torch.Tensor:
        """Z positions of the slices ``z`` of a volume with ``nz`` slices, each with the neighbours this
        model takes (see ``slice_neighbourhoods``); ``z`` itself without context."""
        return slice_neighbourhoods(z, self.context, 0, nz - 1, self.context_step)

    def neighbourhood_outside(self, z: torch.Tensor, nz: float) -> torch.Tensor:
        """Which positions of :meth:`neighbourhoods` lie beyond the volume (bool, same order)."""
        return slice_neighbourhood_outside(z, self.context, 0, nz - 1, self.context_step)

    def slice_scores_raw(self, x: torch.Tensor, stacked: bool = False, outside: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, Z) uncalibrated scores.

        With ``context`` c > 0 each slice is given with its c neighbours on each side (``context_step``
        slices apart): taken from ``x`` itself (beyond its edges the end slices repeated, or masked with
        ``context_fill`` "mask"), or, with ``stacked``, ``x`` holds K groups of 2c + 1 slices along Z
        (each group centred on its slice, end slices repeated where a group runs past the scan) ->
        (B, K). ``outside`` (bool, ``(Z,)`` or ``(B, Z)``; needed by a "mask" model with ``stacked``)
        marks the stacked slices that stand for positions beyond the scan."""
        _check_input(x, self)
        n = 2 * self.context + 1
        if self.context and not stacked:
            zz = torch.arange(x.shape[4], device=x.device)
            if self.context_fill == "mask":
                outside = self.neighbourhood_outside(zz, x.shape[4])
            x = x[..., self.neighbourhoods(zz, x.shape[4])]
        b, _, _, _, z = x.shape
        if z % n:
            raise ValueError(f"stacked input needs a multiple of {n} slices, got {z}")
        if self.context and self.context_fill == "mask":
            if outside is None:
                raise ValueError("a slice model with context_fill 'mask' needs `outside` with stacked input")
            outside = outside.to(device=x.device, dtype=torch.bool)
            if outside.shape[-1] != z or outside.ndim not in (1, 2):
                raise ValueError(f"outside has shape {tuple(outside.shape)}, expected ({z},) or ({b}, {z})")
            x = torch.where(outside.view(-1 if outside.ndim == 2 else 1, 1, 1, 1, z),
                            torch.full((), CONTEXT_MASK_VALUE, dtype=x.dtype, device=x.device), x)
        k = z // n
        x, _ = _pad_to_multiple(x, self.stride)
        xs = x.view(b, 1, x.shape[2], x.shape[3], k, n).permute(0, 4, 5, 1, 2, 3).reshape(b * k, n, x.shape[2], x.shape[3])
        return self._slice_means(xs).view(b, k)

    def slice_scores(self, x: torch.Tensor, stacked: bool = False, outside: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, Z) calibrated scores (``stacked``, ``outside``: as :meth:`slice_scores_raw`)."""
        return self.slice_scores_raw(x, stacked=stacked, outside=outside) * self.calib_scale[0] + self.calib_offset[0]

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        s = self.slice_scores_raw(x)
        b, _, nx, ny, nz = x.shape
        return s.view(b, 1, 1, 1, nz).expand(b, 1, nx, ny, nz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.slice_scores(x)
        b, _, nx, ny, nz = x.shape
        return s.view(b, 1, 1, 1, nz).expand(b, 1, nx, ny, nz).contiguous()


def _block3d(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]


APE_HEADS = ("anchor", "dense")
APE_ANCHORS = ("window", "slice")
ANCHOR_FITS = ("offset", "line", "local")


def add_s_residual(coords: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """``coords`` ``(B, 3, X, Y, Z)`` with the per-slice residual ``(B, Z)`` added to the S channel."""
    s = coords[:, 2:3] + resid.to(coords).view(resid.shape[0], 1, 1, 1, -1)
    return torch.cat([coords[:, :2], s], 1)


def _weighted_lines(d: torch.Tensor, g: torch.Tensor, k: torch.Tensor, fallback: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted least-squares lines of ``g`` against ``d`` (both ``(Z,)``), one per row of the
    weights ``k`` ``(R, Z)``: slopes, weighted mean ``d`` and weighted mean ``g`` (each ``(R,)``); a
    row whose weighted ``d`` has no spread gets the slope ``fallback`` ``(R,)``."""
    sw = k.sum(1).clamp_min(1e-12)
    md, mg = (k @ d) / sw, (k @ g) / sw
    dd = d[None, :] - md[:, None]
    var = (k * dd ** 2).sum(1)
    cov = (k * dd * (g[None, :] - mg[:, None])).sum(1)
    return torch.where(var > 1e-12, cov / var.clamp_min(1e-12), fallback.to(var)), md, mg


def _robust_sd(r: torch.Tensor, floor: float = 1e-9) -> torch.Tensor:
    """1.4826 x the median absolute deviation of ``r``, at least ``floor``."""
    return (1.4826 * (r - r.median()).abs().median()).clamp_min(floor)


def interp_linear(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``(xp, fp)`` (``xp`` increasing) at ``x``; outside
    ``[xp[0], xp[-1]]`` the straight line through the two end knots continues."""
    k = len(xp)
    if k == 1:
        return torch.full_like(x, float(fp[0]))
    i = torch.clamp(torch.searchsorted(xp.contiguous(), x.contiguous()) - 1, 0, k - 2)
    x0, x1, f0, f1 = xp[i], xp[i + 1], fp[i], fp[i + 1]
    inside = f0 + (f1 - f0) * (x - x0) / (x1 - x0).clamp_min(1e-12)
    slope = (fp[-1] - fp[0]) / (xp[-1] - xp[0]).clamp_min(1e-12)
    lo = fp[0] + slope * (x - xp[0])
    hi = fp[-1] + slope * (x - xp[-1])
    return torch.where(x < xp[0], lo, torch.where(x > xp[-1], hi, inside))


def weighted_median(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Median of ``v`` (1D) with non-negative weights ``w`` (the lower one at a tie)."""
    order = torch.argsort(v)
    cw = torch.cumsum(w[order].double(), 0)
    j = int(torch.searchsorted(cw, 0.5 * cw[-1]).clamp(max=len(v) - 1))
    return v[order][j]


class APERegressor(BodyPartRegressor):
    """3D anatomical coordinates (3 channels, R/A/S) for every voxel of a patch.

    ``head="anchor"`` (default): within one patch the ideal coordinates are the physical positions
    (mm / ``unit_mm``, RAS voxel axes at the model spacing) plus one unknown offset per patch, so the
    network only estimates that offset. An encoder (stride 2 ** levels) gives every coarse cell an
    estimate of its own coordinates and a confidence (seeing the cell and, through a pooled global
    feature, the whole patch); the patch offset is the confidence-weighted mean of "cell estimate
    minus the cell's known displacement from the patch centre", and every voxel's output is that
    offset plus its own known displacement. Distances inside a patch are therefore exact; what is
    learnt is where the patch lies in the body, and overlapping patches agree to the extent that
    their two estimates do. An input larger than the training patch is placed by the votes of its
    training-size windows (50 % overlap, weighted by how much body they hold): each window's
    estimate, multiplied by the calibrated per-axis ``anchor_gain`` that undoes the estimates'
    regression to the mean, minus its known displacement, is one vote for the offset of the whole
    input. A patch up to the training size keeps its own (uncorrected, least-squares) estimate.

    ``anchor="slice"`` (anchor head only, BPR v2): the S offset comes from an embedded, frozen
    slice model instead of the windows: every axial slice's calibrated score ``s(z)`` is mapped to a
    raw S coordinate by a calibrated piecewise-linear ``g`` (``s_knots`` -> ``s_values``, fitted on
    the training volumes so that ``g(s(z)) - z`` is as constant as possible within each volume), and
    the offset is the median over the body slices of ``g(s(z))`` minus the slice's known displacement
    (``anchor_fit="offset"``), or (``"line"``, this class's default) S is a straight line fitted
    through the slices' ``g(s(z))`` with its slope against physical z clipped to
    ``anchor_slope_range`` (0.7..1.3): the S map of a scan is then linear with a per-scan slope near
    1 instead of exactly physical; or (``"local"``, what ``voxdiff bpr train`` builds since the
    twelfth session) a local-linear fit of those estimates along z (:meth:`slice_placement`).
    A slice's score does not depend on the other slices, so a crop of a scan gets (nearly) the same
    S offset as the whole scan: many per-slice votes instead of one or two window votes. R and A
    still come from the windows. In training mode the network's own estimate is used for all three
    channels (the anchor has no trainable weights).

    ``head="dense"`` (BPR v1 models): an encoder-decoder that regresses every voxel's coordinates
    freely at stride 4 (upsampled trilinearly).
    """

    kind = "ape"
    out_channels = 3

    def __init__(self, channels: tuple[int, ...] = (16, 32, 48, 64), unit_mm: float = 100.0, head: str = "anchor",
                 input_pool: int = 1, anchor: str = "window", anchor_knots: int = 8, anchor_fit: str = "line",
                 anchor_slope_range: tuple[float, float] = (0.7, 1.3), anchor_bandwidth_mm: float = 45.0, slice_arch: dict[str, Any] | None = None, slice_preprocess: dict[str, Any] | None = None, **kw: Any):
        super().__init__(**kw)
        if head == "dense" and input_pool != 1:
            raise ValueError("input_pool is only for the anchor head")
        if anchor not in APE_ANCHORS:
            raise ValueError(f"unknown ape anchor {anchor!r}; known: {list(APE_ANCHORS)}")
        if anchor == "slice" and head != "anchor":
            raise ValueError("anchor 'slice' needs the anchor head")
        self.anchor = anchor
        self.input_pool = int(input_pool)
        if len(channels) < 3:
            raise ValueError("APERegressor needs at least 3 levels of channels")
        if head not in APE_HEADS:
            raise ValueError(f"unknown ape head {head!r}; known: {list(APE_HEADS)}")
        self.channels = tuple(int(c) for c in channels)
        self.unit_mm = float(unit_mm)
        self.head_kind = head
        self.down = nn.ModuleList()
        cin = 1
        for c in self.channels:
            self.down.append(nn.Sequential(nn.Conv3d(cin, c, 2, stride=2), nn.BatchNorm3d(c), nn.ReLU(inplace=True),
                                           *_block3d(c, c)))
            cin = c
        s = 2 ** len(self.channels) * self.input_pool
        self.stride = (s, s, s)
        if head == "dense":
            # decoder back to stride 4 (level index 1)
            self.up = nn.ModuleList()
            for lvl in range(len(self.channels) - 1, 1, -1):
                self.up.append(nn.Sequential(*_block3d(self.channels[lvl] + self.channels[lvl - 1], self.channels[lvl - 1])))
            self.head = nn.Conv3d(self.channels[1], 3, 1)
        else:
            c = self.channels[-1]
            # per coarse cell: 3 coordinate estimates + 1 confidence logit, from (cell, global) features
            self.head = nn.Sequential(nn.Conv3d(2 * c, c, 1), nn.ReLU(inplace=True), nn.Conv3d(c, 4, 1))
            # per-axis gain on the patch position estimate, set by calibration (undoes regression to
            # the mean: see voxdiff.bpr.train.calibrate)
            self.register_buffer("anchor_gain", torch.ones(3))
        self.anchor_knots = int(anchor_knots)
        self.anchor_fit = str(anchor_fit)
        self.anchor_slope_range = tuple(float(v) for v in anchor_slope_range)
        self.anchor_bandwidth_mm = float(anchor_bandwidth_mm)
        if anchor == "slice":
            if not self.anchor_bandwidth_mm > 0.0:
                raise ValueError(f"anchor_bandwidth_mm must be > 0, got {anchor_bandwidth_mm}")
            if self.anchor_fit not in ANCHOR_FITS:
                raise ValueError(f"unknown anchor_fit {anchor_fit!r}; known: {list(ANCHOR_FITS)}")
            lo, hi = self.anchor_slope_range
            if not 0 < lo <= 1.0 <= hi:
                raise ValueError(f"anchor_slope_range must contain 1 and be positive, got {list(self.anchor_slope_range)}")
            if self.anchor_knots < 2:
                raise ValueError("anchor_knots must be >= 2")
            sa = dict(slice_arch or {})
            for k in ("channels", "patch_size"):
                if k in sa:
                    sa[k] = tuple(sa[k])
            self.slice_model = SliceRegressor(preprocess=dict(slice_preprocess or self.preprocess), **sa)
            freeze(self.slice_model)
            # g: calibrated slice score -> raw S coordinate, set by calibration (voxdiff.bpr.train)
            self.register_buffer("s_knots", torch.linspace(0.0, 1.0, self.anchor_knots))
            self.register_buffer("s_values", torch.zeros(self.anchor_knots))

    @property
    def format_version(self) -> int:
        return max(2, self.slice_model.format_version) if self.anchor == "slice" else 1

    def train(self, mode: bool = True) -> "APERegressor":
        super().train(mode)
        if self.anchor == "slice":
            self.slice_model.eval()  # frozen: its BatchNorm statistics never move
        return self

    @property
    def uses_slice_anchor(self) -> bool:
        """Whether the S offset currently comes from the slice model (anchor "slice", eval mode)."""
        return self.anchor == "slice" and not self.training
    def arch(self) -> dict[str, Any]:
        out = {"channels": list(self.channels), "unit_mm": self.unit_mm, "patch_size": list(self.patch_size),
               "head": self.head_kind}
        if self.head_kind == "anchor":
            out["input_pool"] = self.input_pool
        if self.anchor == "slice":  # only then, so that window-anchored models keep their v1 config
            out.update(anchor="slice", anchor_knots=self.anchor_knots, anchor_fit=self.anchor_fit,
                       anchor_slope_range=list(self.anchor_slope_range), slice_arch=self.slice_model.arch(),
                       slice_preprocess=dict(self.slice_model.preprocess))
            if self.anchor_fit == "local":  # only then, so that earlier models keep their config
                out["anchor_bandwidth_mm"] = self.anchor_bandwidth_mm
        return out

    # -- dense (v1) ----------------------------------------------------------------------------
    def raw_stride4(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        h = x
        for d in self.down:
            h = d(h)
            feats.append(h)
        h = feats[-1]
        for k, up in enumerate(self.up):
            skip = feats[len(self.channels) - 2 - k]
            h = F.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
            h = up(torch.cat([h, skip], 1))
        return self.head(h)

    # -- anchor --------------------------------------------------------------------------------
    def displacement_grid(self, size: tuple[int, ...], step: float = 1.0, first: float = 0.0,
                          extent: tuple[int, ...] | None = None, like: torch.Tensor | None = None) -> torch.Tensor:
        """``(1, 3, *size)`` physical displacement (raw units) of grid points ``first + step * i``
        (input voxel indices) from the centre of an input of ``extent`` voxels per axis."""
        extent = tuple(extent or size)
        dev = like.device if like is not None else None
        dt = like.dtype if like is not None else torch.float32
        axes = [((first + step * torch.arange(n, device=dev, dtype=torch.float32)) - (e - 1) / 2.0) * (sp / self.unit_mm)
                for n, e, sp in zip(size, extent, self.spacing)]
        g = torch.meshgrid(*axes, indexing="ij")
        return torch.stack(g)[None].to(dt)

    def patch_offset(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3)`` raw coordinates of the centre of each patch ``x`` (its own estimate)."""
        h = F.avg_pool3d(x, self.input_pool) if self.input_pool > 1 else x
        for d in self.down:
            h = d(h)
        g = h.mean(dim=(2, 3, 4), keepdim=True).expand_as(h)
        o = self.head(torch.cat([h, g], 1))
        est, logit = o[:, :3], o[:, 3:]
        s = float(self.stride[0])
        cells = self.displacement_grid(tuple(h.shape[2:]), step=s, first=(s - 1) / 2.0, extent=tuple(x.shape[2:]), like=o)
        w = torch.softmax(logit.flatten(2), dim=-1)  # (B, 1, cells)
        return ((est - cells).flatten(2) * w).sum(-1)

    def _padded_offset(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`patch_offset` of patches of any size (small ones padded with air on both sides;
        symmetric padding keeps the centre)."""
        size = tuple(x.shape[2:])
        lo = [max(0, self.stride[a] - size[a]) // 2 for a in range(3)]
        hi = [max(0, self.stride[a] - size[a]) - lo[a] for a in range(3)]
        if any(lo + hi):
            x = F.pad(x, [lo[2], hi[2], lo[1], hi[1], lo[0], hi[0]])
            # an odd total padding moves the padded centre by half a voxel towards the high side
            shift = torch.tensor([(hi[a] - lo[a]) / 2.0 * self.spacing[a] / self.unit_mm for a in range(3)],
                                 device=x.device, dtype=x.dtype)
            return self.patch_offset(x) - shift
        return self.patch_offset(x)

    def window_estimates(self, vol: torch.Tensor, overlap: float = 0.5, batch: int = 4, progress: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training-size windows of one volume ``(X, Y, Z)``: each window's estimate of its centre
        ``(n, 3)`` (raw, no gain), the known displacement of its centre from the volume centre
        ``(n, 3)`` (raw units) and its body fraction ``(n,)``."""
        from tqdm import tqdm

        shape = tuple(int(n) for n in vol.shape)
        win = tuple(min(n, int(p)) for n, p in zip(shape, self.patch_size))
        starts = [tile_starts(n, w, overlap) for n, w in zip(shape, win)]
        origins = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
        thr = body_threshold(self)
        est, pos, body = [], [], []
        for k in tqdm(range(0, len(origins), batch), desc="ape windows", disable=not progress, leave=False):
            chunk = origins[k:k + batch]
            x = torch.stack([vol[o[0]:o[0] + win[0], o[1]:o[1] + win[1], o[2]:o[2] + win[2]] for o in chunk])[:, None]
            est.append(self._padded_offset(x))
            pos.append(torch.tensor([[(o[a] + (win[a] - 1) / 2.0 - (shape[a] - 1) / 2.0) * self.spacing[a] / self.unit_mm
                                      for a in range(3)] for o in chunk], device=x.device, dtype=x.dtype))
            body.append((x > thr).to(x.dtype).mean(dim=(1, 2, 3, 4)))
        return torch.cat(est), torch.cat(pos), torch.cat(body)

    def volume_placement(self, vol: torch.Tensor, overlap: float = 0.5, batch: int = 4, progress: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(3,)`` raw coordinates of the centre of a volume ``(X, Y, Z)`` from its windows' votes
        (S from the slice anchor when there is one, in eval mode), ``(3,)`` the scale of each
        axis (1, except S with the slice anchor's per-scan slope) and the ``(Z,)`` per-slice S
        residual of a ``"local"`` anchor fit (None otherwise): raw S of slice z is
        ``off[2] + scale[2] * d(z) + resid[z]``."""
        est, pos, body = self.window_estimates(vol, overlap, batch, progress)
        w = body + 1e-3
        off = ((est * self.anchor_gain - pos) * w[:, None]).sum(0) / w.sum()
        scale = torch.ones_like(off)
        resid = None
        if self.uses_slice_anchor:
            s_off, slope, resid = self.slice_anchor_volume(vol, overlap)
            off = torch.cat([off[:2], s_off.to(off).view(1)])
            scale = torch.cat([scale[:2], slope.to(off).view(1)])
            resid = None if resid is None else resid.to(off)
        return off, scale, resid

    def volume_offset(self, vol: torch.Tensor, overlap: float = 0.5, batch: int = 4, progress: bool = False) -> torch.Tensor:
        """``(3,)`` raw coordinates of the centre of a volume (:meth:`volume_placement`)."""
        return self.volume_placement(vol, overlap, batch, progress)[0]

    # -- slice anchor (S) ----------------------------------------------------------------------
    def s_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Calibrated slice scores -> raw S coordinates (the calibrated map ``g``)."""
        return interp_linear(scores.to(self.s_knots), self.s_knots, self.s_values)

    def slice_votes(self, scores: torch.Tensor, body: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slice votes for the S offset of an input of ``Z = len(scores)`` slices: ``g(s(z))``
        minus the slice's displacement from the input centre (raw units), and their weights (the
        slices holding at least a quarter of the body-richest slice's body, weighted by body)."""
        nz = scores.shape[-1]
        d = (torch.arange(nz, dtype=self.s_knots.dtype, device=self.s_knots.device) - (nz - 1) / 2.0) \
            * (self.spacing[2] / self.unit_mm)
        votes = self.s_from_scores(scores) - d
        b = body.to(votes)
        w = torch.where(b >= 0.25 * b.max(), b, torch.zeros_like(b)) if float(b.max()) > 0 else torch.ones_like(b)
        return votes, w

    def slice_fit(self, scores: torch.Tensor, body: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S placement of an input of ``Z = len(scores)`` slices: raw S of its centre and the slope
        of S against physical z (:meth:`slice_placement` without the per-slice residual)."""
        off, slope, _ = self.slice_placement(scores, body)
        return off, slope

    def slice_placement(self, scores: torch.Tensor, body: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """S placement of an input of ``Z = len(scores)`` slices: raw S of its centre, the slope of
        S against physical z, and for ``anchor_fit="local"`` the ``(Z,)`` raw S residual of every
        slice from that line (None for the other fits).

        ``"offset"``: slope 1 and the weighted median of the per-slice votes (:meth:`slice_votes`).
        ``"line"``: a straight line through the slices' calibrated S estimates ``g(s(z))`` against
        their displacement (weighted least squares, refit without the slices further than 2.5
        robust SDs from it), slope clipped to ``anchor_slope_range``, and the weighted median of
        ``g(s(z)) - slope * d(z)``. A scan whose scores climb more slowly than the training scans'
        (another body size, another scanner) then keeps the same S at the same anatomy in any crop
        instead of drifting along the scan. ``"local"``: that line, plus the residual that makes
        S(z) a local-linear fit of the ``g(s(z))`` (Gaussian kernel of SD ``anchor_bandwidth_mm``
        along z, weighted by body, local slope clipped to ``anchor_slope_range``), which follows a
        scan whose scores climb at different rates in different regions. A slice sees the same
        neighbours in every crop that holds them, so only slices within about two bandwidths of a
        crop's end move with the crop. Slices with no body slice within reach of the kernel (its
        body-weighted mass under 0.01 slices) go over to the line smoothly. One robustness pass
        reweights the slices by Cleveland's bisquare of their residual from the first local fit (6
        robust SDs, the SD at least 5 mm), so a few slices the slice model misreads do not bend S."""
        votes, w = self.slice_votes(scores, body)
        k = w > 0
        if self.anchor_fit == "offset" or int(k.sum()) < 3:
            return weighted_median(votes, w), torch.ones((), dtype=votes.dtype, device=votes.device), None
        nz = scores.shape[-1]
        d = ((torch.arange(nz, dtype=torch.float64, device=votes.device) - (nz - 1) / 2.0)
             * (self.spacing[2] / self.unit_mm))
        g, wd = votes.double() + d, w.double()
        lo, hi = self.anchor_slope_range
        # the line: weighted least squares over the body slices, refitted without the outliers
        dk, gk, wk = d[k], g[k], wd[k]
        one = torch.ones(1, dtype=torch.float64, device=d.device)
        a, md, mg = _weighted_lines(dk, gk, wk[None], one)
        r = gk - (mg + a * (dk - md))
        keep = r.abs() <= 2.5 * _robust_sd(r)
        if int(keep.sum()) >= 3:
            a, md, mg = _weighted_lines(dk, gk, (wk * keep)[None], one)
        slope = a[0].clamp(lo, hi)
        off = weighted_median((g - slope * d).to(votes), w)
        if self.anchor_fit != "local":
            return off, slope.to(votes), None
        # the local fit: one weighted line per slice, its neighbours weighted by the kernel
        kern = torch.exp(-0.5 * ((d[:, None] - d[None, :]) / (self.anchor_bandwidth_mm / self.unit_mm)) ** 2)

        def local(weights: torch.Tensor) -> torch.Tensor:
            a, md, mg = _weighted_lines(d, g, weights[None, :] * kern, slope.expand(nz))
            return mg + a.clamp(lo, hi) * (d - md)

        s_loc = local(wd)
        r = g - s_loc
        s_loc = local(wd * (1.0 - (r / (6.0 * _robust_sd(r[k], 5.0 / self.unit_mm))).abs().clamp(max=1.0) ** 2) ** 2)
        sw = (wd[None, :] * kern).sum(1)
        # far from every body slice (kernel mass -> 0) the local fit hands over smoothly to the line
        resid = (s_loc - (off.double() + slope * d)) * (sw / (sw + 1e-2))
        return off, slope.to(votes), resid.to(votes)

    def slice_anchor_volume(self, vol: torch.Tensor, overlap: float = 0.5
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Raw S coordinate of the centre of a volume ``(X, Y, Z)`` in [0, 1] from its slices, the
        slope of S against z and the per-slice residual of a local fit (:meth:`slice_placement`)."""
        from .inference import slice_scores_volume

        scores = torch.as_tensor(slice_scores_volume(self.slice_model, vol, overlap=overlap))
        body = (vol > body_threshold(self)).to(torch.float32).mean(dim=(0, 1)).cpu()
        return self.slice_placement(scores, body)

    def slice_anchor_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(B,)`` raw S coordinate of the centre of each patch ``(B, 1, X, Y, Z)``, ``(B,)`` slopes
        and ``(B, Z)`` per-slice residuals of a local fit (None for the other fits)."""
        scores = self.slice_model.slice_scores(x)  # (B, Z)
        body = (x > body_threshold(self)).to(x.dtype).mean(dim=(1, 2, 3))  # (B, Z)
        fits = [self.slice_placement(s, b) for s, b in zip(scores, body)]
        resid = None if fits[0][2] is None else torch.stack([f[2] for f in fits]).to(x)
        return torch.stack([f[0] for f in fits]).to(x), torch.stack([f[1] for f in fits]).to(x), resid

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self)
        if self.head_kind == "dense":
            xp, size = _pad_to_multiple(x, self.stride)
            low = self.raw_stride4(xp)
            full = F.interpolate(low, size=xp.shape[2:], mode="trilinear", align_corners=False)
            return full[:, :, : size[0], : size[1], : size[2]]
        size = tuple(int(n) for n in x.shape[2:])
        scale = resid = None
        if any(n > p for n, p in zip(size, self.patch_size)):
            placed = [self.volume_placement(v[0]) for v in x]
            off = torch.stack([p[0] for p in placed])
            scale = torch.stack([p[1] for p in placed])
            if placed[0][2] is not None:
                resid = torch.stack([p[2] for p in placed])  # type: ignore[misc]
        else:
            off = self._padded_offset(x)
            if self.uses_slice_anchor:
                s_off, slope, resid = self.slice_anchor_patches(x)
                off = torch.cat([off[:, :2], s_off[:, None]], 1)
                scale = torch.cat([torch.ones_like(off[:, :2]), slope[:, None]], 1)
        grid = self.displacement_grid(size, like=off)
        if scale is not None:
            grid = grid * scale.view(-1, 3, 1, 1, 1)
        out = off.view(-1, 3, 1, 1, 1) + grid
        return out if resid is None else add_s_residual(out, resid)


MODEL_CLASSES: dict[str, type[BodyPartRegressor]] = {"slice": SliceRegressor, "ape": APERegressor}


def build_bpr(kind: str, arch: dict[str, Any] | None = None, preprocess: dict[str, Any] | None = None) -> BodyPartRegressor:
    if kind not in MODEL_CLASSES:
        raise ValueError(f"unknown body part regressor kind {kind!r}; known: {list(BPR_KINDS)}")
    arch = dict(arch or {})
    for k in ("channels", "patch_size"):
        if k in arch:
            arch[k] = tuple(arch[k])
    return MODEL_CLASSES[kind](preprocess=preprocess, **arch)


def _check_input(x: torch.Tensor, model: BodyPartRegressor) -> None:
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"body part regressor expects (B, 1, X, Y, Z), got {tuple(x.shape)}")
    small = [s < m for s, m in zip(x.shape[2:], model.min_size)]
    if any(small):
        raise ValueError(f"patch {tuple(x.shape[2:])} is smaller than the {model.kind} model's minimum {model.min_size}")


# -- checkpoints -----------------------------------------------------------------------------------

def save_bpr(path: str | os.PathLike, model: BodyPartRegressor, meta: dict[str, Any] | None = None) -> Path:
    """Save as ``model.safetensors`` + ``model.json`` (a folder path) or ``X.safetensors`` + ``X.json``."""
    return save_checkpoint(path, model.state_dict(), CHECKPOINT_KIND, model.model_config(), meta=meta)


def load_bpr(path: str | os.PathLike, kind: str | None = None) -> BodyPartRegressor:
    """Load a body part regressor in eval mode with frozen weights.

    Refuses (``ModelError``) anything that is not a voxdiff BPR, a BPR of another ``kind`` (when
    given), a newer BPR version, or weights that do not match the architecture.
    """
    note_input(path)
    tensors, info = load_checkpoint(path, kind=CHECKPOINT_KIND)
    cfg = info.get("config") or {}
    bkind = cfg.get("bpr_kind")
    if bkind not in BPR_KINDS:
        raise ModelError(path, f"not a voxdiff body part regressor (unknown kind {bkind!r})")
    if kind is not None and bkind != kind:
        raise ModelError(path, f"this is a '{bkind}' body part regressor, expected '{kind}'")
    ver = cfg.get("bpr_version")
    if not isinstance(ver, int) or ver > BPR_VERSION or ver < 1:
        raise ModelError(path, f"body part regressor version {ver!r} is not supported by this voxdiff (supports 1..{BPR_VERSION})")
    arch = dict(cfg.get("arch") or {})
    if bkind == "ape":
        arch.setdefault("head", "dense")  # ape models saved before the anchor head existed
        if arch.get("anchor", "window") != "window" and ver < 2:
            raise ModelError(path, f"ape anchor {arch.get('anchor')!r} in a version-{ver} body part regressor file")
    members = arch.get("members", 1) if bkind == "slice" else (arch.get("slice_arch") or {}).get("members", 1)
    if members != 1 and ver < 3:
        raise ModelError(path, f"a slice ensemble of {members!r} members in a version-{ver} body part regressor file")
    try:
        model = build_bpr(bkind, arch, cfg.get("preprocess"))
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ModelError(path, f"weights do not match the {bkind} architecture ({str(e).splitlines()[0]})") from None
    model.calibration_info = dict(cfg.get("calibration") or {})
    return prefer_channels_last(freeze(model))


# -- what pretraining calls -------------------------------------------------------------------------

def sincos_encode(coords: torch.Tensor, n_freq: int) -> torch.Tensor:
    """Append ``sin(2^k pi c)``, ``cos(2^k pi c)`` for k < n_freq to the C coordinate channels.

    Output channels: C (the coordinates) + 2 * C * n_freq, ordered [coords, sin(k=0..), cos(k=0..)].
    """
    if n_freq <= 0:
        return coords
    freqs = (2.0 ** torch.arange(n_freq, dtype=coords.dtype, device=coords.device)) * math.pi
    shape = (1, 1, n_freq) + (1,) * (coords.ndim - 2)
    ang = coords.unsqueeze(2) * freqs.view(shape)  # (B, C, F, ...)
    b, c = coords.shape[:2]
    rest = coords.shape[2:]
    return torch.cat([coords, torch.sin(ang).reshape(b, c * n_freq, *rest), torch.cos(ang).reshape(b, c * n_freq, *rest)], 1)


def encoded_channels(n: int, sincos: int = 0) -> int:
    """Channels of ``n`` coordinate channels after :func:`sincos_encode` with ``sincos`` frequencies."""
    return int(n) * (1 + 2 * max(int(sincos), 0))


def coords_channels(model: BodyPartRegressor, sincos: int = 0) -> int:
    """Number of channels that :func:`coords_for_patches` returns."""
    return encoded_channels(model.out_channels, sincos)


@torch.no_grad()
def coords_for_patches(
    model: BodyPartRegressor,
    x: torch.Tensor,
    sincos: int = 0,
    spacing: tuple[float, float, float] | None = None,
) -> torch.Tensor:
    """The coordinate map of a batch of patches: ``(B, 1, X, Y, Z)`` in [0, 1] -> ``(B, C', X, Y, Z)``.

    No gradient, no file IO; runs on ``x``'s device and returns ``x``'s dtype. ``sincos > 0`` appends
    a sin/cos encoding (see :func:`sincos_encode`). When the patches have another voxel spacing than
    the model was trained at, pass ``spacing`` (mm): they are resampled to the model's spacing and
    the map is resampled back.
    """
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"coords_for_patches expects (B, 1, X, Y, Z), got {tuple(x.shape)}")
    dtype = x.dtype
    p = next(model.parameters())
    xin = x.to(device=p.device, dtype=p.dtype)
    size = tuple(xin.shape[2:])
    if spacing is not None:
        ms = model.spacing
        new = tuple(max(1, round(n * s / m)) for n, s, m in zip(size, spacing, ms))
        if new != size:
            xin = F.interpolate(xin, size=new, mode="trilinear", align_corners=False)
    was_training = model.training
    model.eval()
    try:
        out = model(xin)
    finally:
        model.train(was_training)
    if tuple(out.shape[2:]) != size:
        out = F.interpolate(out, size=size, mode="trilinear", align_corners=False)
    out = sincos_encode(out, int(sincos))
    return out.to(device=x.device, dtype=dtype)
