"""benchmarks/label_curve.py on a hand-made benchmark folder: the table, the figure and the paired
tests read the steps' per-case scores correctly."""

import json
import sys
from pathlib import Path

import pytest
from standin import load_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lc():
    return load_benchmark("label_curve")


def _result(folder: Path, key: str, per_case: dict[str, float], n_train: int = 7) -> None:
    """A step's result.json whose every case has two organs of Dice ``v`` and one absent organ (NaN)."""
    folder.mkdir(parents=True)
    scores = {c: {"1": v, "2": v, "3": None} for c, v in per_case.items()}
    (folder / "result.json").write_text(json.dumps({"scores": {key: scores},
                                                    "train_cases": [f"t{i}" for i in range(n_train)]}))


def _bench(root: Path) -> Path:
    cases = [f"c{i}" for i in range(6)]
    for s, shift in ((0, 0.0), (1, 0.02)):
        sd = root / f"seed-{s}"
        _result(sd / "scratch-f0", "scratch", {c: 0.5 for c in cases})
        _result(sd / "labels" / "scratch-n2-f0", "scratch", {c: 0.4 + shift for c in cases})
        # fine-tuned diffusion: +0.1 on every case, +0.12 on seed 1 (its scratch is +0.02)
        _result(sd / "labels" / "finetune-diffusion-ape-n2-f0", "finetune",
                {c: 0.5 + 2 * shift for c in cases})
        # contrastive: better on 4 of 6 cases only
        _result(sd / "labels" / "finetune-contrastive-n2-f0", "finetune",
                {c: (0.45 if i < 4 else 0.35) + shift for i, c in enumerate(cases)})
    return root


def test_case_scores_and_paired_tests(lc, tmp_path):
    bench = _bench(tmp_path / "bench")
    per = lc.case_scores(bench, 2, "diffusion-ape", "fine-tuned")
    assert set(per) == {"seed-0", "seed-1"} and per["seed-1"]["c0"] == pytest.approx(0.54)
    assert lc.case_scores(bench, 4, "diffusion-ape", "fine-tuned") == {}
    lines = lc.paired_lines(bench, 2, [(("diffusion-ape", "fine-tuned"), ("from-scratch", "scratch")),
                                       (("contrastive", "fine-tuned"), ("from-scratch", "scratch")),
                                       (("diffusion-ape", "nonlinear"), ("from-scratch", "scratch"))])
    assert len(lines) == 2  # no frozen rows in this folder: no line for them
    ft, ctr = lines
    # seed 0: +10.0, seed 1: +12.0 -> +11.0 ± 1.4; every case better on both seeds
    assert "| 2 | diffusion-ape fine-tuned - from scratch | 2 | +11.0 ± 1.4 |" in ft
    assert "0: +10.0 (6/6" in ft and "1: +12.0 (6/6" in ft
    from scipy import stats

    seed_p = stats.ttest_1samp([0.10, 0.12], 0).pvalue  # the seeds' own test: two seeds cannot show much
    assert f" | {seed_p:.2g} | " in ft and seed_p > 0.05
    # contrastive: (4 x 0.05 - 2 x 0.05) / 6 = +1.7 on each seed, 4 of 6 cases better
    assert "+1.7 ± 0.0" in ctr and "(4/6" in ctr


def test_main_prints_table_figure_and_tests(lc, tmp_path, monkeypatch, capsys):
    bench = _bench(tmp_path / "bench")
    monkeypatch.setattr(sys, "argv", ["label_curve.py", str(bench), "--out", str(tmp_path / "fig"), "--tests", "2"])
    lc.main()
    out = capsys.readouterr().out
    assert "| 7 | from-scratch | scratch | 0: 50.0, 1: 50.0 | 50.0 ± 0.0 |" in out
    assert "| 2 | from-scratch | scratch | 0: 40.0, 1: 42.0 | 41.0 ± 1.4 |" in out
    assert "Wilcoxon p" in out and (tmp_path / "fig" / "label_efficiency.png").is_file()


def test_against_compares_the_same_fine_tuned_row_of_two_folders(lc, tmp_path):
    bench = _bench(tmp_path / "bench")
    other = tmp_path / "variant"
    cases = [f"c{i}" for i in range(6)]
    for s in (0, 1):  # the variant's fine-tuned diffusion row is 0.03 below the benchmark's on every case
        base = lc.case_scores(bench, 2, "diffusion-ape", "fine-tuned")[f"seed-{s}"]
        # an LP-FT variant (its seed folders link the benchmark's rows): fine-tuned steps named ...-f0-lpft
        _result(other / f"seed-{s}" / "scratch-f0", "scratch", {c: 0.5 for c in cases})
        _result(other / f"seed-{s}" / "labels" / "finetune-diffusion-ape-n2-f0-lpft", "finetune",
                {c: base[c] - 0.03 for c in cases})
    got = lc.collect(other, ["diffusion-ape"], [])
    assert got[(2, "diffusion-ape", "fine-tuned")]["seed-0"] == pytest.approx(0.47)
    (line,) = lc.paired_lines(bench, 2, [(("diffusion-ape", "fine-tuned"), ("diffusion-ape", "fine-tuned"))],
                              bench_b=other)
    assert "| 2 | diffusion-ape fine-tuned - diffusion-ape fine-tuned | 2 | +3.0 ± 0.0 |" in line and "(6/6" in line


def test_several_folders_read_as_one_set_of_seeds(lc, tmp_path, monkeypatch, capsys):
    """Seeds split over two folders (0-1 and 2), the second without all-labels rows (a compare run with
    --scratch false): its few-label rows count, and a seed name found in both folders is refused."""
    bench = _bench(tmp_path / "bench")
    more = tmp_path / "bench2"
    cases = [f"c{i}" for i in range(6)]
    _result(more / "seed-2" / "labels" / "scratch-n2-f0", "scratch", {c: 0.46 for c in cases})
    _result(more / "seed-2" / "labels" / "finetune-diffusion-ape-n2-f0", "finetune", {c: 0.5 for c in cases})
    assert [p.name for p in lc.seed_folders([bench, more])] == ["seed-0", "seed-1", "seed-2"]
    got = lc.collect([bench, more], ["diffusion-ape"], [])
    assert set(got[(2, "from-scratch", "scratch")]) == {"seed-0", "seed-1", "seed-2"}
    assert set(got[(7, "from-scratch", "scratch")]) == {"seed-0", "seed-1"}
    (line,) = lc.paired_lines([bench, more], 2, [(("diffusion-ape", "fine-tuned"), ("from-scratch", "scratch"))])
    # seeds 0 / 1 / 2: +10.0 / +12.0 / +4.0
    assert "| 2 | diffusion-ape fine-tuned - from scratch | 3 | +8.7 ± 4.2 |" in line and "2: +4.0 (6/6" in line
    _result(more / "seed-1" / "labels" / "scratch-n2-f0", "scratch", {c: 0.4 for c in cases})
    with pytest.raises(SystemExit, match="seed-1 is in both"):
        lc.seed_folders([bench, more])


def test_against_also_compares_the_first_method_with_the_others_there(lc, tmp_path, monkeypatch, capsys):
    bench = _bench(tmp_path / "bench")
    variant = tmp_path / "variant"
    cases = [f"c{i}" for i in range(6)]
    for s in (0, 1):  # a variant with only a fine-tuned diffusion row, 0.5 on every case
        _result(variant / f"seed-{s}" / "labels" / "finetune-diffusion-ape-n2-f0", "finetune", {c: 0.5 for c in cases})
    monkeypatch.setattr(sys, "argv", ["label_curve.py", str(variant), "--out", str(tmp_path / "fig"), "--tests", "2",
                                      "--against", str(bench)])
    lc.main()
    out = capsys.readouterr().out
    # the variant's diffusion row against the benchmark's: seed 0 0.50 - 0.50, seed 1 0.50 - 0.54
    assert "| 2 | diffusion-ape fine-tuned - diffusion-ape fine-tuned | 2 | -2.0 ± 2.8 |" in out
    # and against the benchmark's contrastive row: 0.5 - (4 x 0.45 + 2 x 0.35) / 6 = +8.3, seed 1 +6.3
    assert "| 2 | diffusion-ape fine-tuned - contrastive fine-tuned | 2 | +7.3 ± 1.4 |" in out


def test_a_probe_run_with_fewer_heads_gives_rows_for_the_heads_it_has(lc, tmp_path):
    """A probe result holding only the non-linear head's scores: asked for linear and non-linear heads,
    the table gets the non-linear row and no linear one (instead of a KeyError)."""
    bench = _bench(tmp_path / "bench")
    _result(bench / "seed-0" / "probe-diffusion-ape-f0", "nonlinear", {f"c{i}": 0.3 for i in range(6)})
    got = lc.collect(bench, ["diffusion-ape"], ["linear", "nonlinear"])
    assert got[(7, "diffusion-ape", "nonlinear")] == {"seed-0": pytest.approx(0.3)}
    assert (7, "diffusion-ape", "linear") not in got
