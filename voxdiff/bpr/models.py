"""Body part regressor networks, saving and loading.

Both kinds take ``(B, 1, X, Y, Z)`` intensities in [0, 1] (``hu_to_unit`` with the model's
preprocessing window, at the model's spacing) and return ``(B, C, X, Y, Z)`` maps of the same size:

* ``slice`` (C = 1): a small 2D CNN scores every axial slice (k x k in-plane convolutions only, so a
  slice's score never depends on the other slices of the patch); the score is the mean of local
  scores over the slice and is broadcast over it. Calibrated so that the training set's 1st..99th
  percentile of scores maps to 0..1 (``mm_per_unit`` mm per unit).
* ``ape`` (C = 3): a small 3D encoder-decoder; features at stride 4 are mapped to 3 coordinates and
  upsampled trilinearly to full size. Channel 0/1/2 follow the R/A/S axes; calibrated so that one
  unit is ``mm_per_unit`` mm and the training set's median maps to 0.5.

Normalisation layers are BatchNorm (a fixed affine map at inference), so the output at a voxel does
not depend on the rest of the batch and, away from patch borders, not on the rest of the patch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checkpoint import load_checkpoint, save_checkpoint
from ..core.errors import ModelError

BPR_KINDS = ("slice", "ape")
BPR_VERSION = 1  # bump when the architecture or the meaning of the outputs changes
CHECKPOINT_KIND = "bpr"


def _default_preprocess() -> dict[str, Any]:
    return {
        "spacing": [3.0, 3.0, 3.0],
        "hu_window": [-1350.0, 1000.0],
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

    def model_config(self) -> dict[str, Any]:
        return {
            "bpr_kind": self.kind,
            "bpr_version": BPR_VERSION,
            "out_channels": self.out_channels,
            "arch": self.arch(),
            "preprocess": dict(self.preprocess),
            "calibration": dict(self.calibration_info),
        }


def _pad_to_multiple(x: torch.Tensor, mult: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    size = x.shape[2:]
    pads: list[int] = []
    for s, m in reversed(list(zip(size, mult))):
        pads += [0, (-s) % m]
    if any(pads):
        x = F.pad(x, pads)  # zeros = the window minimum (air)
    return x, tuple(size)


class SliceRegressor(BodyPartRegressor):
    kind = "slice"
    out_channels = 1

    def __init__(self, channels: tuple[int, ...] = (16, 32, 48, 64), unit_mm: float = 100.0, **kw: Any):
        super().__init__(**kw)
        self.channels = tuple(int(c) for c in channels)
        self.unit_mm = float(unit_mm)
        layers: list[nn.Module] = []
        cin = 1
        for c in self.channels:
            # stride-2 2x2 conv (no padding: output j covers input [2j, 2j+1]) then a 3x3 conv
            layers += [nn.Conv2d(cin, c, 2, stride=2), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            cin = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(cin, 1, 1)
        s = 2 ** len(self.channels)
        self.stride = (s, s, 1)

    def arch(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "unit_mm": self.unit_mm, "patch_size": list(self.patch_size)}

    def slice_scores_raw(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, Z) uncalibrated scores."""
        _check_input(x, self)
        b, _, _, _, z = x.shape
        x, _ = _pad_to_multiple(x, self.stride)
        xs = x.permute(0, 4, 1, 2, 3).reshape(b * z, 1, x.shape[2], x.shape[3])
        local = self.head(self.features(xs))  # (B*Z, 1, x', y')
        return local.mean(dim=(1, 2, 3)).view(b, z)

    def slice_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, Z) calibrated scores."""
        return self.slice_scores_raw(x) * self.calib_scale[0] + self.calib_offset[0]

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


class APERegressor(BodyPartRegressor):
    kind = "ape"
    out_channels = 3

    def __init__(self, channels: tuple[int, ...] = (16, 32, 48, 64), unit_mm: float = 100.0, **kw: Any):
        super().__init__(**kw)
        if len(channels) < 3:
            raise ValueError("APERegressor needs at least 3 levels of channels")
        self.channels = tuple(int(c) for c in channels)
        self.unit_mm = float(unit_mm)
        self.down = nn.ModuleList()
        cin = 1
        for c in self.channels:
            self.down.append(nn.Sequential(nn.Conv3d(cin, c, 2, stride=2), nn.BatchNorm3d(c), nn.ReLU(inplace=True),
                                           *_block3d(c, c)))
            cin = c
        # decoder back to stride 4 (level index 1)
        self.up = nn.ModuleList()
        for lvl in range(len(self.channels) - 1, 1, -1):
            self.up.append(nn.Sequential(*_block3d(self.channels[lvl] + self.channels[lvl - 1], self.channels[lvl - 1])))
        self.head = nn.Conv3d(self.channels[1], 3, 1)
        s = 2 ** len(self.channels)
        self.stride = (s, s, s)

    def arch(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "unit_mm": self.unit_mm, "patch_size": list(self.patch_size)}

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

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self)
        xp, size = _pad_to_multiple(x, self.stride)
        low = self.raw_stride4(xp)
        full = F.interpolate(low, size=xp.shape[2:], mode="trilinear", align_corners=False)
        return full[:, :, : size[0], : size[1], : size[2]]


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
    try:
        model = build_bpr(bkind, cfg.get("arch"), cfg.get("preprocess"))
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ModelError(path, f"weights do not match the {bkind} architecture ({str(e).splitlines()[0]})") from None
    model.calibration_info = dict(cfg.get("calibration") or {})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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


def coords_channels(model: BodyPartRegressor, sincos: int = 0) -> int:
    """Number of channels that :func:`coords_for_patches` returns."""
    return model.out_channels * (1 + 2 * max(int(sincos), 0))


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
