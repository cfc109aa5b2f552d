"""The ``voxdiff features`` stage function: a data set in, a folder of per-case feature files out."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from ..core.config import check_window, to_dict, write_config
from ..core.errors import InputError
from ..core.outputs import atomic_write_json, check_output_path, staged_dir
from ..core.runtime import resolve_device
from .cache import case_meta, extract_case, feature_key, model_fingerprint, save_features
from .extract import CONDITION_MODES as _CONDITIONS
from .extract import ExtractConfig, window_plan, with_feature_settings

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
                     log: Callable[[str], Any] | None = None) -> Path:
    """Features of every case of ``data`` with ``model`` into folder ``out`` (atomic: all or nothing).

    A case whose image does not look like CT in HU (:mod:`voxdiff.data.ctcheck`) stops the run with
    an :class:`InputError` naming it (nothing is written), unless ``allow_non_ct``. ``log`` (the CLI
    passes a printer) gets one line per case: its grid, the windows (count, size, step, effective
    overlap, :class:`~voxdiff.features.extract.WindowPlan`) and the seconds it took."""
    from ..data.adapters import open_dataset
    from ..data.cache import load_preprocessed
    from ..pretrain.load import load_pretrained

    cfg = cfg or ExtractConfig()
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
    key = feature_key(extractor, cfg, fingerprint)
    index: dict[str, Any] = {"format": "voxdiff-features", "key": key, "model": str(model), "model_sha256": fingerprint,
                             "method": extractor.method, "settings": to_dict(cfg), "cases": []}
    with staged_dir(out, force=force) as tmp:
        bar = tqdm(refs, desc="features", unit="case", disable=not progress)
        for ref in bar:
            bar.set_postfix_str(ref.case_id)
            case = load_preprocessed(ds, extractor.preprocess, cache_dir=cache_dir, case_ids=[ref.case_id],
                                     check_ct=True, allow_non_ct=allow_non_ct)[0]
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
                                                      "split": split, "key": key})
    return Path(out)
