"""Paired comparisons over seeds and cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from voxdiff.evaluate.stats import case_means, paired_comparison, seed_average, verdict


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
