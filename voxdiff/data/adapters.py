"""Dataset adapters: every supported layout yields the same :class:`Case` records, BTCV label ids.

Layouts (``kind``):

* ``btcv``   BTCV RawData: ``img/imgNNNN.nii.gz`` + ``label/labelNNNN.nii.gz`` (also under
  ``Training/`` or ``RawData/Training/``); case ids ``"NNNN"``.
* ``flare``  FLARE22: ``images/<case>_0000.nii.gz`` + ``labels/<case>.nii.gz`` (or nnU-Net folders),
  FLARE22 label ids mapped to BTCV (duodenum -> background).
* ``amos``   AMOS 2022: ``imagesTr``/``labelsTr`` (``imagesVa``/``labelsVa``, ``imagesTs``) with
  ``dataset.json``; AMOS ids mapped to BTCV; MRI cases (ids >= 500) are skipped.
* ``nnunet`` any nnU-Net v1/v2 or MSD folder with ``dataset.json``; label names are matched to BTCV
  names (unmatched organs -> background); when no name matches, ids are taken as given.
* ``folder`` unlabelled CTs: NIfTI files and/or DICOM series folders anywhere below the folder (or a
  single file / DICOM folder); sub-folders named like label folders (``labels``, ``labelsTr``, ...)
  are skipped.

``open_dataset(path, kind="auto")`` detects the layout. Label values outside the source schema are an
:class:`InputError` naming the label file.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from voxdiff.core.errors import InputError, VoxdiffWarning
from voxdiff.core.outputs import note_input

from . import labels as L
from .io import is_dicom_dir, is_nifti, load_image, load_label, nifti_stem
from .preprocess import axcodes, resample_to_grid, spacing_of
from .types import Case, CaseMeta, CaseRef

KINDS = ("auto", "btcv", "flare", "amos", "nnunet", "folder")
SPLITS = ("train", "val", "test", "all")


@dataclass
class Dataset:
    """A data set on disk: where its cases are and how its label ids map to BTCV."""

    root: Path
    kind: str
    refs: list[CaseRef]
    label_map: dict[int, int] | None = None  # source id -> BTCV id; None = unlabelled
    source_labels: dict[int, str] = field(default_factory=dict)  # source id -> name (for reports)
    name: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # folder mode: (path, why) not taken as CTs

    def __len__(self) -> int:
        return len(self.refs)

    def __iter__(self) -> Iterator[Case]:
        for r in self.refs:
            yield self.load(r)

    @property
    def case_ids(self) -> list[str]:
        return [r.case_id for r in self.refs]

    @property
    def labelled(self) -> list[CaseRef]:
        return [r for r in self.refs if r.label_path is not None]

    def ref(self, case_id: str) -> CaseRef:
        for r in self.refs:
            if r.case_id == case_id:
                return r
        raise KeyError(case_id)

    def map_labels(self, raw: np.ndarray, path: str | os.PathLike) -> np.ndarray:
        """Source label ids -> BTCV uint8; values outside the source schema raise InputError."""
        lm = self.label_map if self.label_map is not None else L.IDENTITY
        return map_label_values(raw, lm, path, schema=self.kind)

    def load(self, ref: CaseRef) -> Case:
        """Raw case: float32 HU image in file orientation, label (BTCV ids) on the same grid."""
        image, affine = load_image(ref.image_path)
        label = None
        if ref.label_path is not None:
            raw, laff = load_label(ref.label_path)
            raw = align_label(raw, laff, image.shape, affine, ref.label_path, ref.image_path)
            label = self.map_labels(raw, ref.label_path)
        meta = CaseMeta(
            case_id=ref.case_id,
            image_path=str(ref.image_path),
            label_path=None if ref.label_path is None else str(ref.label_path),
            original_shape=tuple(int(s) for s in image.shape),
            original_affine=affine.copy(),
            affine=affine.copy(),
            spacing=spacing_of(affine),
            extra={"dataset": self.kind, "source_axcodes": "".join(axcodes(affine))},
        )
        return Case(image=image, label=label, meta=meta)


def map_label_values(raw: np.ndarray, label_map: dict[int, int], path, schema: str = "BTCV") -> np.ndarray:
    vals = np.unique(raw)
    bad = [int(v) for v in vals if int(v) not in label_map]
    if bad:
        shown = ", ".join(str(v) for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
        allowed = f"{min(label_map)}..{max(label_map)}"
        raise InputError(path, f"label values {shown} outside the {schema} label schema ({allowed})")
    lut = np.zeros(max(max(label_map), int(vals.max()) if vals.size else 0) + 1, dtype=np.uint8)
    for k, v in label_map.items():
        lut[k] = v
    if vals.size and int(vals.min()) < 0:  # cannot happen after the check above, keeps lut safe
        raise InputError(path, "negative label values")
    return lut[raw]


def align_label(label, label_affine, image_shape, image_affine, label_path, image_path) -> np.ndarray:
    """Bring a label map onto its image's voxel grid.

    Identical grids pass through. A label stored on the *same physical grid* in another axis
    order (e.g. LAS label for an LPS DICOM series) is permuted/flipped exactly. Anything else is a
    shape or affine mismatch error naming the label file.
    """
    image_shape = tuple(int(s) for s in image_shape)
    same_aff = np.allclose(label_affine, image_affine, atol=1e-3, rtol=1e-4)
    if same_aff:
        if tuple(label.shape) != image_shape:
            raise InputError(label_path, f"label shape {tuple(label.shape)} differs from image shape {image_shape} ({Path(image_path).name})")
        return label
    m = np.linalg.inv(label_affine) @ image_affine  # image voxel -> label voxel
    a = m[:3, :3]
    perm = np.argmax(np.abs(a), axis=0)
    is_perm = (
        len(set(perm.tolist())) == 3
        and np.allclose(np.abs(a[perm, range(3)]), 1.0, atol=1e-3)
        and np.allclose(np.abs(a).sum(axis=0), 1.0, atol=1e-3)
        and np.allclose(m[:3, 3], np.round(m[:3, 3]), atol=1e-2)
    )
    if is_perm:
        # the image grid's corners must land on the label grid's corners
        corners = np.array([[0, 0, 0, 1], [*(s - 1 for s in image_shape), 1]]).T
        lab_idx = np.round(m @ corners)[:3]
        lo, hi = lab_idx.min(axis=1), lab_idx.max(axis=1)
        if np.all(lo == 0) and np.all(hi == np.array(label.shape) - 1):
            return resample_to_grid(label, label_affine, image_shape, image_affine, order=0, fill=0)
    if tuple(label.shape) != image_shape and not is_perm:
        raise InputError(label_path, f"label shape {tuple(label.shape)} differs from image shape {image_shape} ({Path(image_path).name})")
    diff = float(np.max(np.abs(np.asarray(label_affine) - np.asarray(image_affine))))
    raise InputError(label_path, f"label affine differs from the image affine of {Path(image_path).name} (max difference {diff:.4g})")


# ------------------------------------------------------------------------------------ helpers


def _nii_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.is_file() and is_nifti(f) and not f.name.startswith("."))


def _strip_channel(stem: str) -> tuple[str, int | None]:
    m = re.match(r"^(.*)_(\d{4})$", stem)
    if m:
        return m.group(1), int(m.group(2))
    return stem, None


def _paired(images_dir: Path, labels_dir: Path | None) -> list[CaseRef]:
    """Images of a folder paired with same-named labels.

    nnU-Net naming (``<case>_0000.nii.gz``, other channels ``_0001``... ignored) is used when any
    image ends in ``_0000``; otherwise (MSD, AMOS: ``amos_0001.nii.gz``) each file is one case.
    """
    refs = []
    label_files = {nifti_stem(f): f for f in _nii_files(labels_dir)} if labels_dir is not None else {}
    files = _nii_files(images_dir)
    channels = any(_strip_channel(nifti_stem(f))[1] == 0 for f in files)
    for f in files:
        cid = nifti_stem(f)
        if channels:
            cid, ch = _strip_channel(cid)
            if ch not in (None, 0):
                continue  # other channels of multi-modal data
        lab = label_files.get(cid)
        refs.append(CaseRef(cid, str(f), None if lab is None else str(lab)))
    used = {r.case_id for r in refs}
    orphans = sorted(f.name for stem, f in label_files.items() if stem not in used)
    if orphans and labels_dir is not None:  # a renamed or missing image: say so rather than drop the case quietly
        shown = ", ".join(orphans[:5]) + (f" (+{len(orphans) - 5} more)" if len(orphans) > 5 else "")
        warnings.warn(f"{labels_dir}: {len(orphans)} label map(s) with no image in {images_dir.name}, not used: {shown}",
                      VoxdiffWarning, stacklevel=3)
    return refs


def _check_nonempty(root: Path, refs: list[CaseRef], what: str) -> None:
    if not refs:
        raise InputError(root, f"no CT images found ({what})")


def _require_dir(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir() and not any(path.iterdir()):
        raise InputError(path, "empty folder")


# ------------------------------------------------------------------------------------ layouts


def open_btcv(root: Path) -> Dataset:
    base = None
    for cand in (root, root / "Training", root / "RawData" / "Training"):
        if (cand / "img").is_dir():
            base = cand
            break
    if base is None:
        raise InputError(root, "not a BTCV RawData folder (no img/ folder)")
    labels = {}
    for f in _nii_files(base / "label"):
        m = re.search(r"(\d+)$", nifti_stem(f))
        if m:
            labels[m.group(1)] = f
    refs = []
    for f in _nii_files(base / "img"):
        m = re.search(r"(\d+)$", nifti_stem(f))
        cid = m.group(1) if m else nifti_stem(f)
        lab = labels.get(cid)
        refs.append(CaseRef(cid, str(f), None if lab is None else str(lab)))
    _check_nonempty(root, refs, "img/imgNNNN.nii.gz")
    return Dataset(root, "btcv", refs, dict(L.IDENTITY), dict(L.BTCV_LABELS), name="BTCV")


def _read_dataset_json(root: Path) -> dict:
    p = root / "dataset.json"
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(p, f"unreadable dataset.json ({e.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise InputError(p, "dataset.json is not a JSON object")
    return doc


def _dataset_json_labels(doc: dict, path: Path) -> dict[int, str]:
    """``labels`` of nnU-Net v2 ({name: id}) or v1/MSD ({"id": name}) -> {id: name}."""
    raw = doc.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise InputError(path, "dataset.json has no 'labels' entry")
    out: dict[int, str] = {}
    for k, v in raw.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):  # v2: name -> id
            out[int(v)] = str(k)
        elif isinstance(v, (list, tuple)):  # v2 region-based labels: not supported
            raise InputError(path, f"region-based label '{k}' is not supported")
        else:
            try:
                out[int(k)] = str(v)
            except ValueError:
                raise InputError(path, f"cannot read label entry {k!r}: {v!r}") from None
    return out


def _nnunet_refs(root: Path, split: str, ending: str | None) -> list[CaseRef]:
    parts = {"train": [("imagesTr", "labelsTr")], "val": [("imagesVa", "labelsVa")], "test": [("imagesTs", "labelsTs")]}
    parts["all"] = parts["train"] + parts["val"] + parts["test"]
    if split not in parts:
        raise InputError(root, f"unknown split '{split}' (expected one of {', '.join(SPLITS)})")
    refs: list[CaseRef] = []
    seen = set()
    for img_dir, lab_dir in parts[split]:
        for r in _paired(root / img_dir, root / lab_dir if (root / lab_dir).is_dir() else None):
            if r.case_id in seen:
                continue
            seen.add(r.case_id)
            refs.append(r)
    return refs


def open_nnunet(root: Path, split: str = "all", kind: str = "nnunet") -> Dataset:
    doc = _read_dataset_json(root)
    names = _dataset_json_labels(doc, root / "dataset.json")
    channels = doc.get("channel_names") or doc.get("modality") or {}
    if isinstance(channels, dict) and len(channels) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in channels.items())
        warnings.warn(f"{root / 'dataset.json'}: {len(channels)} input channels ({listed}); voxdiff reads channel 0 "
                      f"(<case>_0000) as CT and ignores the others", VoxdiffWarning, stacklevel=2)
    refs = _nnunet_refs(root, split, doc.get("file_ending"))
    _check_nonempty(root, refs, f"imagesTr/imagesTs for split '{split}'")
    if kind == "amos":
        lm = dict(L.AMOS_TO_BTCV)
        keep = []
        for r in refs:
            m = re.search(r"(\d+)$", r.case_id)
            if m and int(m.group(1)) >= 500:
                continue  # AMOS MRI cases
            keep.append(r)
        if not keep:
            raise InputError(root, "no AMOS CT cases (ids below 500) in this folder")
        return Dataset(root, "amos", keep, lm, names, name=str(doc.get("name", "AMOS")))
    if kind == "flare":
        return Dataset(root, "flare", refs, dict(L.FLARE22_TO_BTCV), names, name=str(doc.get("name", "FLARE22")))
    lm: dict[int, int] = {}
    matched = {i: L.btcv_id_for_name(n) for i, n in names.items()}
    if any(v not in (None, 0) for i, v in matched.items() if i != 0):
        dropped = [names[i] for i, v in matched.items() if v is None and i != 0]
        if dropped:
            warnings.warn(f"{root}: labels without a BTCV class become background: {', '.join(dropped)}", stacklevel=2)
        lm = {i: (v or 0) for i, v in matched.items()}
        lm[0] = 0
    else:
        lm = {i: i for i in names}
        bad = [i for i in lm if i not in L.BTCV_LABELS]
        if bad:
            raise InputError(root / "dataset.json", f"label ids {bad} are outside the BTCV schema and their names match no BTCV organ")
    return Dataset(root, "nnunet", refs, lm, names, name=str(doc.get("name", root.name)))


def open_flare(root: Path, split: str = "all") -> Dataset:
    if (root / "dataset.json").is_file():
        return open_nnunet(root, split, kind="flare")
    if (root / "imagesTr").is_dir():
        refs = _nnunet_refs(root, split, None)
    else:
        img = root / "images" if (root / "images").is_dir() else root
        lab = root / "labels" if (root / "labels").is_dir() else None
        refs = _paired(img, lab)
    _check_nonempty(root, refs, "images/<case>_0000.nii.gz")
    names = {0: "background", 1: "liver", 2: "right_kidney", 3: "spleen", 4: "pancreas", 5: "aorta",
             6: "inferior_vena_cava", 7: "right_adrenal_gland", 8: "left_adrenal_gland", 9: "gallbladder",
             10: "esophagus", 11: "stomach", 12: "duodenum", 13: "left_kidney"}
    return Dataset(root, "flare", refs, dict(L.FLARE22_TO_BTCV), names, name="FLARE22")


def open_amos(root: Path, split: str = "all") -> Dataset:
    if (root / "dataset.json").is_file():
        return open_nnunet(root, split, kind="amos")
    refs = _nnunet_refs(root, split, None)
    _check_nonempty(root, refs, "imagesTr/amos_NNNN.nii.gz")
    refs = [r for r in refs if not (re.search(r"(\d+)$", r.case_id) and int(re.search(r"(\d+)$", r.case_id).group(1)) >= 500)]
    _check_nonempty(root, refs, "AMOS CT cases (ids below 500)")
    return Dataset(root, "amos", refs, dict(L.AMOS_TO_BTCV), {}, name="AMOS")


_LABEL_DIRS = {"label", "labels", "labelstr", "labelsts", "labelsva", "segmentations"}
# words in a folder or file name (split at non-alphanumerics) that mark masks and label maps
_MASK_WORDS = {"mask", "masks", "label", "labels", "labelled", "labeled", "labelstr", "labelsts", "labelsva",
               "seg", "segs", "segmentation", "segmentations", "roi", "rois", "gt", "groundtruth"}


def mask_name(name: str) -> bool:
    """A folder or file name that says "mask" or "label" (``MASKS_DICOM``, ``liver_seg.nii.gz``)."""
    stem = nifti_stem(name) if is_nifti(name) else name
    return any(t in _MASK_WORDS for t in re.split(r"[^a-z0-9]+", stem.lower()) if t)


def _nifti_label_dtype(path: Path) -> str | None:
    """Why a NIfTI file is a label map by its header alone (8-bit integers, no scaling), or None."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        dt = np.dtype(img.get_data_dtype())
        slope = img.dataobj.slope
    except Exception:
        return None  # unreadable files are reported when they are loaded
    if dt.kind in "iub" and dt.itemsize == 1 and (slope is None or not np.isfinite(slope) or slope in (0, 1)):
        return f"{dt} voxels: a label map"
    return None


def _dicom_mask_values(folder: Path) -> str | None:
    """Why a DICOM series folder holds a mask (a few slices show only a handful of whole values
    >= 0, such as 0/1/255), or None."""
    from .io import read_raw_dicom

    files = [f for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")]
    picks = [files[i] for i in sorted({0, len(files) // 2, len(files) - 1})] if files else []
    vals: set[float] = set()
    seen = 0
    for f in picks:
        ds = read_raw_dicom(f)
        if ds is None or "PixelData" not in ds:
            continue
        try:
            px = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
        except Exception:
            return None  # unreadable slices are reported when the series is loaded
        vals.update(np.unique(px).tolist())
        seen += 1
        if len(vals) > 32 or min(vals) < 0:
            return None
    if not seen and picks and all((ds := read_raw_dicom(f, stop_before_pixels=True)) is not None
                                  and "Rows" not in ds for f in picks):
        return "no image pixel data (a structure set or report)"
    if seen and all(float(v).is_integer() for v in vals):
        shown = "/".join(f"{v:g}" for v in sorted(vals)[:4]) + ("/..." if len(vals) > 4 else "")
        return f"values {shown} only: a mask"
    return None


def open_folder(root: Path) -> Dataset:
    """Unlabelled CTs: a single file / DICOM folder, or everything below a folder.

    Below a folder, masks and label maps are not taken for CTs: sub-folders and files whose name
    says so (``labels``, ``MASKS_DICOM``, ``liver_seg.nii.gz``, ...), 8-bit integer NIfTI files and
    DICOM series whose slices hold only a few whole values >= 0 (0/1/255). They are listed in
    :attr:`Dataset.skipped` and in one warning.
    """
    if root.is_file() or is_dicom_dir(root):
        cid = nifti_stem(root) if root.is_file() else root.name
        return Dataset(root, "folder", [CaseRef(cid, str(root), None)], None, {}, name=root.name)
    refs = []
    skipped: list[tuple[str, str]] = []
    used: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            if name.lower() in _LABEL_DIRS or mask_name(name):
                skipped.append((str(d / name), "mask or label folder name"))
                continue
            keep.append(name)
        dirnames[:] = keep
        cands = []
        for f in sorted(filenames):
            if not is_nifti(f) or f.startswith("."):
                continue
            why = "mask or label file name" if mask_name(f) else _nifti_label_dtype(d / f)
            if why:
                skipped.append((str(d / f), why))
            else:
                cands.append(d / f)
        if d != root and is_dicom_dir(d):
            why = _dicom_mask_values(d)
            if why:
                skipped.append((str(d), why))
            else:
                cands.append(d)
        for c in cands:
            rel = c.relative_to(root)
            cid = "_".join(list(rel.parts[:-1]) + [nifti_stem(c) if c.is_file() else c.name])
            base, k = cid, 1
            while cid in used:
                k += 1
                cid = f"{base}-{k}"
            used.add(cid)
            refs.append(CaseRef(cid, str(c), None))
    if skipped:
        shown = ", ".join(f"{Path(p).relative_to(root)} ({w})" for p, w in skipped[:6])
        more = f" and {len(skipped) - 6} more" if len(skipped) > 6 else ""
        warnings.warn(f"{root}: skipped {len(skipped)} mask or label series/file(s), not CTs: {shown}{more}",
                      VoxdiffWarning, stacklevel=3)
    _check_nonempty(root, refs, "no NIfTI files or DICOM series folders" + (
        f"; skipped as masks or labels: {', '.join(Path(p).name for p, _ in skipped[:4])}" if skipped else ""))
    return Dataset(root, "folder", refs, None, {}, name=root.name, skipped=skipped)


def detect_kind(root: Path) -> str:
    if root.is_file() or is_dicom_dir(root):
        return "folder"
    if (root / "dataset.json").is_file():
        doc = _read_dataset_json(root)
        name = str(doc.get("name", "")) + " " + str(doc.get("description", ""))
        if "amos" in name.lower():
            return "amos"
        if "flare" in name.lower():
            return "flare"
        return "nnunet"
    for cand in (root, root / "Training", root / "RawData" / "Training"):
        if (cand / "img").is_dir() and any(is_nifti(f) for f in (cand / "img").iterdir()):
            return "btcv"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        if "flare" in root.name.lower() or any("flare" in f.name.lower() for f in _nii_files(root / "images")[:5]):
            return "flare"
        raise InputError(root, "images/ + labels/ folder without dataset.json: say which label ids it uses with --kind flare|amos|nnunet")
    if (root / "imagesTr").is_dir():
        if any(f.name.lower().startswith("amos") for f in _nii_files(root / "imagesTr")[:5]):
            return "amos"
        raise InputError(root, "imagesTr/ folder without dataset.json: add one (labels by name) or give --kind flare|amos")
    return "folder"


def open_dataset(path: str | os.PathLike, kind: str = "auto", split: str = "all") -> Dataset:
    """Open a data set folder (or a single CT) and list its cases.

    ``kind``: auto|btcv|flare|amos|nnunet|folder. ``split`` (nnU-Net style layouts):
    train (imagesTr), val (imagesVa), test (imagesTs) or all.
    """
    root = Path(path)
    note_input(root)
    if kind not in KINDS:
        raise InputError(root, f"unknown data set kind '{kind}' (expected one of {', '.join(KINDS)})")
    if split not in SPLITS:
        raise InputError(root, f"unknown split '{split}' (expected one of {', '.join(SPLITS)})")
    if not root.exists():
        raise InputError(root, "no such file or folder")
    if root.is_dir():
        _require_dir(root)
    elif not is_nifti(root):
        raise InputError(root, "not a data set folder, NIfTI file or DICOM series folder")
    if kind == "auto":
        kind = detect_kind(root)
    if kind == "btcv":
        return open_btcv(root)
    if kind == "flare":
        return open_flare(root, split)
    if kind == "amos":
        return open_amos(root, split)
    if kind == "nnunet":
        if not (root / "dataset.json").is_file():
            raise InputError(root, "not an nnU-Net/MSD folder (dataset.json missing)")
        return open_nnunet(root, split)
    return open_folder(root)
