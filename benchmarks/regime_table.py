"""Two regimes of the same benchmark side by side (e.g. i.i.d. labels against labels from one site).

Reads the step results of `voxdiff experiment compare` folders, one folder per seed and regime
(the same seeds in the same order on both sides), and prints per row (frozen probe, from scratch,
fine-tuned) the mean test Dice of each regime, their difference (mean ± std over seeds) and the
paired test over the test cases (each case's Dice averaged over the seeds; `voxdiff.evaluate.stats`);
then, within regime B, every row against from scratch (or the row ``--against`` names). Without
``--a``, only the second table: the rows of one set of seed folders against one of them:

    .venv/bin/python benchmarks/regime_table.py --a runs/bench/seed-0,runs/bench/seed-1 \\
        --b runs/bench-shift0,runs/bench-shift1
    .venv/bin/python benchmarks/regime_table.py --b runs/bench/seed-0,...,runs/bench/seed-4 \\
        --against "diffusion-ape nonlinear"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from voxdiff.evaluate.metrics import mean_std
from voxdiff.evaluate.stats import case_means, paired_comparison, seed_average


def folder_rows(folder: Path) -> dict[str, dict[str, float]]:
    """``{row: {case: Dice}}`` of fold 0 of one experiment folder."""
    rows: dict[str, dict[str, float]] = {}
    for d in sorted(folder.glob("probe-*-f0")):
        for head, scores in json.loads((d / "result.json").read_text())["scores"].items():
            rows[f"{d.name[len('probe-'):-len('-f0')]} {head}"] = case_means(scores)
    for d in [folder / "scratch-f0", *sorted(folder.glob("finetune-*-f0"))]:
        if (d / "result.json").is_file():
            for mode, scores in json.loads((d / "result.json").read_text())["scores"].items():
                rows["scratch" if mode == "scratch" else d.name[:-len("-f0")]] = case_means(scores)
    return rows


def regime(folders: list[Path]) -> dict[str, list[dict[str, float]]]:
    """``{row: [per-seed {case: Dice}]}`` for the rows every seed has."""
    per = [folder_rows(f) for f in folders]
    common = set(per[0]).intersection(*per[1:]) if per else set()
    return {r: [p[r] for p in per] for r in sorted(common)}


def seed_means(runs: list[dict[str, float]]) -> list[float]:
    return [float(np.nanmean(list(r.values()))) for r in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="", help="comma-separated experiment folders of regime A, one per seed (optional)")
    ap.add_argument("--b", required=True, help="regime B's folders, the same seeds in the same order")
    ap.add_argument("--names", default="A,B", help="names of the two regimes in the table")
    ap.add_argument("--against", default="scratch", help="the row of regime B every other row is compared with "
                                                         "(default: scratch), e.g. 'diffusion-ape nonlinear'")
    args = ap.parse_args()
    fb = [Path(p) for p in args.b.split(",")]
    fa = [Path(p) for p in args.a.split(",")] if args.a else []
    if fa and len(fa) != len(fb):
        raise SystemExit("error: --a and --b need the same number of folders (seeds)")
    na, nb = args.names.split(",")
    rb = regime(fb)
    if fa:
        ra = regime(fa)
        print(f"| row | {na} | {nb} | {nb} - {na} (seeds) | cases {nb} better / worse | p (Wilcoxon) | p (seeds, t-test) |")
        print("|---|---|---|---|---|---|---|")
        for row in sorted(set(ra) & set(rb)):
            a, b = seed_means(ra[row]), seed_means(rb[row])
            c = paired_comparison(b, a, seed_average(rb[row]), seed_average(ra[row]))
            print(f"| {row} | {100 * np.mean(a):.1f} | {100 * np.mean(b):.1f} | {100 * c['diff_mean']:+.1f} ± "
                  f"{100 * c['diff_std_seeds']:.1f} | {c['cases_a_better']} / {c['cases_b_better']} | {c['wilcoxon_p']:.3g} | "
                  f"{c['seed_ttest_p']:.3g} |")
    ref = args.against
    if ref not in rb:
        if not fa:
            raise SystemExit(f"error: no row {ref!r} in every folder of --b; rows: {', '.join(sorted(rb))}")
        return
    what = "from scratch" if ref == "scratch" else ref
    print(f"\n{nb}, {len(fb)} seeds, each row against {what}:\n")
    print(f"| row | mean ± std over seeds | row - {ref} (seeds) | cases better / worse | p (Wilcoxon) | p (seeds, t-test) |")
    print("|---|---|---|---|---|---|")
    r_means, r_cases = seed_means(rb[ref]), seed_average(rb[ref])
    print(f"| {ref} | {100 * np.mean(r_means):.1f} ± {100 * mean_std(r_means)['std']:.1f} | | | |")
    for row in sorted(rb):
        if row != ref:
            m = seed_means(rb[row])
            c = paired_comparison(m, r_means, seed_average(rb[row]), r_cases)
            print(f"| {row} | {100 * np.mean(m):.1f} ± {100 * mean_std(m)['std']:.1f} | {100 * c['diff_mean']:+.1f} ± {100 * c['diff_std_seeds']:.1f} | "
                  f"{c['cases_a_better']} / {c['cases_b_better']} | {c['wilcoxon_p']:.3g} | {c['seed_ttest_p']:.3g} |")


if __name__ == "__main__":
    main()
