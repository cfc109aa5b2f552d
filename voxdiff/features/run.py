"""The ``voxdiff features`` stage function: a data set in, a folder of per-case feature files out."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from ..core.config import check_window, to_dict, write_config
from ..core.errors import InputError
from ..core.outputs import atomic_write_json, check_output_path, staged_dir
from ..core.runtime import resolve_device
from .cache import case_meta, extract_case, feature_key, model_fingerprint, save_features
from .extract import CONDITION_MODES as _CONDITIONS
from .extract import ExtractConfig, window_plan, with_feature_settings
from .norm import NORM_STATS_FILE, NormStatsConfig

_MODES = ("gaussian", "constant")


def validate(cfg: ExtractConfig, extractor: Any) -> None:
    """Refuse bad settings with a one-line message before anything is written."""
    check_window(cfg.overlap, cfg.sw_batch_size)
    if cfg.mode not in _MODES:
        raise InputError(None, f"mode must be one of {', '.join(_MODES)}, got {cfg.mode!r}")
    if cfg.condition not in _CONDITIONS:
        raise InputError(None, f"condition must be one of {', '.join(_CONDITIONS)}, got {cfg.condition!r}")
    if cfg.dtype not in ("float16", "float32", "bfloat16"):
        raise InputError(None, f"dtype must be float16, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.roi is not None and (len(cfg.roi) != 3 or any(int(r) < 1 for r in cfg.roi)):
        raise InputError(None, f"roi must be 3 positive sizes, got {cfg.roi}")
    n = len(extractor.levels)
    if cfg.levels is not None:
        bad = [i for i in cfg.levels if not -n <= int(i) < n]
        if bad or not cfg.levels:
            raise InputError(getattr(extractor, "path", None), f"levels {list(cfg.levels)} do not exist (the model has levels 0..{n - 1})")


def features_command(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                     cfg: ExtractConfig | None = None, data_kind: str = "auto", split: str = "all",
                     case_ids: Sequence[str] | None = None, cache_dir: str | os.PathLike | None = None,
                     force: bool = False, progress: bool = True, allow_non_ct: bool = False,
                     log: Callable[[str], Any] | None = None, norm: NormStatsConfig | None = None) -> Path:
    """Features of every case of ``data`` with ``model`` into folder ``out`` (atomic: all or nothing).

    A case whose image does not look like CT in HU (:mod:`voxdiff.data.ctcheck`) stops the run with
    an :class:`InputError` naming it (nothing is written), unless ``allow_non_ct``. ``log`` (the CLI
    passes a printer) gets one line per case: its grid, the windows (count, size, step, effective
    overlap, :class:`~voxdiff.features.extract.WindowPlan`) and the seconds it took.

    ``norm`` (:class:`~voxdiff.features.norm.NormStatsConfig`): with ``norm_stats`` fixed, the
    backbone normalises every window with one set of GroupNorm statistics, estimated on crops of up
    to ``norm_cases`` of the cases (evenly spaced) or read from ``norm_from``; they are written to
    ``OUT/norm_stats.safetensors`` (with the model's SHA-256) and enter the features' key."""
    from ..data.adapters import open_dataset
    from ..data.cache import load_preprocessed
    from ..pretrain.load import load_pretrained

    cfg = cfg or ExtractConfig()
    norm = norm or NormStatsConfig()
    _check_norm(norm)
    check_output_path(out, force=force, inputs=(model, data))
    device = resolve_device(cfg.device)
    extractor = load_pretrained(model, device=device)
    with_feature_settings(extractor, cfg)
    validate(cfg, extractor)
    ds = open_dataset(data, kind=data_kind, split=split)
    refs = ds.refs
    if case_ids:
        known = {r.case_id for r in refs}
        missing = [c for c in case_ids if c not in known]
        if missing:
            raise InputError(data, f"case ids not in the data set: {', '.join(missing[:5])}")
        refs = [r for r in refs if r.case_id in set(case_ids)]
    if not refs:
        raise InputError(data, "no cases found")
    fingerprint = model_fingerprint(extractor)
    load = lambda ids: load_preprocessed(ds, extractor.preprocess, cache_dir=cache_dir, case_ids=ids,  # noqa: E731
                                         check_ct=True, allow_non_ct=allow_non_ct)
    norm_doc, stats, loaded = _apply_norm(extractor, norm, fingerprint, [r.case_id for r in refs], load, log)
    key = feature_key(extractor, cfg, fingerprint)  # (after the statistics: fixed ones enter the key)
    index: dict[str, Any] = {"format": "voxdiff-features", "key": key, "model": str(model), "model_sha256": fingerprint,
                             "method": extractor.method, "settings": to_dict(cfg), "norm_stats": norm_doc, "cases": []}
    with staged_dir(out, force=force) as tmp:
        if stats:
            from .norm import save_norm_stats

            save_norm_stats(tmp / NORM_STATS_FILE, stats, {k: v for k, v in norm_doc.items() if k != "file"})
        bar = tqdm(refs, desc="features", unit="case", disable=not progress)
        for ref in bar:
            bar.set_postfix_str(ref.case_id)
            case = loaded.pop(ref.case_id) if ref.case_id in loaded else load([ref.case_id])[0]
            t0 = time.perf_counter()
            pyr = extract_case(extractor, case, cfg, progress=progress)  # window bar: a case can take minutes
            meta = case_meta(extractor, case, cfg, pyr, key, fingerprint)
            meta["seconds"] = round(time.perf_counter() - t0, 3)
            meta["device"] = str(device)
            save_features(tmp / f"{case.case_id}.safetensors", pyr, meta, [lv["index"] for lv in meta["levels"]])
            index["cases"].append({"case_id": case.case_id, "file": f"{case.case_id}.safetensors",
                                   "shape": meta["shape"], "levels": meta["levels"],
                                   "windows": meta["windows"]["count"],
                                   "effective_overlap": meta["windows"]["effective_overlap"]})
            if log is not None:
                plan = window_plan(extractor, meta["shape"], cfg.roi, cfg.overlap)
                log(f"{case.case_id}: {'x'.join(map(str, meta['shape']))} voxels, {plan.summary()}, "
                    f"{meta['seconds']:.1f} s on {device}")
            del pyr, case
        atomic_write_json(tmp / "features.json", index)
        write_config(tmp / "config.yaml", cfg, extra={"model": str(model), "data": str(data), "data_kind": data_kind,
                                                      "split": split, "key": key, "norm": to_dict(norm)})
    return Path(out)


def _check_norm(norm: NormStatsConfig) -> None:
    from .norm import check_norm_config

    try:
        check_norm_config(norm)
    except ValueError as e:
        raise InputError(None, str(e)) from None


def _apply_norm(extractor: Any, norm: NormStatsConfig, fingerprint: str, case_ids: Sequence[str],
                load: Callable[[list[str]], list[Any]], log: Callable[[str], Any] | None
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Set the extractor's GroupNorm statistics as ``norm`` says. Returns what the index records, the
    statistics (empty for window ones) and the cases loaded to estimate them (by id, kept so that
    extraction does not load and preprocess them again)."""
    import numpy as np

    from .cache import _case_image_unit
    from .norm import estimate_norm_stats, fix_group_norms, load_norm_stats, norm_stats_file, stats_digest

    loaded: dict[str, Any] = {}
    if norm.norm_stats == "window":
        return {"mode": "window"}, {}, loaded
    if not isinstance(getattr(extractor, "backbone", None), torch.nn.Module):
        raise InputError(getattr(extractor, "path", None), "fixed normalisation statistics need a model with a backbone module")
    if norm.norm_from is not None:
        src = norm_stats_file(norm.norm_from)
        try:
            stats, meta = load_norm_stats(src)
        except ValueError as e:
            raise InputError(src, str(e)) from None
        if meta.get("model_sha256") not in (None, fingerprint):
            raise InputError(src, f"these statistics were estimated with another model (SHA-256 {meta['model_sha256'][:12]}..., "
                                  f"this one {fingerprint[:12]}...)")
        doc: dict[str, Any] = {"mode": "fixed", "from": str(norm.norm_from), **{k: meta[k] for k in ("cases",) if k in meta},
                               **{k: int(meta[k]) for k in ("crops", "seed") if str(meta.get(k, "")).isdigit()}}
    else:
        k = min(int(norm.norm_cases), len(case_ids))
        ids = [case_ids[int(i)] for i in np.unique(np.linspace(0, len(case_ids) - 1, k).round().astype(int))]
        loaded = {c.case_id: c for c in load(ids)}
        units = [_case_image_unit(extractor, c) for c in loaded.values()]
        try:
            stats = estimate_norm_stats(extractor, units, n=int(norm.norm_crops), seed=int(norm.norm_seed))
        except ValueError as e:
            raise InputError(None, str(e)) from None
        del units
        doc = {"mode": "fixed", "crops": int(norm.norm_crops), "seed": int(norm.norm_seed), "cases": ",".join(ids)}
    if not stats:  # (e.g. a backbone with BatchNorm, whose statistics are fixed already in eval mode)
        raise InputError(getattr(extractor, "path", None), "this model has no GroupNorm layers whose statistics could be fixed")
    try:
        fix_group_norms(extractor.backbone, stats)
    except ValueError as e:
        raise InputError(norm.norm_from, f"these statistics do not fit the model ({e})") from None
    doc.update(model_sha256=fingerprint, digest=stats_digest(stats), file=NORM_STATS_FILE)
    if log is not None:
        log(f"fixed normalisation statistics ({len(stats)} GroupNorms) "
            + (f"from {norm.norm_from}" if norm.norm_from else f"from {doc['crops']} crops of {doc['cases']}"))
    return doc, stats, loaded
