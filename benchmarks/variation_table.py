"""How much one labelled phantom teaches, on two phantom distributions: the from-scratch rows of
``voxdiff experiment label-efficiency`` folders (one folder per training seed) for each distribution,
their mean ± std over seeds at every label count, and the share of the all-labels Dice that one label
reaches (docs/PHANTOMS.md, "Wide variation").

    python benchmarks/variation_table.py --a runs/var/le-default-s0,runs/var/le-default-s1 \
        --b runs/var/le-wide-s0,runs/var/le-wide-s1 --names "default,wide"

A step ``labels/METHOD-nN-f0`` with N = ``all`` is every labelled case. ``--methods`` adds other rows
of the same folders (e.g. ``finetune-contrastive``). ``--paired N[,N...]`` adds, for distribution B, the
paired comparisons of ``benchmarks/label_curve.py --tests`` at each N labelled phantoms (``all``: every
labelled phantom) (fine-tuned and frozen
non-linear rows of ``--label_methods`` against from scratch, fine-tuned diffusion against contrastive):

    python benchmarks/variation_table.py --a ... --b runs/var/lew-s0,runs/var/lew-s1 --names default,wide \
        --methods scratch,finetune-diffusion-ape,finetune-contrastive,diffusion-ape,contrastive --paired 1,2,all

A folder written ``PATH@N`` (``@1``, ``@all``, ``@1+2``) gives only its rows at those label counts, so
that one protocol's runs can be gathered from folders that also hold another's. ``--figure DIR``
draws distribution B's rows against the number of labelled phantoms (``DIR/label_efficiency.png``,
mean ± std over the folders that have each row):

    python benchmarks/variation_table.py --a runs/var/le-default-s0 \
        --b runs/var/lefix1-s0,runs/var/lefix2-s0,runs/var/lefix2-s1,runs/var/lefix-s0@all,runs/var/lefix-s1@all \
        --methods scratch,finetune-diffusion-ape,finetune-contrastive,diffusion-ape,contrastive --paired 1,2,all --figure docs/images
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

from label_curve import case_mean, paired_lines  # noqa: E402


def entry(spec: str) -> tuple[Path, set[str] | None]:
    """``PATH`` (every label count) or ``PATH@N[+N...]`` (only those counts; ``all`` for every case)."""
    path, _, counts = spec.partition("@")
    return Path(path), (set(counts.split("+")) if counts else None)


def steps(spec: str, methods: list[str]) -> list[tuple[str, str, Path]]:
    """``(method, label count, result.json)`` of the folder's label-efficiency steps in ``methods``."""
    folder, counts = entry(spec)
    out = []
    for res in sorted((folder / "labels").glob("*-n*-f0/result.json")):
        m = re.fullmatch(r"(.+)-n(\d+|all)-f0", res.parent.name)
        if m and m.group(1) in methods and (counts is None or m.group(2) in counts):
            out.append((m.group(1), m.group(2), res))
    return out


def read_step(res: Path) -> tuple[float, int]:
    """A step's Dice (mean over test cases of the organ-mean, as a fraction) and its number of labelled
    training cases."""
    doc = json.loads(res.read_text())
    scores = doc["scores"]
    key = "nonlinear" if "nonlinear" in scores else next(iter(scores))  # frozen probes: the non-linear head
    return case_mean(scores[key]), len(doc.get("train_cases") or [])


def collect(folders: list[str], methods: list[str]) -> dict[tuple[str, str], tuple[list[float], int]]:
    """``{(method, label count): ([Dice as a fraction per folder that has the row], labelled training
    cases)}`` (folders as for :func:`entry`; each result.json read once)."""
    out: dict[tuple[str, str], tuple[list[float], int]] = {}
    for f in folders:
        for method, n, res in steps(f, methods):
            dice, n_train = read_step(res)
            vals, _ = out.get((method, n), ([], 0))
            out[(method, n)] = (vals + [dice], n_train or (int(n) if n != "all" else 0))
    return out


def rows(collected: dict[tuple[str, str], tuple[list[float], int]]) -> dict[tuple[str, str], list[float]]:
    """``{(method, label count): [Dice (%) per folder that has the row]}`` from :func:`collect`."""
    return {k: [100 * v for v in vals] for k, (vals, _) in collected.items()}


def figure_rows(collected: dict[tuple[str, str], tuple[list[float], int]]) -> list[dict]:
    """Rows for :func:`voxdiff.experiments.report.label_figures` from :func:`collect`: each (method,
    label count) as the label-efficiency report names it, Dice as a fraction, mean ± std over the
    folders, at the number of labelled training phantoms the runs used (``all`` is read from the runs)."""
    out = []
    for (method, _n), (v, n_train) in collected.items():
        if method == "scratch":
            name, mode = "from-scratch", "scratch"
        elif method.startswith("finetune-"):
            name, mode = method.removeprefix("finetune-"), "fine-tuned"
        else:
            name, mode = method, "nonlinear"
        std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        out.append({"method": name, "mode": mode, "n_train": n_train,
                    "summary": {"mean": {"mean": float(np.mean(v)), "std": std, "n": len(v)}}})
    return sorted(out, key=lambda r: (r["method"] != "from-scratch", r["method"], r["mode"], r["n_train"]))


def fmt(v: list[float]) -> str:
    return f"{np.mean(v):.1f} ± {np.std(v, ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="comma-separated label-efficiency folders (one per seed), distribution A")
    ap.add_argument("--b", required=True, help="the same for distribution B")
    ap.add_argument("--names", default="A,B")
    ap.add_argument("--methods", default="scratch", help="comma-separated row names (scratch, finetune-METHOD, METHOD)")
    ap.add_argument("--paired", default="", help="comma-separated label counts (or all) for paired tests on distribution B")
    ap.add_argument("--label_methods", default="diffusion-ape,contrastive")
    ap.add_argument("--figure", type=Path, default=None,
                    help="folder for label_efficiency.png: distribution B's rows against labelled phantoms")
    a = ap.parse_args(argv)
    names = a.names.split(",")
    methods = a.methods.split(",")
    collected = [collect(s.split(","), methods) for s in (a.a, a.b)]
    tables = [rows(c) for c in collected]
    counts = sorted({n for t in tables for (_, n) in t}, key=lambda n: (n == "all", int(n) if n != "all" else 0))
    print(f"| row | labelled phantoms | {' | '.join(names)} |")
    print("|---|---|" + "---|" * len(names))
    for m in methods:
        for n in counts:
            cells = [fmt(t[(m, n)]) if (m, n) in t else "-" for t in tables]
            print(f"| {m} | {n} | {' | '.join(cells)} |")
        share = []
        for t in tables:
            one, full = t.get((m, "1")), t.get((m, "all"))
            share.append(f"{100 * np.mean(one) / np.mean(full):.0f} %" if one and full else "-")
        if any(x != "-" for x in share):
            print(f"| {m} | 1 label / all labels | {' | '.join(share)} |")
    if a.paired:
        import tempfile

        lm = a.label_methods.split(",")
        pairs = [((m, k), ("from-scratch", "scratch")) for m in lm for k in ("fine-tuned", "nonlinear")]
        pairs += [((lm[0], "fine-tuned"), (m, "fine-tuned")) for m in lm[1:]]
        print(f"\n{names[1]}: paired over test cases (Wilcoxon), differences in Dice points\n")
        print("| labelled | A - B | seeds | mean diff | p (pooled) | p (seeds, t-test) | per seed: diff (cases A better / all, p) |")
        print("|---|---|---|---|---|---|---|")
        for n in a.paired.split(","):
            # label_curve reads seed-S folders: those with rows at n, numbered 0, 1, ... in --b's order
            with tempfile.TemporaryDirectory() as tmp:
                having = [f for f in a.b.split(",") if any(c == n for _, c, _ in steps(f, methods))]
                for k, f in enumerate(having):
                    (Path(tmp) / f"seed-{k}").symlink_to(entry(f)[0].resolve())
                for line in paired_lines(Path(tmp), n, pairs):  # a count or "all"
                    print(line)
    if a.figure is not None:
        from voxdiff.experiments.report import label_figures

        a.figure.mkdir(parents=True, exist_ok=True)
        label_figures(figure_rows(collected[1]), a.figure)
        print(f"\nwrote {a.figure / 'label_efficiency.png'}")


if __name__ == "__main__":
    main()
