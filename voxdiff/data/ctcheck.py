"""Does a volume look like CT in Hounsfield units? One check for every command that reads a CT.

``segment``, ``bpr predict``, ``features``, ``data prepare`` and ``data check`` refuse a volume
for which :func:`ct_problem` finds a problem (exit code 2, one line naming the file), unless the
user passes ``--allow_non_ct`` (unusual but real CT). What is refused:

* a DICOM series whose Modality tag names another kind of image (MR, PT, US, SEG, ...);
* a constant volume, a single axial slice, NaN/Inf voxels;
* all values in 0..1 (a normalised image, a probability or binary mask);
* no negative value at all: a label map or mask (few whole values such as 0/1/255), an 8-bit
  image (0..255), or intensities that are not HU (MR, PET, a CT without its RescaleIntercept);
  air is about -1000 HU and fat about -100 HU, so any CT of a body has negative values;
* a value range narrower than 100 HU;
* no tissue (nothing above -500 HU), or an implausible histogram: fewer than 20 % of the voxels
  above -500 HU lie in the soft-tissue and fat range -200..300 HU (real abdominal and thoracic
  CTs, contrast CTs and CT angiographies: 70..97 %; HU scaled by a wrong slope: far less), or
  more than 30 % of them are denser than 600 HU (real CTs: 0.3..3 %, the CT angiography included;
  a CT whose rescale intercept was lost, air at 0 and soft tissue near 1050: 35..64 %).

:func:`ct_warnings` lists softer oddities (no air: a crop inside the body or a missing
RescaleIntercept; values beyond -5000..10000) that do not stop a command.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from voxdiff.core.errors import InputError

ALLOW_FLAG = "--allow_non_ct"
ALLOW_HELP = ("accept an image that does not look like CT in Hounsfield units (a mask, 0..1 or 8-bit values, no "
              "negative values, an implausible histogram): for unusual but real CT")
SOFT_TISSUE_HU = (-200.0, 300.0)
BODY_HU = -500.0
MIN_SOFT_FRACTION = 0.2
DENSE_HU = 600.0
MAX_DENSE_FRACTION = 0.3
_SAMPLE = 2_000_000  # voxels looked at for the histogram rules (a regular subsample)


def _sample(a: np.ndarray) -> np.ndarray:
    flat = a.reshape(-1)
    step = max(1, flat.size // _SAMPLE)
    return flat[::step]


def _values(vals: np.ndarray, k: int = 6) -> str:
    shown = ", ".join(f"{v:g}" for v in vals[:k])
    return shown + (", ..." if len(vals) > k else "")


def ct_problem(hu: np.ndarray) -> str | None:
    """Why an array does not look like a CT volume in HU (None when it does)."""
    a = np.asarray(hu)
    if a.ndim != 3:
        return f"expected a 3D volume, got shape {tuple(a.shape)}"
    if min(a.shape) < 1 or a.shape[2] < 2:
        return f"a single axial slice (shape {tuple(a.shape)}) has no z extent: not a 3D CT"
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        return "contains NaN or infinite values"
    lo, hi = float(a.min()), float(a.max())
    if hi - lo < 1e-6:
        return f"constant image (all voxels {lo:g}): not a CT"
    if lo >= 0.0 and hi <= 1.0:
        return "all values lie in 0..1: a normalised image or a mask, not CT in Hounsfield units"
    s = _sample(a)
    if lo >= 0.0:
        vals = np.unique(s)
        whole = bool(np.all(np.abs(vals - np.rint(vals)) < 1e-3))
        if whole and len(vals) <= 32:
            return (f"only {len(vals)} distinct values ({_values(vals)}): a label map or mask, "
                    "not CT in Hounsfield units")
        if hi <= 255.0:
            return f"values lie in {lo:g}..{hi:g}: an 8-bit image, not CT in Hounsfield units"
        return (f"no negative values (range {lo:g}..{hi:g}): not CT in Hounsfield units, where air is "
                "about -1000 (MR or PET, or a CT without its RescaleIntercept?)")
    if hi - lo < 100.0:
        return f"value range {lo:g}..{hi:g} is too narrow for CT in Hounsfield units"
    body = s[s > BODY_HU]
    if body.size == 0:
        return f"no voxel above {BODY_HU:g} HU (range {lo:g}..{hi:g}): no tissue, not a CT of a body"
    soft = float(np.mean((body >= SOFT_TISSUE_HU[0]) & (body <= SOFT_TISSUE_HU[1])))
    if soft < MIN_SOFT_FRACTION:
        return (f"implausible histogram for CT: only {100 * soft:.0f}% of the voxels above {BODY_HU:g} HU lie in "
                f"the soft-tissue range {SOFT_TISSUE_HU[0]:g}..{SOFT_TISSUE_HU[1]:g} HU (in CT most of them do)")
    dense = float(np.mean(body > DENSE_HU))
    if dense > MAX_DENSE_FRACTION:
        return (f"implausible histogram for CT: {100 * dense:.0f}% of the voxels above {BODY_HU:g} HU are denser than "
                f"{DENSE_HU:g} HU (bone and contrast are a few percent in CT; a missing rescale intercept?)")
    return None


def ct_warnings(hu: np.ndarray) -> list[str]:
    """Oddities of a volume that passes :func:`ct_problem` but deserve a word."""
    a = np.asarray(hu)
    if a.size == 0:
        return []
    lo, hi = float(a.min()), float(a.max())
    out = []
    if lo >= -100:
        out.append(f"minimum {lo:.0f} HU: no air in the image (a crop inside the body, or a missing rescale intercept?)")
    if hi > 10000 or lo < -5000:
        # padding values outside the reconstruction circle (-2000, -3024, -32768) are common: ignore them
        inside = a[(a > -4000)]
        lo_in = float(inside.min()) if inside.size else lo
        if hi > 10000 or lo_in < -5000:
            out.append(f"HU range {lo:.0f}..{hi:.0f} is implausible for CT")
    return out


# DICOM Modality values of images that are not CT (an MR, PET or ultrasound series, a
# segmentation or dose object); "OT" (other) and a missing tag are judged by the values alone
NON_CT_MODALITIES = frozenset({"MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "SEG", "RTDOSE", "RTSTRUCT",
                               "RTIMAGE", "SM", "OP", "ES", "XC", "OCT"})


def dicom_modality(path: str | os.PathLike | None) -> str | None:
    """The Modality tag of a DICOM series folder (None for a file, a folder without DICOM, or no tag)."""
    from .io import first_dicom_header

    ds = first_dicom_header(path)
    return (str(ds.get("Modality", "") or "").strip().upper() or None) if ds is not None else None


def check_ct(hu: np.ndarray, path: str | os.PathLike | None, allow_non_ct: bool = False) -> list[str]:
    """Refuse (:class:`InputError` naming ``path``) a volume that does not look like CT in HU, or a
    DICOM series whose Modality is not CT (:data:`NON_CT_MODALITIES`).

    With ``allow_non_ct`` the problem becomes a warning. Returns the soft oddities of
    :func:`ct_warnings` (not emitted: callers decide).
    """
    modality = dicom_modality(path)
    problem = f"DICOM Modality is {modality}, not CT" if modality in NON_CT_MODALITIES else ct_problem(hu)
    if problem:
        if not allow_non_ct:
            raise InputError(path, f"{problem}; if this is CT, pass {ALLOW_FLAG}")
        warnings.warn(f"{path}: {problem} (accepted: {ALLOW_FLAG})", stacklevel=2)
    return ct_warnings(hu)


__all__ = ["ALLOW_FLAG", "ALLOW_HELP", "NON_CT_MODALITIES", "check_ct", "ct_problem", "ct_warnings", "dicom_modality"]
