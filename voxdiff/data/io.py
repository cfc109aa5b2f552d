"""Reading and writing CT volumes: NIfTI files and DICOM series folders.

Everything returns numpy arrays in ``(x, y, z)`` voxel order together with a 4x4 voxel-to-world
affine in the RAS+ world of nibabel (millimetres). Arrays are in the file's *own* orientation here;
``voxdiff.data.preprocess`` canonicalises them to RAS.

Problems a user can cause (missing file, truncated file, not 3D, NaN voxels, bad spacing, mixed
DICOM series, ...) raise :class:`voxdiff.core.errors.InputError` naming the file.
"""

from __future__ import annotations

import os
import re
import warnings
import zlib
from pathlib import Path

import numpy as np

from voxdiff.core.errors import InputError, VoxdiffWarning
from voxdiff.core.outputs import atomic_path, note_input

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# files that are never DICOM slices even in a DICOM folder
_NON_DICOM = {"dicomdir", "readme", "readme.txt", "license", ".ds_store", "thumbs.db"}


def is_nifti(path: str | os.PathLike) -> bool:
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    name = Path(path).name
    for suf in (".nii.gz", ".nii"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(path).stem


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "no such file or folder")


# No CT spans more than this along any axis (a whole-body scan is about 2 m long, a scanner's
# field of view at most about 0.8 m wide): a larger extent means the header's spacing is in the
# wrong unit or wrong, and resampling such an image to the working grid would ask for terabytes.
MAX_EXTENT_MM = 4000.0


def _check_spacing(path: Path, affine: np.ndarray, zooms=None, shape=None) -> None:
    """Refuse headers whose geometry cannot be a CT: NaN/Inf, zero or negative spacing, a degenerate
    affine and (with ``shape``) an implausible physical extent (:data:`MAX_EXTENT_MM`)."""
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "affine contains NaN or Inf")
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(norms <= 1e-6):
        raise InputError(path, f"zero or negative voxel spacing {tuple(round(float(n), 4) for n in norms)}")
    if zooms is not None:
        z = [float(v) for v in zooms[:3]]
        if any((not np.isfinite(v)) or v <= 0 for v in z):
            raise InputError(path, f"zero or negative voxel spacing {tuple(z)} in the header")
    if abs(np.linalg.det(affine[:3, :3])) <= 1e-9:
        raise InputError(path, "degenerate affine (voxel axes are not independent)")
    if shape is not None:
        extent = np.asarray([int(n) for n in tuple(shape)[:3]], dtype=np.float64) * norms
        if np.any(extent > MAX_EXTENT_MM):
            fmt = " x ".join(f"{v:,.0f}" for v in extent)
            sp = " x ".join(f"{v:g}" for v in np.round(norms, 4))
            raise InputError(path, f"implausible size for a CT: {fmt} mm ({sp} mm voxels); check the voxel spacing "
                                   f"in the header (at most {MAX_EXTENT_MM:,.0f} mm along an axis)")


def _as_3d(path: Path, arr: np.ndarray) -> np.ndarray:
    # trailing singleton dimensions (x, y, z, 1) are harmless; everything else must be 3D
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise InputError(path, f"not a 3D image (shape {tuple(int(s) for s in arr.shape)})")
    if min(arr.shape) < 1:
        raise InputError(path, f"empty image (shape {tuple(int(s) for s in arr.shape)})")
    return arr


def _check_finite(path: Path, arr: np.ndarray) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        n = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise InputError(path, f"image contains {n} NaN or Inf voxels")


def _read_nifti(path: Path, dtype) -> tuple[np.ndarray, np.ndarray]:
    import logging

    import nibabel as nib

    log = logging.getLogger("nibabel.global")
    level = log.level
    log.setLevel(logging.CRITICAL)  # nibabel "fixes" bad headers with a message on stderr; we judge them
    try:
        img = nib.load(str(path))
        raw_hdr = _raw_header(path, type(img.header))
    except InputError:
        raise
    except Exception as e:  # nibabel raises many types for garbage files
        raise InputError(path, f"unreadable NIfTI file ({_short(e)})") from None
    finally:
        log.setLevel(level)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3 or (len(shape) > 3 and any(s != 1 for s in shape[3:])):
        raise InputError(path, f"not a 3D image (shape {shape})")
    hdr = raw_hdr if raw_hdr is not None else img.header
    try:
        raw = [float(v) for v in hdr["pixdim"][1:4]]
        uses_pixdim = int(hdr["qform_code"]) > 0 or int(hdr["sform_code"]) == 0
    except (KeyError, ValueError, TypeError):  # not a NIfTI-1/2 header
        raw, uses_pixdim = [], False
    if any((not np.isfinite(v)) or v < 0 or (v == 0 and uses_pixdim) for v in raw):
        raise InputError(path, f"zero or negative voxel spacing {tuple(raw)} in the header")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        affine = np.asarray(img.affine, dtype=np.float64)
    _check_spacing(path, affine, shape=shape)
    try:
        if np.issubdtype(np.dtype(dtype), np.floating):
            arr = np.asarray(img.dataobj, dtype=np.float64 if dtype == np.float64 else None)
            arr = arr.astype(dtype, copy=False)
        else:
            arr = np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, ValueError) as e:
        raise InputError(path, f"unreadable or truncated file ({_short(e)})") from None
    arr = _as_3d(path, np.asarray(arr))
    return arr, affine


def _raw_header(path: Path, cls):
    """The header as stored in the file (nibabel's loader silently fixes pixdim), or None."""
    from nibabel.openers import ImageOpener

    if not hasattr(cls, "from_fileobj"):
        return None
    try:
        with ImageOpener(str(path)) as f:
            return cls.from_fileobj(f, check=False)
    except Exception:
        return None


def _short(e: BaseException, limit: int = 120) -> str:
    """The first line of an exception's message, cut at a word boundary (never mid-word)."""
    msg = str(e).strip().splitlines()[0].strip() if str(e).strip() else e.__class__.__name__
    if len(msg) <= limit:
        return msg
    cut = msg[:limit].rsplit(" ", 1)[0].rstrip(" ,;:-(")
    return cut + " ..."


def load_image(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a CT volume (NIfTI file or DICOM series folder) as float32 HU plus its 4x4 affine.

    The array is in the file's own voxel order (no reorientation). NIfTI scaling (scl_slope /
    scl_inter) and DICOM RescaleSlope/Intercept are applied. Raises :class:`InputError` for
    missing/unreadable/truncated files, non-3D images, NaN/Inf voxels and bad spacing.
    """
    p = Path(path)
    _require_exists(p)
    note_input(p)
    if p.is_dir():
        arr, affine, _ = load_dicom_series(p)
        return arr, affine
    if not is_nifti(p):
        if _looks_like_dicom(p):
            raise InputError(p, "a single DICOM file; pass the folder that holds the whole series")
        raise InputError(p, "unsupported file type (expected .nii, .nii.gz or a DICOM series folder)")
    arr, affine = _read_nifti(p, np.float32)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    _check_finite(p, arr)
    return arr, affine


def first_dicom_header(path: str | os.PathLike | None):
    """The header (no pixels) of the first readable DICOM file of a series folder; None for a file, a
    missing path or a folder without DICOM files."""
    if path is None or not Path(path).is_dir():
        return None
    for f in sorted(Path(path).iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name.lower() in _NON_DICOM:
            continue
        ds = read_raw_dicom(f, stop_before_pixels=True)
        if ds is not None:
            return ds
    return None


def source_name(path: str | os.PathLike) -> str:
    """A readable name of a CT for titles: the file name of a NIfTI file; for a DICOM folder its
    parent and own folder name with the SeriesDescription (``case7/PATIENT_DICOM: ABDOMEN 2.0 B30f``)."""
    p = Path(path)
    if not p.is_dir():
        return p.name
    name = f"{p.parent.name}/{p.name}" if p.parent.name else p.name
    ds = first_dicom_header(p)
    if ds is None:
        return name
    parts = [str(ds.get(k, "") or "").strip() for k in ("SeriesDescription", "ProtocolName")]
    desc = next((d for d in parts if d), "")
    return f"{name}: {desc}" if desc else name


def load_label(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a label map (NIfTI) as an integer array (int32) plus its affine.

    Float-stored labels are accepted when all values are whole numbers; otherwise an error.
    """
    p = Path(path)
    _require_exists(p)
    note_input(p)
    if p.is_dir() or not is_nifti(p):
        raise InputError(p, "label maps must be NIfTI files (.nii or .nii.gz)")
    arr, affine = _read_nifti(p, None)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError(p, "label map contains NaN or Inf")
        r = np.rint(arr)
        if np.any(np.abs(arr - r) > 1e-3):
            raise InputError(p, "label map has non-integer values")
        arr = r
    elif arr.dtype.kind not in "iub":
        raise InputError(p, f"label map has unsupported data type {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int32), affine


def save_nifti(
    path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, dtype=None, description: str | None = None
) -> Path:
    """Write ``array`` with ``affine`` as NIfTI atomically (temp file + rename, suffix kept).

    ``dtype`` (e.g. ``np.int16`` for HU, ``np.uint8`` for labels) casts with rounding for integer
    types; qform and sform are both set (scanner-aligned, code 1), units mm. ``description``: the
    header's ``descrip`` text (ASCII, at most 79 characters).
    """
    import nibabel as nib

    p = Path(path)
    arr = np.asarray(array)
    if dtype is not None:
        dt = np.dtype(dtype)
        if dt.kind in "iu" and arr.dtype.kind == "f":
            info = np.iinfo(dt)
            arr = np.clip(np.rint(arr), info.min, info.max)
        arr = arr.astype(dt, copy=False)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(np.asarray(affine, dtype=np.float64), code=1)
    img.set_sform(np.asarray(affine, dtype=np.float64), code=1)
    if description is not None:
        if len(description) > 79 or not description.isascii():
            raise ValueError(f"a NIfTI description is ASCII of at most 79 characters, not {description!r}")
        img.header["descrip"] = description.encode()
    with atomic_path(p) as tmp:
        nib.save(img, str(tmp))
    return p


# --------------------------------------------------------------------------------------- DICOM


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) >= 132 and head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".ima")


def read_raw_dicom(path: Path, stop_before_pixels: bool = False):
    """pydicom dataset of ``path``; also old files without the 128-byte preamble ("DICM") when they
    parse to an image. None when the file is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), force=False, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass
    if is_nifti(path) or path.suffix.lower() in (".txt", ".json", ".md", ".png", ".jpg", ".xml", ".csv"):
        return None
    try:
        ds = pydicom.dcmread(str(path), force=True, stop_before_pixels=stop_before_pixels)
    except Exception:
        return None
    if not ("Rows" in ds and "Columns" in ds):
        return None
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        # no file meta: tell the pixel decoder the encoding the file was read with
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = getattr(ds, "original_encoding", (True, True))
        fm = meta if meta is not None else FileMetaDataset()
        fm.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
        ds.file_meta = fm
    return ds


def is_dicom_dir(path: str | os.PathLike) -> bool:
    """A folder that directly holds at least one DICOM file (preamble, extension, or a file that
    parses as a DICOM image)."""
    p = Path(path)
    if not p.is_dir():
        return False
    files = [f for f in sorted(p.iterdir())
             if f.is_file() and f.name.lower() not in _NON_DICOM and not f.name.startswith(".")]
    if any(_looks_like_dicom(f) for f in files):
        return True
    return any(read_raw_dicom(f, stop_before_pixels=True) is not None for f in files[:3] if not is_nifti(f))


def _number_in_name(name: str) -> int | None:
    nums = re.findall(r"\d+", name)
    return int(nums[-1]) if nums else None


def _floats(v, n: int) -> np.ndarray | None:
    if v is None:
        return None
    try:
        a = np.array([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return a if a.shape == (n,) and np.all(np.isfinite(a)) else None


# the largest run of consecutive missing slices that is filled by interpolation (more is refused)
MAX_FILLED_SLICES = 5


def _instance(ds) -> int | None:
    try:
        return int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return None


class _SliceGrid:
    """Acquired slices (sorted coordinates ``t``) placed on a regular grid of ``n`` planes."""

    def __init__(self, t: np.ndarray, n: int, message: str = "", n_missing: int = 0):
        self.t = np.asarray(t, dtype=np.float64)
        self.n = int(n)
        self.message = message
        self.n_missing = int(n_missing)
        self.identity = self.n == len(self.t) and not message

    def fill(self, acq: np.ndarray) -> np.ndarray:
        """Planes of the regular grid: an acquired slice where one sits on the grid point, else
        linear interpolation between the two acquired neighbours."""
        t = self.t
        g = t[0] + (t[-1] - t[0]) * np.arange(self.n) / (self.n - 1)
        tol = 1e-3 * (t[-1] - t[0]) / (self.n - 1)
        out = np.empty(acq.shape[:2] + (self.n,), dtype=np.float32)
        for j, x in enumerate(g):
            i = int(np.clip(np.searchsorted(t, x), 1, len(t) - 1))
            if abs(x - t[i - 1]) <= tol:
                out[:, :, j] = acq[:, :, i - 1]
            elif abs(x - t[i]) <= tol:
                out[:, :, j] = acq[:, :, i]
            else:
                w = np.float32((x - t[i - 1]) / (t[i] - t[i - 1]))
                out[:, :, j] = (1 - w) * acq[:, :, i - 1] + w * acq[:, :, i]
        return out


def _slice_grid(folder: Path, t: np.ndarray, inst: list, by: str, dz: float | None = None) -> _SliceGrid:
    """Regular grid through sorted slice coordinates ``t`` (mm along the normal when ``by`` is
    "position", InstanceNumbers otherwise): gaps that are whole multiples of the usual step are
    missing slices, filled by interpolation (refused beyond MAX_FILLED_SLICES in a row); steps that
    are not multiples (non-uniform spacing) are resampled linearly onto the median step."""
    d = np.diff(t)
    step = float(np.median(d))
    tol = max(0.01 if by == "position" else 0.0, 0.05 * step)
    k = np.rint(d / step)
    regular = bool(np.all((k >= 1) & (np.abs(d - k * step) <= tol)))
    if regular and np.all(k == 1):
        return _SliceGrid(t, len(t))
    if not regular:
        if by != "position":  # irregular InstanceNumbers say nothing about geometry: keep the order
            return _SliceGrid(t, len(t))
        n = int(round((t[-1] - t[0]) / step)) + 1
        msg = (f"non-uniform slice spacing ({d.min():.3f}..{d.max():.3f} mm): resampled linearly onto a regular "
               f"grid of {n} slices at {(t[-1] - t[0]) / (n - 1):.3f} mm")
        return _SliceGrid(t, n, msg)
    gaps = [(i, int(k[i]) - 1) for i in np.flatnonzero(k > 1)]
    n_missing = sum(m for _, m in gaps)
    n = len(t) + n_missing

    def where(i: int) -> str:
        if by == "position":
            a, b = f"z={t[i]:.1f} mm", f"z={t[i + 1]:.1f} mm"
            if inst[i] is not None and inst[i + 1] is not None:
                return f"{a} and {b} (InstanceNumber {inst[i]} and {inst[i + 1]})"
            return f"{a} and {b}"
        return f"InstanceNumber {int(t[i])} and {int(t[i + 1])}"

    big = [(i, m) for i, m in gaps if m > MAX_FILLED_SLICES]
    if big:
        i, m = big[0]
        raise InputError(folder, f"{m} slices missing between {where(i)}: too many to fill by interpolation "
                                 f"(at most {MAX_FILLED_SLICES} in a row); the series is incomplete")
    mm = step if by == "position" else (dz or 1.0) * step
    parts = [f"{m} slice(s) missing between {where(i)}" for i, m in gaps[:3]]
    if len(gaps) > 3:
        parts.append(f"and {len(gaps) - 3} more gap(s)")
    msg = "; ".join(parts) + f": filled by linear interpolation on the regular {mm:g} mm grid ({n} slices)"
    return _SliceGrid(t, n, msg, n_missing)


def _pixel_problem(ds) -> str:
    """The key fact about unreadable pixel data: how many bytes there are against how many the
    header asks for, when that is the cause."""
    try:
        want = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * (int(ds.BitsAllocated) // 8)
        have = len(ds.PixelData)
    except Exception:
        return ""
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts is not None and getattr(ts, "is_compressed", False):
        return ""
    if have < want:
        return f"{have} of the {want} bytes of pixel data present: truncated file"
    return ""


def _slice_hu(f: Path, ds) -> np.ndarray:
    """One slice as float32 HU, (x=column, y=row)."""
    try:
        px = ds.pixel_array
    except Exception as e:
        fact = _pixel_problem(ds)
        raise InputError(f, f"unreadable DICOM pixel data ({fact or _short(e)})") from None
    if px.ndim != 2:
        raise InputError(f, f"not a 2D slice (pixel array shape {px.shape})")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    inter = float(ds.get("RescaleIntercept", 0) or 0)
    return (px.astype(np.float32) * slope + inter).T  # (rows, cols) -> (x=col, y=row)


def load_dicom_series(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a folder holding one DICOM CT series -> ``(hu float32 (x,y,z), affine RAS, info)``.

    Slices are ordered by the projection of ImagePositionPatient on the slice normal
    (row x column direction of ImageOrientationPatient). When positions are missing or
    degenerate (all equal) the order falls back to InstanceNumber, then to the number in the file
    name, with a warning. The affine maps DICOM's LPS world to nibabel's RAS (x and y negated).
    ``info`` says how the slices were ordered and holds a few header fields.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(path)
    _require_exists(folder)
    files = [
        f
        for f in sorted(folder.iterdir())
        if f.is_file() and not f.name.startswith(".") and f.name.lower() not in _NON_DICOM
    ]
    if not files:
        raise InputError(folder, "empty folder (no DICOM files)")
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), force=False)
        except InvalidDicomError:
            ds = read_raw_dicom(f)  # a DICOM file without preamble?
            if ds is None:
                if f.suffix.lower() in (".dcm", ".ima"):
                    raise InputError(f, "unreadable DICOM file") from None
                continue  # not a DICOM file: ignore (notes, thumbnails)
        except Exception as e:
            raise InputError(f, f"unreadable or truncated DICOM file ({_short(e)})") from None
        if "PixelData" not in ds:
            continue  # e.g. a structured report or presentation state
        slices.append((f, ds))
    if not slices:
        raise InputError(folder, "no DICOM image files in the folder")

    uids = {str(ds.get("SeriesInstanceUID", "") or "") for _, ds in slices}
    uids.discard("")
    if len(uids) > 1:
        raise InputError(folder, f"mixed DICOM series ({len(uids)} different SeriesInstanceUIDs); put each series in its own folder")
    for f, ds in slices:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(f, "multi-frame DICOM is not supported (expected one file per slice)")
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    if len(shapes) > 1:
        raise InputError(folder, f"DICOM slices have different sizes {sorted(shapes)} (mixed series?)")

    f0, ds0 = slices[0]
    iop = _floats(ds0.get("ImageOrientationPatient"), 6)
    warn_msgs = []
    if iop is None:
        warn_msgs.append("ImageOrientationPatient missing; assuming axial [1,0,0,0,1,0]")
        iop = np.array([1, 0, 0, 0, 1, 0], dtype=np.float64)
    for f, ds in slices[1:]:
        o = _floats(ds.get("ImageOrientationPatient"), 6)
        if o is not None and np.max(np.abs(o - iop)) > 1e-3:
            raise InputError(folder, "DICOM slices have different orientations (mixed series?)")
    row = iop[:3] / np.linalg.norm(iop[:3])
    col = iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row, col)
    ps = _floats(ds0.get("PixelSpacing"), 2)
    if ps is None:
        warn_msgs.append("PixelSpacing missing; assuming 1 mm")
        ps = np.array([1.0, 1.0])
    if np.any(ps <= 0):
        raise InputError(f0, f"zero or negative pixel spacing {tuple(ps)}")

    positions = [_floats(ds.get("ImagePositionPatient"), 3) for _, ds in slices]
    n = len(slices)
    order_by = "position"
    proj = None
    if all(p is not None for p in positions):
        proj = np.array([float(np.dot(p, normal)) for p in positions])
        if n > 1 and (np.ptp(proj) < 1e-4 or len(np.unique(np.round(proj, 4))) < n):
            order_by = None
            reason = "degenerate (all equal)" if np.ptp(proj) < 1e-4 else "duplicated"
    else:
        order_by = None
        reason = "missing"
    if order_by is None:
        inst = [ds.get("InstanceNumber") for _, ds in slices]
        try:
            inst_num = [int(v) for v in inst]
        except (TypeError, ValueError):
            inst_num = None
        if inst_num is not None and len(set(inst_num)) == n:
            order_by = "InstanceNumber"
            keys = inst_num
        else:
            name_num = [_number_in_name(f.name) for f, _ in slices]
            if all(v is not None for v in name_num) and len(set(name_num)) == n:
                order_by = "file name"
                keys = name_num
            else:
                raise InputError(folder, f"cannot order DICOM slices: positions {reason}, no unique InstanceNumber or numbered file names")
        warn_msgs.append(f"slice positions are {reason}; ordering slices by {order_by}")
        idx = np.argsort(np.asarray(keys), kind="stable")
    else:
        idx = np.argsort(proj, kind="stable")
    slices = [slices[i] for i in idx]

    # where the slices sit: a regular grid, with missing slices (gaps) filled by interpolation
    gap_text = ""
    if order_by == "position" and n > 1:
        pos = np.stack([positions[i] for i in idx])
        grid = _slice_grid(folder, proj[idx], [_instance(ds) for _, ds in slices], "position")
        origin = pos[0]
        step_vec = (pos[-1] - pos[0]) / (grid.n - 1)
    else:
        dz = None
        for key in ("SpacingBetweenSlices", "SliceThickness"):
            try:
                v = float(ds0.get(key))
                if v > 0:
                    dz = v
                    break
            except (TypeError, ValueError):
                pass
        if dz is None:
            dz = 1.0
            if n > 1:
                warn_msgs.append("slice spacing unknown; assuming 1 mm")
        grid = None
        if order_by == "InstanceNumber" and n > 1:
            nums = [int(k) for k in np.asarray(keys)[idx]]
            grid = _slice_grid(folder, np.asarray(nums, dtype=np.float64), nums, "InstanceNumber", dz)
        step_vec = normal * dz
        first = positions[idx[0]] if positions[idx[0]] is not None else np.zeros(3)
        origin = first
    if grid is not None and grid.message:
        gap_text = grid.message
        warn_msgs.append(grid.message)

    acq = np.empty((int(ds0.Columns), int(ds0.Rows), n), dtype=np.float32)
    for k, (f, ds) in enumerate(slices):
        acq[:, :, k] = _slice_hu(f, ds)
    if not np.isfinite(acq).all():
        raise InputError(folder, "DICOM series contains NaN or Inf voxels")
    vol = acq if grid is None or grid.identity else grid.fill(acq)

    lps = np.eye(4)
    lps[:3, 0] = row * ps[1]  # along a row: column index, spacing between columns
    lps[:3, 1] = col * ps[0]  # down a column: row index, spacing between rows
    lps[:3, 2] = step_vec
    lps[:3, 3] = origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    _check_spacing(folder, affine, shape=vol.shape)
    for m in warn_msgs:
        warnings.warn(f"{folder}: {m}", VoxdiffWarning, stacklevel=2)
    info = {
        "order_by": order_by,
        "n_slices": int(vol.shape[2]),
        "n_files": n,
        "missing_slices": 0 if grid is None else grid.n_missing,
        "gaps": gap_text,
        "series_description": str(ds0.get("SeriesDescription", "") or "").strip(),
        "series_uid": next(iter(uids), ""),
        "files": [str(f) for f, _ in slices],
        "warnings": warn_msgs,
    }
    return vol, affine, info
