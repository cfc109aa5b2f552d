"""Preprocessing of CT volumes: RAS orientation, resampling, HU windowing, body crop, and the way back.

``preprocess(case, cfg)`` turns a raw case (file orientation and spacing) into the training grid:

1. reorient to RAS+ (a permutation/flip of the voxel axes, no interpolation);
2. resample to ``cfg.spacing`` mm (image linear, labels nearest), keeping the physical extent;
3. crop to the body (HU >= ``body_threshold_hu``, largest connected component, holes filled)
   plus ``body_margin_mm``.

Every step only changes the voxel grid; the affine of the current array is kept in
``case.meta.affine`` and the source grid in ``meta.original_shape`` / ``meta.original_affine``, so
:func:`restore_to_original` can map any array (labels, probabilities, images) back to the source
file's grid exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .types import Case, CaseMeta


@dataclass
class PreprocessConfig:
    """How CT volumes are brought to the common training grid.

    spacing: target voxel spacing in mm (x, y, z) in RAS; null keeps the native spacing.
    hu_window: HU range mapped to [0, 1] for model inputs (values outside are clipped).
    crop_to_body: crop each volume to the bounding box of the body mask.
    body_threshold_hu: voxels at or above this HU are candidate body voxels.
    body_margin_mm: margin kept around the body bounding box.
    """

    spacing: tuple[float, float, float] | None = (1.0, 1.0, 2.0)
    hu_window: tuple[float, float] = (-1350.0, 1000.0)
    crop_to_body: bool = True
    body_threshold_hu: float = -500.0
    body_margin_mm: float = 10.0


# --------------------------------------------------------------------------------- intensities


def hu_to_unit(hu, window=(-1350.0, 1000.0)):
    """Clip HU to ``window`` and scale linearly to [0, 1] (float32). numpy arrays or torch tensors."""
    lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        raise ValueError(f"invalid HU window {window}")
    if hasattr(hu, "clamp"):  # torch tensor
        return ((hu.float() - lo) / (hi - lo)).clamp_(0.0, 1.0)
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def unit_to_hu(unit, window=(-1350.0, 1000.0)):
    """Inverse of :func:`hu_to_unit` inside the window."""
    lo, hi = float(window[0]), float(window[1])
    if hasattr(unit, "clamp"):
        return unit.float() * (hi - lo) + lo
    return (np.asarray(unit, dtype=np.float32) * np.float32(hi - lo) + np.float32(lo)).astype(np.float32)
