"""benchmarks/lpft_one_label.py: the frozen probe's one-label recipe and the demo's LP-FT settings reach
the right rows."""

import pytest
from standin import load_benchmark


@pytest.mark.parametrize("method", ["diffusion-ape", "contrastive"])
def test_recipe_reaches_the_frozen_probe_and_lpft_only_fine_tuning_from_the_head(tmp_path, method):
    from voxdiff.experiments.base import Experiment, ExperimentConfig

    lp = load_benchmark("lpft_one_label")
    exp = Experiment(ExperimentConfig(budget="tiny"), tmp_path / "e", log=lambda *a: None)
    before = exp.tuned_cfg("finetune")
    lp.with_recipe(exp, method)
    p = exp.probe_cfg()
    assert (p.sampling.fov_crops, p.optim.steps, p.feature_side, p.norm_stats) == (64, 2400, "both", "fixed")
    assert tuple(p.inference.feature_roi) == (160, 160, 160)
    assert p.feature_input == ("clean" if method.startswith("diffusion") else None)
    ft = exp.tuned_cfg("finetune", from_probe=True)
    assert ft.sampling.whole_volume and ft.sampling.batch_size == 1
    assert (ft.optim.steps, ft.optim.backbone_lr, ft.optim.val_every) == (30, 1e-5, 10)
    assert ft.tune == "all"
    lp.with_recipe(exp, method, tune="head")
    assert exp.tuned_cfg("finetune", from_probe=True).tune == "head"
    plain = exp.tuned_cfg("finetune")  # not from the probe's head: no LP-FT settings
    assert not plain.sampling.whole_volume and plain.optim.backbone_lr == before.optim.backbone_lr


def test_missing_folders_are_refused(tmp_path):
    lp = load_benchmark("lpft_one_label")
    with pytest.raises(SystemExit, match="not a seed folder"):
        lp.main([str(tmp_path), "--seeds", "3"])
