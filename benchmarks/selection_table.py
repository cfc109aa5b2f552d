"""Which checkpoint of an end-to-end run to score: the rules of ``voxdiff experiment label-efficiency
--compare_selection`` side by side, from the same training runs.

Each end-to-end step (``labels/scratch-nN-f0``, ``labels/finetune-METHOD-nN-f0``) of a folder made
with ``--compare_selection '[smoothed, last]'`` holds the test Dice of the state its own rule kept
(``selection``, usually best) and of each compared rule's state (``by_selection``). This prints, per
label count, row and rule, the kept step and the test Dice (mean ± std over the folders, one per
seed), and paired tests (Wilcoxon over the test cases, each case's Dice averaged over folders; as in
``benchmarks/label_curve.py``): each fine-tuned row minus from scratch and minus the other fine-tuned
rows under each rule, and each rule minus best for every row. A rule is chosen on validation in advance, not from this table's test
columns; the table says how much the choice moves a comparison.

    python benchmarks/selection_table.py runs/var/sel2-s0,runs/var/sel2-s1

A variant of the same runs (e.g. longer pretraining) against them: ``--baseline`` names one folder
per variant folder, in the same order (same seed, same labelled and test cases); every row and rule
found in both, the frozen probes included, is then compared as variant - baseline:

    python benchmarks/selection_table.py runs/var/pt4k-s0,runs/var/pt4k-s1 \
        --baseline runs/var/sel2-s0,runs/var/sel2-s1
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from label_curve import paired_over_seeds  # noqa: E402

Table = dict[tuple[str, str, str], dict[str, tuple[int | None, dict[str, float]]]]


def _states(name: str, doc: dict) -> list[tuple[str, str, str, int | None, dict]] | None:
    """(label count, row, rule, kept step, scores) of one ``labels/NAME/result.json``: an end-to-end
    step (row ``scratch`` / ``finetune-METHOD``, one entry per scored rule) or a frozen probe (row
    ``frozen-METHOD-HEAD``, rule ``-``); None for other names."""
    m = re.fullmatch(r"(scratch|finetune-.+)-n(\d+|all)-f0(-lpft)?", name)
    if m:
        (key, scores), = doc["scores"].items()
        out = [(m.group(2), m.group(1), doc.get("selection", "best"), doc.get("best_step"), scores)]
        out += [(m.group(2), m.group(1), rule, alt.get("best_step"), alt["scores"][key])
                for rule, alt in (doc.get("by_selection") or {}).items()]
        return out
    m = re.fullmatch(r"(.+)-n(\d+|all)-f0", name)
    if m:
        return [(m.group(2), f"frozen-{m.group(1)}-{head}", "-", None, sc) for head, sc in doc["scores"].items()]
    return None


def read(folders: list[str], frozen: bool = False) -> Table:
    """``{(label count, row, rule): {folder: (kept step, {case: organ-mean Dice})}}`` of the end-to-end
    rows (``scratch``, ``finetune-METHOD``), and with ``frozen`` also of the frozen probes
    (``frozen-METHOD-HEAD``, rule ``-``: a probe keeps one state)."""
    from voxdiff.evaluate.stats import case_means
    from voxdiff.experiments.base import scores_to_per_case

    out: Table = {}
    for f in folders:
        for res in sorted((Path(f) / "labels").glob("*-n*-f0*/result.json")):
            for n, row, rule, step, sc in _states(res.parent.name, json.loads(res.read_text())) or []:
                if frozen or not row.startswith("frozen-"):
                    out.setdefault((n, row, rule), {})[f] = (step, case_means(scores_to_per_case(sc)))
    return out


def against(folders: list[str], baseline: list[str]) -> str:
    """Variant - baseline for every (label count, row, rule) in both; ``baseline[i]`` pairs with
    ``folders[i]``."""
    if len(folders) != len(baseline):
        raise SystemExit(f"--baseline names {len(baseline)} folders for {len(folders)} variant folders")
    rename = dict(zip(baseline, folders))
    var, base = read(folders, frozen=True), read(baseline, frozen=True)
    lines = ["| labelled | row | rule | variant - baseline (± std over folders) | p (Wilcoxon, cases) | per folder |",
             "|---|---|---|---|---|---|"]
    for key in sorted(set(var) & set(base)):
        s = paired(var[key], {rename[f]: v for f, v in base[key].items()})
        if s:
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {s} |")
    return "\n".join(lines)


def _fmt(v: list[float]) -> str:
    return f"{np.mean(v):.1f} ± {np.std(v, ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def paired(a: dict[str, tuple[int | None, dict[str, float]]], b: dict[str, tuple[int | None, dict[str, float]]]) -> str | None:
    """``diff ± std over folders | p | per folder`` of A - B over the folders both have (Dice in %)."""
    both = paired_over_seeds({f: v[1] for f, v in a.items()}, {f: v[1] for f, v in b.items()})
    if both is None:
        return None
    common, am, bm, pooled = both
    per = "; ".join(f"{100 * (x - y):+.1f}" for x, y in zip(am, bm))
    spread = f" ± {100 * pooled['diff_std_seeds']:.1f}" if len(common) > 1 else ""
    return f"{100 * pooled['diff_mean']:+.1f}{spread} | {pooled['wilcoxon_p']:.2g} | {per}"


def tables(folders: list[str], rules: list[str] | None = None) -> str:
    data = read(folders)
    counts = sorted({n for n, _, _ in data}, key=lambda n: (n == "all", int(n) if n != "all" else 0))
    rows = sorted({r for _, r, _ in data}, key=lambda r: (r != "scratch", r))
    rules = rules or sorted({u for _, _, u in data}, key=lambda u: (u != "best", u))
    lines = ["| labelled | row | rule | kept step per folder | test Dice |", "|---|---|---|---|---|"]
    for n in counts:
        for r in rows:
            for u in rules:
                d = data.get((n, r, u))
                if d:
                    steps = ", ".join(str(d[f][0]) for f in sorted(d))
                    dice = [100 * float(np.nanmean(list(d[f][1].values()))) for f in sorted(d)]
                    lines.append(f"| {n} | {r} | {u} | {steps} | {_fmt(dice)} |")
    lines += ["", "| labelled | comparison | A - B (± std over folders) | p (Wilcoxon, cases) | per folder |",
              "|---|---|---|---|---|"]
    for n in counts:
        for u in rules:
            for r in rows:
                if r == "scratch":
                    continue
                s = paired(data.get((n, r, u), {}), data.get((n, "scratch", u), {}))
                if s:
                    lines.append(f"| {n} | {r} - scratch, both {u} | {s} |")
            tuned = [r for r in rows if r != "scratch"]
            for i, r in enumerate(tuned):
                for q in tuned[i + 1:]:
                    s = paired(data.get((n, r, u), {}), data.get((n, q, u), {}))
                    if s:
                        lines.append(f"| {n} | {r} - {q}, both {u} | {s} |")
        for r in rows:
            for u in rules:
                if u == "best":
                    continue
                s = paired(data.get((n, r, u), {}), data.get((n, r, "best"), {}))
                if s:
                    lines.append(f"| {n} | {r}: {u} - best | {s} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", help="comma-separated label-efficiency folders (one per seed)")
    ap.add_argument("--rules", default="", help="comma-separated rules to show (default: every rule found)")
    ap.add_argument("--baseline", default="", help="comma-separated folders, one per variant folder in the same "
                    "order: also print variant - baseline for every row and rule")
    a = ap.parse_args(argv)
    print(tables(a.folders.split(","), a.rules.split(",") if a.rules else None))
    if a.baseline:
        print()
        print(against(a.folders.split(","), a.baseline.split(",")))


if __name__ == "__main__":
    main()
