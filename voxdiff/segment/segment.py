"""Segment a new CT with a segmenter bundle: NIfTI file or DICOM folder in, label map out on the
input's exact grid (same shape and affine), plus per-organ volumes in mL and an optional preview."""

from __future__ import annotations

import os
import warnings
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxdiff.core.config import Bf16Renamed, check_window
from voxdiff.core.errors import InputError, VoxdiffWarning
from voxdiff.core.outputs import check_output_path

from .bundle import Segmenter, load_segmenter


@dataclass
class SegmentConfig(Bf16Renamed):
    """Options of ``voxdiff segment``.

    Args:
        device: cpu, cuda or auto.
        bf16: bf16 autocast for the feature extractor where the device computes bf16 natively (fp32
            elsewhere).
        sw_batch_size: sliding windows per forward pass.
        overlap: sliding-window overlap (null = the model's).
        amp: deprecated: the old name of ``bf16`` (still accepted, with a warning).
    """

    device: str = "auto"
    bf16: bool = False
    sw_batch_size: int = 2
    overlap: float | None = None
    amp: InitVar[bool | None] = None  # the old name of bf16 (Bf16Renamed)


def raw_case(image: np.ndarray, affine: np.ndarray, case_id: str = "input", image_path: str | None = None,
             label: np.ndarray | None = None):
    """A :class:`voxdiff.data.types.Case` for an array on its file grid."""
    from voxdiff.data.preprocess import spacing_of
    from voxdiff.data.types import Case, CaseMeta

    meta = CaseMeta(case_id=case_id, image_path=image_path, label_path=None,
                    original_shape=tuple(int(s) for s in image.shape), original_affine=np.array(affine, dtype=np.float64),
                    affine=np.array(affine, dtype=np.float64), spacing=spacing_of(affine), extra={})
    return Case(image=np.asarray(image, dtype=np.float32), label=label, meta=meta)


def organ_volumes_ml(labels: np.ndarray, affine: np.ndarray, names: dict[int, str]) -> dict[str, float]:
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=max(names) + 1)
    return {names[i]: float(counts[i] * voxel_ml) for i in sorted(names) if i > 0}


def segment_ct(
    model_dir: str | os.PathLike | Segmenter,
    ct_path: str | os.PathLike,
    out_path: str | os.PathLike,
    cfg: SegmentConfig | None = None,
    preview: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    allow_non_ct: bool = False,
) -> dict[str, Any]:
    """Write ``out_path`` (NIfTI uint8 BTCV ids) on the grid of ``ct_path``; return a summary with
    per-organ volumes (mL). The model is checked before the CT is read; nothing is written on error.
    A CT that does not look like CT in HU (:mod:`voxdiff.data.ctcheck`: a mask, 0..1 or 8-bit values,
    ...) is refused unless ``allow_non_ct``."""
    from voxdiff.core.runtime import resolve_device
    from voxdiff.data.ctcheck import check_ct
    from voxdiff.data.io import is_nifti, load_image, save_nifti, source_name
    from voxdiff.data.phantom import fitted_on_phantoms, is_phantom_image

    cfg = cfg or SegmentConfig()
    check_window(cfg.overlap, cfg.sw_batch_size)
    out = Path(out_path)
    if not is_nifti(out):
        raise InputError(out, "output must be a NIfTI file name (.nii or .nii.gz)")
    inputs = (ct_path, None if isinstance(model_dir, Segmenter) else model_dir)
    check_output_path(out, force=force, inputs=inputs)
    if preview is not None:
        if Path(preview).suffix.lower() != ".png":
            raise InputError(preview, "preview must be a .png file name")
        check_output_path(preview, force=force, inputs=inputs)
    device = resolve_device(cfg.device)
    seg = model_dir if isinstance(model_dir, Segmenter) else load_segmenter(model_dir, device=device)
    hu, affine = load_image(ct_path)
    for w in check_ct(hu, ct_path, allow_non_ct=allow_non_ct):
        warnings.warn(f"{ct_path}: {w}", VoxdiffWarning, stacklevel=2)
    if fitted_on_phantoms(seg.info.get("meta")) and not is_phantom_image(ct_path):
        warnings.warn(f"{seg.path}: this segmenter was fitted on synthetic phantoms only; on real CT its labels "
                      "agree poorly with reference segmentations (README, 'On real CT'): fit it on real "
                      "labelled CT for real use", VoxdiffWarning, stacklevel=2)
    case = raw_case(hu, affine, case_id=Path(ct_path).name, image_path=str(ct_path))
    if cfg.overlap is not None:
        seg.overlap = float(cfg.overlap)
    labels = seg.predict(case, device=device, amp=cfg.bf16, sw_batch_size=cfg.sw_batch_size, progress=progress)
    if labels.shape != hu.shape:  # pragma: no cover - restore_to_original guarantees it
        raise RuntimeError(f"label map {labels.shape} does not match the input grid {hu.shape}")
    save_nifti(out, labels.astype(np.uint8), affine, dtype=np.uint8)
    vols = organ_volumes_ml(labels, affine, seg.labels)
    if preview is not None:
        from voxdiff.evaluate.figures import overlay_figure

        mode = seg.info.get("mode", "")
        overlay_figure(hu, labels, preview, affine=affine, title=source_name(ct_path) + (f" ({mode})" if mode else ""),
                       legend={i: n for i, n in seg.labels.items() if i > 0})
    return {"input": str(ct_path), "output": str(out), "shape": list(hu.shape), "volumes_ml": vols,
            "model": str(seg.path), "preview": None if preview is None else str(preview)}


def format_volumes(vols: dict[str, float]) -> str:
    lines = [f"{'organ':<26}{'volume (mL)':>12}"]
    for name, v in vols.items():
        lines.append(f"{name:<26}{v:>12.1f}")
    return "\n".join(lines)
