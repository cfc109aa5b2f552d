"""Evaluation of segmenters on labelled data: per case x organ metrics, fold and CV aggregates,
``summary.json`` / ``summary.md`` / PNG figures."""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from voxdiff.core.config import Bf16Renamed, check_window
from voxdiff.core.errors import InputError
from voxdiff.core.runtime import resolve_device
from voxdiff.data.labels import BTCV_LABELS, SIZE_GROUPS

from . import metrics as M


@dataclass
class EvaluateConfig(Bf16Renamed):
    """Options of ``voxdiff evaluate``.

    Args:
        head: which head of a probe run to evaluate (linear, nonlinear, mix, finetune, scratch) when
            the model folder holds several.
        cases: which labelled cases: auto (the fold's held-out cases recorded in the model when the
            data set is the one it was trained on, else all labelled cases), test (imagesTs), train
            (imagesTr), all.
        surface: also compute HD95 and normalised surface Dice (slower).
        tau_mm: surface Dice tolerance in mm.
        overlap: sliding-window overlap (null = the model's).
        sw_batch_size: windows per forward pass.
        figures: number of cases with axial/coronal overlay figures.
        device: auto, cpu or cuda.
        bf16: bf16 autocast for the feature extractor where the device computes bf16 natively (fp32
            elsewhere).
        n_classes: label classes incl. background.
        amp: deprecated: the old name of ``bf16`` (still accepted, with a warning).
    """

    head: str = "nonlinear"
    cases: str = "auto"
    surface: bool = False
    tau_mm: float = 2.0
    overlap: float | None = None
    sw_batch_size: int = 2
    figures: int = 2
    device: str = "auto"
    bf16: bool = False
    n_classes: int = 14
    amp: InitVar[bool | None] = None  # the old name of bf16 (Bf16Renamed)


def _named(scores: dict[int, float]) -> dict[str, float | None]:
    return {BTCV_LABELS.get(int(k), str(k)): _num(v) for k, v in scores.items()}


def _num(v):
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else round(v, 6)


def _clean(obj):
    """NaN/inf -> null, int keys -> organ names where they are organ ids, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def evaluate_cases(
    extractor,
    head,
    cases: Iterable,
    preprocess=None,
    roi: Sequence[int] = (96, 96, 64),
    overlap: float = 0.5,
    n_classes: int = 14,
    surface: bool = False,
    tau_mm: float = 2.0,
    device: str | None = None,
    amp: bool = False,
    sw_batch_size: int = 2,
    figures_dir: str | os.PathLike | None = None,
    n_figures: int = 0,
    progress: bool = True,
    predict=None,
) -> dict[str, Any]:
    """Predict every raw labelled case (file grid) and score it on that grid.

    ``predict``: optional ``f(raw_case) -> labels on the file grid`` used instead of sliding-window
    prediction with ``extractor`` + ``head`` (e.g. ``Segmenter.predict`` of a whole-volume bundle).

    Returns ``{"cases": {case_id: {"dice": {organ_id: v}, ["hd95", "surface_dice"]}},
    "aggregate": aggregate_cases(dice)}`` (plus ``aggregate_hd95`` / ``aggregate_surface_dice``).
    """
    from tqdm.auto import tqdm

    from voxdiff.probe.predict import predict_original

    per_case: dict[str, dict[str, dict[int, float]]] = {}
    figs = 0
    for case in tqdm(cases, desc="evaluate", unit="case", disable=None if progress else True):
        if case.label is None:
            raise InputError(case.meta.image_path, "case has no label map to evaluate against")
        if predict is not None:
            pred = predict(case)
        else:
            pred, _ = predict_original(extractor, head, case, preprocess, roi, overlap, device=device, amp=amp,
                                       sw_batch_size=sw_batch_size)
        sp = tuple(float(s) for s in case.meta.spacing)
        per_case[case.case_id] = M.case_metrics(pred, np.asarray(case.label), n_classes, sp, surface, tau_mm)
        if figures_dir is not None and figs < n_figures:
            from .figures import overlay_figure

            overlay_figure(case.image, pred, Path(figures_dir) / f"overlay_{case.case_id}.png", gt=case.label,
                           affine=case.meta.affine, title=f"{case.case_id}: mean Dice "
                           f"{M.mean_over_organs(per_case[case.case_id]['dice']):.3f}")
            figs += 1
    out: dict[str, Any] = {"cases": per_case,
                           "aggregate": M.aggregate_cases({c: v["dice"] for c, v in per_case.items()}, n_classes)}
    if surface:
        for k in ("hd95", "surface_dice"):
            out[f"aggregate_{k}"] = M.aggregate_cases({c: v[k] for c, v in per_case.items()}, n_classes)
    return out


# ------------------------------------------------------------------------------------ model folders


def find_models(path: str | os.PathLike, head: str = "nonlinear") -> list[Path]:
    """Segmenter bundles under ``path``: the bundle itself, ``path/<head>/`` of a probe run, or
    ``path/fold_*/[<head>/]`` of a cross-validation root (one per fold, sorted by fold)."""
    p = Path(path)
    if (p / "segmenter.json").is_file():
        return [p]
    if (p / head / "segmenter.json").is_file():
        return [p / head]
    folds = []
    for d in sorted(p.glob("fold_*")):
        m = re.fullmatch(r"fold_(\d+)", d.name)
        if not m or not d.is_dir():
            continue
        if (d / "segmenter.json").is_file():
            folds.append((int(m.group(1)), d))
        elif (d / head / "segmenter.json").is_file():
            folds.append((int(m.group(1)), d / head))
    if folds:
        return [d for _, d in sorted(folds)]
    if not p.exists():
        raise InputError(p, "model folder not found")
    raise InputError(p, f"no segmenter found (expected segmenter.json, {head}/segmenter.json or fold_*/...)")


def _cases_for(model_doc: dict, data_dir: Path, cfg: EvaluateConfig):
    from voxdiff.data.adapters import open_dataset

    meta = model_doc.get("meta") or {}
    same_data = meta.get("data") and Path(meta["data"]).resolve() == data_dir.resolve()
    choice = cfg.cases
    if choice == "auto":
        choice = "fold" if same_data and meta.get("test_cases") else "all"
    if choice == "fold":
        ds = open_dataset(data_dir, split="train")
        ids = list(meta.get("test_cases") or [])
        if not ids:
            raise InputError(data_dir, "the model records no held-out cases for its fold")
        by = {r.case_id: r for r in ds.refs}
        missing = [c for c in ids if c not in by]
        if missing:
            raise InputError(data_dir, f"held-out cases of the model not in the data set: {', '.join(missing[:5])}")
        refs = [by[c] for c in ids]
    elif choice in ("test", "train", "all"):
        ds = open_dataset(data_dir, split=choice)
        refs = ds.labelled
    else:
        raise InputError(None, f"unknown case selection '{cfg.cases}' (auto, fold, test, train, all)")
    if not refs:
        raise InputError(data_dir, f"no labelled cases to evaluate (cases={choice})")
    return ds, refs, choice


def validate(cfg: EvaluateConfig) -> None:
    """Refuse settings that cannot be meant, with one line, before anything is read or written."""
    check_window(cfg.overlap, cfg.sw_batch_size)
    if not float(cfg.tau_mm) > 0:
        raise InputError(None, f"tau_mm (the surface Dice tolerance) must be > 0 mm, got {cfg.tau_mm}")
    if int(cfg.figures) < 0:
        raise InputError(None, f"figures must be >= 0, got {cfg.figures}")
    if int(cfg.n_classes) < 2:
        raise InputError(None, f"n_classes (background included) must be >= 2, got {cfg.n_classes}")


def evaluate_models(
    model: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: EvaluateConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate one segmenter or one per fold (cross-validation) on ``data_dir``; write
    ``summary.json``, ``summary.md``, ``figures/`` and ``config.yaml`` into ``out_dir``."""
    from voxdiff.core.config import write_config
    from voxdiff.core.outputs import atomic_write, atomic_write_json, check_output_path, staged_dir
    from voxdiff.probe.bundle import load_segmenter

    cfg = cfg or EvaluateConfig()
    validate(cfg)
    data = Path(data_dir)
    check_output_path(out_dir, force=force, inputs=(model, data))
    models = find_models(model, cfg.head)
    device = resolve_device(cfg.device)
    t0 = time.time()
    with staged_dir(out_dir, force=force) as tmp:
        figdir = tmp / "figures"
        figdir.mkdir()
        folds = []
        for i, mdir in enumerate(models):
            seg = load_segmenter(mdir, device=device)
            if cfg.overlap is not None:  # the whole-volume path (seg.predict) reads it from the segmenter
                seg.overlap = float(cfg.overlap)
            ds, refs, choice = _cases_for(seg.info, data, cfg)
            fold = (seg.info.get("meta") or {}).get("fold")
            res = evaluate_cases(
                seg.extractor, seg.head, (ds.load(r) for r in refs), seg.preprocess, seg.roi,
                seg.overlap if cfg.overlap is None else cfg.overlap, cfg.n_classes, cfg.surface, cfg.tau_mm,
                device, cfg.bf16, cfg.sw_batch_size, figdir, cfg.figures if i == 0 else 0, progress,
                predict=(lambda c, seg=seg: seg.predict(c, device=device, amp=cfg.bf16))
                if seg.info.get("inference") == "volume" else None,
            )
            folds.append({"fold": fold if fold is not None else i, "model": str(Path(mdir).resolve()), "cases_from": choice,
                          "mode": seg.info.get("mode"), "method": seg.info.get("method"), **res})
        all_cases = {f"{f['fold']}/{c}" if len(folds) > 1 else c: v["dice"] for f in folds for c, v in f["cases"].items()}
        pooled = M.aggregate_cases(all_cases, cfg.n_classes)
        cv = M.aggregate_folds([f["aggregate"] for f in folds]) if len(folds) > 1 else None
        summary = {
            "data": str(data.resolve()),
            "config": cfg,
            "n_folds": len(folds),
            "folds": [_fold_json(f) for f in folds],
            "pooled": _agg_json(pooled),
            "cross_validation": None if cv is None else _cv_json(cv),
            "seconds": round(time.time() - t0, 1),
        }
        summary = _clean(_to_plain(summary))
        atomic_write_json(tmp / "summary.json", summary)
        atomic_write(tmp / "summary.md", summary_markdown(summary))
        from .figures import organ_bar_chart

        if cv is not None:
            organ_bar_chart({o: v["mean"] for o, v in cv["per_organ"].items()}, figdir / "dice_per_organ.png",
                            std={o: v["std"] for o, v in cv["per_organ"].items()},
                            title=f"Dice per organ, {len(folds)}-fold CV (mean +- std)",
                            groups={g: v["mean"] for g, v in cv["groups"].items()})
        else:
            organ_bar_chart(pooled["per_organ"], figdir / "dice_per_organ.png",
                            title=f"Dice per organ ({pooled['n_cases']} cases)", groups=pooled["groups"])
        write_config(tmp, cfg, extra={"model": str(Path(model).resolve()), "data": str(data.resolve())})
    return summary


def _to_plain(obj):
    from voxdiff.core.config import to_dict

    return to_dict(obj)


def _agg_json(a: dict) -> dict:
    return {"mean": a["mean"], "mean_of_cases": a["mean_of_cases"], "groups": a["groups"],
            "per_organ": _named(a["per_organ"]), "n_cases": a["n_cases"]}


def _cv_json(cv: dict) -> dict:
    return {"mean": cv["mean"], "groups": cv["groups"],
            "per_organ": {BTCV_LABELS.get(int(o), str(o)): v for o, v in cv["per_organ"].items()}, "n_folds": cv["n_folds"]}


def _fold_json(f: dict) -> dict:
    out = {k: f[k] for k in ("fold", "model", "cases_from", "mode", "method")}
    out["cases"] = {c: {m: _named(v) for m, v in res.items()} for c, res in f["cases"].items()}
    out["aggregate"] = _agg_json(f["aggregate"])
    for k in ("aggregate_hd95", "aggregate_surface_dice"):
        if k in f:
            out[k] = _agg_json(f[k])
    return out


def _fmt(v, std=None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if std is None else f"{v:.3f} +- {std:.3f}"


def summary_markdown(s: dict) -> str:
    """Markdown tables of a ``summary.json`` document."""
    lines = [f"# Evaluation on `{s['data']}`", ""]
    organs = [BTCV_LABELS[i] for i in range(1, 14)]
    cv = s.get("cross_validation")
    if cv:
        lines += [f"## {cv['n_folds']}-fold cross-validation (mean +- std over folds)", "",
                  "| organ | Dice |", "|---|---|"]
        for o in organs:
            v = cv["per_organ"].get(o) or {}
            lines.append(f"| {o} | {_fmt(v.get('mean'), v.get('std'))} |")
        for g, v in cv["groups"].items():
            lines.append(f"| **{g}** | {_fmt(v.get('mean'), v.get('std'))} |")
        lines.append(f"| **mean** | {_fmt(cv['mean'].get('mean'), cv['mean'].get('std'))} |")
        lines.append("")
    lines += ["## Per fold", "", "| fold | mode | cases | " + " | ".join(SIZE_GROUPS) + " | mean |",
              "|---|---|---|" + "---|" * len(SIZE_GROUPS) + "---|"]
    for f in s["folds"]:
        a = f["aggregate"]
        lines.append(f"| {f['fold']} | {f['mode']} | {a['n_cases']} | "
                     + " | ".join(_fmt(a["groups"].get(g)) for g in SIZE_GROUPS) + f" | {_fmt(a['mean'])} |")
    lines += ["", "## Per case (Dice)", "", "| fold | case | " + " | ".join(organs) + " | mean |",
              "|---|---|" + "---|" * (len(organs) + 1)]
    for f in s["folds"]:
        for c, res in f["cases"].items():
            d = res["dice"]
            vals = [d.get(o) for o in organs]
            finite = [v for v in vals if v is not None]
            lines.append(f"| {f['fold']} | {c} | " + " | ".join(_fmt(v) for v in vals)
                         + f" | {_fmt(float(np.mean(finite)) if finite else None)} |")
    lines += ["", "n/a: organ absent from both ground truth and prediction (not scored).", ""]
    return "\n".join(lines)
