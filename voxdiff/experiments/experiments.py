"""``compare``, ``timesteps`` and ``label-efficiency``: the paper's table and figure on any data set."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from voxdiff.core.errors import VoxdiffError
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
            notes: list[str] | None = None, report_only: bool = False) -> dict[str, Any]:
    """Method x {linear, non-linear} probing, fine-tuned backbones (``cfg.finetune``) and
    from-scratch: the paper's main table. ``notes``: paragraphs for the report, under the table.
    With ``cfg.seeds``: the same over several seeds (:func:`compare_seeds`)."""
    if cfg.seeds:
        return compare_seeds(cfg, out, force=force, log=log, notes=notes, report_only=report_only)
    if report_only:
        raise VoxdiffError("--report_only applies to compare --seeds")
    return _compare_in(Experiment(cfg, out, force=force, log=log), notes)


def _compare_in(exp: Experiment, notes: list[str] | None = None) -> dict[str, Any]:
    """:func:`compare` (one seed) in an opened experiment folder."""
    cfg = exp.cfg
    if cfg.jobs != 1:
        from .lanes import run_lanes

        run_lanes(exp, "compare")
    rows = _frozen_rows(exp) + _tuned_rows(exp)
    pre = {m: exp.runner.result(f"pretrain-{m}") for m in cfg.methods}
    bprs = {k: exp.runner.result(f"bpr-{k}") for k in ("ape", "slice") if exp.runner.done(f"bpr-{k}")}
    results = {"experiment": "compare", "config": cfg, "budget": exp.budget, "rows": rows, "pretraining": pre,
               "bpr": bprs, "seconds": round(exp.elapsed(), 1), "step_seconds": round(exp.runner.step_seconds(), 1)}
    atomic_write_json(exp.out / "results.json", _plain(results))
    figs = report.compare_figures(rows, exp.out)
    atomic_write(exp.out / "report.md", report.compare_markdown(results, figs, notes))
    return results


def _frozen_rows(exp: Experiment, finished_only: bool = False) -> list[dict[str, Any]]:
    """Every method's backbone, pretrained and probed frozen with every head (one row per head).
    ``finished_only``: run nothing; rows of the methods whose probes have all finished."""
    return [r for method in exp.cfg.methods for r in _frozen_method_rows(exp, method, finished_only)]


def _frozen_method_rows(exp: Experiment, method: str, finished_only: bool = False) -> list[dict[str, Any]]:
    cfg = exp.cfg
    names = [probe_step(method, k) for k in range(_n_folds(exp))]
    if finished_only:
        if not all(exp.runner.done(n) for n in names):
            return []
        folds = [exp.runner.result(n) for n in names]
    else:
        model = exp.pretrained(method)
        folds = [exp.probe(n, model, k, tuple(cfg.heads)) for k, n in enumerate(names)]
    return [{"method": method, "head": head, **_aggregate(folds, head),
             "head_parameters": folds[0]["head_parameters"][head],
             "backbone_parameters": folds[0]["backbone_parameters"]} for head in cfg.heads]


def probe_step(method: str, fold: int) -> str:
    """The step of ``method``'s frozen probes on ``fold`` (also where LP-FT takes its head from)."""
    return f"probe-{method}-f{fold}"


def _tuned_jobs(exp: Experiment) -> list[tuple[str, str, str, list[str]]]:
    """(method, row head, mode, step names per fold) of the fine-tuned rows and the from-scratch row."""
    cfg = exp.cfg
    nf = _n_folds(exp)
    jobs = [(m, "fine-tuned", "finetune", [f"finetune-{m}-f{k}" for k in range(nf)]) for m in finetuned_methods(cfg)]
    if cfg.scratch:
        jobs.append(("from-scratch", "end-to-end", "scratch", [f"scratch-f{k}" for k in range(nf)]))
    return jobs


def _tuned_rows(exp: Experiment, finished_only: bool = False) -> list[dict[str, Any]]:
    """Fine-tuned backbones and the from-scratch reference (to convergence when the budget says
    ``tuned_early_stopping``). ``finished_only``: run nothing; the rows whose runs have finished."""
    rows = [_tuned_job_row(exp, job, finished_only) for job in _tuned_jobs(exp)]
    return [r for r in rows if r is not None]


def _tuned_job_row(exp: Experiment, job: tuple[str, str, str, list[str]], finished_only: bool = False
                   ) -> dict[str, Any] | None:
    method, head, mode, names = job
    stop = bool(exp.budget.get("tuned_early_stopping", False))
    if finished_only:
        if not all(exp.runner.done(n) for n in names):
            return None
        folds = [exp.runner.result(n) for n in names]
    elif mode == "scratch":
        folds = [exp.scratch(n, k, early_stopping=stop) for k, n in enumerate(names)]
    else:
        model = exp.pretrained(method)
        folds = []
        for k, n in enumerate(names):
            init = lpft_start(exp, probe_step(method, k), model, k)  # LP-FT: from the frozen row's head
            folds.append(exp.tuned(n, k, "finetune", model, early_stopping=stop, init_probe=init))
    return {"method": method, "head": head, **_aggregate(folds, mode), "steps": folds[0].get("max_steps"),
            "init": folds[0].get("init", "random"), **_stopped(folds)}


def finetunes_whole_volumes(exp: Experiment) -> bool:
    """Whether the fine-tuned rows of ``compare`` train on whole volumes (the budget's LP-FT settings,
    ``lpft.whole_volume``, as the demo's): each such step holds the activations of a whole volume, the
    largest memory of the experiment."""
    stop = bool(exp.budget.get("tuned_early_stopping", False))
    return bool(exp.tuned_cfg("finetune", early_stopping=stop, from_probe=starts_from_probe(exp)).sampling.whole_volume)


def compare_items(exp: Experiment, whole_volume: bool = True) -> list[tuple[str, Callable[[], Any]]]:
    """The independent pieces of ``compare`` (a frozen method's probes, a fine-tuned or from-scratch
    row), each a callable that runs its steps (and the steps they need): what ``--jobs`` spreads over
    processes (:mod:`voxdiff.experiments.lanes`). ``whole_volume`` False leaves out the fine-tuned rows
    when they train on whole volumes (:func:`finetunes_whole_volumes`)."""
    def tuned_item(job: tuple[str, str, str, list[str]]) -> tuple[str, Callable[[], Any]]:
        return f"{job[2]} {job[0]}", lambda: _tuned_job_row(exp, job)

    tuned = {job[0]: job for job in _tuned_jobs(exp)}
    if not whole_volume and finetunes_whole_volumes(exp):
        tuned = {m: job for m, job in tuned.items() if job[2] != "finetune"}
    items: list[tuple[str, Callable[[], Any]]] = []
    for m in exp.cfg.methods:  # a method's fine-tuned row right after its probes: the chain of one backbone
        items.append((f"probes of {m}", lambda m=m: _frozen_method_rows(exp, m)))
        if m in tuned:
            items.append(tuned_item(tuned.pop(m)))
    return items + [tuned_item(job) for job in tuned.values()]


def _stopped(folds: list[dict[str, Any]]) -> dict[str, Any]:
    if folds[0].get("steps_run") is None:
        return {}
    return {"steps_run": [f.get("steps_run") for f in folds], "best_step": [f.get("best_step") for f in folds]}


def compare_seeds(cfg: ExperimentConfig, out: str | Path, force: bool = False, log: Callable[[str], None] = print,
                  notes: list[str] | None = None, report_only: bool = False) -> dict[str, Any]:
    """``compare`` over several training seeds on one data set, with paired tests.

    The data (phantoms generated once into OUT/phantoms, or ``cfg.data``) and its split are shared;
    each seed runs BPR, pretraining, probes and end-to-end rows into OUT/seed-S. The work goes
    breadth first: every seed's frozen probes before any seed's fine-tuned and from-scratch rows,
    so an interrupted run already holds the main comparison for all seeds (rerun to resume).
    ``report_only``: run nothing; report the rows that have finished for every seed (e.g. while the
    end-to-end rows are still running, or after an interruption).
    """
    import dataclasses

    seeds = list(dict.fromkeys(int(s) for s in cfg.seeds))
    if len(seeds) < 2:
        raise VoxdiffError(f"--seeds needs at least two different seeds, got {list(cfg.seeds)}")
    top = Experiment(cfg, out, force=force, log=log)
    data = str(top.data_dir().resolve())
    sub_cfgs = {s: dataclasses.replace(cfg, seed=s, seeds=(), data=data) for s in seeds}
    exps = {s: Experiment(c, top.out / f"seed-{s}", force=force, log=log, budget=top.budget)
            for s, c in sub_cfgs.items()}
    if report_only:
        seed_rows = [_frozen_rows(exps[s], True) + _tuned_rows(exps[s], True) for s in seeds]
        common = set.intersection(*[{(r["method"], r["head"]) for r in rs} for rs in seed_rows])
        seed_rows = [[r for r in rs if (r["method"], r["head"]) in common] for rs in seed_rows]
        if not common:
            raise VoxdiffError(f"{top.out}: no row has finished for every seed yet")
        seed_seconds = {}
    else:
        spent = dict.fromkeys(seeds, 0.0)  # each seed's own wall time (its two phases)
        for s in seeds:
            log(f"seed {s}: pretraining and frozen probes")
            t0 = time.perf_counter()
            _frozen_rows(exps[s])
            spent[s] += time.perf_counter() - t0
        per_seed = {}
        for s in seeds:
            log(f"seed {s}: fine-tuned and from-scratch rows")
            t0 = time.perf_counter()
            per_seed[s] = _compare_in(exps[s])
            spent[s] += time.perf_counter() - t0
        seed_rows = [per_seed[s]["rows"] for s in seeds]
        seed_seconds = {str(s): round(spent[s], 1) for s in seeds}
    rows, tests = seeds_summary(cfg, seed_rows)
    results = {"experiment": "compare-seeds", "config": cfg, "budget": top.budget, "seeds": seeds,
               "rows": rows, "tests": tests, "seconds": round(top.elapsed(), 1), "seed_seconds": seed_seconds,
               "step_seconds": round(top.runner.step_seconds(), 1),  # the seeds' folders are inside top's
               "complete": len(rows) == len(_row_keys(cfg))}
    atomic_write_json(top.out / "results.json", _plain(results))
    figs = report.seeds_figures(rows, top.out)
    atomic_write(top.out / "report.md", report.seeds_markdown(results, figs, notes))
    return results


def _row_keys(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """Every (method, head) row a complete compare has."""
    keys = [(m, h) for m in cfg.methods for h in cfg.heads]
    keys += [(m, "fine-tuned") for m in finetuned_methods(cfg)]
    return keys + ([("from-scratch", "end-to-end")] if cfg.scratch else [])


def seeds_summary(cfg: ExperimentConfig, seed_rows: list[list[dict[str, Any]]]
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows with mean ± std over seeds, and the paired tests of the methods' comparisons.

    Each row: ``summary`` (mean ± std over seeds of the seeds' mean Dice, per organ and group),
    ``seed_means`` and ``cases`` (each test case's Dice, mean over organs, averaged over seeds).
    Tests: the first method against each other one with the same head; each fine-tuned backbone
    against from scratch and the first fine-tuned against the other ones; the first method's
    non-linear probe against from scratch."""
    from voxdiff.evaluate.metrics import mean_std
    from voxdiff.evaluate.stats import case_means, paired_comparison, seed_average, verdict

    keys = [(r["method"], r["head"]) for r in seed_rows[0]]
    rows = []
    for key in keys:
        per = [next(r for r in rs if (r["method"], r["head"]) == key) for rs in seed_rows]
        means = [float(p["summary"]["mean"]["mean"]) for p in per]
        organs = list(per[0]["summary"]["per_organ"])
        groups = list(per[0]["summary"]["groups"])
        summary = {"mean": mean_std(means),
                   "per_organ": {o: mean_std([p["summary"]["per_organ"][o]["mean"] for p in per]) for o in organs},
                   "groups": {g: mean_std([p["summary"]["groups"][g]["mean"] for p in per]) for g in groups},
                   "n_seeds": len(per)}
        cases = seed_average([case_means(scores_to_per_case(p["per_case"])) for p in per])
        row = {"method": key[0], "head": key[1], "summary": summary, "seed_means": means, "cases": cases}
        for k in ("steps", "steps_run", "best_step"):
            if k in per[0]:
                row[k] = [p.get(k) for p in per] if k != "steps" else per[0][k]
        rows.append(row)
    by_key = {(r["method"], r["head"]): r for r in rows}

    pairs: list[tuple[tuple[str, str], tuple[str, str]]] = []
    ours = cfg.methods[0] if cfg.methods else None
    for head in cfg.heads:
        for m in cfg.methods[1:]:
            pairs.append(((ours, head), (m, head)))
    tuned = [m for m in finetuned_methods(cfg)]
    if cfg.scratch:
        pairs += [((m, "fine-tuned"), ("from-scratch", "end-to-end")) for m in tuned]
        if ours is not None:
            pairs.append(((ours, "nonlinear"), ("from-scratch", "end-to-end")))
    pairs += [((tuned[0], "fine-tuned"), (m, "fine-tuned")) for m in tuned[1:]]
    tests = []
    for a, b in pairs:
        if a not in by_key or b not in by_key:
            continue
        ra, rb = by_key[a], by_key[b]
        cmp = paired_comparison(ra["seed_means"], rb["seed_means"], ra["cases"], rb["cases"])
        tests.append({"a": list(a), "b": list(b), **cmp, "verdict": verdict(cmp)})
    return rows, tests


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
               "by_t": by_t, "by_T": by_T, "seconds": round(exp.elapsed(), 1), "step_seconds": round(exp.runner.step_seconds(), 1)}
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
    its frozen backbone probed with ``heads`` and the backbone fine-tuned (from the non-linear probe's
    head of the same labelled cases when the budget's ``finetune_init`` is "probe", LP-FT; else from a
    random head). From scratch and
    fine-tuning train to convergence (the budget's ``early_stopping``: validation every
    ``val_every`` steps, stopped after ``patience`` validations without a better Dice) and the
    state of the ``selection`` rule (default: the best validation Dice) is tested, with the
    ``compare_selection`` rules' states scored beside it; the frozen heads keep their best-validation
    state. The
    validation case is held out of the labelled training cases (``val_from_train``) and is the same
    for every count, so every choice is made on it, never on the test cases.
    """
    exp = Experiment(cfg, out, force=force, log=log)
    if cfg.jobs != 1:
        from .lanes import run_lanes

        run_lanes(exp, "label-efficiency")
    rows = []
    for n_eff, method, kind, thunks in _label_jobs(exp):
        folds = [t() for t in thunks]
        if kind == "probe":
            rows += [_label_row(n_eff, method, h, folds, h) for h in cfg.heads]
        elif kind == "scratch":
            rows.append(_label_row(n_eff, method, "scratch", folds, "scratch"))
        else:
            rows.append(_label_row(n_eff, method, "fine-tuned", folds, "finetune"))
    results = {"experiment": "label-efficiency", "config": cfg, "budget": exp.budget, "methods": _label_methods(cfg),
               "rows": rows, "seconds": round(exp.elapsed(), 1), "step_seconds": round(exp.runner.step_seconds(), 1)}
    atomic_write_json(exp.out / "results.json", _plain(results))
    figs = report.label_figures(rows, exp.out)
    atomic_write(exp.out / "report.md", report.label_markdown(results, figs))
    return results


def _label_jobs(exp: Experiment) -> list[tuple[int, str, str, list[Callable[[], dict[str, Any]]]]]:
    """(labelled cases, method, scratch | probe | finetune, one callable per fold running its step) of
    ``label_efficiency``, in the order of its report."""
    cfg = exp.cfg
    counts = tuple(cfg.label_counts) or tuple(exp.budget["label_counts"])
    methods = _label_methods(cfg)
    n_all = len(exp.folds()[0][0])
    nf = _n_folds(exp)
    jobs: list[tuple[int, str, str, list[Callable[[], dict[str, Any]]]]] = []
    seen: set[int] = set()
    for n in counts:
        n_eff = n_all if not n else min(int(n), n_all)
        if n_eff in seen:  # e.g. 4 and "all" with 4 training cases
            continue
        seen.add(n_eff)
        tag = "all" if n_eff == n_all else str(n_eff)
        jobs.append((n_eff, "from-scratch", "scratch", [
            lambda k=k, n=n_eff, t=tag: exp.scratch(f"labels/scratch-n{t}-f{k}", k, n_train=n, early_stopping=True)
            for k in range(nf)]))
        for m in methods:
            jobs.append((n_eff, m, "probe", [
                lambda k=k, m=m, n=n_eff, t=tag: exp.probe(f"labels/{m}-n{t}-f{k}", exp.pretrained(m), k,
                                                           tuple(cfg.heads), n_train=n) for k in range(nf)]))
            jobs.append((n_eff, m, "finetune", [
                lambda k=k, m=m, n=n_eff, t=tag: _label_finetune(exp, m, k, n, t) for k in range(nf)]))
    return jobs


LPFT_SUFFIX = "-lpft"  # ends the name of a label-efficiency fine-tuning step that started from the probe's head


def lpft_start(exp: Experiment, probe_name: str, model: Path, fold: int, n_train: int | None = None) -> str | None:
    """Where a fine-tuned row starts: with the budget's ``finetune_init`` "probe" (and a non-linear
    head among the heads) the probe step ``probe_name`` (run first if it has not), whose non-linear
    head fine-tuning starts from (LP-FT); else None, a random head."""
    if not starts_from_probe(exp):
        return None
    exp.probe(probe_name, model, fold, tuple(exp.cfg.heads), n_train=n_train)
    return probe_name


def starts_from_probe(exp: Experiment) -> bool:
    """Whether fine-tuning starts from the frozen probe's non-linear head (LP-FT): the budget's
    ``finetune_init`` "probe", with a non-linear head among the heads."""
    return exp.budget.get("finetune_init") == "probe" and "nonlinear" in exp.cfg.heads


def _label_finetune(exp: Experiment, method: str, fold: int, n: int, tag: str) -> dict[str, Any]:
    """One fine-tuned label-efficiency row on one fold, from the frozen probe fitted on the same
    labelled cases where the budget says so (:func:`lpft_start`); the step name then ends in
    :data:`LPFT_SUFFIX`, so a folder never mixes the two starts under one name."""
    model = exp.pretrained(method)
    init = lpft_start(exp, f"labels/{method}-n{tag}-f{fold}", model, fold, n_train=n)
    name = f"labels/finetune-{method}-n{tag}-f{fold}" + (LPFT_SUFFIX if init else "")
    return exp.tuned(name, fold, "finetune", model, n_train=n, early_stopping=True, init_probe=init)


def _label_methods(cfg: ExperimentConfig) -> list[str]:
    """The pretrained methods of label-efficiency (random init is the from-scratch row)."""
    return [m for m in cfg.label_methods if m != "random"]


def label_items(exp: Experiment) -> list[tuple[str, Callable[[], Any]]]:
    """The independent pieces of ``label_efficiency`` (one step each), for ``--jobs``."""
    return [(f"{kind} {method} n={n} fold {k}", t) for n, method, kind, thunks in _label_jobs(exp)
            for k, t in enumerate(thunks)]


def _label_row(n: int, method: str, mode: str, fold_results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    row: dict[str, Any] = {"n_train": n, "method": method, "mode": mode, "summary": _aggregate(fold_results, key)["summary"]}
    if mode == "fine-tuned":  # where fine-tuning started: a random head or a frozen probe's (LP-FT)
        row["init"] = fold_results[0].get("init", "random")
    if "steps_run" in fold_results[0]:  # trained end to end: where early stopping ended, which step was kept
        row["steps_run"] = [r.get("steps_run") for r in fold_results]
        row["best_step"] = [r.get("best_step") for r in fold_results]
        row["max_steps"] = [r.get("max_steps") for r in fold_results]
        row["selection"] = fold_results[0].get("selection", "best")
    rules = [u for u in (fold_results[0].get("by_selection") or {}) if all(u in (r.get("by_selection") or {})
                                                                             for r in fold_results)]
    if rules:  # the other checkpoint rules' states of the same runs (--compare_selection)
        row["by_selection"] = {
            u: {"summary": _aggregate([r["by_selection"][u] for r in fold_results], key)["summary"],
                "best_step": [r["by_selection"][u].get("best_step") for r in fold_results]} for u in rules}
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
