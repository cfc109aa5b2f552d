"""``compare``, ``timesteps`` and ``label-efficiency``: the paper's table and figure on any data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from voxdiff.core.outputs import atomic_write, atomic_write_json
from voxdiff.evaluate.metrics import aggregate_cases, aggregate_folds

from . import report
from .base import Experiment, ExperimentConfig, method_parts, scores_to_per_case


def _aggregate(fold_results: list[dict[str, Any]], head: str) -> dict[str, Any]:
    per_fold = [aggregate_cases(scores_to_per_case(r["scores"][head])) for r in fold_results]
    return {"folds": per_fold, "summary": aggregate_folds(per_fold),
            "per_case": {k: v for r in fold_results for k, v in r["scores"][head].items()}}


def _n_folds(exp: Experiment) -> int:
    return 1 if exp.cfg.folds == 0 else exp.cfg.folds


def compare(cfg: ExperimentConfig, out: str | Path, force: bool = False, log: Callable[[str], None] = print,
            notes: list[str] | None = None) -> dict[str, Any]:
    """Method x {linear, non-linear} probing, fine-tuned backbones (``cfg.finetune``) and
    from-scratch: the paper's main table. ``notes``: paragraphs for the report, under the table."""
    exp = Experiment(cfg, out, force=force, log=log)
    rows: list[dict[str, Any]] = []
    for method in cfg.methods:
        model = exp.pretrained(method)
        folds = [exp.probe(f"probe-{method}-f{k}", model, k, tuple(cfg.heads)) for k in range(_n_folds(exp))]
        for head in cfg.heads:
            rows.append({"method": method, "head": head, **_aggregate(folds, head),
                         "head_parameters": folds[0]["head_parameters"][head],
                         "backbone_parameters": folds[0]["backbone_parameters"]})
    for method in finetuned_methods(cfg):
        model = exp.pretrained(method)
        folds = [exp.tuned(f"finetune-{method}-f{k}", k, "finetune", model) for k in range(_n_folds(exp))]
        rows.append({"method": method, "head": "fine-tuned", **_aggregate(folds, "finetune"),
                     "steps": folds[0].get("max_steps")})
    if cfg.scratch:
        folds = [exp.scratch(f"scratch-f{k}", k) for k in range(_n_folds(exp))]
        rows.append({"method": "from-scratch", "head": "end-to-end", **_aggregate(folds, "scratch"),
                     "steps": folds[0].get("max_steps")})
    pre = {m: exp.runner.result(f"pretrain-{m}") for m in cfg.methods}
    bprs = {k: exp.runner.result(f"bpr-{k}") for k in ("ape", "slice") if exp.runner.done(f"bpr-{k}")}
    results = {"experiment": "compare", "config": cfg, "budget": exp.budget, "rows": rows, "pretraining": pre,
               "bpr": bprs, "seconds": round(exp.elapsed(), 1)}
    atomic_write_json(exp.out / "results.json", _plain(results))
    figs = report.compare_figures(rows, exp.out)
    atomic_write(exp.out / "report.md", report.compare_markdown(results, figs, notes))
    return results


def timesteps(cfg: ExperimentConfig, out: str | Path, force: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Dice against the feature timestep t, and against the number of training steps T (paper Fig. 2)."""
    exp = Experiment(cfg, out, force=force, log=log)
    method = cfg.timestep_method
    if method_parts(method)[0] != "diffusion":
        raise ValueError(f"timesteps needs a diffusion method, got {method!r}")
    ts = tuple(cfg.timesteps) or tuple(exp.budget["timesteps"])
    Ts = tuple(cfg.train_T) or tuple(exp.budget["train_T"])
    heads = tuple(cfg.heads)
    model = exp.pretrained(method)
    by_t = []
    for t in ts:
        folds = [exp.probe(f"t-sweep/{method}-t{t}-f{k}", model, k, heads, timesteps=(t,)) for k in range(_n_folds(exp))]
        by_t.append({"t": t, **{h: _aggregate(folds, h)["summary"] for h in heads}})
    by_T = []
    ref_T = int(exp.budget["pretrain"].get("diffusion_steps", 1000))
    ref_t = tuple(exp.budget["pretrain"]["feature_timesteps"])
    for T in Ts:
        if T == ref_T and len(ref_t) == 1 and ref_t[0] in ts:  # the model and probe of the t sweep
            folds = [exp.runner.result(f"t-sweep/{method}-t{ref_t[0]}-f{k}") for k in range(_n_folds(exp))]
            feature_t = list(ref_t)
        else:
            m = exp.pretrained(method) if T == ref_T else exp.pretrained(method, diffusion_steps=T)
            folds = [exp.probe(f"T-sweep/{method}-T{T}-f{k}", m, k, heads) for k in range(_n_folds(exp))]
            feature_t = exp.runner.result(f"T-sweep/{method}-T{T}-f0").get("timesteps")
        by_T.append({"T": T, "feature_t": feature_t, **{h: _aggregate(folds, h)["summary"] for h in heads}})
    results = {"experiment": "timesteps", "config": cfg, "budget": exp.budget, "method": method,
               "by_t": by_t, "by_T": by_T, "seconds": round(exp.elapsed(), 1)}
    atomic_write_json(exp.out / "results.json", _plain(results))
    figs = report.timestep_figures(by_t, by_T, heads, exp.out)
    atomic_write(exp.out / "report.md", report.timesteps_markdown(results, figs))
    return results


def finetuned_methods(cfg: ExperimentConfig) -> list[str]:
    """The compared methods whose backbones are also fine-tuned (a random backbone fine-tuned is the
    from-scratch row)."""
    return [m for m in cfg.finetune if m in cfg.methods and m != "random"]


def label_efficiency(cfg: ExperimentConfig, out: str | Path, force: bool = False,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Dice against the number of labelled training cases (1, 2, 4, ..., all).

    For every count: the same network trained from scratch; for every method of ``label_methods``
    its frozen backbone probed with ``heads`` and the backbone fine-tuned. From scratch and
    fine-tuning train to convergence (the budget's ``early_stopping``: validation every
    ``val_every`` steps, stopped after ``patience`` validations without a better Dice) and the
    best-validation state is tested; the frozen heads keep their best-validation state too. The
    validation case is held out of the labelled training cases (``val_from_train``) and is the same
    for every count, so every choice is made on it, never on the test cases.
    """
    exp = Experiment(cfg, out, force=force, log=log)
    counts = tuple(cfg.label_counts) or tuple(exp.budget["label_counts"])
    methods = [m for m in cfg.label_methods if m != "random"]
    models = {m: exp.pretrained(m) for m in methods}
    n_all = len(exp.folds()[0][0])
    nf = _n_folds(exp)
    rows = []
    seen: set[int] = set()
    for n in counts:
        n_eff = n_all if not n else min(int(n), n_all)
        if n_eff in seen:  # e.g. 4 and "all" with 4 training cases
            continue
        seen.add(n_eff)
        tag = "all" if n_eff == n_all else str(n_eff)
        scratch = [exp.scratch(f"labels/scratch-n{tag}-f{k}", k, n_train=n_eff, early_stopping=True) for k in range(nf)]
        rows.append(_label_row(n_eff, "from-scratch", "scratch", scratch, "scratch"))
        for m in methods:
            frozen = [exp.probe(f"labels/{m}-n{tag}-f{k}", models[m], k, tuple(cfg.heads), n_train=n_eff)
                      for k in range(nf)]
            for h in cfg.heads:
                rows.append(_label_row(n_eff, m, h, frozen, h))
            tuned = [exp.tuned(f"labels/finetune-{m}-n{tag}-f{k}", k, "finetune", models[m], n_train=n_eff,
                               early_stopping=True) for k in range(nf)]
            rows.append(_label_row(n_eff, m, "fine-tuned", tuned, "finetune"))
    results = {"experiment": "label-efficiency", "config": cfg, "budget": exp.budget, "methods": methods,
               "rows": rows, "seconds": round(exp.elapsed(), 1)}
    atomic_write_json(exp.out / "results.json", _plain(results))
    figs = report.label_figures(rows, exp.out)
    atomic_write(exp.out / "report.md", report.label_markdown(results, figs))
    return results


def _label_row(n: int, method: str, mode: str, fold_results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    row: dict[str, Any] = {"n_train": n, "method": method, "mode": mode, "summary": _aggregate(fold_results, key)["summary"]}
    if "steps_run" in fold_results[0]:  # trained end to end: where early stopping ended, which step was kept
        row["steps_run"] = [r.get("steps_run") for r in fold_results]
        row["best_step"] = [r.get("best_step") for r in fold_results]
    return row


def _plain(obj: Any) -> Any:
    """JSON-safe: dataclasses to dicts, NaN to null (strict JSON readers choke on NaN)."""
    import dataclasses
    import math

    from voxdiff.core.config import to_dict

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(to_dict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
