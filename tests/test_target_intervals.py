"""benchmarks/target_intervals.py: the intervals behind issue #13's targets table."""

import json

import numpy as np
import pytest
from standin import load_benchmark


def test_intervals_from_a_summary_are_students_and_the_verdicts_follow_them(tmp_path, capsys):
    ti = load_benchmark("target_intervals")
    from scipy import stats

    from voxdiff.evaluate.stats import t_interval

    d = np.asarray(ti.FINETUNED_ALL) - np.asarray(ti.SCRATCH_ALL)
    ref = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert t_interval(float(d.mean()), float(d.std(ddof=1)), len(d)) == pytest.approx(ref)
    assert ti.verdict(0.5, 2.0, 0.0).startswith("met") and ti.verdict(-3.0, 5.6, 10.0).startswith("not met")
    assert ti.verdict(-1.7, 1.8, 0.0).startswith("not settled")
    assert ti.main(["--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert len(rows) == 3 + 2 + 2 + len(ti.SUMMARIES)
    assert all(len(v) == len(ti.TWO_LABELS_SEEDS) for v in ti.TWO_LABELS.values())
    for r in rows:
        assert r["ci95"][0] < r["mean"] < r["ci95"][1] and r["ci95"][0] < r["one_sided_low"] < r["mean"]
    out = capsys.readouterr().out
    assert sum(line.startswith("| ") for line in out.splitlines()) == len(rows) + 1  # the header, one line a row
