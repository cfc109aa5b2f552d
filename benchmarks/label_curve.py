"""Label-efficiency curve of a `compare --seeds` benchmark folder: Dice against labelled phantoms.

The all-labels points are the benchmark's own rows (``seed-S/probe-METHOD-f0``,
``finetune-METHOD-f0``, ``scratch-f0``); the few-label points are label-efficiency steps run in the
same seed folders (``seed-S/labels/{scratch,METHOD,finetune-METHOD}-nN-f0``, the step names of
``voxdiff experiment label-efficiency``; ``...-f0-lpft`` when fine-tuning started from the probe's head). Per seed, a row's Dice is the mean over test cases of the
organ-mean Dice; the table gives mean ± std over the seeds that have the row, and the figure
(``label_efficiency.png`` in OUT, ``voxdiff.experiments.report.label_figures``) draws the means
with the spread over seeds.

    python benchmarks/label_curve.py runs/bench --out docs/images
    python benchmarks/label_curve.py runs/bench --out /tmp/lc --tests 1,2   # + paired tests at 1 and 2 labels
    python benchmarks/label_curve.py runs/bench-fresh --out /tmp/lc --tests 1 --against runs/bench
    python benchmarks/label_curve.py runs/bench-clean runs/bench34-clean --tests 1 --against runs/bench runs/bench34

Several folders (e.g. seeds 0-2 in one, 3-4 in another) are read as one set of seed folders; a
seed folder's name must not repeat among them. A seed folder without the all-labels rows (a
``compare --scratch false`` run) contributes its few-label rows only.

``--tests N,...``: at each of those label counts, paired comparisons over the seeds that have both
rows (``voxdiff.evaluate.stats.paired_comparison``): each seed's mean difference (mean ± std over
seeds), and the Wilcoxon test over the test cases, pooled (each case's Dice averaged over the seeds)
and per seed (cases where A is better / all).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np


def case_mean(scores: dict) -> float:
    """Mean over cases of the organ-mean Dice (organs absent from both: NaN, left out)."""
    from voxdiff.evaluate.stats import case_means
    from voxdiff.experiments.base import scores_to_per_case

    vals = [v for v in case_means(scores_to_per_case(scores)).values() if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


Benches = Path | Sequence[Path]


def seed_folders(bench: Benches) -> list[Path]:
    """The ``seed-*`` folders of one benchmark folder or of several, by seed; a seed folder name
    found in two of them is refused (their rows would be mixed up)."""
    roots = [Path(bench)] if isinstance(bench, (str, Path)) else [Path(b) for b in bench]
    found: dict[str, Path] = {}
    for root in roots:
        for sd in root.glob("seed-*"):
            if not sd.is_dir():
                continue
            if sd.name in found:
                raise SystemExit(f"{sd.name} is in both {found[sd.name].parent} and {root}")
            found[sd.name] = sd

    def seed(name: str) -> tuple[int, str]:
        tail = name.removeprefix("seed-")
        return (int(tail), "") if tail.isdigit() else (1 << 30, tail)

    return [found[k] for k in sorted(found, key=seed)]


def collect(bench: Benches, methods: list[str], heads: list[str]) -> dict[tuple[int, str, str], dict[str, float]]:
    """``{(labelled cases, method, mode): {seed folder: Dice}}``."""
    from voxdiff.experiments.experiments import LPFT_SUFFIX

    out: dict[tuple[int, str, str], dict[str, float]] = {}

    def add(n: int, method: str, mode: str, seed: str, value: float) -> None:
        out.setdefault((n, method, mode), {})[seed] = value

    for sd in seed_folders(bench):
        # the all-labels rows (where run): (method, folder, {mode: key of its scores in result.json})
        full = [("from-scratch", sd / "scratch-f0", {"scratch": "scratch"})]
        for m in methods:
            full += [(m, sd / f"probe-{m}-f0", {h: h for h in heads}), (m, sd / f"finetune-{m}-f0", {"fine-tuned": "finetune"})]
        for m, folder, modes in full:
            if (folder / "result.json").is_file():
                d = json.loads((folder / "result.json").read_text())
                for mode, key in modes.items():
                    if key in d["scores"]:  # a probe run with fewer heads has no row for the others
                        add(len(d["train_cases"]), m, mode, sd.name, case_mean(d["scores"][key]))
        for res in sorted((sd / "labels").glob("*-n*-f0*/result.json")):
            name = res.parent.name
            mt = re.fullmatch(rf"(.+)-n(\d+)-f0(?:{LPFT_SUFFIX})?", name)  # LP-FT: fine-tuned from the probe's head
            if not mt:
                continue
            stem, n = mt.group(1), int(mt.group(2))
            d = json.loads(res.read_text())
            if stem == "scratch":
                add(n, "from-scratch", "scratch", sd.name, case_mean(d["scores"]["scratch"]))
            elif stem.startswith("finetune-") and stem[len("finetune-"):] in methods:
                add(n, stem[len("finetune-"):], "fine-tuned", sd.name, case_mean(d["scores"]["finetune"]))
            elif stem in methods:
                for h in heads:
                    if h in d["scores"]:
                        add(n, stem, h, sd.name, case_mean(d["scores"][h]))
    return out


STEPS = {"scratch": ("scratch", "scratch"), "fine-tuned": ("finetune-{m}", "finetune"),
         "nonlinear": ("{m}", "nonlinear"), "linear": ("{m}", "linear")}


def case_scores(bench: Benches, n: int | str, method: str, mode: str) -> dict[str, dict[str, float]]:
    """``{seed folder: {case: organ-mean Dice}}`` of a few-label step (``labels/STEP-nN-f0``)."""
    from voxdiff.evaluate.stats import case_means
    from voxdiff.experiments.base import scores_to_per_case
    from voxdiff.experiments.experiments import LPFT_SUFFIX

    step, key = STEPS[mode]
    out = {}
    for sd in seed_folders(bench):
        for suffix in ("", LPFT_SUFFIX):  # a folder holds one of the two starts of a fine-tuned row
            f = sd / "labels" / f"{step.format(m=method)}-n{n}-f0{suffix}" / "result.json"
            if f.is_file():
                out[sd.name] = case_means(scores_to_per_case(json.loads(f.read_text())["scores"][key]))
                break
    return out


def paired_over_seeds(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]
                      ) -> tuple[list[str], list[float], list[float], dict] | None:
    """A - B over the seed folders both have (``{folder: {case: Dice}}`` each): ``(folders, A's mean
    per folder, B's, the pooled paired comparison)``, the cases averaged over folders for the
    Wilcoxon test; None when no folder has both."""
    from voxdiff.evaluate.stats import paired_comparison, seed_average

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None

    def mean(d: dict[str, float]) -> float:
        return float(np.nanmean(list(d.values())))

    am, bm = [mean(a[s]) for s in seeds], [mean(b[s]) for s in seeds]
    return seeds, am, bm, paired_comparison(am, bm, seed_average([a[s] for s in seeds]),
                                            seed_average([b[s] for s in seeds]))


def paired_lines(bench: Benches, n: int | str, pairs: list[tuple[tuple[str, str], tuple[str, str]]],
                 bench_b: Benches | None = None) -> list[str]:
    """One line per comparison A - B at ``n`` labelled phantoms (see the module docstring); B's rows
    from ``bench_b`` when given (the same seed folder names)."""
    from voxdiff.evaluate.stats import paired_comparison

    def name(m: str, k: str) -> str:
        return "from scratch" if k == "scratch" else f"{m} {k}"

    lines = []
    for (ma, ka), (mb, kb) in pairs:
        a, b = case_scores(bench, n, ma, ka), case_scores(bench_b or bench, n, mb, kb)
        both = paired_over_seeds(a, b)
        if both is None:
            continue
        seeds, am, bm, pooled = both
        per = []
        for s, x, y in zip(seeds, am, bm):
            c = paired_comparison([x], [y], a[s], b[s])
            per.append(f"{s.removeprefix('seed-')}: {100 * c['case_diff_mean']:+.1f} "
                       f"({c['cases_a_better']}/{c['n_cases']}, p = {c['wilcoxon_p']:.2g})")
        spread = f" ± {100 * pooled['diff_std_seeds']:.1f}" if len(seeds) > 1 else ""
        sp = pooled["seed_ttest_p"]
        lines.append(f"| {n} | {name(ma, ka)} - {name(mb, kb)} | {len(seeds)} | {100 * pooled['diff_mean']:+.1f}{spread} | "
                     f"{pooled['wilcoxon_p']:.2g} | {'n/a' if sp != sp else f'{sp:.2g}'} | {'; '.join(per)} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=Path, nargs="+", help="`voxdiff experiment compare --seeds` folder(s)")
    ap.add_argument("--methods", default="diffusion-ape,contrastive")
    ap.add_argument("--heads", default="linear,nonlinear")
    ap.add_argument("--out", type=Path, default=None, help="folder for label_efficiency.png (default: BENCH)")
    ap.add_argument("--tests", default="", help="label counts for paired tests, e.g. 1,2")
    ap.add_argument("--against", type=Path, nargs="+", default=None,
                    help="with --tests: each fine-tuned row of BENCH against the same row of these folders "
                         "(e.g. a label_rows.py --finetune variant against the benchmark), and the first "
                         "method's against the other methods' fine-tuned rows there")
    args = ap.parse_args()
    methods, heads = args.methods.split(","), args.heads.split(",")
    data = collect(args.bench, methods, heads)
    if not data:
        raise SystemExit(f"{', '.join(map(str, args.bench))}: no finished rows (seed-*/.../result.json)")
    from voxdiff.evaluate.metrics import mean_std

    rows = []
    print("| labelled phantoms | method | mode | seeds | mean Dice (%) |\n|---|---|---|---|---|")
    for (n, method, mode), per_seed in sorted(data.items(), key=lambda kv: (kv[0][0], kv[0][1] != "from-scratch", kv[0])):
        v = np.array(list(per_seed.values()))
        std = mean_std(v)["std"]
        seeds = ", ".join(f"{s.removeprefix('seed-')}: {100 * x:.1f}" for s, x in per_seed.items())
        print(f"| {n} | {method} | {mode} | {seeds} | {100 * v.mean():.1f}" + (f" ± {100 * std:.1f}" if len(v) > 1 else "") + " |")
        rows.append({"n_train": n, "method": method, "mode": mode,
                     "summary": {"mean": {"mean": float(v.mean()), "std": std}}})
    from voxdiff.experiments.report import label_figures

    out = args.out or args.bench[0]
    out.mkdir(parents=True, exist_ok=True)
    label_figures(rows, out)
    print(f"\nfigure: {out / 'label_efficiency.png'}")
    counts = [int(c) for c in args.tests.split(",") if c.strip()]
    if counts:
        first, other = methods[0], methods[1:]
        pairs = [((first, "fine-tuned"), ("from-scratch", "scratch"))]
        pairs += [((first, "fine-tuned"), (m, "fine-tuned")) for m in other]
        pairs += [((m, "fine-tuned"), ("from-scratch", "scratch")) for m in other]
        pairs += [((first, "nonlinear"), ("from-scratch", "scratch"))]
        print("\n| labelled | A - B | seeds | mean difference over seeds | Wilcoxon p (cases, seed-averaged) | "
              "t-test p (seeds) | per seed (cases A better, p) |\n|---|---|---|---|---|---|---|")
        for n in counts:
            print("\n".join(paired_lines(args.bench, n, pairs)))
            if args.against is not None:
                across = [((m, "fine-tuned"), (m, "fine-tuned")) for m in methods]
                across += [((first, "fine-tuned"), (m, "fine-tuned")) for m in other]
                print("\n".join(paired_lines(args.bench, n, across, bench_b=args.against)))


if __name__ == "__main__":
    main()
