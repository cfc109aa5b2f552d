"""Helpers for the data-layer tests: tiny synthetic CTs, NIfTI and DICOM writers, the real-CT path.

(A uniquely named module, so that test files can import it whatever other conftest.py files exist.)
"""

from __future__ import annotations

import struct
from pathlib import Path

import nibabel as nib
import nibabel.orientations as nio
import numpy as np

REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_ct"
if not REAL_CT.exists():  # the shared data folder sits beside the repository root
    REAL_CT = Path(__file__).resolve().parents[3] / "shared" / "data" / "real_ct"


def affine_for(axcodes: str, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Axis-aligned affine whose voxel axes point along ``axcodes`` (e.g. "LPS", "PIR")."""
    ornt = nio.axcodes2ornt(tuple(axcodes))
    a = np.eye(4)
    a[:3, :3] = 0
    for i, (ax, fl) in enumerate(ornt):
        a[int(ax), i] = fl * spacing[i]
    a[:3, 3] = origin
    return a


def synthetic_ct(shape=(40, 36, 24), seed=0):
    """A body-like volume in voxel space (air around an ellipsoid 'body' with 'organs'), float32 HU,
    and a label map (BTCV ids 1 = spleen-ish blob, 6 = liver-ish blob, 13 = small blob)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.7) ** 2 < 1.0
    img = np.full(shape, -1000.0, dtype=np.float32)
    img[body] = 40.0
    lab = np.zeros(shape, dtype=np.uint8)
    liver = ((x - 0.35) / 0.3) ** 2 + (y / 0.3) ** 2 + (z / 0.5) ** 2 < 1
    spleen = ((x + 0.4) / 0.18) ** 2 + ((y + 0.2) / 0.2) ** 2 + (z / 0.3) ** 2 < 1
    small = ((x + 0.1) / 0.1) ** 2 + ((y - 0.3) / 0.1) ** 2 + ((z - 0.2) / 0.15) ** 2 < 1
    lab[liver & body] = 6
    lab[spleen & body] = 1
    lab[small & body] = 13
    img[lab == 6] = 60.0
    img[lab == 1] = 50.0
    img[lab == 13] = 20.0
    img += rng.normal(0, 5, shape).astype(np.float32)
    return img, lab


def write_nifti(path, arr, affine, dtype=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(arr if dtype is None else np.asarray(arr).astype(dtype))
    img = nib.Nifti1Image(arr, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


def patch_pixdim(path, values):
    """Overwrite pixdim[1:4] of an uncompressed .nii in place and drop q/sform codes, so that the
    header spacing is what readers use (to make files with zero or negative spacing)."""
    with open(path, "r+b") as f:
        f.seek(80)  # pixdim[1]
        f.write(struct.pack("<3f", *values))
        f.seek(252)  # qform_code, sform_code (int16 each)
        f.write(struct.pack("<2h", 0, 0))


# ------------------------------------------------------------------------------------ DICOM

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_dicom_series(
    folder,
    hu,
    spacing=(0.8, 0.7, 2.5),
    origin_lps=(-100.0, -80.0, 50.0),
    iop=(1, 0, 0, 0, 1, 0),
    slope=1.0,
    intercept=-1024.0,
    series_uid="1.2.826.0.1.3680043.8.498.1",
    positions="normal",
    instance_numbers=True,
    names=None,
    shuffle_seed=None,
    start_index=0,
):
    """Write ``hu`` (x=columns, y=rows, z=slices) as one DICOM file per slice.

    positions: "normal" (ImagePositionPatient along the slice normal), "equal" (all the same),
    "missing" (no ImagePositionPatient). names: callable k -> file name (default random-ish names
    so that file order says nothing). Returns the list of paths.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    iop = np.asarray(iop, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    nx, ny, nz = hu.shape
    order = np.arange(nz)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(nz)
    paths = []
    for k in order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = names(k) if names else f"{generate_uid()[-12:]}.dcm"
        p = folder / name
        ds = FileDataset(str(p), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [spacing[1], spacing[0]]  # [between rows, between columns]
        ds.SliceThickness = spacing[2]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        if positions == "normal":
            ds.ImagePositionPatient = [float(v) for v in np.asarray(origin_lps) + normal * spacing[2] * k]
        elif positions == "equal":
            ds.ImagePositionPatient = [float(v) for v in origin_lps]
        if instance_numbers:
            ds.InstanceNumber = int(k) + 1 + start_index
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        stored = np.rint((hu[:, :, k] - intercept) / slope).astype(np.int16).T  # (rows, cols)
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds.save_as(str(p), enforce_file_format=True)
        paths.append(p)
    return paths
