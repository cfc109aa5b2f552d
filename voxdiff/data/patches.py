"""Random 3D training patches with the world (mm) coordinates of every voxel.

``sample_patch`` cuts one patch; volumes smaller than the patch are padded (image with the HU
window minimum, label 0) and the coordinates keep following the affine into the padding.
``sample_batch`` draws a batch from several cases and returns model-ready torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .preprocess import HU_WINDOW, hu_to_unit


@dataclass
class Patch:
    image: np.ndarray  # (X, Y, Z) float32 (HU when the volume is HU)
    label: np.ndarray | None  # (X, Y, Z) uint8 or None
    coords_mm: np.ndarray  # (3, X, Y, Z) float32 world mm (RAS) of every voxel
    origin: tuple[int, int, int]  # index of the patch's first voxel in the volume (may be negative)


def voxel_coords_mm(affine: np.ndarray | None, origin, size) -> np.ndarray:
    """World coordinates (3, X, Y, Z) float32 of the voxels ``origin + [0, size)`` under ``affine``."""
    a = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    ix = np.arange(size[0], dtype=np.float64) + origin[0]
    iy = np.arange(size[1], dtype=np.float64) + origin[1]
    iz = np.arange(size[2], dtype=np.float64) + origin[2]
    out = np.empty((3, *size), dtype=np.float32)
    for d in range(3):
        out[d] = (
            a[d, 0] * ix[:, None, None] + a[d, 1] * iy[None, :, None] + a[d, 2] * iz[None, None, :] + a[d, 3]
        )
    return out


def class_locations(label: np.ndarray, max_per_class: int = 20000, seed: int = 0) -> dict[int, np.ndarray]:
    """Voxel indices (N, 3) of each organ present (subsampled to ``max_per_class``): pass to
    :func:`sample_patch` as ``locations`` to avoid scanning the label map for every patch."""
    rng = np.random.default_rng(seed)
    flat = np.asarray(label).ravel()
    nz = np.flatnonzero(flat)
    out = {}
    if nz.size == 0:
        return out
    vals = flat[nz]
    for c in np.unique(vals):
        idx = nz[vals == c]
        if idx.size > max_per_class:
            idx = rng.choice(idx, max_per_class, replace=False)
        out[int(c)] = np.stack(np.unravel_index(idx, label.shape), axis=1)
    return out


def crop_or_pad(arr: np.ndarray, origin, size, fill: float, dtype=None) -> np.ndarray:
    """``arr[origin : origin + size]`` where parts outside ``arr`` are ``fill`` (origin may be < 0)."""
    out = np.full(tuple(size), fill, dtype=dtype or arr.dtype)
    src, dst = [], []
    for o, s, n in zip(origin, size, arr.shape):
        lo, hi = max(o, 0), min(o + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _extract(vol: np.ndarray, origin, size, pad_value) -> np.ndarray:
    dtype = np.float32 if vol.dtype.kind == "f" or vol.dtype == np.int16 else vol.dtype
    return crop_or_pad(vol, origin, size, pad_value, dtype=dtype)


def sample_patch(
    image: np.ndarray,
    size: Sequence[int],
    rng: np.random.Generator,
    label: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    fg_prob: float = 0.0,
    pad_value: float = HU_WINDOW[0],
    locations: dict[int, np.ndarray] | None = None,
) -> Patch:
    """One random patch of ``size`` voxels.

    With probability ``fg_prob`` (and a label with organs) the patch is centred on a labelled voxel:
    an organ class is picked uniformly first, then a voxel of it, so that small organs are seen as
    often as big ones. Otherwise the origin is uniform over all positions where the patch fits (or,
    along an axis shorter than the patch, where the volume fits inside the patch: the rest is padding
    with ``pad_value``, the window minimum by default). ``image`` may be int16 HU (cache memmap).
    """
    size = tuple(int(s) for s in size)
    shape = image.shape
    if len(size) != 3 or any(s < 1 for s in size):
        raise ValueError(f"patch size must be 3 positive ints, got {size}")
    lo = [min(0, n - s) for n, s in zip(shape, size)]
    hi = [max(0, n - s) for n, s in zip(shape, size)]
    origin = None
    if fg_prob > 0 and label is not None and rng.random() < fg_prob:
        locs = locations if locations is not None else class_locations(label, seed=int(rng.integers(1 << 31)))
        classes = sorted(c for c, v in locs.items() if len(v))
        if classes:
            c = classes[int(rng.integers(len(classes)))]
            v = locs[c][int(rng.integers(len(locs[c])))]
            origin = [int(np.clip(int(v[d]) - size[d] // 2, lo[d], hi[d])) for d in range(3)]
    if origin is None:
        origin = [int(rng.integers(lo[d], hi[d] + 1)) for d in range(3)]
    img = _extract(image, origin, size, pad_value).astype(np.float32, copy=False)
    lab = None if label is None else _extract(label, origin, size, 0).astype(np.uint8, copy=False)
    return Patch(img, lab, voxel_coords_mm(affine, origin, size), tuple(origin))


def sample_batch(
    cases: Sequence,
    batch_size: int,
    size: Sequence[int],
    rng: np.random.Generator,
    window: Sequence[float] = HU_WINDOW,
    fg_prob: float = 0.0,
    locations: Sequence[dict[int, np.ndarray] | None] | None = None,
) -> dict:
    """A batch of patches from ``cases`` (each picked uniformly) as torch tensors.

    Returns ``{"image": (B,1,X,Y,Z) float32 in [0,1], "label": (B,X,Y,Z) int64 or None,
    "coords": (B,3,X,Y,Z) float32 mm, "case_ids": [...], "origins": [...]}``. Labels are returned
    only when every picked case has one.
    """
    import torch

    imgs, labs, coords, ids, origins = [], [], [], [], []
    for _ in range(batch_size):
        i = int(rng.integers(len(cases)))
        c = cases[i]
        loc = locations[i] if locations is not None else None
        p = sample_patch(c.image, size, rng, label=c.label, affine=c.meta.affine, fg_prob=fg_prob,
                         pad_value=float(window[0]), locations=loc)
        imgs.append(hu_to_unit(p.image, window))
        labs.append(p.label)
        coords.append(p.coords_mm)
        ids.append(c.meta.case_id)
        origins.append(p.origin)
    out = {
        "image": torch.from_numpy(np.stack(imgs)[:, None]),
        "label": None if any(l is None for l in labs) else torch.from_numpy(np.stack(labs).astype(np.int64)),
        "coords": torch.from_numpy(np.stack(coords)),
        "case_ids": ids,
        "origins": origins,
    }
    return out
