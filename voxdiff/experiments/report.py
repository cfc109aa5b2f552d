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


def compare_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | head | mean Dice (%) | Big | Medium | Small |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["summary"]
        lines.append(f"| {r['method']} | {r['head']} | {pct(s.get('mean'))} | "
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
    sel = [r for r in rows if r["head"] in ("nonlinear", "end-to-end")] or rows
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
    ax.set_title("Per-organ Dice (non-linear probes and from-scratch)")
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


def compare_markdown(results: dict[str, Any], figs: list[str]) -> str:
    cfg = results["config"]
    cfgd = cfg if isinstance(cfg, dict) else cfg.__dict__
    rows = results["rows"]
    parts = [
        "# voxdiff experiment: compare",
        "",
        f"Budget `{cfgd['budget']}`; data `{cfgd['data'] or 'generated phantoms'}`; "
        f"{'train/test split of the data set' if not cfgd['folds'] else str(cfgd['folds']) + '-fold cross-validation'}; "
        f"seed {cfgd['seed']}; {results['seconds']:.0f} s in all.",
        "",
        "Dice (%) on the test cases, mean over the 13 organs (NaN-aware), and by size group "
        "(Big: liver, spleen, stomach, kidneys; Medium: aorta, IVC, portal/splenic vein, pancreas, "
        "gallbladder; Small: esophagus, adrenals). With several folds: mean ± std over folds.",
        "",
        compare_table(rows),
        "",
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
    heads = [h for h in ("linear", "nonlinear") if results["by_t"] and h in results["by_t"][0]] or ["nonlinear"]
    parts = ["# voxdiff experiment: timesteps", "",
             f"Method `{results['method']}`; {results['seconds']:.0f} s in all. Dice (%) by size group.", ""]
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


def label_figures(rows: list, method: str, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from voxdiff.core.outputs import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.8))
    xs = [r["n_train"] for r in rows]
    for key, label in (("pretrained", f"{method} (non-linear probe)"), ("scratch", "from scratch")):
        ys = [(r[key].get("mean") or {}).get("mean") for r in rows]
        ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=label)
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "label_efficiency.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return ["label_efficiency.png"]


def label_markdown(results: dict[str, Any], figs: list[str]) -> str:
    parts = ["# voxdiff experiment: label efficiency", "",
             f"Method `{results['method']}` (frozen features, non-linear probe) against the same network "
             f"trained from scratch; {results['seconds']:.0f} s in all.", "",
             "| labelled cases | pretrained | from scratch |", "|---|---|---|"]
    for r in results["rows"]:
        parts.append(f"| {r['n_train']} | {pct(r['pretrained'].get('mean'))} | {pct(r['scratch'].get('mean'))} |")
    parts += ["", *[f"![{f}]({f})" for f in figs]]
    return "\n".join(parts) + "\n"
