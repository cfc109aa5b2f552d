"""benchmarks/refine_heads.py: the refinement settings reach the probe config; bad input refused."""

import pytest
from standin import load_benchmark


def test_refine_settings_and_the_bundles_window_reach_the_config(tmp_path):
    from voxdiff.experiments.base import Experiment, ExperimentConfig

    rh = load_benchmark("refine_heads")
    exp = Experiment(ExperimentConfig(budget="tiny"), tmp_path / "e", log=lambda *a: None)
    cfg = rh.refine_cfg(exp, {"roi": [24, 24, 16], "overlap": 0.5}, {"refine_steps": 7, "refine_lr": 3e-5})
    assert (cfg.optim.refine_steps, cfg.optim.refine_lr) == (7, 3e-5)
    assert tuple(cfg.inference.feature_roi) == (24, 24, 16) and cfg.inference.overlap == 0.5


def test_bad_input_is_refused(tmp_path):
    rh = load_benchmark("refine_heads")
    with pytest.raises(SystemExit, match="--refine: a JSON object"):
        rh.main([str(tmp_path), "--refine", '{"lr": 1}'])
    with pytest.raises(SystemExit, match="not a seed folder"):
        rh.main([str(tmp_path), "--seeds", "3"])
    with pytest.raises(SystemExit, match=f"{tmp_path}: not a seed folder"):  # one folder, no seed subfolders
        rh.main([str(tmp_path), "--seeds", "-"])
    from voxdiff.experiments.base import Experiment, ExperimentConfig

    exp = Experiment(ExperimentConfig(budget="tiny"), tmp_path / "e", log=lambda *a: None)
    with pytest.raises(SystemExit, match="no finished probe step"):
        rh.run_seed(exp, "probe-random-f0", 1, {"refine_steps": 1})
