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


def rows(folders: list[Path], methods: list[str]) -> dict[tuple[str, str], list[float]]:
    """``{(method, label count): [Dice per folder that has the row]}``."""
    out: dict[tuple[str, str], list[float]] = {}
    for f in folders:
        for res in sorted((f / "labels").glob("*-n*-f0/result.json")):
            m = re.fullmatch(r"(.+)-n(\d+|all)-f0", res.parent.name)
            if not m or m.group(1) not in methods:
                continue
            scores = json.loads(res.read_text())["scores"]
            key = "nonlinear" if "nonlinear" in scores else next(iter(scores))  # frozen probes: the non-linear head
            per_case = scores[key]  # {case: {organ: Dice}}
            out.setdefault((m.group(1), m.group(2)), []).append(100 * case_mean(per_case))
    return out


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
    a = ap.parse_args(argv)
    names = a.names.split(",")
    methods = a.methods.split(",")
    tables = [rows([Path(p) for p in s.split(",")], methods) for s in (a.a, a.b)]
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
        with tempfile.TemporaryDirectory() as tmp:  # label_curve reads seed-S folders
            for i, f in enumerate(a.b.split(",")):
                (Path(tmp) / f"seed-{i}").symlink_to(Path(f).resolve())
            print(f"\n{names[1]}: paired over test cases (Wilcoxon), differences in Dice points\n")
            print("| labelled | A - B | seeds | mean diff | p (pooled) | per seed: diff (cases A better / all, p) |")
            print("|---|---|---|---|---|---|")
            for n in a.paired.split(","):
                for line in paired_lines(Path(tmp), n, pairs):  # a count or "all"
                    print(line)


if __name__ == "__main__":
    main()
