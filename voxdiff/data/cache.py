"""Preprocessing cache: int16 volumes + JSON metadata, keyed by source files and settings.

Layout of a cache folder::

    cache/
      voxdiff-cache.json            # marker: {"format": "voxdiff-cache", "version": 1}
      <key>.json                    # metadata (written last: a case is complete when it exists)
      <key>_image.npy               # int16 HU (x, y, z), RAS, resampled, cropped; np.load(mmap_mode="r")
      <key>_label.npy               # uint8 BTCV ids (only for labelled cases)
      prepare-<cfghash>.yaml        # resolved config of each `voxdiff data prepare` run

``key`` = SHA-256 (first 24 hex digits) over the cache format version, the resolved image and
label paths with their size and modification time (ns), the label map and the preprocessing config.
Touching or replacing a source file, or changing any setting, gives a new key; stale entries are
simply never read again.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from voxdiff.core.config import to_dict, write_config
from voxdiff.core.errors import InputError, VoxdiffError
from voxdiff.core.outputs import atomic_path, atomic_write_json, replaced_input

from .adapters import Dataset, open_dataset
from .preprocess import PreprocessConfig, preprocess
from .types import Case, CaseMeta, CaseRef

CACHE_FORMAT = "voxdiff-cache"
CACHE_VERSION = 1
MARKER = "voxdiff-cache.json"


def _file_sig(path: str | None) -> list[Any] | None:
    if path is None:
        return None
    p = Path(path).resolve()
    if p.is_dir():  # DICOM folder: every file's name, size and mtime
        items = []
        for f in sorted(p.iterdir()):
            if f.is_file():
                st = f.stat()
                items.append([f.name, st.st_size, st.st_mtime_ns])
        return [str(p), items]
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


def config_hash(cfg: PreprocessConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def case_key(ref: CaseRef, cfg: PreprocessConfig, label_map: dict[int, int] | None = None) -> str:
    doc = {
        "v": CACHE_VERSION,
        "image": _file_sig(ref.image_path),
        "label": _file_sig(ref.label_path),
        "label_map": None if label_map is None else sorted(label_map.items()),
        "cfg": to_dict(cfg),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _meta_to_json(meta: CaseMeta) -> dict[str, Any]:
    return {
        "case_id": meta.case_id,
        "image_path": meta.image_path,
        "label_path": meta.label_path,
        "original_shape": list(meta.original_shape),
        "original_affine": np.asarray(meta.original_affine).tolist(),
        "affine": np.asarray(meta.affine).tolist(),
        "spacing": list(meta.spacing),
        "extra": to_dict(meta.extra),
    }


def _meta_from_json(d: dict[str, Any]) -> CaseMeta:
    return CaseMeta(
        case_id=str(d["case_id"]),
        image_path=d.get("image_path"),
        label_path=d.get("label_path"),
        original_shape=tuple(int(s) for s in d["original_shape"]),
        original_affine=np.asarray(d["original_affine"], dtype=np.float64),
        affine=np.asarray(d["affine"], dtype=np.float64),
        spacing=tuple(float(s) for s in d["spacing"]),
        extra=dict(d.get("extra", {})),
    )


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def _is_cache_dir(root: Path) -> bool:
    return (root / MARKER).is_file()


def init_cache_dir(root: str | os.PathLike, force: bool = False) -> Path:
    """Create (or reuse) a cache folder; a non-empty folder that is not a voxdiff cache is refused
    unless ``force``."""
    p = Path(root)
    if p.exists() and not p.is_dir():
        raise InputError(p, "cache path exists and is not a folder")
    if p.is_dir() and any(p.iterdir()) and not _is_cache_dir(p) and not force:
        raise InputError(p, "output folder exists and is not empty (and is not a voxdiff cache; use --force to use it anyway)")
    p.mkdir(parents=True, exist_ok=True)
    if not _is_cache_dir(p):
        atomic_write_json(p / MARKER, {"format": CACHE_FORMAT, "version": CACHE_VERSION})
    return p


class PreprocessCache:
    """Preprocessed cases on disk. ``get(ref)`` returns the cached case or computes and stores it."""

    def __init__(self, root: str | os.PathLike, cfg: PreprocessConfig, force: bool = False):
        self.root = init_cache_dir(root, force=force)
        self.cfg = cfg

    def paths(self, key: str) -> tuple[Path, Path, Path]:
        return self.root / f"{key}.json", self.root / f"{key}_image.npy", self.root / f"{key}_label.npy"

    def key(self, ref: CaseRef, dataset: Dataset | None = None) -> str:
        return case_key(ref, self.cfg, dataset.label_map if dataset is not None else None)

    def has(self, ref: CaseRef, dataset: Dataset | None = None) -> bool:
        return self.paths(self.key(ref, dataset))[0].is_file()

    def read(self, key: str, mmap: bool = False) -> Case | None:
        js, im, lb = self.paths(key)
        if not js.is_file():
            return None
        try:
            doc = json.loads(js.read_text())
            meta = _meta_from_json(doc["meta"])
            img = np.load(im, mmap_mode="r" if mmap else None)
            lab = np.load(lb, mmap_mode="r" if mmap else None) if doc.get("has_label") else None
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None  # damaged entry: recomputed by the caller
        if not mmap:
            img = img.astype(np.float32)
        return Case(image=img, label=lab, meta=meta)

    def write(self, key: str, case: Case) -> None:
        js, im, lb = self.paths(key)
        img = np.clip(np.rint(case.image), -32768, 32767).astype(np.int16)
        _save_npy(im, img)
        if case.label is not None:
            _save_npy(lb, np.asarray(case.label, dtype=np.uint8))
        atomic_write_json(
            js,
            {
                "format": CACHE_FORMAT,
                "version": CACHE_VERSION,
                "has_label": case.label is not None,
                "shape": list(img.shape),
                "meta": _meta_to_json(case.meta),
                "preprocess": to_dict(self.cfg),
            },
        )

    def get(self, ref: CaseRef, dataset: Dataset | None = None, mmap: bool = False,
            check: bool = False, allow_non_ct: bool = False) -> Case:
        """Preprocessed case from the cache, computed (and stored) when missing.

        ``mmap=True`` returns the image as the int16 memory map (HU) instead of a float32 copy.
        ``check``: refuse an image that is not CT (:func:`voxdiff.data.ctcheck.check_ct`; the source
        when it is read, the cached volume otherwise) unless ``allow_non_ct``.
        """
        from .ctcheck import check_ct

        key = self.key(ref, dataset)
        c = self.read(key, mmap=mmap)
        if c is not None:
            if check:
                check_ct(c.image, ref.image_path, allow_non_ct=allow_non_ct)
            return c
        ds = dataset if dataset is not None else _single_ref_dataset(ref)
        raw = ds.load(ref)
        if check:
            check_ct(raw.image, ref.image_path, allow_non_ct=allow_non_ct)
        case = preprocess(raw, self.cfg)
        self.write(key, case)
        c = self.read(key, mmap=mmap)
        assert c is not None
        return c


def _single_ref_dataset(ref: CaseRef) -> Dataset:
    from . import labels as L

    return Dataset(Path(ref.image_path).parent, "btcv" if ref.label_path else "folder", [ref],
                   dict(L.IDENTITY) if ref.label_path else None)


# ----------------------------------------------------------------------------------- prepare


@dataclass
class PrepareReport:
    cache_dir: str
    n_cases: int
    done: list[str] = field(default_factory=list)  # computed now
    cached: list[str] = field(default_factory=list)  # already in the cache
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case id, one-line reason)

    @property
    def ok(self) -> bool:
        return len(self.done) + len(self.cached) > 0


def _prepare_one(args) -> tuple[str, str, str | None, list[str]]:
    """Preprocess one case into the cache: (case id, done|cached|failed, reason, warnings). Warnings
    are returned, not shown, so that worker processes hand them to the parent."""
    root, cfg, kind, label_map, ref, allow_non_ct = args
    import warnings as _w

    from .ctcheck import check_ct

    dataset = Dataset(Path(root), kind, [ref], label_map)
    caught: list[str] = []
    try:
        with _w.catch_warnings(record=True) as rec:
            _w.simplefilter("always")
            try:
                cache = PreprocessCache.__new__(PreprocessCache)
                cache.root, cache.cfg = Path(root), cfg
                key = cache.key(ref, dataset)
                if cache.paths(key)[0].is_file():
                    return ref.case_id, "cached", None, []
                raw = dataset.load(ref)
                check_ct(raw.image, ref.image_path, allow_non_ct=allow_non_ct)
                case = preprocess(raw, cfg)
                cache.write(key, case)
            finally:
                caught = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
        return ref.case_id, "done", None, caught
    except VoxdiffError as e:
        return ref.case_id, "failed", str(e).replace("\n", " "), caught
    except MemoryError:
        return ref.case_id, "failed", f"{ref.image_path}: out of memory", caught
    except Exception as e:  # an unexpected failure of one case must not stop thousands of others
        return ref.case_id, "failed", f"{ref.image_path}: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}", caught


def prepare_cache(
    data: str | os.PathLike | Dataset,
    cache_dir: str | os.PathLike,
    cfg: PreprocessConfig,
    workers: int = 1,
    kind: str = "auto",
    split: str = "all",
    force: bool = False,
    progress: bool = True,
    allow_non_ct: bool = False,
) -> PrepareReport:
    """Preprocess every case of a data set into ``cache_dir`` with ``workers`` processes.

    Cases that fail (unreadable, or not CT by :mod:`voxdiff.data.ctcheck` unless
    ``allow_non_ct``) are skipped and listed in the report; nothing is written for them. Warnings
    of the workers are shown (once each) in the calling process.
    """
    from tqdm import tqdm

    ds = data if isinstance(data, Dataset) else open_dataset(data, kind=kind, split=split)
    if replaced_input(cache_dir, inputs=(ds.root,)) is not None:  # never mix a cache into the data set
        raise InputError(cache_dir, f"the cache folder is, or holds, the data set {ds.root}; use a folder of its own")
    created = not Path(cache_dir).exists()
    root = init_cache_dir(cache_dir, force=force)
    write_config(root / f"prepare-{config_hash(cfg)}.yaml", cfg, extra={"data": str(ds.root), "kind": ds.kind})
    report = PrepareReport(str(root), len(ds.refs))
    jobs = [(str(root), cfg, ds.kind, ds.label_map, r, allow_non_ct) for r in ds.refs]
    bar = tqdm(total=len(jobs), desc="prepare", unit="case", disable=None if progress else True)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for cid, status, msg, warned in map(_prepare_one, jobs):
                _record(report, cid, status, msg, warned)
                bar.update(1)
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(processes=min(workers, len(jobs))) as pool:
                for cid, status, msg, warned in pool.imap_unordered(_prepare_one, jobs):
                    _record(report, cid, status, msg, warned)
                    bar.update(1)
    finally:
        bar.close()
    if not report.ok and created:
        import shutil

        shutil.rmtree(root, ignore_errors=True)  # every case failed: leave nothing behind
    return report


def _record(report: PrepareReport, cid: str, status: str, msg: str | None, warned: Sequence[str] = ()) -> None:
    import warnings

    from voxdiff.core.errors import VoxdiffWarning

    for w in warned:
        warnings.warn(w, VoxdiffWarning, stacklevel=3)
    if status == "done":
        report.done.append(cid)
    elif status == "cached":
        report.cached.append(cid)
    else:
        report.failed.append((cid, msg or "failed"))


def load_preprocessed(
    path_or_dataset: str | os.PathLike | Dataset,
    cfg: PreprocessConfig,
    cache_dir: str | os.PathLike | None = None,
    kind: str = "auto",
    split: str = "all",
    case_ids: Sequence[str] | None = None,
    mmap: bool = False,
    progress: bool = False,
    check_ct: bool = False,
    allow_non_ct: bool = False,
) -> list[Case]:
    """Preprocessed cases of a data set (the one call later stages use).

    With ``cache_dir`` cases are read from / added to the cache; without, they are preprocessed in
    memory. ``case_ids`` restricts to those cases (in that order); unknown ids are an error.
    ``check_ct``: an image that does not look like CT in HU (:mod:`voxdiff.data.ctcheck`) is an
    :class:`InputError` naming it, unless ``allow_non_ct``.
    """
    from tqdm import tqdm

    from .ctcheck import check_ct as _check

    ds = path_or_dataset if isinstance(path_or_dataset, Dataset) else open_dataset(path_or_dataset, kind=kind, split=split)
    refs = ds.refs
    if case_ids is not None:
        by_id = {r.case_id: r for r in ds.refs}
        missing = [c for c in case_ids if c not in by_id]
        if missing:
            raise InputError(ds.root, f"case ids not in the data set: {', '.join(missing[:5])}")
        refs = [by_id[c] for c in case_ids]
    cache = PreprocessCache(cache_dir, cfg) if cache_dir is not None else None
    out = []
    for r in tqdm(refs, desc="load", unit="case", disable=None if progress else True):
        if cache is not None:
            out.append(cache.get(r, ds, mmap=mmap, check=check_ct, allow_non_ct=allow_non_ct))
        else:
            raw = ds.load(r)
            if check_ct:
                _check(raw.image, r.image_path, allow_non_ct=allow_non_ct)
            out.append(preprocess(raw, cfg))
    return out
