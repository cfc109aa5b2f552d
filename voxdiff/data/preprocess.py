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

from voxdiff.core.errors import InputError

from .types import Case, CaseMeta

# The HU range mapped to [0, 1] for every model input by default (vox2vec's window): one place for it.
HU_WINDOW: tuple[float, float] = (-1350.0, 1000.0)


@dataclass
class PreprocessConfig:
    """How CT volumes are brought to the common training grid.

    Args:
        spacing: target voxel spacing in mm (x, y, z) in RAS; null keeps the native spacing.
        hu_window: HU range mapped to [0, 1] for model inputs (values outside are clipped).
        crop_to_body: crop each volume to the bounding box of the body mask.
        body_threshold_hu: voxels at or above this HU are candidate body voxels.
        body_margin_mm: margin kept around the body bounding box (mm).
    """

    spacing: tuple[float, float, float] | None = (1.0, 1.0, 2.0)
    hu_window: tuple[float, float] = HU_WINDOW
    crop_to_body: bool = True
    body_threshold_hu: float = -500.0
    body_margin_mm: float = 10.0

    def __post_init__(self) -> None:
        # one line for settings that cannot be meant, before any volume is read
        w = [float(v) for v in self.hu_window]
        if len(w) != 2 or not all(np.isfinite(w)) or not w[0] < w[1]:
            raise InputError(None, f"preprocess.hu_window must be two finite HU values, low < high, got {list(self.hu_window)}")
        if self.spacing is not None:
            sp = [float(v) for v in self.spacing]
            if len(sp) != 3 or not all(np.isfinite(sp)) or min(sp) <= 0:
                raise InputError(None, f"preprocess.spacing must be 3 positive sizes in mm (or null), got {list(self.spacing)}")
        if not float(self.body_margin_mm) >= 0:
            raise InputError(None, f"preprocess.body_margin_mm must be >= 0, got {self.body_margin_mm}")


# --------------------------------------------------------------------------------- intensities


def hu_to_unit(hu, window=HU_WINDOW):
    """Clip HU to ``window`` and scale linearly to [0, 1] (float32). numpy arrays or torch tensors."""
    lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        raise ValueError(f"invalid HU window {window}")
    if hasattr(hu, "clamp"):  # torch tensor
        return ((hu.float() - lo) / (hi - lo)).clamp_(0.0, 1.0)
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    if isinstance(out, np.ndarray) and out.ndim > 0:
        return np.clip(out, 0.0, 1.0, out=out)
    return np.float32(np.clip(out, 0.0, 1.0))


def unit_to_hu(unit, window=HU_WINDOW):
    """Inverse of :func:`hu_to_unit` inside the window."""
    lo, hi = float(window[0]), float(window[1])
    if hasattr(unit, "clamp"):
        return unit.float() * (hi - lo) + lo
    return (np.asarray(unit, dtype=np.float32) * np.float32(hi - lo) + np.float32(lo)).astype(np.float32)


# --------------------------------------------------------------------------------- orientation


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient the last three axes of ``array`` to RAS+ (closest canonical, like nibabel's
    ``as_closest_canonical``): only axis permutations and flips, no interpolation."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    target = nio.axcodes2ornt(("R", "A", "S"))
    tr = nio.ornt_transform(ornt, target)
    if np.array_equal(tr, [[0, 1], [1, 1], [2, 1]]):
        return array, np.asarray(affine, dtype=np.float64).copy()
    spatial = array.shape[-3:]
    lead = array.ndim - 3
    out = array
    # apply flips then the permutation, on the last three axes
    for ax in range(3):
        if tr[ax, 1] == -1:
            out = np.flip(out, axis=lead + ax)
    perm = list(range(lead)) + [lead + int(i) for i in np.argsort(tr[:, 0])]
    out = np.ascontiguousarray(np.transpose(out, perm))
    new_affine = np.asarray(affine, dtype=np.float64) @ nio.inv_ornt_aff(tr, spatial)
    return out, new_affine


def axcodes(affine: np.ndarray) -> tuple[str, str, str]:
    import nibabel as nib

    return tuple(nib.aff2axcodes(affine))  # type: ignore[return-value]


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    s = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return tuple(float(v) for v in s)  # type: ignore[return-value]


# --------------------------------------------------------------------------------- resampling


def _resample_axis(arr: np.ndarray, coords: np.ndarray, axis: int, order: int, fill: float | None) -> np.ndarray:
    """Sample ``arr`` along ``axis`` at fractional source indices ``coords`` (separable 1-D step).

    order 0: nearest (round half up); order 1: linear. Coordinates outside [0, n-1] take ``fill``,
    or the edge value when ``fill`` is None (coordinates within half a voxel of the edge always
    take the edge value).
    """
    n = arr.shape[axis]
    c = np.asarray(coords, dtype=np.float64)
    snapped = np.round(c)
    c = np.where(np.abs(c - snapped) < 1e-6, snapped, c)
    if fill is not None:
        outside = (c < -0.5) | (c > n - 0.5)
    else:
        outside = None
    c = np.clip(c, 0.0, n - 1.0)
    shape = [1] * arr.ndim
    shape[axis] = len(c)
    if order == 0:
        idx = np.floor(c + 0.5).astype(np.intp)
        np.clip(idx, 0, n - 1, out=idx)
        out = np.take(arr, idx, axis=axis)
    else:
        i0 = np.floor(c).astype(np.intp)
        np.clip(i0, 0, max(n - 2, 0), out=i0)
        w = (c - i0).astype(np.float32)
        i1 = np.minimum(i0 + 1, n - 1)
        a0 = np.take(arr, i0, axis=axis).astype(np.float32, copy=False)
        a1 = np.take(arr, i1, axis=axis).astype(np.float32, copy=False)
        w = w.reshape(shape)
        # a0 + w * (a1 - a0), in place to save memory on big volumes
        np.subtract(a1, a0, out=a1)
        np.multiply(a1, w, out=a1)
        np.add(a0, a1, out=a0)
        out = a0
    if outside is not None and outside.any():
        if out.dtype.kind in "iub" and not float(fill).is_integer():
            out = out.astype(np.float32)
        sl = [slice(None)] * arr.ndim
        sl[axis] = np.nonzero(outside)[0]
        out[tuple(sl)] = fill
    return out


def resample_axes(
    array: np.ndarray, coords: list[np.ndarray], order: int, fill: float | None = None
) -> np.ndarray:
    """Separable resampling of the last three axes at per-axis source coordinates."""
    lead = array.ndim - 3
    # do the axis with the largest reduction first to keep intermediates small
    out = array
    ratios = [len(coords[a]) / max(array.shape[lead + a], 1) for a in range(3)]
    for a in np.argsort(ratios):
        a = int(a)
        n_src = out.shape[lead + a]
        c = coords[a]
        if len(c) == n_src and np.allclose(c, np.arange(n_src), atol=1e-6):
            continue
        out = _resample_axis(out, c, lead + a, order, fill)
    if order == 0 and out.dtype != array.dtype:
        out = out.astype(array.dtype)
    return out


# the largest grid resample_to_spacing makes (16 GiB as float32): a paper-grid whole-body CT at
# 1 x 1 x 2 mm is about 0.2 G voxels, so only a wrong spacing (of the image or the target) gets here
MAX_GRID_VOXELS = 2**32


def _mm(v) -> str:
    return " x ".join(f"{float(x):g}" for x in np.round(np.asarray(v, dtype=np.float64), 4))


def resample_to_spacing(
    array: np.ndarray, affine: np.ndarray, spacing, order: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Resample the last three axes to ``spacing`` mm, keeping the physical extent of the grid.

    New size ``round(n * s / s_new)`` (at least 1); voxel ``i`` of the new grid lies at source
    index ``(i + 0.5) * s_new / s - 0.5`` (extent-preserving, voxel centres). Direction cosines
    are kept. Returns ``(array, new_affine)``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    old = np.array(spacing_of(affine))
    new = np.asarray(spacing, dtype=np.float64)
    if np.any(new <= 0):
        raise ValueError(f"target spacing must be positive, got {tuple(spacing)}")
    shape = np.array(array.shape[-3:])
    if np.allclose(old, new, rtol=1e-5, atol=1e-6):
        return array, affine.copy()
    new_shape = np.maximum(1, np.round(shape * old / new)).astype(int)
    n_new = int(np.prod(new_shape.astype(np.float64)) * int(np.prod(array.shape[:-3], dtype=np.int64)))
    if n_new > MAX_GRID_VOXELS:
        raise InputError(None, f"resampling a {tuple(int(n) for n in shape)} grid of {_mm(old)} mm voxels to "
                               f"{_mm(new)} mm would make {tuple(int(n) for n in new_shape)} voxels "
                               f"({4 * n_new / 2**30:,.0f} GiB as float32); use a coarser spacing or check the "
                               f"image's voxel spacing")
    scale = new / old  # source voxels per target voxel
    coords = [(np.arange(new_shape[a]) + 0.5) * scale[a] - 0.5 for a in range(3)]
    out = resample_axes(array, coords, order=order, fill=None)
    vox = np.eye(4)
    vox[:3, :3] = np.diag(scale)
    vox[:3, 3] = 0.5 * scale - 0.5
    return out, affine @ vox


def _grid_map(src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """4x4 matrix taking destination voxel indices to source voxel indices."""
    return np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)


def resample_to_grid(
    array: np.ndarray,
    affine: np.ndarray,
    out_shape,
    out_affine: np.ndarray,
    order: int = 1,
    fill: float | None = 0.0,
) -> np.ndarray:
    """Resample ``array`` (last three axes on ``affine``) onto the grid ``(out_shape, out_affine)``.

    When the grids are related by axis permutations, flips, scaling and shifts (always true between
    a file and its RAS/resampled/cropped versions) this is separable and fast; otherwise it falls
    back to ``scipy.ndimage.map_coordinates``. Voxels outside the source grid get ``fill`` (None:
    the nearest edge value).
    """
    out_shape = tuple(int(s) for s in out_shape)
    m = _grid_map(affine, out_affine)
    a = m[:3, :3]
    perm = np.argmax(np.abs(a), axis=0)  # source axis feeding each destination axis
    lead = array.ndim - 3
    off = a.copy()
    off[perm, range(3)] = 0.0
    if len(set(perm.tolist())) == 3 and np.max(np.abs(off)) < 1e-6 * max(1.0, np.max(np.abs(a))):
        src = np.transpose(array, list(range(lead)) + [lead + int(p) for p in perm])
        coords = [a[perm[d], d] * np.arange(out_shape[d]) + m[perm[d], 3] for d in range(3)]
        out = resample_axes(src, coords, order=order, fill=fill)
        return np.ascontiguousarray(out)
    from scipy import ndimage

    grid = np.indices(out_shape, dtype=np.float64).reshape(3, -1)
    src_idx = a @ grid + m[:3, 3:4]
    flat = array.reshape((-1,) + array.shape[-3:])
    res = [
        ndimage.map_coordinates(
            v, src_idx, order=order, mode="nearest" if fill is None else "constant", cval=0.0 if fill is None else fill
        ).reshape(out_shape)
        for v in flat
    ]
    return np.stack(res).reshape(array.shape[:-3] + out_shape).astype(
        array.dtype if order == 0 else np.float32
    )


# --------------------------------------------------------------------------------- body mask


def body_mask(hu: np.ndarray, threshold_hu: float = -500.0, fill_holes: bool = True) -> np.ndarray:
    """Boolean body mask: HU >= threshold, largest 3D connected component, holes filled per slice.

    Air inside the body (lungs, bowel gas) is filled slice by slice in the axial plane.
    """
    from scipy import ndimage

    m = hu >= threshold_hu
    if not m.any():
        return m
    lab, n = ndimage.label(m)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        m = lab == int(np.argmax(sizes))
    if fill_holes:
        for k in range(m.shape[2]):
            if m[:, :, k].any():
                m[:, :, k] = ndimage.binary_fill_holes(m[:, :, k])
    return m


def body_bbox(hu: np.ndarray, affine: np.ndarray, threshold_hu: float, margin_mm: float) -> tuple[tuple[int, int], ...] | None:
    """Bounding box ``((x0, x1), (y0, y1), (z0, z1))`` (half-open) of the body plus a margin.

    The mask is computed on a copy subsampled to about 4 mm voxels (fast on 512^2 x 300 volumes);
    returns None when no body is found.
    """
    sp = np.array(spacing_of(affine))
    step = np.maximum(1, np.floor(4.0 / sp)).astype(int)
    small = hu[:: step[0], :: step[1], :: step[2]]
    m = body_mask(small, threshold_hu, fill_holes=False)
    if not m.any():
        return None
    box = []
    for ax in range(3):
        other = tuple(i for i in range(3) if i != ax)
        nz = np.nonzero(m.any(axis=other))[0]
        lo = int(nz[0]) * step[ax]
        hi = min(hu.shape[ax], (int(nz[-1]) + 1) * step[ax])
        margin = int(np.ceil(margin_mm / sp[ax])) + step[ax]
        box.append((int(max(0, lo - margin)), int(min(hu.shape[ax], hi + margin))))
    return tuple(box)


def crop(array: np.ndarray, affine: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
    """Crop the last three axes to ``box`` (half-open index ranges); returns the shifted affine."""
    sl = (Ellipsis,) + tuple(slice(lo, hi) for lo, hi in box)
    shift = np.eye(4)
    shift[:3, 3] = [lo for lo, _ in box]
    return np.ascontiguousarray(array[sl]), np.asarray(affine, dtype=np.float64) @ shift


# --------------------------------------------------------------------------------- pipeline


def preprocess_arrays(
    image: np.ndarray, affine: np.ndarray, cfg: PreprocessConfig, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict[str, Any]]:
    """RAS + resample + body crop on raw arrays -> ``(image, label, affine, steps)``."""
    img, aff = to_ras(image, affine)
    lab = to_ras(label, affine)[0] if label is not None else None
    steps: dict[str, Any] = {"ras_shape": list(img.shape), "source_axcodes": "".join(axcodes(affine))}
    if cfg.spacing is not None:
        img, new_aff = resample_to_spacing(img, aff, cfg.spacing, order=1)
        if lab is not None:
            lab, _ = resample_to_spacing(lab, aff, cfg.spacing, order=0)
        aff = new_aff
    img = np.asarray(img, dtype=np.float32)
    steps["resampled_shape"] = list(img.shape)
    if cfg.crop_to_body:
        box = body_bbox(img, aff, cfg.body_threshold_hu, cfg.body_margin_mm)
        if box is not None:
            img, new_aff = crop(img, aff, box)
            if lab is not None:
                lab, _ = crop(lab, aff, box)
            aff = new_aff
            steps["crop"] = [list(b) for b in box]
    steps["shape"] = list(img.shape)
    return img, lab, aff, steps


def preprocess(case: Case, cfg: PreprocessConfig) -> Case:
    """Raw case (file grid) -> case on the training grid (RAS, ``cfg.spacing``, cropped to body).

    ``meta.original_shape``/``original_affine`` stay those of the source file; ``meta.affine`` and
    ``meta.spacing`` describe the new array; ``meta.extra["preprocess"]`` records the steps.
    """
    try:
        img, lab, aff, steps = preprocess_arrays(case.image, case.meta.affine, cfg, case.label)
    except InputError as e:
        if e.path is None and case.meta.image_path:  # name the file the grid came from
            raise InputError(case.meta.image_path, e.problem) from None
        raise
    from voxdiff.core.config import to_dict

    extra = dict(case.meta.extra)
    extra["preprocess"] = {"config": to_dict(cfg), **steps}
    meta = replace(case.meta, affine=aff, spacing=spacing_of(aff), extra=extra)
    return Case(image=img, label=None if lab is None else lab.astype(np.uint8, copy=False), meta=meta)


def restore_to_original(
    array: np.ndarray, meta: CaseMeta, is_label: bool, fill: float | None = None
) -> np.ndarray:
    """Map ``array`` (on the grid ``meta.affine``; extra leading axes such as classes allowed) back
    to the source file's grid ``(meta.original_shape, meta.original_affine)``.

    Labels use nearest neighbour and keep their dtype; anything else is linear (float32). Voxels
    outside the preprocessed region (cropped away) get ``fill``: 0 for labels, the array minimum
    otherwise.
    """
    arr = np.asarray(array)
    done = meta.extra.get("preprocess", {}).get("shape") if isinstance(meta.extra, dict) else None
    if arr.ndim < 3 or (done is not None and list(arr.shape[-3:]) != list(done)):
        raise ValueError(f"array of shape {arr.shape} does not match the preprocessed grid {done} of case {meta.case_id}")
    if fill is None:
        fill = 0.0 if is_label else float(arr.min()) if arr.size else 0.0
    out = resample_to_grid(
        arr, meta.affine, meta.original_shape, meta.original_affine, order=0 if is_label else 1, fill=fill
    )
    if is_label:
        return out.astype(arr.dtype, copy=False)
    return out.astype(np.float32, copy=False)
