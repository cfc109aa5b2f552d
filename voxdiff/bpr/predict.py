"""Coordinate maps of whole CT files: ``predict_volume(model, ct, out.nii.gz, plot=...)``.

The CT is read (NIfTI or DICOM folder), preprocessed exactly as the model's training data (the
``PreprocessConfig`` stored in the model), mapped, and the map is resampled back onto the input
file's grid (same shape and affine). Regions cropped away as outside the body take the nearest
value of the map. A slice model writes a 3D float32 map, an ape model a 4D ``(X, Y, Z, 3)`` one.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..core.config import write_config
from ..core.errors import InputError
from ..core.outputs import atomic_path, check_output_path
from .inference import infer_volume, slice_scores_volume
from .models import BodyPartRegressor, body_threshold, load_bpr


def _sidecar(out: Path) -> Path:
    name = out.name
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return out.with_name(name + ".bpr.yaml")


def model_preprocess_config(model: BodyPartRegressor):
    from ..core.config import from_dict
    from ..data.preprocess import PreprocessConfig

    return from_dict(PreprocessConfig, dict(model.preprocess), strict=False)


# a volume that covers less than this fraction of the model input along an axis (x, y, z) gets a
# warning: below it an ape map drifts measurably from the map of the whole body (docs/BPR.md,
# "Volumes smaller than the model input")
SMALL_VOLUME_FRACTION = (0.75, 0.75, 0.5)


def prepare_ct(model: BodyPartRegressor, ct_path: str | os.PathLike, allow_non_ct: bool = False):
    """Read and preprocess a CT for ``model``; returns the preprocessed case and the [0, 1] volume.

    A volume that does not look like CT in HU is refused (:mod:`voxdiff.data.ctcheck`) unless
    ``allow_non_ct``."""
    from ..core.errors import VoxdiffWarning
    from ..data.ctcheck import check_ct
    from ..data.io import load_image
    from ..data.preprocess import hu_to_unit, preprocess, spacing_of
    from ..data.types import Case, CaseMeta

    hu, affine = load_image(ct_path)
    for w in check_ct(hu, ct_path, allow_non_ct=allow_non_ct):
        warnings.warn(f"{ct_path}: {w}", VoxdiffWarning, stacklevel=2)
    cid = Path(ct_path).name.replace(".nii.gz", "").replace(".nii", "")
    meta = CaseMeta(cid, str(ct_path), None, tuple(int(s) for s in hu.shape), np.asarray(affine), np.asarray(affine), spacing_of(affine))
    pp = model_preprocess_config(model)
    case = preprocess(Case(hu, None, meta), pp)
    if any(s < m for s, m in zip(case.image.shape, model.min_size)) or case.image.shape[2] < 2:
        raise InputError(ct_path, f"volume is too small for the body part regressor: {case.image.shape} voxels at "
                                  f"{tuple(model.spacing)} mm (need at least {model.min_size} and 2 slices)")
    need = model.patch_size if model.kind == "ape" else model.patch_size[:2] + (1,)
    short = [a for a in range(3) if case.image.shape[a] < SMALL_VOLUME_FRACTION[a] * need[a]]
    if short:
        a = short[0]
        warnings.warn(f"{ct_path}: volume {case.image.shape} at {tuple(model.spacing)} mm is smaller than the model input "
                      f"{tuple(need)} along {'xyz'[a]}: {case.image.shape[a]} voxels, under {SMALL_VOLUME_FRACTION[a]:.0%} "
                      f"of {need[a]}; the map may be less reliable", VoxdiffWarning, stacklevel=2)
    return case, hu_to_unit(case.image, pp.hu_window)


def predict_volume(
    model_path: str | os.PathLike | BodyPartRegressor,
    ct_path: str | os.PathLike,
    out_path: str | os.PathLike,
    plot: str | os.PathLike | None = None,
    overlap: float = 0.5,
    force: bool = True,
    progress: bool = False,
    allow_non_ct: bool = False,
) -> dict[str, Any]:
    """Write the coordinate map of ``ct_path`` on its own grid to ``out_path`` (NIfTI).

    Returns a summary (shape, kind, seconds, and the per-slice scores for a slice model).
    Bad input raises :class:`InputError`/``ModelError`` before anything is written.
    """
    from ..data.io import save_nifti
    from ..data.preprocess import resample_to_grid

    out = Path(out_path)
    if not (out.name.endswith(".nii.gz") or out.name.endswith(".nii")):
        raise InputError(out, "output must be a .nii.gz or .nii file")
    check_output_path(out, force=force, inputs=(ct_path, None if isinstance(model_path, BodyPartRegressor) else model_path))
    t0 = time.time()
    model = model_path if isinstance(model_path, BodyPartRegressor) else load_bpr(model_path)
    case, unit = prepare_ct(model, ct_path, allow_non_ct=allow_non_ct)
    t1 = time.time()
    cmap = infer_volume(model, unit, overlap=overlap, progress=progress)  # (C, x, y, z)
    t2 = time.time()
    meta = case.meta
    # edge values outside the body crop (fill=None), linear inside
    full = resample_to_grid(cmap, meta.affine, meta.original_shape, meta.original_affine, order=1, fill=None)
    full = np.asarray(full, dtype=np.float32)
    arr = full[0] if model.kind == "slice" else np.moveaxis(full, 0, -1)
    save_nifti(out, arr, meta.original_affine, dtype=np.float32)
    t3 = time.time()
    summary: dict[str, Any] = {
        "model": str(model_path) if not isinstance(model_path, BodyPartRegressor) else "<in memory>",
        "ct": str(ct_path), "out": str(out), "kind": model.kind, "shape": list(arr.shape),
        "preprocessed_shape": list(case.image.shape), "mm_per_unit": model.mm_per_unit,
        "seconds": {"load_preprocess": t1 - t0, "inference": t2 - t1, "restore_save": t3 - t2, "total": t3 - t0},
    }
    if plot is not None:
        write_plot(plot, model, case, unit, cmap)
        summary["plot"] = str(plot)
    write_config(_sidecar(out), {"overlap": overlap}, extra={"summary": summary, "preprocess": model.preprocess,
                                                             "calibration": model.calibration_info})
    return summary


def write_plot(path: str | os.PathLike, model: BodyPartRegressor, case, unit: np.ndarray, cmap: np.ndarray) -> Path:
    """PNG: score (slice) or z coordinate (ape) against z, and a coronal view of the map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .quality import slice_z_mm

    z = slice_z_mm(case.meta.affine, unit.shape)
    if model.kind == "slice":
        curve, ylabel = cmap[0, 0, 0, :], "slice score (calibrated)"
    else:
        body = unit > body_threshold(model)
        w = body.sum(axis=(0, 1)) + 1e-6
        curve = (cmap[2] * body).sum(axis=(0, 1)) / w
        ylabel = "mean S coordinate (ape channel 2)"
    y = unit.shape[1] // 2
    sp = case.meta.spacing
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
    ax[0].plot(z, curve, "-", lw=1.5)
    ax[0].set_xlabel("z (mm, superior +)")
    ax[0].set_ylabel(ylabel)
    ax[0].grid(alpha=0.3)
    from ..data.io import source_name

    name = source_name(case.meta.image_path) if case.meta.image_path else case.meta.case_id
    ax[0].set_title(f"{model.kind} model: {name}", fontsize=9)
    ext = (0, unit.shape[0] * sp[0], 0, unit.shape[2] * sp[2])
    ax[1].imshow(unit[:, y, :].T, cmap="gray", origin="lower", extent=ext)
    if model.kind == "slice":
        im = ax[1].imshow(cmap[0, :, y, :].T, cmap="viridis", alpha=0.45, origin="lower", extent=ext)
        fig.colorbar(im, ax=ax[1], fraction=0.046)
    else:
        rgb = cmap[:, :, y, :].transpose(2, 1, 0)
        lo = rgb.reshape(-1, 3).min(0)
        hi = rgb.reshape(-1, 3).max(0)
        ax[1].imshow((rgb - lo) / np.maximum(hi - lo, 1e-6), origin="lower", extent=ext, alpha=0.55)
        from matplotlib.patches import Patch

        key = [Patch(facecolor=c, label=t) for c, t in (("red", "R: coordinate 0 (right-left)"),
                                                          ("green", "G: coordinate 1 (posterior-anterior)"),
                                                          ("blue", "B: coordinate 2 (inferior-superior)"))]
        ax[1].legend(handles=key, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False,
                     title="map colours (low to high)", title_fontsize=7)
    ax[1].set_title("coronal view of the map (R-L horizontal, S up)")
    ax[1].set_xlabel("x (mm)")
    ax[1].set_ylabel("z (mm)")
    fig.tight_layout()
    p = Path(path)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, dpi=90, format="png", metadata={"Title": f"{model.kind} model: {name}"})
    plt.close(fig)
    return p


__all__ = ["predict_volume", "prepare_ct", "write_plot", "slice_scores_volume"]
