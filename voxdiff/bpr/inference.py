"""Whole-volume inference of a body part regressor (in memory, no file IO).

* slice model: each axial slice is scored on in-plane tiles of the training size (the scores of
  the tiles of a slice are averaged, weighted by how much body they contain), which is what the
  model saw in training and keeps whole-volume scores consistent with patch scores;
* ape model, anchor head: every training-size window of the volume (50 % overlap) says where the
  volume lies (its own position estimate minus its known displacement inside the volume); the
  body-weighted mean of these estimates places one rigid map (physical positions at the model
  spacing plus that offset), so distances inside a volume are physical by construction and the
  windows only vote on the offset;
* ape model, dense head (v1): MONAI sliding-window inference with Gaussian blending.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.ctcheck import ct_problem  # noqa: F401  (the shared CT check; bpr.train imports it from here)
from .models import (
    APERegressor,
    BodyPartRegressor,
    SliceRegressor,
    add_s_residual,
    body_threshold,
    tile_starts,
)


@torch.no_grad()
def slice_scores_volume(
    model: SliceRegressor, unit: torch.Tensor | np.ndarray, overlap: float = 0.5, z_chunk: int = 32,
    raw: bool = False, progress: bool = False,
) -> np.ndarray:
    """Per-slice scores ``(Z,)`` of a volume ``(X, Y, Z)`` in [0, 1] (calibrated unless ``raw``)."""
    vol = torch.as_tensor(np.asarray(unit, dtype=np.float32)) if not torch.is_tensor(unit) else unit.float()
    nx, ny, nz = vol.shape
    tx, ty = model.patch_size[0], model.patch_size[1]
    xs, ys = tile_starts(nx, tx, overlap), tile_starts(ny, ty, overlap)
    thr = body_threshold(model)
    was = model.training
    model.eval()
    out = np.zeros(nz, dtype=np.float64)
    from tqdm import tqdm

    try:
        for z0 in tqdm(range(0, nz, z_chunk), desc="slices", disable=not progress, leave=False):
            z1 = min(nz, z0 + z_chunk)
            tiles = [vol[x0:x0 + tx, y0:y0 + ty, z0:z1] for x0 in xs for y0 in ys]
            batch = torch.stack(tiles)[:, None]  # (T, 1, tx, ty, zc)
            if model.context:  # each slice with its neighbours from the whole volume (end slices repeated or masked at its edges)
                zi = model.neighbourhoods(torch.arange(z0, z1), nz)
                ctx = torch.stack([vol[x0:x0 + tx, y0:y0 + ty][:, :, zi] for x0 in xs for y0 in ys])[:, None]
                out_z = model.neighbourhood_outside(torch.arange(z0, z1), nz)
                s = model.slice_scores_raw(ctx, stacked=True, outside=out_z)  # (T, zc)
            else:
                s = model.slice_scores_raw(batch)  # (T, zc)
            w = (batch > thr).float().mean(dim=(1, 2, 3)) + 0.02  # (T, zc)
            out[z0:z1] = ((s * w).sum(0) / w.sum(0)).double().cpu().numpy()
    finally:
        model.train(was)
    if not raw:
        out = out * float(model.calib_scale[0]) + float(model.calib_offset[0])
    return out.astype(np.float32)


@torch.no_grad()
def ape_volume(
    model: APERegressor, unit: torch.Tensor | np.ndarray, overlap: float = 0.5, sw_batch_size: int = 4,
    raw: bool = False, progress: bool = False, min_roi: int = 64,
) -> np.ndarray:
    """``(3, X, Y, Z)`` coordinates of a volume ``(X, Y, Z)`` in [0, 1] (calibrated unless ``raw``).

    Windows are the training patch size, enlarged to at least ``min_roi`` voxels per axis for the
    dense head (it is fully convolutional: bigger windows mean fewer borders). The anchor head
    votes with windows of the training size on one offset for the whole volume (module docstring).
    """
    vol = torch.as_tensor(np.asarray(unit, dtype=np.float32)) if not torch.is_tensor(unit) else unit.float()
    was = model.training
    model.eval()
    try:
        if getattr(model, "head_kind", "dense") == "anchor":
            off, scale, resid = model.volume_placement(vol, overlap, sw_batch_size, progress)
            out = off.view(1, 3, 1, 1, 1) + model.displacement_grid(tuple(vol.shape), like=off) * scale.view(1, 3, 1, 1, 1)
            if resid is not None:
                out = add_s_residual(out, resid[None])
            if not raw:
                out = model.calibrate(out)
        else:
            from monai.inferers import sliding_window_inference

            out = sliding_window_inference(
                vol[None, None], roi_size=tuple(max(int(p), int(min_roi)) for p in model.patch_size),
                sw_batch_size=sw_batch_size, predictor=model.raw if raw else model,
                overlap=overlap, mode="gaussian", padding_mode="constant", cval=0.0, progress=progress,
            )
    finally:
        model.train(was)
    return out[0].cpu().numpy().astype(np.float32)


def infer_volume(model: BodyPartRegressor, unit, overlap: float = 0.5, raw: bool = False, progress: bool = False) -> np.ndarray:
    """The dense map ``(C, X, Y, Z)`` of a preprocessed volume in [0, 1]."""
    if model.kind == "slice":
        s = slice_scores_volume(model, unit, overlap=overlap, raw=raw, progress=progress)  # type: ignore[arg-type]
        shape = np.asarray(unit).shape if not torch.is_tensor(unit) else tuple(unit.shape)
        return np.broadcast_to(s[None, None, None, :], (1,) + tuple(shape)).copy()
    return ape_volume(model, unit, overlap=overlap, raw=raw, progress=progress)  # type: ignore[arg-type]
