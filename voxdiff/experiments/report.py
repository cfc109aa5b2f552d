"""Markdown tables and PNG figures of the experiments."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from voxdiff.data.labels import ORGAN_NAMES, SIZE_GROUPS

GROUPS = list(SIZE_GROUPS)


def pct(ms: dict[str, Any] | None, std: bool = True) -> str:
    """'67.8 ± 2.1' from a {'mean', 'std'} dict of fractions."""
    if not ms or ms.get("mean") is None or (isinstance(ms["mean"], float) and math.isnan(ms["mean"])):
        return "n/a"
    s = f"{100 * ms['mean']:.1f}"
    if std and ms.get("n", 1) > 1 and ms.get("std") is not None:
        s += f" ± {100 * ms['std']:.1f}"
    return s


def _g(summary: dict, group: str) -> dict | None:
    return (summary.get("groups") or {}).get(group)


def _steps_label(r: dict[str, Any]) -> str:
    """`` (30 steps)`` after a trained row's head; `` (10 of 30 steps)`` (or ``10-30 of 30``) where early
    stopping ended some of its runs before the last step."""
    if not r.get("steps"):
        return ""
    ran = _flat_steps(r.get("steps_run"))
    if not ran or all(n >= r["steps"] for n in ran):
        return f" ({r['steps']} steps)"
    lo, hi = min(ran), max(ran)
    return f" ({lo if lo == hi else f'{lo}-{hi}'} of {r['steps']} steps)"


def compare_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | head | mean Dice (%) | Big | Medium | Small |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["summary"]
        head = r["head"] + _steps_label(r)
        lines.append(f"| {r['method']} | {head} | {pct(s.get('mean'))} | "
                     + " | ".join(pct(_g(s, g)) for g in GROUPS) + " |")
    return "\n".join(lines)


def organ_table(rows: list[dict[str, Any]]) -> str:
    organs = list(ORGAN_NAMES)
    head = "| method | head | " + " | ".join(ORGAN_NAMES[o].replace("_", " ") for o in organs) + " |"
    lines = [head, "|---|---|" + "---|" * len(organs)]
    for r in rows:
        po = r["summary"].get("per_organ", {})
        lines.append(f"| {r['method']} | {r['head']} | "
                     + " | ".join(pct(po.get(o) or po.get(str(o)), std=False) for o in organs) + " |")
    return "\n".join(lines)


def _fig_path(out: Path, name: str) -> Path:
    return out / name


def compare_figures(rows: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from voxdiff.core.outputs import atomic_path

    files = []
    organs = list(ORGAN_NAMES)
    sel = [r for r in rows if r["head"] in ("nonlinear", "fine-tuned", "end-to-end")] or rows
    fig, ax = plt.subplots(figsize=(12, 4.5))
    w = 0.8 / max(1, len(sel))
    for i, r in enumerate(sel):
        po = r["summary"].get("per_organ", {})
        vals = [((po.get(o) or po.get(str(o)) or {}).get("mean") or 0.0) for o in organs]
        ax.bar(np.arange(len(organs)) + i * w, vals, w, label=f"{r['method']} ({r['head']})", color=plt.cm.tab20(i % 20))
    ax.set_xticks(np.arange(len(organs)) + 0.4 - w / 2)
    ax.set_xticklabels([ORGAN_NAMES[o].replace("_", "\n") for o in organs], fontsize=7)
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.set_title("Per-organ Dice (non-linear probes, fine-tuned and from scratch)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    with atomic_path(out / "per_organ.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    files.append("per_organ.png")

    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        s = r["summary"]
        vals = [(s.get("mean") or {}).get("mean") or 0.0] + [(_g(s, g) or {}).get("mean") or 0.0 for g in GROUPS]
        errs = [(s.get("mean") or {}).get("std") or 0.0] + [(_g(s, g) or {}).get("std") or 0.0 for g in GROUPS]
        ax.bar(np.arange(4) + i * w, vals, w, yerr=errs, label=f"{r['method']} / {r['head']}", capsize=2,
               color=plt.cm.tab20(i % 20))
    ax.set_xticks(np.arange(4) + 0.4 - w / 2)
    ax.set_xticklabels(["mean", *GROUPS])
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, ncol=3)
    ax.set_title("Dice by organ size group")
    fig.tight_layout()
    with atomic_path(out / "size_groups.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    files.append("size_groups.png")
    return files


def time_phrase(results: dict[str, Any]) -> str:
    """"N s in all", or, when steps had finished in earlier invocations (the report of a resumed or
    extended folder), the steps' own total with this invocation's wall time beside it; "" when the
    results carry no time (``seconds`` None: a table gathered from several folders)."""
    if results.get("seconds") is None:
        return ""
    wall = float(results["seconds"])
    steps = results.get("step_seconds")
    if steps is None or float(steps) <= wall + 1.0:
        return f"{wall:.0f} s in all"
    return f"{float(steps):.0f} s of steps in all ({wall:.0f} s in this invocation; the rest finished earlier)"


def compare_markdown(results: dict[str, Any], figs: list[str], notes: list[str] | None = None) -> str:
    """The compare report; ``notes``: extra paragraphs placed under the table (each ending a line)."""
    cfg = results["config"]
    cfgd = cfg if isinstance(cfg, dict) else cfg.__dict__
    rows = results["rows"]
    parts = [
        "# voxdiff experiment: compare",
        "",
        f"Budget `{cfgd['budget']}`; data `{cfgd['data'] or 'generated phantoms'}`; "
        f"{'train/test split of the data set' if not cfgd['folds'] else str(cfgd['folds']) + '-fold cross-validation'}; "
        f"seed {cfgd['seed']}; {time_phrase(results)}.",
        "",
        "Dice (%) on the test cases, mean over the 13 organs (NaN-aware), and by size group "
        "(Big: liver, spleen, stomach, kidneys; Medium: aorta, IVC, portal/splenic vein, pancreas, "
        "gallbladder; Small: esophagus, adrenals). With several folds: mean ± std over folds.",
        "",
        compare_table(rows),
        "",
        *([note, ""] if (note := contrastive_note(rows)) else []),
        *([note, ""] if (note := tuned_below_note(rows)) else []),
        *([note, ""] if (note := tuned_start_note(rows)) else []),
        *[x for n in (notes or []) for x in (n, "")],
        "## Per organ",
        "",
        organ_table(rows),
        "",
    ]
    params = [r for r in rows if r.get("head_parameters")]
    if params:
        parts += ["## Parameters", "", "| method | head | head parameters | backbone parameters |", "|---|---|---|---|"]
        parts += [f"| {r['method']} | {r['head']} | {r['head_parameters']:,} | {r['backbone_parameters']:,} |" for r in params]
        parts.append("")
    pre = results.get("pretraining") or {}
    if pre:
        parts += ["## Pretraining", "", "| method | steps | first loss | last loss | seconds |", "|---|---|---|---|---|"]
        for m, r in pre.items():
            parts.append(f"| {m} | {r.get('steps')} | {_num(r.get('first_loss'))} | {_num(r.get('last_loss'))} | {r.get('seconds')} |")
        parts.append("")
    for kind, r in (results.get("bpr") or {}).items():
        q = r.get("quality") or {}
        parts.append(f"BPR `{kind}` ({r.get('steps')} steps, {r.get('seconds')} s): "
                     + ", ".join(f"{k} = {_num(v)}" for k, v in q.items() if isinstance(v, (int, float))))
    parts += ["", *[f"![{f}]({f})" for f in figs], ""]
    return "\n".join(parts)


def _num(v: Any) -> str:
    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
        return f"{v:.4g}"
    return "n/a"


def timestep_figures(by_t: list, by_T: list, heads: tuple[str, ...], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from voxdiff.core.outputs import atomic_path

    files = []
    for key, rows, fname, xlabel in (("t", by_t, "dice_vs_t.png", "feature timestep t"),
                                     ("T", by_T, "dice_vs_T.png", "diffusion steps T in training")):
        if not rows:
            continue
        fig, axes = plt.subplots(1, len(heads), figsize=(5 * len(heads), 3.8), squeeze=False)
        xs = [r[key] for r in rows]
        for ax, h in zip(axes[0], heads):
            for label, get in [("average", lambda s: s.get("mean"))] + [(g, (lambda g: lambda s: _g(s, g))(g)) for g in GROUPS]:
                ys = [((get(r[h]) or {}).get("mean")) for r in rows]
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=label)
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("Dice")
            ax.set_ylim(0, 1)
            ax.set_title(f"{h} probe")
            ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_path(out / fname) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        files.append(fname)
    return files


def timesteps_markdown(results: dict[str, Any], figs: list[str]) -> str:
    heads = [h for h in ("linear", "nonlinear", "mix") if results["by_t"] and h in results["by_t"][0]] or ["nonlinear"]
    parts = ["# voxdiff experiment: timesteps", "",
             f"Method `{results['method']}`; {time_phrase(results)}. Dice (%) by size group.", ""]
    for key, rows, title in (("t", results["by_t"], "Feature timestep t (one pretrained model)"),
                             ("T", results["by_T"], "Diffusion steps T used in training (features at the same t/T)")):
        if not rows:
            continue
        parts += [f"## {title}", "", f"| {key} | head | average | Big | Medium | Small |", "|---|---|---|---|---|---|"]
        for r in rows:
            for h in heads:
                s = r[h]
                parts.append(f"| {r[key]} | {h} | {pct(s.get('mean'))} | " + " | ".join(pct(_g(s, g)) for g in GROUPS) + " |")
        parts.append("")
    parts += [f"![{f}]({f})" for f in figs]
    return "\n".join(parts) + "\n"


def label_series(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (method, mode) series of label-efficiency rows, in first-seen order."""
    return list(dict.fromkeys((r["method"], r["mode"]) for r in rows))


def _series_label(method: str, mode: str) -> str:
    if method == "from-scratch":
        return "from scratch"
    return f"{method}, {'frozen ' + mode + ' probe' if mode in ('linear', 'nonlinear', 'mix') else mode}"


def label_figures(rows: list, out: Path) -> list[str]:
    """``label_efficiency.png``: mean Dice against the number of labelled cases, one line per
    method and mode (frozen probes dashed, fine-tuned solid, from scratch black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from voxdiff.core.outputs import atomic_path

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "from-scratch"))
    for method, mode in label_series(rows):
        pts = sorted((r["n_train"], (r["summary"].get("mean") or {})) for r in rows
                     if r["method"] == method and r["mode"] == mode)
        xs = [n for n, _ in pts]
        ys = [float("nan") if m.get("mean") is None else m["mean"] for _, m in pts]
        es = [m.get("std") or 0.0 for _, m in pts]
        if method == "from-scratch":
            style = {"color": "black", "linestyle": "-", "marker": "s"}
        else:
            color = plt.cm.tab10(methods.index(method) % 10)
            style = {"color": color, "linestyle": {"fine-tuned": "-", "nonlinear": "--"}.get(mode, ":"),
                     "marker": {"fine-tuned": "o", "nonlinear": "^"}.get(mode, "v")}
        ax.errorbar(xs, ys, yerr=es if any(es) else None, label=_series_label(method, mode), capsize=2, **style)
    ax.set_xscale("log", base=2)
    ns = sorted({r["n_train"] for r in rows})
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("mean Dice (13 organs)")
    ax.set_ylim(0, 1)
    ax.set_title("Label efficiency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "label_efficiency.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return ["label_efficiency.png"]


def label_markdown(results: dict[str, Any], figs: list[str]) -> str:
    rows = results["rows"]
    series = label_series(rows)
    es = dict((results.get("budget") or {}).get("early_stopping") or {})
    cfg = results.get("config") or {}  # an ExperimentConfig, or its dict read back from results.json
    for key, field in (("steps", "early_stopping_steps"), ("min_steps", "early_stopping_min_steps")):
        value = cfg.get(field) if isinstance(cfg, dict) else getattr(cfg, field, None)
        if es and value is not None:  # the experiment's overrides of the budget's settings
            es[key] = value
    rule = (cfg.get("selection") if isinstance(cfg, dict) else getattr(cfg, "selection", None)) or "best"
    kept_state = {"best": "the best-validation state",
                  "smoothed": f"the state that ends the best window of {es.get('smooth_window', 3)} validations "
                              "(mean Dice)",
                  "last": "the last state"}.get(rule, f"the {rule} state")
    if not es:
        schedule = ""
    elif es.get("min_steps") and es.get("steps") is not None and es["min_steps"] >= es["steps"]:
        # the floor reaches the cap: every run trains the same number of steps (matched compute)
        schedule = (f" for {es['steps']} steps each (no early stopping: --early_stopping_min_steps reaches the cap), "
                    f"validated every {es.get('val_every')} steps")
    else:
        schedule = (f" for up to {es.get('steps')} steps, validated every {es.get('val_every')} steps and stopped "
                    f"after {es.get('patience')} validations without a better Dice"
                    + (f" (never before step {es['min_steps']})" if es.get("min_steps") else ""))
    parts = ["# voxdiff experiment: label efficiency", "",
             "Mean Dice (%) on the test cases against the number of labelled training cases. From scratch "
             "and fine-tuned: backbone + non-linear head trained end to end" + schedule
             + f"; {kept_state} is tested. Frozen probes: heads on the frozen pretrained "
             "backbone, best-validation state. Every choice is made on the held-out validation case, "
             f"never on the test cases. {time_phrase(results)}.", "",
             "| labelled cases | " + " | ".join(_series_label(m, k) for m, k in series) + " |",
             "|---|" + "---|" * len(series)]
    for n in sorted({r["n_train"] for r in rows}):
        cells = []
        for m, k in series:
            hit = [r for r in rows if r["n_train"] == n and r["method"] == m and r["mode"] == k]
            cells.append(pct(hit[0]["summary"].get("mean")) if hit else "")
        parts.append(f"| {n} | " + " | ".join(cells) + " |")
    inits = {r["init"] != "random" for r in rows if r["mode"] == "fine-tuned" and "init" in r}
    if inits:
        parts += ["", "Fine-tuned rows start from " + (
            "the non-linear head of the frozen probe fitted on the same labelled cases (LP-FT)." if inits == {True}
            else "a random head." if inits == {False} else "a random head or the frozen probe's head (see results.json).")]
    tuned = [r for r in rows if r.get("steps_run")]
    if tuned:
        parts += ["", f"Steps trained end to end (stopped at / step kept by the {rule} rule, per fold):", "",
                  "| labelled cases | series | stopped at | kept |", "|---|---|---|---|"]
        capped = first = False
        for r in tuned:
            kept = []
            for best, cap in zip(r["best_step"], r.get("max_steps") or [None] * len(r["best_step"])):
                at_cap = rule != "last" and best is not None and cap is not None and best >= cap
                # kept the first validated state: no later validation was better
                at_first = (rule != "last" and best is not None and not at_cap and es.get("val_every") is not None
                            and best <= es["val_every"])
                capped |= at_cap
                first |= at_first
                kept.append(f"{best}{' (cap)' if at_cap else ' (first)' if at_first else ''}")
            parts.append(f"| {r['n_train']} | {_series_label(r['method'], r['mode'])} | "
                         f"{', '.join(str(v) for v in r['steps_run'])} | {', '.join(kept)} |")
        if capped:
            parts += ["", "A run whose kept step is the last it was allowed (cap) was still improving on the "
                      "validation case and may not have converged: rerun with a higher --early_stopping_steps."]
        if first:
            parts += ["", "A run that kept its first validated state (first) never improved on the validation case "
                      "afterwards, often because early stopping ran out its patience on the near-zero Dice of a "
                      "network that had not started to learn: rerun with --early_stopping_min_steps."]
    alt = [r for r in rows if r.get("by_selection")]
    if alt:
        parts += ["", f"The same end-to-end runs scored at the states other checkpoint rules keep (--compare_selection; "
                  f"the columns above use the {rule} rule):", "",
                  "| labelled cases | series | rule | kept step | mean Dice |", "|---|---|---|---|---|"]
        for r in alt:
            for u, d in r["by_selection"].items():
                parts.append(f"| {r['n_train']} | {_series_label(r['method'], r['mode'])} | {u} | "
                             f"{', '.join(str(v) for v in d['best_step'])} | {pct(d['summary'].get('mean'))} |")
    parts += ["", *[f"![{f}]({f})" for f in figs]]
    return "\n".join(parts) + "\n"


def _mean_of(rows: list[dict[str, Any]], method: str, head: str) -> float | None:
    for r in rows:
        if r["method"] == method and r["head"] == head:
            v = (r["summary"].get("mean") or {}).get("mean")
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
    return None


def _shown(x: float) -> float:
    """A mean Dice as the tables show it (percent, one decimal): the notes under a table compare what it shows,
    so a difference in the last bits (the same network scored in another process, or with other threads) is
    no difference."""
    return round(100 * x, 1)


def _case_interval(rows: list[dict[str, Any]], a: str, b: str, head: str) -> tuple[float, float, float, int] | None:
    """A - B over the test cases both rows scored (:func:`~voxdiff.evaluate.stats.paired_comparison` of
    one seed): the mean difference, its 95 % t interval and the number of cases; None without two cases."""
    from voxdiff.evaluate.stats import case_means, paired_comparison

    from .base import scores_to_per_case

    ra = next((r for r in rows if r["method"] == a and r["head"] == head and r.get("per_case")), None)
    rb = next((r for r in rows if r["method"] == b and r["head"] == head and r.get("per_case")), None)
    if ra is None or rb is None:
        return None
    cmp = paired_comparison([0.0], [0.0], case_means(scores_to_per_case(ra["per_case"])),
                            case_means(scores_to_per_case(rb["per_case"])))
    if cmp["n_cases"] < 2:
        return None
    return cmp["case_diff_mean"], *cmp["case_ci95"], cmp["n_cases"]


def contrastive_note(rows: list[dict[str, Any]], ours: str = "diffusion-ape", other: str = "contrastive") -> str | None:
    """One line saying where the contrastive baseline is ahead of diffusion + BPR in a compare table
    (computed from the rows at the table's precision; None when it is ahead nowhere or a row is missing).
    Where the non-linear probes' rows hold per-case scores, the line also gives the 95 % interval of
    their difference over the test cases: how much one split can tell."""
    ahead = []
    for head, name in (("linear", "linear probe"), ("nonlinear", "non-linear probe"), ("mix", "mix probe"),
                       ("fine-tuned", "fine-tuned")):
        a, b = _mean_of(rows, other, head), _mean_of(rows, ours, head)
        if a is not None and b is not None and _shown(a) > _shown(b):
            ahead.append(f"{name} {100 * a:.1f} vs {100 * b:.1f}")
    if not ahead:
        return None
    line = f"Note: the {other} baseline is ahead of {ours} here (mean Dice): " + "; ".join(ahead) + "."
    ci = _case_interval(rows, other, ours, "nonlinear")
    if ci is not None:
        d, lo, hi, n = ci
        verdict = "not shown on these cases" if lo <= 0 <= hi else "shown on these cases"
        line += (f" Over the {n} test cases the non-linear probes differ by {100 * d:+.1f} points, 95 % interval "
                 f"{100 * lo:+.1f} to {100 * hi:+.1f} ({verdict}).")
    return line


def tuned_below_note(rows: list[dict[str, Any]]) -> str | None:
    """One line naming every method whose fine-tuned row scores below its own frozen non-linear probe
    (computed from the rows at the table's precision; None when there is no such method)."""
    below = []
    for method in dict.fromkeys(r["method"] for r in rows if r["head"] == "fine-tuned"):
        tuned, frozen = _mean_of(rows, method, "fine-tuned"), _mean_of(rows, method, "nonlinear")
        if tuned is not None and frozen is not None and _shown(tuned) < _shown(frozen):
            below.append(f"{method} {100 * tuned:.1f} vs {100 * frozen:.1f}")
    if not below:
        return None
    return ("Note: fine-tuning scores below the frozen non-linear probe it starts from here (mean Dice, fine-tuned vs "
            "frozen): " + "; ".join(below) + ". Its first steps move the backbone away from the features the head "
            "was fitted on, and a short run does not make up the loss; where the fine-tuned network is scored on "
            "other windows than the probe's features, that differs too (docs/RESULTS.md, \"Longer frozen heads in "
            "the demo\" and \"Fine-tuned rows below their frozen probe\").")


def _flat_steps(v: Any) -> list[int]:
    """A row's steps (best or run; per fold, or per seed of per-fold lists), flattened; None left out."""
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [s for x in v for s in _flat_steps(x)]
    return [int(v)]


def tuned_start_note(rows: list[dict[str, Any]]) -> str | None:
    """One line naming every fine-tuned row that kept its start state (best step 0, ``optim.validate_start``):
    there the row is the frozen non-linear probe it started from (None when no row did)."""
    kept = []
    for r in rows:
        steps = _flat_steps(r.get("best_step")) if r["head"] == "fine-tuned" else []
        n0 = sum(s == 0 for s in steps)
        if n0:
            kept.append(r["method"] if n0 == len(steps) else f"{r['method']} (in {n0} of {len(steps)} runs)")
    if not kept:
        return None
    return ("Note: fine-tuning kept its start for " + ", ".join(kept) + ": none of the steps it ran scored above "
            "the network it started from on the validation cases, so that row is its start (from the probe's head, "
            "LP-FT: the frozen non-linear probe; docs/RESULTS.md, \"The demo's LP-FT: the start as a candidate\").")


def seeds_figures(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """Mean Dice per row, mean ± std over seeds, with each seed's value as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from voxdiff.core.outputs import atomic_path

    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 2), 4.2))
    x = np.arange(len(rows))
    means = [(r["summary"]["mean"].get("mean") or 0.0) for r in rows]
    stds = [(r["summary"]["mean"].get("std") or 0.0) for r in rows]
    ax.bar(x, means, 0.6, yerr=stds, capsize=3, color=[plt.cm.tab20(i % 20) for i in range(len(rows))])
    for i, r in enumerate(rows):
        v = [s for s in r["seed_means"] if s is not None]
        ax.scatter(np.full(len(v), i) + np.linspace(-0.12, 0.12, len(v)), v, s=10, color="k", zorder=3)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['method']}\n{r['head']}" for r in rows], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.set_title(f"Mean Dice over {rows[0]['summary']['n_seeds'] if rows else 0} seeds (bars: mean ± std; dots: seeds)")
    fig.tight_layout()
    with atomic_path(out / "seeds.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return ["seeds.png"]


def _p(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f}" if v >= 0.001 else f"{v:.1e}"


def _ci(test: dict[str, Any]) -> str:
    """A paired test's 95 % interval in points: over seeds, or over cases (said so) with one seed; "n/a"
    when there is none (results written before the intervals were have none)."""
    over_cases = int(test.get("n_seeds", 1)) < 2
    ci = test.get("case_ci95" if over_cases else "seed_ci95")
    if not ci or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return "n/a"
    return f"{100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}" + (" (cases)" if over_cases else "")


def seeds_markdown(results: dict[str, Any], figs: list[str], notes: list[str] | None = None,
                   title: str = "# voxdiff experiment: compare over seeds", seed_reports: str = "seed-S/report.md") -> str:
    """The report over seeds; ``title`` and ``seed_reports`` (where each seed's report lies) for tables
    gathered from several folders (benchmarks/seed_table.py)."""
    cfg = results["config"]
    cfgd = cfg if isinstance(cfg, dict) else cfg.__dict__
    rows, tests, seeds = results["rows"], results["tests"], results["seeds"]
    n_cases = max((len(r["cases"]) for r in rows), default=0)
    where = f"data `{cfgd['data']}`" if cfgd["data"] else f"generated phantoms (seed {cfgd['phantom_seed']})"
    took = time_phrase(results)
    lines = [
        title,
        "",
        f"Budget `{cfgd['budget']}`; {where}; seeds {', '.join(map(str, seeds))}; {n_cases} test cases"
        f"{'; ' + took if took else ''}. Each seed's own report: `{seed_reports}`.",
        "",
        *([] if results.get("complete", True) else [
            "**Partial report** (`--report_only`): only the rows that have finished for every seed; "
            "rerun the command without it to finish the others.", ""]),
        "Mean Dice (%) on the test cases (mean over the 13 organs), mean ± std over seeds, then each seed.",
        "",
        "| method | head | mean Dice (%) | seeds | Big | Medium | Small |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["summary"]
        head = r["head"]
        if r.get("steps_run"):
            head += f" (stopped at {', '.join(str(v[0] if isinstance(v, list) else v) for v in r['steps_run'])})"
        lines.append(f"| {r['method']} | {head} | {pct(s['mean'])} | "
                     + ", ".join(f"{100 * v:.1f}" for v in r["seed_means"]) + " | "
                     + " | ".join(pct(_g(s, g)) for g in GROUPS) + " |")
    lines += ["", *[x for n in (notes or []) for x in (n, "")]]
    lines += [
        "## Paired comparisons (A - B)",
        "",
        "Over seeds: the difference of the seeds' mean Dice, mean ± std. Over cases: each test case's "
        "Dice (mean over its organs) averaged over seeds; the paired differences across cases, "
        "two-sided Wilcoxon signed-rank and paired t-test; the seeds' differences, a one-sample t-test. "
        "The verdict names a winner when the Wilcoxon test over cases and the t-test over seeds both "
        "reject at 0.05 ('not shown across seeds': only the test over cases does). The 95 % CI is "
        "Student's t interval of the mean difference over seeds (over cases with one seed): the "
        "differences the runs still allow, either way.",
        "",
        "| A | B | A - B over seeds (points) | 95 % CI | seeds A / B better | seed t-test p | A - B over cases | "
        "cases A / B better | Wilcoxon p | t-test p | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tests:
        lines.append(
            f"| {' / '.join(t['a'])} | {' / '.join(t['b'])} | {100 * t['diff_mean']:+.1f} ± {100 * t['diff_std_seeds']:.1f} | "
            f"{_ci(t)} | "
            f"{t.get('seeds_a_better', '')} / {t.get('seeds_b_better', '')} | {_p(t.get('seed_ttest_p', float('nan')))} | "
            f"{100 * t['case_diff_mean']:+.1f} | {t['cases_a_better']} / {t['cases_b_better']} | {_p(t['wilcoxon_p'])} | "
            f"{_p(t['ttest_p'])} | {t['verdict']} |")
    lines += ["", *[f"![{f}]({f})" for f in figs], ""]
    return "\n".join(lines)
