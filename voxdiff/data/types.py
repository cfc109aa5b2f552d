"""Records that every data adapter yields: an image, an optional label map and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CaseMeta:
    case_id: str
    image_path: str | None
    label_path: str | None
    original_shape: tuple[int, int, int]
    original_affine: np.ndarray  # 4x4 voxel->world (mm) of the source file, as read
    affine: np.ndarray  # 4x4 affine of the array currently held in Case.image
    spacing: tuple[float, float, float]  # spacing of the current array (mm)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. crop box, orientation transform, dataset name


@dataclass
class Case:
    image: np.ndarray  # float32 HU, (x, y, z)
    label: np.ndarray | None  # uint8 BTCV ids, same shape, or None (unlabelled)
    meta: CaseMeta

    @property
    def case_id(self) -> str:
        return self.meta.case_id

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class CaseRef:
    """A case in a data set before loading: where its files are."""

    case_id: str
    image_path: str
    label_path: str | None = None
