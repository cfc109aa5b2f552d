"""benchmarks/lpft_demo_seeds.py: LP-FT rows of a demo folder with the backbone trained or frozen."""

import pytest
from standin import load_benchmark


def test_tune_reaches_only_the_lpft_rows(tmp_path):
    from voxdiff.experiments.base import Experiment, ExperimentConfig

    lp = load_benchmark("lpft_demo_seeds")
    exp = Experiment(ExperimentConfig(budget="cpu-small"), tmp_path / "e", log=lambda *a: None)
    assert exp.tuned_cfg("finetune", from_probe=True).tune == "all"  # the demo's own rows
    lp.with_tune(exp, "head")
    ft = exp.tuned_cfg("finetune", from_probe=True)
    assert ft.tune == "head" and ft.sampling.whole_volume and ft.optim.backbone_lr == 1e-5
    assert exp.tuned_cfg("finetune").tune == "all"  # fine-tuning from a random head is left alone
    lp.with_tune(exp, "decoder")
    assert exp.tuned_cfg("finetune", from_probe=True).tune == "decoder"


def test_refused_without_lpft_rows_or_folders(tmp_path):
    from voxdiff.experiments.base import Experiment, ExperimentConfig

    lp = load_benchmark("lpft_demo_seeds")
    exp = Experiment(ExperimentConfig(budget="tiny"), tmp_path / "e", log=lambda *a: None)
    exp.budget.pop("lpft", None)
    exp.budget["finetune_init"] = "random"  # (tiny has no lpft section of its own to fall back on)
    with pytest.raises(SystemExit, match="fine-tunes no LP-FT rows"):
        lp.with_tune(exp, "head")
    with pytest.raises(SystemExit, match="not an experiment folder"):
        lp.main([str(tmp_path / "nothing")])
    exp2 = Experiment(ExperimentConfig(budget="cpu-small"), tmp_path / "f", log=lambda *a: None)
    with pytest.raises(SystemExit, match="no finished frozen probe"):
        lp.run_method(lp.with_tune(exp2, "head"), "contrastive", "head")


def test_a_folder_from_before_lpft_gets_the_budgets_current_settings(tmp_path):
    from voxdiff.experiments.base import Experiment, ExperimentConfig
    from voxdiff.experiments.budgets import BUDGETS

    lp = load_benchmark("lpft_demo_seeds")
    exp = Experiment(ExperimentConfig(budget="cpu-small"), tmp_path / "e", log=lambda *a: None)
    for k in ("lpft", "finetune_init"):
        exp.budget.pop(k)
    exp.budget["finetune_steps"] = 150  # as the demo ran before its fine-tuned rows moved to whole volumes
    lp.with_tune(exp, "head")
    ft = exp.tuned_cfg("finetune", from_probe=True)
    assert ft.tune == "head" and ft.sampling.whole_volume and ft.optim.steps == BUDGETS["cpu-small"]["finetune_steps"]


def test_step_names_carry_every_non_default_option():
    lp = load_benchmark("lpft_demo_seeds")
    assert lp.step_name("contrastive", "all") == "lpft-all-contrastive-f0"
    assert lp.step_name("contrastive", "all", "s52-probe-{method}-600", 1e-6, "off", 8, 4242) == (
        "lpft-all-contrastive-from-s52-probe-contrastive-600-lr1e-06-startoff-heldout4242x8-f0")
    assert lp.step_name("diffusion-ape", "all", heldout=8, patience=1) == "lpft-all-diffusion-ape-patience1-heldout4242x8-f0"


def test_bad_options_are_refused(tmp_path):
    lp = load_benchmark("lpft_demo_seeds")
    (tmp_path / "config.yaml").write_text("{}")
    with pytest.raises(SystemExit, match="--probe must name the method"):
        lp.main([str(tmp_path), "--probe", "probe-f0"])
    with pytest.raises(SystemExit, match="--backbone_lr must be > 0"):
        lp.main([str(tmp_path), "--backbone_lr", "0"])
    with pytest.raises(SystemExit, match="--heldout must be >= 0"):
        lp.main([str(tmp_path), "--heldout", "-1"])
    with pytest.raises(SystemExit, match="--patience must be >= 0"):
        lp.main([str(tmp_path), "--patience", "-1"])
