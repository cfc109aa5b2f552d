"""benchmarks/tuned_windows.py: the settings reach both end-to-end rows, and the summary table."""

import pytest
from standin import load_benchmark


def test_settings_reach_both_end_to_end_rows_and_fine_tuning_overrides_only_fine_tuning(tmp_path):
    from voxdiff.experiments.base import Experiment, ExperimentConfig

    tw = load_benchmark("tuned_windows")
    exp = Experiment(ExperimentConfig(budget="tiny"), tmp_path / "e", log=lambda *a: None)
    frozen = exp.probe_cfg()
    tw.with_settings(exp, {"patch_size": [32, 32, 16], "batch_size": 1, "roi": [48, 48, 48]}, {"hidden": 6})
    sc, ft = exp.tuned_cfg("scratch", early_stopping=True), exp.tuned_cfg("finetune", early_stopping=True)
    for c in (sc, ft):
        assert tuple(c.sampling.patch_size) == (32, 32, 16) and c.sampling.batch_size == 1
        assert tuple(c.inference.roi) == (48, 48, 48)
    assert ft.head.hidden == 6 and sc.head.hidden == frozen.head.hidden
    assert exp.probe_cfg().sampling.patch_size == frozen.sampling.patch_size  # frozen heads keep theirs


def test_early_stopping_overrides_reach_both_rows_trained_to_convergence(tmp_path):
    from voxdiff.experiments.base import Experiment, ExperimentConfig

    tw = load_benchmark("tuned_windows")
    exp = Experiment(ExperimentConfig(budget="tiny"), tmp_path / "e", log=lambda *a: None)
    before = exp.tuned_cfg("scratch", early_stopping=True)
    tw.with_settings(exp, {"whole_volume": True, "batch_size": 1}, {}, {"steps": 7, "val_every": 3})
    for mode in ("scratch", "finetune"):
        c = exp.tuned_cfg(mode, early_stopping=True)
        assert (c.optim.steps, c.optim.val_every) == (7, 3) and c.optim.patience == before.optim.patience
        assert c.sampling.whole_volume and c.sampling.batch_size == 1


def test_summary_rows_per_kind_and_window():
    tw = load_benchmark("tuned_windows")
    rows = [{"seed": s, "method": "from-scratch", "patch": [80, 80, 48], "batch": 1,
             "val@64": 30.0 + s, "test@64": 40.0 + s, "val@96": 50.0, "test@96": 60.0 - s} for s in (1, 0)]
    rows.append({"seed": 0, "method": "diffusion-ape", "patch": [48, 48, 32], "batch": 2, "val@64": 1.0, "test@64": 2.0})
    lines = tw.summary(rows).splitlines()
    assert len(lines) == 2 + 3
    assert lines[2] == "| from-scratch, 1 x 80x80x48 | 64^3 | 30.0 / 31.0 | 30.5 | 40.0 / 41.0 | 40.5 ± 0.7 |"
    assert lines[3].startswith("| from-scratch, 1 x 80x80x48 | 96^3 |") and lines[3].endswith("| 59.5 ± 0.7 |")
    assert lines[4] == "| diffusion-ape, 2 x 48x48x32 | 64^3 | 1.0 | 1.0 | 2.0 | 2.0 |"
    rows = [{"seed": 0, "method": "from-scratch", "patch": "volume", "batch": 1, "val@volume": 3.0, "test@volume": 4.0}]
    assert tw.summary(rows).splitlines()[2] == "| from-scratch, 1 x volume | volume | 3.0 | 3.0 | 4.0 | 4.0 |"


def test_bad_modes_are_refused(capsys):
    tw = load_benchmark("tuned_windows")
    with pytest.raises(SystemExit):
        tw.main(["runs", "--modes", "probe", "--out", "x.jsonl"])
    assert "--modes" in capsys.readouterr().err


def test_case_means_skip_absent_organs():
    tw = load_benchmark("tuned_windows")
    out = tw.case_means({"a": {"1": 0.5, "2": None, "3": float("nan"), "4": 1.0}, "b": {"1": None}})
    assert out["a"] == 75.0 and out["b"] != out["b"]  # NaN: no organ present
