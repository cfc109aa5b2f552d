"""Whole-volume coordinate fields: the BPR map of a volume, computed once and cropped for every patch.

Both regressor kinds give maps that vary along one voxel axis per channel:

* ``slice``: one score per axial slice (channel 0 varies along z only);
* ``ape`` (anchor head): the physical position of the voxel plus one offset for the whole volume, so
  channel ``k`` (R, A, S) varies along voxel axis ``k`` only, linearly.

A :class:`CoordinateField` therefore stores one 1D profile per channel along its axis (a few hundred
numbers per volume instead of a dense ``(C, X, Y, Z)`` array) and hands out the map of any box of
voxel indices with :meth:`CoordinateField.crop`, boxes reaching outside the volume included: outside
the profile is extended linearly with its mean slope (exact for the ape map, which is linear; for
slice scores the straight continuation of the body axis). The same voxel therefore carries the same
coordinates whatever patch, window or field of view it is seen in.

Fields are computed by :func:`volume_field` on the whole preprocessed volume (at the regressor's own
spacing, mapped back to the volume's grid) and cached by :class:`FieldCache` in
``<preprocessing cache>/conditions/<model signature>/<volume key>.json``, where the volume key hashes
the voxels, the grid (affine) and the intensity window, and the model signature hashes the
regressor's weights and configuration: new weights or other preprocessing give other keys, so a
stale field is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..core.errors import InputError, ModelError
from ..core.outputs import atomic_write_json
from ..data.preprocess import HU_WINDOW
from .models import BodyPartRegressor, sincos_encode

FIELD_FORMAT = "voxdiff-bpr-field"
FIELD_VERSION = 1


@dataclass
class CoordinateField:
    """Per-channel 1D profiles of a volume's coordinate map.

    Attributes:
        shape: the volume's shape ``(X, Y, Z)``.
        axes: the voxel axis along which each channel varies.
        profiles: one float64 array per channel, of length ``shape[axes[c]]``.
    """

    shape: tuple[int, int, int]
    axes: tuple[int, ...]
    profiles: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)  # type: ignore[assignment]
        self.axes = tuple(int(a) for a in self.axes)
        self.profiles = tuple(np.asarray(p, dtype=np.float64).reshape(-1) for p in self.profiles)
        if len(self.axes) != len(self.profiles):
            raise ValueError("one axis per profile")
        for a, p in zip(self.axes, self.profiles):
            if not 0 <= a < 3 or len(p) != self.shape[a]:
                raise ValueError(f"profile of length {len(p)} does not fit axis {a} of a volume {self.shape}")

    @property
    def channels(self) -> int:
        return len(self.profiles)

    def values(self, axis_channel: int, index: np.ndarray) -> np.ndarray:
        """Channel ``axis_channel`` at integer voxel indices along its axis (linear outside)."""
        p = self.profiles[axis_channel]
        n = len(p)
        i = np.asarray(index, dtype=np.int64)
        inside = np.clip(i, 0, n - 1)
        out = p[inside].copy()
        slope = (p[-1] - p[0]) / (n - 1) if n > 1 else 0.0
        lo, hi = i < 0, i > n - 1
        out[lo] = p[0] + slope * i[lo]
        out[hi] = p[-1] + slope * (i[hi] - (n - 1))
        return out

    def crop(self, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """``(C, *size)`` float32 map of the box starting at voxel ``origin`` (may lie outside)."""
        size = tuple(int(s) for s in size)
        out = np.empty((self.channels,) + size, dtype=np.float32)
        for c, a in enumerate(self.axes):
            v = self.values(c, np.arange(int(origin[a]), int(origin[a]) + size[a])).astype(np.float32)
            shape = [1, 1, 1]
            shape[a] = size[a]
            out[c] = np.broadcast_to(v.reshape(shape), size)
        return out

    def dense(self) -> np.ndarray:
        """The whole map ``(C, X, Y, Z)`` float32."""
        return self.crop((0, 0, 0), self.shape)

    # -- serialisation --------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": FIELD_FORMAT, "version": FIELD_VERSION, "shape": list(self.shape),
                "axes": list(self.axes), "profiles": [p.tolist() for p in self.profiles]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "CoordinateField":
        if doc.get("format") != FIELD_FORMAT or doc.get("version") != FIELD_VERSION:
            raise ValueError("not a voxdiff coordinate field of a known version")
        return cls(tuple(doc["shape"]), tuple(doc["axes"]), tuple(np.asarray(p) for p in doc["profiles"]))


def crop_fields(fields: Sequence[CoordinateField], index: Sequence[int], origins: Sequence[Sequence[int]],
                size: Sequence[int], sincos: int = 0) -> torch.Tensor:
    """Batch ``(B, C', *size)`` of the fields ``fields[index[b]]`` cropped at ``origins[b]``,
    with the sin/cos encoding of :func:`~voxdiff.bpr.models.sincos_encode` appended when ``sincos``
    (the profiles of :func:`crop_profiles`, expanded here)."""
    profiles, axes = crop_profiles(fields, index, origins, size)
    return expand_profiles(profiles, axes, size, sincos).contiguous()


def crop_profiles(fields: Sequence[CoordinateField], index: Sequence[int], origins: Sequence[Sequence[int]],
                  size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The crops of :func:`crop_fields` as 1D profiles: ``(profiles, axes)`` with ``profiles``
    ``(B, C, max(size))`` float32 (channel ``c`` of patch ``b`` along its axis, zero-padded past
    ``size[axes[c]]``) and ``axes`` ``(C,)`` int64. :func:`expand_profiles` turns them into the dense
    maps wherever they are (e.g. on the GPU): a batch carries a few kB instead of ``C`` patch-sized maps.
    Every field must vary along the same axes (fields of one regressor do)."""
    size = tuple(int(s) for s in size)
    axes = fields[int(index[0])].axes if len(index) else ()
    if any(fields[int(i)].axes != axes for i in index):
        raise ValueError("the fields of one batch vary along different axes")
    out = np.zeros((len(index), len(axes), max(size)), dtype=np.float32)
    for b, (i, o) in enumerate(zip(index, origins)):
        f = fields[int(i)]
        for c, a in enumerate(axes):
            out[b, c, : size[a]] = f.values(c, np.arange(int(o[a]), int(o[a]) + size[a])).astype(np.float32)
    return torch.from_numpy(out), torch.tensor(axes, dtype=torch.int64)


def expand_profiles(profiles: torch.Tensor, axes: Sequence[int] | torch.Tensor, size: Sequence[int],
                    sincos: int = 0) -> torch.Tensor:
    """Dense ``(B, C', *size)`` maps of :func:`crop_profiles` output, on the profiles' device; equal
    to :func:`crop_fields` of the same crops (the sin/cos encoding appended when ``sincos``)."""
    size = tuple(int(s) for s in size)
    axes = [int(a) for a in (axes.tolist() if torch.is_tensor(axes) else axes)]
    b = profiles.shape[0]
    chans = []
    for c, a in enumerate(axes):
        shape = [b, 1, 1, 1]
        shape[1 + a] = size[a]
        chans.append(profiles[:, c, : size[a]].reshape(shape).expand(b, *size))
    return sincos_encode(torch.stack(chans, 1), int(sincos))


# ------------------------------------------------------------------------------------ computing


def _resample_unit(unit: torch.Tensor, spacing: Sequence[float], target: Sequence[float]) -> torch.Tensor:
    size = tuple(int(n) for n in unit.shape)
    new = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(size, spacing, target))
    if new == size:
        return unit
    return torch.nn.functional.interpolate(unit[None, None], size=new, mode="trilinear", align_corners=False)[0, 0]


def _to_grid(profile: np.ndarray, n: int) -> np.ndarray:
    """A profile sampled on ``len(profile)`` cells resampled to ``n`` cells of the same extent
    (cell centres, as ``F.interpolate(align_corners=False)``)."""
    m = len(profile)
    if m == n:
        return np.asarray(profile, dtype=np.float64)
    x = (np.arange(n) + 0.5) * (m / n) - 0.5
    if m == 1:
        return np.full(n, float(profile[0]))
    i0 = np.clip(np.floor(x).astype(np.int64), 0, m - 2)
    f = x - i0
    return profile[i0] * (1 - f) + profile[i0 + 1] * f


@torch.no_grad()
def volume_field(model: BodyPartRegressor, hu: np.ndarray | torch.Tensor, spacing: Sequence[float],
                 overlap: float = 0.5, progress: bool = False) -> CoordinateField:
    """The coordinate field of a whole preprocessed volume ``hu`` (HU, ``(X, Y, Z)`` at ``spacing`` mm).

    The volume is brought to the model's intensity window and spacing, mapped once
    (:mod:`voxdiff.bpr.inference`), and the profiles are taken back to the volume's own grid.
    """
    from ..data.preprocess import hu_to_unit
    from .inference import slice_scores_volume

    vol = torch.as_tensor(np.asarray(hu, dtype=np.float32)) if not torch.is_tensor(hu) else hu.float()
    if vol.ndim != 3:
        raise ValueError(f"volume_field expects an (X, Y, Z) volume, got {tuple(vol.shape)}")
    shape = tuple(int(n) for n in vol.shape)
    window = tuple(float(v) for v in model.preprocess.get("hu_window", HU_WINDOW))
    unit = hu_to_unit(vol, window)
    sp = tuple(float(s) for s in spacing)
    unit_m = _resample_unit(unit, sp, model.spacing)
    p = next(model.parameters())
    unit_m = unit_m.to(device=p.device, dtype=p.dtype)
    if model.kind == "slice":
        # slices narrower than the model's minimum are padded with air in-plane (scores are per slice)
        pads = [max(0, m - n) for n, m in zip(unit_m.shape[:2], model.min_size[:2])]
        if any(pads):
            unit_m = torch.nn.functional.pad(unit_m[None, None], (0, 0, 0, pads[1], 0, pads[0]))[0, 0]
        scores = slice_scores_volume(model, unit_m, overlap=overlap, progress=progress).astype(np.float64)  # type: ignore[arg-type]
        return CoordinateField(shape, (2,), (_to_grid(scores, shape[2]),))
    if getattr(model, "head_kind", None) != "anchor":
        raise ModelError(None, "this ape body part regressor (v1 dense head) gives no whole-volume coordinate field; "
                               "retrain it with the current voxdiff (head: anchor)")
    off, axis_scale, resid = model.volume_placement(unit_m, overlap=overlap, progress=progress)  # type: ignore[operator]
    off, axis_scale = off.double().cpu(), axis_scale.double().cpu()
    # the model grid and the volume grid share their centre:
    # raw_k(i) = off_k + axis_scale_k * (i - (n-1)/2) * sp_k / unit_mm  (axis_scale: 1, or the S slope of a slice anchor)
    # plus, along S with a local slice-anchor fit, the per-slice residual taken from the model grid
    scale = model.calib_scale.double().cpu()
    shift = model.calib_offset.double().cpu()
    profiles = []
    for k in range(3):
        d = (np.arange(shape[k]) - (shape[k] - 1) / 2.0) * sp[k] / model.unit_mm  # type: ignore[attr-defined]
        raw = float(off[k]) + float(axis_scale[k]) * d
        if k == 2 and resid is not None:
            r = resid.double().cpu().numpy()
            dm = (np.arange(len(r)) - (len(r) - 1) / 2.0) * model.spacing[2] / model.unit_mm  # type: ignore[attr-defined]
            raw = raw + np.interp(d, dm, r)
        profiles.append(raw * float(scale[k]) + float(shift[k]))
    return CoordinateField(shape, (0, 1, 2), tuple(profiles))


def model_signature(model: BodyPartRegressor) -> str:
    """Hash of the regressor's weights, buffers and configuration (what decides its outputs)."""
    h = hashlib.sha256()
    h.update(json.dumps(model.model_config(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def volume_key(hu: np.ndarray, affine: np.ndarray | None, spacing: Sequence[float]) -> str:
    """Hash of a preprocessed volume's voxels (as int16 HU), grid and spacing."""
    h = hashlib.blake2b(digest_size=16)
    a = np.asarray(hu)
    h.update(json.dumps({"shape": list(a.shape), "spacing": [round(float(s), 6) for s in spacing],
                         "affine": None if affine is None else np.round(np.asarray(affine, dtype=np.float64), 6).tolist()},
                        sort_keys=True).encode())
    if a.dtype != np.int16:
        a = np.clip(np.rint(a), -32768, 32767).astype(np.int16)
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class FieldCache:
    """Coordinate fields on disk, one small JSON per volume and regressor (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, model: BodyPartRegressor):
        self.model = model
        self.signature = model_signature(model)
        self.root = Path(root) / "conditions" / self.signature

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, hu: np.ndarray, affine: np.ndarray | None, spacing: Sequence[float],
            progress: bool = False) -> CoordinateField:
        key = volume_key(hu, affine, spacing)
        p = self.path(key)
        if p.is_file():
            try:
                field = CoordinateField.from_json(json.loads(p.read_text()))
                if field.shape == tuple(np.asarray(hu).shape):
                    return field
            except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
                pass  # damaged or foreign entry: recomputed and replaced
        field = volume_field(self.model, hu, spacing, progress=progress)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(p, field.to_json())
        return field


def case_fields(model: BodyPartRegressor, cases: Sequence[Any], cache_dir: str | os.PathLike | None = None,
                progress: bool = False) -> list[CoordinateField]:
    """The coordinate field of every preprocessed case (``Case`` with an HU ``image`` and ``meta``),
    read from / added to ``cache_dir`` when given."""
    from tqdm import tqdm

    cache = FieldCache(cache_dir, model) if cache_dir is not None else None
    out = []
    for c in tqdm(cases, desc="bpr fields", unit="case", disable=None if progress else True):
        spacing = tuple(float(s) for s in c.meta.spacing)
        if len(spacing) != 3:
            raise InputError(getattr(c.meta, "image_path", None), f"case has no 3D spacing ({spacing})")
        if cache is not None:
            out.append(cache.get(c.image, c.meta.affine, spacing))
        else:
            out.append(volume_field(model, c.image, spacing))
    return out
