"""Deformed copies and field-of-view crops of labelled cases: more subjects for heads and networks
trained on few labels.

With a handful of labelled volumes, the frozen heads fit their training phantoms far better than
unseen ones (60 against 34 Dice on the phantom benchmark, docs/RESULTS.md): they learn the few
subjects' shapes and positions. A randomly rotated, scaled and shifted copy of a labelled volume is
a plausible other subject for those heads and networks. Copies are made once, before training, so
that every method trained on the same labelled cases and settings sees the very same copies (a
frozen probe reads their features like any volume's; end-to-end training samples patches from them).

The deformation is MONAI's ``RandAffine`` in voxel space: a rotation about the last (cranio-caudal)
axis, a scale per axis, and a shift; the image is resampled linearly, the label with nearest
neighbour, and voxels pulled in from outside the volume repeat its border (air for CT). Volumes are
expected on the preprocessing grid (isotropic in-plane); the copy keeps the original's metadata, so it
is meant for training, never for writing out.

Field-of-view crops (:func:`fov_crops`) are sub-volumes of a labelled case at random positions and
sizes. A frozen head reads each crop's features in a window of its own, so it sees the same anatomy
in other fields of view: fitted on one labelled phantom, frozen heads otherwise learn where organs lie
in that scan (docs/RESULTS.md, "Why frozen heads fail with one labelled phantom").
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import numpy as np
import torch

from voxdiff.core.errors import InputError

from .types import Case


@dataclasses.dataclass(frozen=True)
class Deformation:
    """Ranges of the random affine deformation (each drawn uniformly in +-range).

    Args:
        rotate_deg: rotation about the cranio-caudal (last) axis, degrees.
        scale: relative scale per axis (0.15: factors 0.85-1.15).
        shift: shift per axis, voxels.
    """

    rotate_deg: float = 15.0
    scale: tuple[float, float, float] = (0.15, 0.15, 0.1)
    shift: tuple[float, float, float] = (4.0, 4.0, 4.0)


def case_seed(case_id: str, seed: int) -> int:
    """A seed for one case's copies from its id and a run seed (independent of the case's position
    in a list, so that a case gets the same copies whichever other cases are trained with it)."""
    return (zlib.crc32(case_id.encode()) ^ (int(seed) * 0x9E3779B1)) & 0x7FFFFFFF


def deformed_copies(case: Case, n: int, seed: int, deformation: Deformation | None = None) -> list[Case]:
    """``n`` randomly deformed copies of a labelled ``case`` (see the module docstring), ids
    ``<id>-def<i>``; deterministic in (case id, ``seed``), and copy ``i`` is the same whatever ``n``."""
    from monai.transforms import RandAffine

    if n < 0:
        raise InputError(None, f"the number of deformed copies must be >= 0, not {n}")
    if n and case.label is None:
        raise InputError(case.meta.image_path, f"case {case.case_id} has no label to deform with its image")
    d = deformation or Deformation()
    # the base grid of the volume's shape is built once for all copies (the same draws as without it)
    ra = RandAffine(prob=1.0, rotate_range=(0.0, 0.0, float(np.deg2rad(d.rotate_deg))), scale_range=tuple(d.scale),
                    translate_range=tuple(d.shift), padding_mode="border", spatial_size=tuple(case.image.shape),
                    cache_grid=True)
    ra.set_random_state(case_seed(case.case_id, seed))
    image = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float32)[None])
    label = torch.from_numpy(np.asarray(case.label, dtype=np.float32)[None]) if n else None
    out = []
    for i in range(n):
        img = ra(image, mode="bilinear")
        lab = ra(label, mode="nearest", randomize=False)
        meta = dataclasses.replace(case.meta, case_id=f"{case.case_id}-def{i}",
                                   extra={**case.meta.extra, "deformed_from": case.case_id})
        out.append(Case(image=np.asarray(img[0], dtype=np.float32),
                        label=np.rint(np.asarray(lab[0])).astype(np.uint8), meta=meta))
    return out


def with_deformed_copies(cases: Sequence[Case], n: int, seed: int,
                         deformation: Deformation | None = None) -> list[Case]:
    """``cases`` followed by ``n`` deformed copies of each (``n`` = 0: the cases themselves)."""
    out = list(cases)
    if n > 0:
        for c in cases:
            out.extend(deformed_copies(c, n, seed, deformation))
    return out


def crop_box(shape: Sequence[int], rng: np.random.Generator, z_min: float = 0.5,
             xy_min: float = 0.8) -> tuple[slice, slice, slice]:
    """A random box in a volume of ``shape`` (x, y, z): each axis keeps a random fraction of its
    length (``xy_min``..1 in-plane, ``z_min``..1 along z, at least one voxel) at a random position."""
    box = []
    for n, lo in zip(shape, (xy_min, xy_min, z_min)):
        m = max(1, int(round(int(n) * rng.uniform(lo, 1.0))))
        s = int(rng.integers(0, int(n) - m + 1))
        box.append(slice(s, s + m))
    return box[0], box[1], box[2]


def fov_crops(case: Case, n: int, seed: int, z_min: float = 0.5, xy_min: float = 0.8) -> list[Case]:
    """``n`` random field-of-view crops (:func:`crop_box`) of a labelled ``case``, image and label
    alike, ids ``<id>-fov<i>``; deterministic in (case id, ``seed``), and crop ``i`` is the same
    whatever ``n``."""
    if n < 0:
        raise InputError(None, f"the number of field-of-view crops must be >= 0, not {n}")
    if not (0 < z_min <= 1 and 0 < xy_min <= 1):
        raise InputError(None, f"crop fractions must be in (0, 1], not z {z_min}, in-plane {xy_min}")
    if n and case.label is None:
        raise InputError(case.meta.image_path, f"case {case.case_id} has no label to crop with its image")
    rng = np.random.default_rng(case_seed(case.case_id, seed) + 1)  # (not the deformed copies' draws)
    out = []
    for i in range(n):
        box = crop_box(case.image.shape, rng, z_min, xy_min)
        meta = dataclasses.replace(case.meta, case_id=f"{case.case_id}-fov{i}",
                                   extra={**case.meta.extra, "cropped_from": case.case_id,
                                          "crop_start": [b.start for b in box]})
        out.append(Case(image=np.ascontiguousarray(case.image[box], dtype=np.float32),
                        label=np.ascontiguousarray(case.label[box]), meta=meta))  # type: ignore[index]
    return out
