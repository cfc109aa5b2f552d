"""benchmarks/seed_table.py on hand-made compare folders: the seeds of two folders of the same
benchmark are gathered into one table with the paired tests; folders of another benchmark, a seed
in both folders or a missing row are refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from standin import load_benchmark

from voxdiff.evaluate.metrics import aggregate_cases, aggregate_folds

CASES = [f"c{i}" for i in range(8)]


@pytest.fixture(scope="module")
def st():
    return load_benchmark("seed_table")


def _row(method: str, dice: dict[str, float]) -> dict:
    """A compare row whose every case has organs 1 and 2 at its Dice, the rest absent."""
    per_case = {c: {o: (v if o in (1, 2) else float("nan")) for o in range(1, 14)} for c, v in dice.items()}
    plain = {c: {str(o): (None if np.isnan(v) else v) for o, v in d.items()} for c, d in per_case.items()}
    return {"method": method, "head": "nonlinear", "summary": aggregate_folds([aggregate_cases(per_case)]),
            "per_case": plain}


def _folder(root: Path, name: str, seeds: list[int], phantom_seed: int = 1, skip: str = "") -> Path:
    out = root / name
    (out / "phantoms").mkdir(parents=True)
    (out / "phantoms" / "phantoms.json").write_text(json.dumps({"seed": phantom_seed}))
    cfg = {"budget": "cpu-bench", "methods": ["a", "b"], "heads": ["nonlinear"], "seeds": seeds,
           "phantom_seed": phantom_seed}
    (out / "config.yaml").write_text(yaml.safe_dump({"config": cfg}))
    for s in seeds:
        rows = [_row("a", {c: 0.40 + 0.01 * s + 0.01 * i for i, c in enumerate(CASES)})]
        if skip != "b":
            rows.append(_row("b", {c: 0.30 + 0.02 * s for c in CASES}))  # A ahead on every case
        (out / f"seed-{s}").mkdir()
        (out / f"seed-{s}" / "results.json").write_text(json.dumps({"rows": rows}))
    return out


def test_two_folders_make_one_table_over_all_seeds(st, tmp_path, capsys):
    f1, f2 = _folder(tmp_path, "x", [0, 1, 2]), _folder(tmp_path, "y", [3, 4])
    assert st.main([str(f1), str(f2), "--pairs", "b:a", "--json", str(tmp_path / "t.json")]) == 0
    text = capsys.readouterr().out
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["seeds"] == [0, 1, 2, 3, 4]
    a, b = doc["rows"]
    # A's seed means: 0.40 + 0.01 s + mean(0.01 i) = 0.435 + 0.01 s; B's 0.30 + 0.02 s
    np.testing.assert_allclose(a["seed_means"], [0.435 + 0.01 * s for s in range(5)])
    np.testing.assert_allclose(b["seed_means"], [0.30 + 0.02 * s for s in range(5)])
    t_ab, t_ba = doc["tests"]
    assert t_ab["a"] == ["a", "nonlinear"] and t_ab["cases_a_better"] == 8 and t_ab["verdict"] == "A better"
    assert t_ab["diff_mean"] == pytest.approx(np.mean([0.135 - 0.01 * s for s in range(5)]))
    assert t_ba["a"] == ["b", "nonlinear"] and t_ba["verdict"] == "B better" and t_ba["wilcoxon_p"] < 0.05
    assert "seeds 0, 1, 2, 3, 4; 8 test cases. Each seed's own report: `FOLDER/seed-S/report.md`." in text
    assert text.startswith(f"# compare over seeds, gathered from {f1}, {f2}")
    assert "| a | nonlinear | 45.5 ± 1.6 |" in text and " s in all" not in text


def test_other_benchmarks_duplicate_seeds_and_missing_rows_are_refused(st, tmp_path):
    f1 = _folder(tmp_path, "x", [0, 1])
    with pytest.raises(SystemExit, match="not the same benchmark"):
        st.main([str(f1), str(_folder(tmp_path, "other", [2, 3], phantom_seed=2))])
    with pytest.raises(SystemExit, match="seed 1 is also in another folder"):
        st.main([str(f1), str(_folder(tmp_path, "again", [1, 2]))])
    with pytest.raises(SystemExit, match="no nonlinear row for b"):
        st.main([str(f1), str(_folder(tmp_path, "nob", [5, 6], skip="b"))])
