"""Paired comparisons of two methods scored on the same test cases over several training seeds.

Two methods A and B are run with the same seeds on the same cases. Their difference is reported
two ways:

* over seeds: the difference of the seeds' mean Dice, mean ± std over seeds (what a rerun moves);
* over cases: each case's Dice (mean over its organs) averaged over the seeds, then the paired
  differences across cases, tested with the two-sided Wilcoxon signed-rank test and the paired t-test.
  Cases are the independent units here; a seed's runs share their cases, so seeds x cases are not
  pooled as independent samples.

Each difference also gets a 95 % confidence interval (Student's t over the seeds' differences, and
over the cases' differences): where a test says "no difference shown", the interval says how large a
difference the runs still allow either way (a non-inferiority reading: A is no worse than B by more
than the interval's lower end).

The test over cases does not see how much a method moves between pretraining seeds: averaged over
three seeds, one method's unlucky draw can look like a difference on every case (the phantom
benchmark's "diffusion + APE - none" gave p = 0.020 over cases on three seeds and +1.3 ± 5.0,
p = 0.19, on five). So the seeds' differences get their own two-sided one-sample t-test
(``seed_ttest_p``), and :func:`verdict` names a winner only when both tests reject.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from .metrics import mean_std


def case_means(per_case: Mapping[str, Mapping[int, float]]) -> dict[str, float]:
    """Each case's Dice averaged over its organs (NaN organs, absent from the case, left out)."""
    out = {}
    for cid, organs in per_case.items():
        v = np.asarray([x for x in organs.values() if x is not None and np.isfinite(x)], dtype=np.float64)
        out[str(cid)] = float(v.mean()) if v.size else float("nan")
    return out


def seed_average(per_seed: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """``{case: value}`` averaged over seeds, for the cases every seed scored."""
    if not per_seed:
        return {}
    common = set(per_seed[0])
    for d in per_seed[1:]:
        common &= set(d)
    return {c: float(np.nanmean([d[c] for d in per_seed])) for c in sorted(common)}


def t_interval(mean: float, std: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided Student's t confidence interval at ``level`` of a mean of ``n`` values with sample std
    ``std``: ``(nan, nan)`` for ``n`` < 2, ``(mean, mean)`` when ``std`` is 0."""
    from scipy import stats

    if n < 2 or not math.isfinite(std):
        return float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * std / math.sqrt(n) if std > 0 else 0.0
    return mean - half, mean + half


def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """:func:`t_interval` of ``values`` (NaN ignored, as :func:`~voxdiff.evaluate.metrics.mean_std`)."""
    ms = mean_std(list(values))
    return t_interval(ms["mean"], ms["std"], ms["n"], level)


def paired_comparison(a_seed_means: Sequence[float], b_seed_means: Sequence[float],
                      a_cases: Mapping[str, float], b_cases: Mapping[str, float]) -> dict[str, Any]:
    """A - B: ``a_seed_means`` / ``b_seed_means`` are each seed's mean Dice (same seed order);
    ``a_cases`` / ``b_cases`` the per-case Dice averaged over seeds. ``seed_ci95`` and ``case_ci95``:
    95 % confidence intervals ``[low, high]`` of the mean difference over seeds and over cases."""
    from scipy import stats

    if len(a_seed_means) != len(b_seed_means):
        raise ValueError("paired comparison needs the same seeds for both methods")
    seed_diff = mean_std([a - b for a, b in zip(a_seed_means, b_seed_means)])
    cases = sorted(c for c in set(a_cases) & set(b_cases)
                   if np.isfinite(a_cases[c]) and np.isfinite(b_cases[c]))
    d = np.asarray([a_cases[c] - b_cases[c] for c in cases], dtype=np.float64)
    sd = np.asarray([a - b for a, b in zip(a_seed_means, b_seed_means)], dtype=np.float64)
    sd = sd[np.isfinite(sd)]
    seed_p = float("nan")
    if sd.size >= 2:
        if sd.std(ddof=1) > 1e-9:
            seed_p = float(stats.ttest_1samp(sd, 0.0).pvalue)
        else:  # every seed the same difference (to rounding): consistent when it is not zero
            seed_p = 0.0 if abs(sd.mean()) > 1e-9 else 1.0
    res: dict[str, Any] = {
        "diff_mean": seed_diff["mean"], "diff_std_seeds": seed_diff["std"], "n_seeds": seed_diff["n"],
        "seeds_a_better": int((sd > 0).sum()), "seeds_b_better": int((sd < 0).sum()), "seed_ttest_p": seed_p,
        "n_cases": int(d.size), "case_diff_mean": float(d.mean()) if d.size else float("nan"),
        "cases_a_better": int((d > 0).sum()), "cases_b_better": int((d < 0).sum()),
        "wilcoxon_p": float("nan"), "ttest_p": float("nan"),
        "seed_ci95": list(mean_ci(sd)), "case_ci95": list(mean_ci(d)),
    }
    if d.size >= 2 and np.any(d != 0):
        res["wilcoxon_p"] = float(stats.wilcoxon(d, alternative="two-sided").pvalue)
        if d.std(ddof=1) > 0:
            res["ttest_p"] = float(stats.ttest_1samp(d, 0.0).pvalue)
    elif d.size >= 2:
        res["wilcoxon_p"] = res["ttest_p"] = 1.0
    return res


def verdict(cmp: Mapping[str, float | int], alpha: float = 0.05) -> str:
    """'A better' / 'B better' when the Wilcoxon test over cases rejects at ``alpha`` and so does the
    t-test over the seeds' differences (when there are two seeds or more); 'not shown across seeds'
    when only the test over cases rejects; else 'no difference shown'."""
    p = float(cmp.get("wilcoxon_p", float("nan")))
    if math.isnan(p) or p >= alpha:
        return "no difference shown"
    ps = float(cmp.get("seed_ttest_p", float("nan")))
    if int(cmp.get("n_seeds", 1)) >= 2 and not (ps < alpha):
        return "not shown across seeds"
    return "A better" if float(cmp["case_diff_mean"]) > 0 else "B better"
