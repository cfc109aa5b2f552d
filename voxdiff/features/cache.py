"""Per-case feature files (float16 safetensors + JSON) and a cache keyed by model and settings.

A feature file ``<case_id>.safetensors`` holds one tensor per pyramid level (``level0``, ``level2``,
... named by level index, shape ``(C_l, X_l, Y_l, Z_l)``); ``<case_id>.json`` beside it says what they
are: the model (folder, SHA-256 of its weights, method, feature timesteps), the levels (channels,
stride, shape), the extraction settings, the windows used (``windows``: window size, step, counts,
effective overlap, :meth:`~voxdiff.features.extract.WindowPlan.describe`), the preprocessing, the
case's grid (shape, affine, spacing) and a digest of the preprocessed image.

:class:`FeatureCache` stores such files under ``root/<key>/`` where ``key`` is a digest of the model
weights, its task configuration (timesteps, noise seed, conditioning), the preprocessing and the
extraction settings: retraining the model, or asking for other timesteps or levels, uses another
folder, and a case whose preprocessed image changed is recomputed. :func:`case_features` streams
``(case, pyramid)`` pairs, from the cache or computed on the fly without one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.config import to_dict
from ..core.errors import InputError
from ..core.outputs import atomic_path, atomic_write_json
from ..data.preprocess import HU_WINDOW
from .extract import ExtractConfig, extract_volume, select_levels, window_plan, with_feature_settings
from .norm import fixed_norm_stats, stats_digest

FORMAT = "voxdiff-features"
FORMAT_VERSION = 1
# how windows are placed and blended; part of the cache key so that features from an older scheme
# are recomputed (2: exact overlap with aligned windows, own per-level stitching, default window =
# the model's training patch)
EXTRACTION_VERSION = 2
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def model_fingerprint(extractor: Any) -> str:
    """SHA-256 of the model's weights file, or of its parameters when it has no folder."""
    path = getattr(extractor, "path", None)
    if path is not None and (Path(path) / "model.safetensors").is_file():
        return _sha256_file(Path(path) / "model.safetensors")
    h = hashlib.sha256()
    for k, v in sorted(extractor.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def image_digest(image: np.ndarray) -> str:
    a = np.ascontiguousarray(image)
    h = hashlib.sha1(a.view(np.uint8).reshape(-1).data)
    h.update(str((a.shape, a.dtype.str)).encode())
    return h.hexdigest()


def timesteps_of(extractor: Any) -> list[int] | None:
    opts = getattr(getattr(extractor, "task", None), "opts", None)
    ts = getattr(opts, "feature_timesteps", None)
    return None if ts is None else [int(t) for t in ts]


def task_options_of(extractor: Any) -> dict[str, Any]:
    opts = getattr(getattr(extractor, "task", None), "opts", None)
    if opts is not None and dataclasses.is_dataclass(opts):
        return to_dict(opts)
    return {}


def settings_of(cfg: ExtractConfig) -> dict[str, Any]:
    """The extraction settings that change the features (``device`` does not)."""
    d = to_dict(cfg)
    d.pop("device", None)
    if d.get("feature_side") == "decoder":  # the pyramid of every cache written before the option
        d.pop("feature_side")
    return d


def feature_key(extractor: Any, cfg: ExtractConfig, fingerprint: str | None = None) -> str:
    doc = {
        "format": FORMAT_VERSION,
        "extraction": EXTRACTION_VERSION,
        "model": fingerprint or model_fingerprint(extractor),
        "method": getattr(extractor, "method", None),
        "task": task_options_of(extractor),
        "timesteps": timesteps_of(extractor),
        "preprocess": to_dict(getattr(extractor, "preprocess", None)),
        "settings": settings_of(cfg),
    }
    norm = stats_digest(fixed_norm_stats(extractor.backbone)) if isinstance(getattr(extractor, "backbone", None), torch.nn.Module) else None
    if norm:  # fixed GroupNorm statistics (absent otherwise, so the keys of earlier caches stay valid)
        doc["norm_stats"] = norm
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ------------------------------------------------------------------------------------------------
# files


def save_features(path: str | os.PathLike, pyramid: list[torch.Tensor], meta: dict[str, Any],
                  level_indices: list[int] | None = None) -> Path:
    """Write ``pyramid`` (tensors ``(1, C, ...)`` or ``(C, ...)``) and ``meta`` atomically.

    ``path`` is the ``.safetensors`` file; the JSON goes beside it (written last)."""
    st = Path(path)
    if st.suffix != ".safetensors":
        st = st.with_name(st.name + ".safetensors")
    idx = level_indices if level_indices is not None else list(range(len(pyramid)))
    tensors = {}
    for i, f in zip(idx, pyramid):
        t = f[0] if f.ndim == 5 else f
        tensors[f"level{i}"] = t.detach().cpu().contiguous()
    st.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(st) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **to_dict(meta)}
    atomic_write_json(st.with_suffix(".json"), doc)
    return st


def read_feature_meta(path: str | os.PathLike) -> dict[str, Any]:
    st = Path(path)
    js = st.with_suffix(".json") if st.suffix == ".safetensors" else st.with_name(st.name + ".json")
    if not js.is_file():
        raise InputError(js, "feature metadata file not found")
    try:
        doc = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(js, "not a voxdiff feature description (invalid JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(js, "not a voxdiff feature description")
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(js, f"feature format version {doc.get('format_version')} is newer than this voxdiff supports")
    return doc


def load_features(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """``(pyramid as (1, C, ...) tensors in level order, metadata)``; ``dtype`` converts on load."""
    st = Path(path)
    if st.suffix != ".safetensors":
        st = st.with_name(st.name + ".safetensors")
    meta = read_feature_meta(st)
    if not st.is_file():
        raise InputError(st, "feature file not found")
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(st, f"unreadable feature file ({e})") from None
    order = [int(lv["index"]) for lv in meta.get("levels", [])] or sorted(int(k[5:]) for k in tensors)
    pyr = []
    for i in order:
        t = tensors[f"level{i}"][None]
        pyr.append(t if dtype is None else t.to(dtype))
    return pyr, meta


# ------------------------------------------------------------------------------------------------
# cases


def _case_image_unit(extractor: Any, case: Any) -> np.ndarray:
    from ..data.preprocess import hu_to_unit

    pre = getattr(extractor, "preprocess", None)
    window = getattr(pre, "hu_window", HU_WINDOW)
    return hu_to_unit(np.asarray(case.image, dtype=np.float32), window)


def extract_case(extractor: Any, case: Any, cfg: ExtractConfig | None = None, progress: bool = False
                 ) -> list[torch.Tensor]:
    """Features of a preprocessed case (HU image, as ``voxdiff.data.cache.load_preprocessed`` gives)."""
    cfg = cfg or ExtractConfig()
    if cfg.dtype not in _DTYPES:
        raise InputError(None, f"dtype must be one of {sorted(_DTYPES)}, got {cfg.dtype!r}")
    return extract_volume(extractor, _case_image_unit(extractor, case), roi=cfg.roi, overlap=cfg.overlap,
                          levels=cfg.levels, sw_batch_size=cfg.sw_batch_size, out_dtype=_DTYPES[cfg.dtype],
                          upsample=cfg.upsample, progress=progress, mode=cfg.mode, condition=cfg.condition,
                          bf16=cfg.bf16)


def case_meta(extractor: Any, case: Any, cfg: ExtractConfig, pyramid: list[torch.Tensor], key: str,
              fingerprint: str) -> dict[str, Any]:
    idx = list(range(len(extractor.levels))) if cfg.levels is None else [int(i) % len(extractor.levels) for i in cfg.levels]
    levels = select_levels(extractor, idx)
    m = getattr(case, "meta", None)
    return {
        "case_id": getattr(case, "case_id", None),
        "key": key,
        "model": {"path": str(getattr(extractor, "path", "") or ""), "sha256": fingerprint,
                  "method": getattr(extractor, "method", None)},
        "t": timesteps_of(extractor),
        "task": task_options_of(extractor),
        "levels": [{"index": i, "name": lv.name, "channels": int(f.shape[1]), "stride": 1 if cfg.upsample else int(lv.stride),
                    "model_stride": int(lv.stride), "shape": list(f.shape[2:])}
                   for i, lv, f in zip(idx, levels, pyramid)],
        "settings": settings_of(cfg),
        "windows": window_plan(extractor, np.asarray(case.image).shape, cfg.roi, cfg.overlap).describe(),
        "preprocess": to_dict(getattr(extractor, "preprocess", None)),
        "shape": [int(s) for s in np.asarray(case.image).shape],
        "affine": None if m is None else np.asarray(m.affine, dtype=float).tolist(),
        "spacing": None if m is None else [float(s) for s in m.spacing],
        "image_sha1": image_digest(np.asarray(case.image)),
    }


class FeatureCache:
    """Feature files of many cases for one (model, settings) pair under ``root/<key>/``."""

    def __init__(self, root: str | os.PathLike, extractor: Any, cfg: ExtractConfig | None = None):
        self.extractor = extractor
        self.cfg = cfg or ExtractConfig()
        with_feature_settings(extractor, self.cfg)
        self.fingerprint = model_fingerprint(extractor)
        self.key = feature_key(extractor, self.cfg, self.fingerprint)
        self.root = Path(root)
        self.dir = self.root / self.key

    def path(self, case_id: str) -> Path:
        return self.dir / f"{case_id}.safetensors"

    def has(self, case: Any) -> bool:
        st = self.path(case.case_id)
        if not (st.is_file() and st.with_suffix(".json").is_file()):
            return False
        try:
            meta = read_feature_meta(st)
        except InputError:
            return False
        return meta.get("key") == self.key and meta.get("image_sha1") == image_digest(np.asarray(case.image))

    def get(self, case: Any, progress: bool = False, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Cached features of ``case`` (computed and stored when missing or stale)."""
        if self.has(case):
            return load_features(self.path(case.case_id), dtype=dtype)[0]
        pyr = extract_case(self.extractor, case, self.cfg, progress=progress)
        self.put(case, pyr)
        return pyr if dtype is None else [f.to(dtype) for f in pyr]

    def put(self, case: Any, pyramid: list[torch.Tensor]) -> Path:
        meta = case_meta(self.extractor, case, self.cfg, pyramid, self.key, self.fingerprint)
        if not (self.dir / "cache.json").is_file():
            atomic_write_json(self.dir / "cache.json", {k: v for k, v in meta.items()
                                                       if k in ("key", "model", "t", "task", "settings", "preprocess")})
        return save_features(self.path(case.case_id), pyramid, meta, [lv["index"] for lv in meta["levels"]])


def case_features(extractor: Any, cases: Iterable[Any], cfg: ExtractConfig | None = None,
                  cache_dir: str | os.PathLike | None = None, progress: bool = False
                  ) -> Iterator[tuple[Any, list[torch.Tensor]]]:
    """Stream ``(case, pyramid)``: from/into a :class:`FeatureCache` when ``cache_dir`` is given,
    otherwise computed on the fly and not kept (one case's features in memory at a time)."""
    cfg = cfg or ExtractConfig()
    if cache_dir is not None:
        cache = FeatureCache(cache_dir, extractor, cfg)
        for case in cases:
            yield case, cache.get(case, progress=progress)
        return
    with_feature_settings(extractor, cfg)
    for case in cases:
        yield case, extract_case(extractor, case, cfg, progress=progress)
