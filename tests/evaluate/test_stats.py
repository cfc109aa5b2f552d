"""Paired comparisons over seeds and cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from voxdiff.evaluate.stats import case_means, mean_ci, paired_comparison, seed_average, verdict


def test_case_means_ignore_absent_organs():
    got = case_means({"a": {1: 0.5, 2: float("nan"), 3: 1.0}, "b": {1: float("nan")}})
    assert got["a"] == pytest.approx(0.75)
    assert math.isnan(got["b"])


def test_seed_average_keeps_cases_scored_by_every_seed():
    got = seed_average([{"a": 0.2, "b": 0.4}, {"a": 0.4, "c": 1.0}])
    assert got == {"a": pytest.approx(0.3)}


def test_paired_comparison_against_a_reference_computation():
    from scipy import stats

    rng = np.random.default_rng(0)
    b = {f"c{i}": float(v) for i, v in enumerate(rng.uniform(0.3, 0.6, 12))}
    a = {k: v + 0.05 + float(rng.normal(0, 0.01)) for k, v in b.items()}  # A better on every case
    res = paired_comparison([0.50, 0.52, 0.49], [0.45, 0.46, 0.46], a, b)
    d = np.array([a[k] - b[k] for k in sorted(a)])
    assert res["diff_mean"] == pytest.approx(np.mean([0.05, 0.06, 0.03]))
    assert res["diff_std_seeds"] == pytest.approx(np.std([0.05, 0.06, 0.03], ddof=1))
    assert res["case_diff_mean"] == pytest.approx(d.mean())
    assert res["wilcoxon_p"] == pytest.approx(stats.wilcoxon(d).pvalue)
    assert res["ttest_p"] == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    assert res["cases_a_better"] == 12 and res["cases_b_better"] == 0 and res["n_cases"] == 12
    assert verdict(res) == "A better"
    # swapped: B better; noise around zero: nothing shown
    assert verdict(paired_comparison([0.45] * 3, [0.5] * 3, b, a)) == "B better"
    noise = {k: v + float(rng.normal(0, 0.02)) for k, v in b.items()}
    assert verdict(paired_comparison([0.5] * 3, [0.5] * 3, noise, b)) in ("no difference shown",)


def test_paired_comparison_needs_the_same_seeds_and_survives_ties():
    with pytest.raises(ValueError, match="same seeds"):
        paired_comparison([0.1, 0.2], [0.1], {}, {})
    same = {"a": 0.5, "b": 0.7}
    res = paired_comparison([0.6, 0.6], [0.6, 0.6], same, same)
    assert res["wilcoxon_p"] == 1.0 and verdict(res) == "no difference shown"


def test_a_difference_over_cases_that_the_seeds_do_not_reproduce_is_not_a_verdict():
    """Three seeds where one seed of B was unlucky: every case looks better for A once averaged over
    the seeds (Wilcoxon rejects), but the seeds' differences (+0.08, -0.01, -0.01) do not show it."""
    from scipy import stats

    rng = np.random.default_rng(1)
    b = {f"c{i}": float(v) for i, v in enumerate(rng.uniform(0.3, 0.6, 10))}
    a = {k: v + 0.02 + float(rng.normal(0, 0.002)) for k, v in b.items()}
    res = paired_comparison([0.50, 0.51, 0.52], [0.42, 0.52, 0.53], a, b)
    assert res["wilcoxon_p"] < 0.01 and res["cases_a_better"] == 10
    assert res["seeds_a_better"] == 1 and res["seeds_b_better"] == 2
    assert res["seed_ttest_p"] == pytest.approx(stats.ttest_1samp([0.08, -0.01, -0.01], 0).pvalue)
    assert res["seed_ttest_p"] > 0.05 and verdict(res) == "not shown across seeds"
    # the same cases with seeds that agree: a verdict
    agree = paired_comparison([0.50, 0.51, 0.52], [0.48, 0.49, 0.505], a, b)
    assert agree["seed_ttest_p"] < 0.05 and verdict(agree) == "A better"
    # one seed: only the test over cases is possible, and it decides
    one = paired_comparison([0.50], [0.42], a, b)
    assert math.isnan(one["seed_ttest_p"]) and verdict(one) == "A better"


def test_confidence_intervals_agree_with_the_t_tests():
    """The 95 % interval is Student's: scipy's ``t.interval`` of the same values; it excludes zero
    exactly when the two-sided t-test rejects at 0.05, and narrows as seeds are added."""
    from scipy import stats

    v = [0.012, -0.012, 0.007, 0.0, 0.015, 0.018, -0.036]  # seven seeds' differences
    lo, hi = mean_ci(v)
    ref = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
    assert (lo, hi) == pytest.approx(ref)
    assert lo < np.mean(v) < hi
    assert mean_ci(v, level=0.90)[0] > lo  # a lower level gives a narrower interval
    assert all(math.isnan(x) for x in mean_ci([0.1])) and mean_ci([0.2, 0.2]) == (0.2, 0.2)
    assert mean_ci([0.1, float("nan"), 0.3]) == pytest.approx(mean_ci([0.1, 0.3]))
    rng = np.random.default_rng(3)
    for shift in (0.0, 0.01, 0.03):
        a = [0.5 + shift + float(x) for x in rng.normal(0, 0.02, 5)]
        b = [0.5] * 5
        cases_b = {f"c{i}": 0.5 for i in range(8)}
        cases_a = {k: v + shift + float(rng.normal(0, 0.02)) for k, v in cases_b.items()}
        res = paired_comparison(a, b, cases_a, cases_b)
        for ci, p in ((res["seed_ci95"], res["seed_ttest_p"]), (res["case_ci95"], res["ttest_p"])):
            assert (ci[0] > 0 or ci[1] < 0) == (p < 0.05), (shift, ci, p)
        assert res["seed_ci95"][0] < res["diff_mean"] < res["seed_ci95"][1]
    assert math.isnan(paired_comparison([0.5], [0.4], cases_a, cases_b)["seed_ci95"][0])
