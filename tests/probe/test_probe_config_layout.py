"""ProbeConfig in sections: the flat layout (saved config.yaml, train states, the experiments'
budgets) still loads and trains the same heads bit for bit; the command line takes the nested
options and the old flat ones (hidden, with a warning)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from standin import StandinExtractor, two_organ_case

from voxdiff.core.config import flat_names, flatten, from_dict, from_namespace, read_config, to_dict, write_config
from voxdiff.core.errors import InputError, VoxdiffDeprecationWarning
from voxdiff.core.sections import RuntimeConfig
from voxdiff.core.trainstate import latest_train_state
from voxdiff.experiments.budgets import BUDGETS
from voxdiff.probe.train import (
    ProbeConfig,
    ProbeHead,
    ProbeOptim,
    ProbeSampling,
    ProbeWindow,
    fit_heads,
    fit_network,
    heads_engine_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# a probe's config.yaml "config" as written before the sections (every field, flat)
FLAT = {
    "heads": ["linear", "nonlinear"], "patch_size": [16, 16, 8], "batch_size": 2, "steps": 6, "lr": 0.01,
    "backbone_lr": 0.01, "scratch_lr": 0.001, "weight_decay": 1e-05, "warmup_steps": 2, "fg_prob": 0.67, "hidden": 8,
    "blocks": 1, "train_cases": None, "val_from_train": 1, "val_every": 3, "patience": 0, "roi": [24, 24, 16],
    "overlap": 0.5, "feature_roi": None, "n_classes": 7, "bf16": False, "device": "cpu", "seed": 2,
    "frozen_training": "voxels", "voxels_per_step": 256, "t": None,
}

NESTED = ProbeConfig(
    heads=("linear", "nonlinear"), seed=2, n_classes=7,
    sampling=ProbeSampling(patch_size=(16, 16, 8), voxels_per_step=256),
    optim=ProbeOptim(steps=6, lr=0.01, backbone_lr=0.01, warmup_steps=2, val_every=3),
    head=ProbeHead(hidden=8),
    inference=ProbeWindow(roi=(24, 24, 16)),
    runtime=RuntimeConfig(device="cpu", threads=0, bf16=False, log_every=0, checkpoint_every=0, keep_checkpoints=1),
)


def _flat(cfg: ProbeConfig) -> dict:
    back = {path: name for name, path in flat_names(ProbeConfig).items()}
    return {back.get(k, k): v for k, v in flatten(ProbeConfig, to_dict(cfg)).items()}


def test_flat_and_nested_layouts_give_one_config(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # saved configs load silently
        assert from_dict(ProbeConfig, FLAT) == NESTED
    new_only = {"min_lr_ratio", "grad_clip", "ema_decay", "threads", "compile", "log_every", "checkpoint_every",
                "keep_checkpoints", "tensorboard", "fresh_noise", "min_steps", "selection", "smooth_window",
                "feature_input", "feature_side", "deformed_copies", "fov_crops", "whole_volume", "norm_stats", "norm_crops",
                "anchor_decay", "transfer", "tune", "refine_steps", "refine_lr", "refine_val_every", "upsample",
                "validate_start"}
    assert {k: v for k, v in _flat(NESTED).items() if k not in new_only} == FLAT  # every old field has its place
    d = to_dict(NESTED)
    assert set(d) == {"heads", "seed", "n_classes", "frozen_training", "t", "feature_input", "feature_side",
                      "norm_stats", "norm_crops", "transfer", "tune", "sampling", "optim", "head", "inference", "runtime"}
    assert from_dict(ProbeConfig, d) == NESTED
    write_config(tmp_path / "new", NESTED)
    assert read_config(tmp_path / "new" / "config.yaml", ProbeConfig) == NESTED
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({"config": FLAT, "config_class": "voxdiff.probe.train.ProbeConfig"}))
    assert read_config(tmp_path / "old.yaml", ProbeConfig) == NESTED


def test_every_budget_and_override_reads_into_the_sections():
    for name, budget in BUDGETS.items():
        for extra in ({}, budget.get("finetune", {}), budget.get("early_stopping", {})):
            opts = {**budget["probe"], **extra}
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                cfg = from_dict(ProbeConfig, opts)
            f = flatten(ProbeConfig, to_dict(cfg))
            for k, v in opts.items():  # a section's field by its flat name; a top-level field by its own
                assert to_dict(f[flat_names(ProbeConfig).get(k, k)]) == to_dict(v), (name, k)
    # an experiment's flat overrides on a flat budget (benchmarks/probe_variants.py)
    cfg = from_dict(ProbeConfig, {**BUDGETS["tiny"]["probe"], "roi": (16, 16, 16), "hidden": 4})
    assert cfg.inference.roi == (16, 16, 16) and cfg.head.hidden == 4 and cfg.optim.steps == BUDGETS["tiny"]["probe"]["steps"]


def test_engine_settings_keep_todays_values():
    e = heads_engine_config(NESTED, ["linear"], False, "probe")
    assert (e.steps, e.lr, e.warmup_steps, e.min_lr_ratio, e.weight_decay, e.grad_clip, e.ema_decay) == (
        6, 0.01, 0, 0.05, 1e-05, 0.0, None)
    assert (e.log_every, e.checkpoint_every, e.keep_checkpoints, e.bf16, e.threads, e.seed) == (3, 3, 1, False, 0, 2)
    with pytest.raises(InputError, match="optim.ema_decay"):
        heads_engine_config(from_dict(ProbeConfig, {"ema_decay": 0.9}), ["linear"], False, "probe")


def _heads(cfg, **kw):
    return fit_heads(StandinExtractor(channels=(4, 8)), [two_organ_case(0)], [two_organ_case(1)], ("linear", "nonlinear"), cfg,
                     progress=False, **kw)


def test_heads_and_a_fine_tuned_network_from_a_flat_config_are_bit_identical(tmp_path):
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({"config": FLAT}))
    old_cfg = read_config(tmp_path / "old.yaml", ProbeConfig)
    a, b = _heads(old_cfg), _heads(NESTED)
    for n in a:
        assert all(torch.equal(v, b[n].state_dict()[k]) for k, v in a[n].state_dict().items()), n
    ext = StandinExtractor(channels=(4, 8))
    ta, ha = fit_network(ext, [two_organ_case(0)], [two_organ_case(1)], "finetune", old_cfg, progress=False)
    tb, hb = fit_network(ext, [two_organ_case(0)], [two_organ_case(1)], "finetune", NESTED, progress=False)
    assert ha.steps_run == hb.steps_run == 6
    for ma, mb in ((ha, hb), (ta.backbone, tb.backbone)):
        assert all(torch.equal(v, mb.state_dict()[k]) for k, v in ma.state_dict().items())


def test_resume_from_a_flat_train_state(tmp_path):
    full = _heads(NESTED)
    _heads(NESTED, state_dir=tmp_path / "ts", stop_after=3)
    js = latest_train_state(tmp_path / "ts") / "model.json"
    doc = json.loads(js.read_text())
    assert doc["config"] == to_dict(NESTED)
    doc["config"] = FLAT
    js.write_text(json.dumps(doc))
    resumed = _heads(NESTED, state_dir=tmp_path / "ts", resume=True)
    for n in full:
        assert all(torch.equal(v, resumed[n].state_dict()[k]) for k, v in full[n].state_dict().items()), n


def _parse(argv: list[str]) -> ProbeConfig:
    from voxdiff.cli import build_parser

    parser, root = build_parser()
    return from_namespace(ProbeConfig, root.leaf(parser.parse_args(["probe", "pre", "data", "-o", "out", *argv])))


NESTED_ARGS = ["--heads", "[finetune]", "--sampling.patch_size", "[16,16,8]", "--sampling.train_cases", "2",
               "--optim.steps", "6", "--optim.lr", "0.01", "--optim.backbone_lr", "0.001", "--optim.warmup_steps", "2",
               "--optim.patience", "3", "--head.hidden", "8", "--inference.roi", "[24,24,16]", "--inference.overlap",
               "0.25", "--runtime.device", "cpu", "--runtime.bf16", "true", "--seed", "2"]
FLAT_ARGS = ["--heads", "[finetune]", "--patch_size", "[16,16,8]", "--train_cases", "2",
             "--steps", "6", "--lr", "0.01", "--backbone_lr", "0.001", "--warmup_steps", "2",
             "--patience", "3", "--hidden", "8", "--roi", "[24,24,16]", "--overlap",
             "0.25", "--device", "cpu", "--bf16", "true", "--seed", "2"]


def test_command_line_nested_options_and_old_flat_ones():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = _parse(NESTED_ARGS)
    assert cfg.heads == ("finetune",) and cfg.seed == 2
    assert cfg.sampling == ProbeSampling(patch_size=(16, 16, 8), train_cases=2)
    assert cfg.optim == ProbeOptim(steps=6, lr=0.01, backbone_lr=0.001, warmup_steps=2, patience=3)
    assert cfg.head == ProbeHead(hidden=8) and cfg.inference == ProbeWindow(roi=(24, 24, 16), overlap=0.25)
    assert cfg.runtime.device == "cpu" and cfg.runtime.bf16 is True and cfg.runtime.log_every == 0
    with pytest.warns(VoxdiffDeprecationWarning) as rec:
        assert _parse(FLAT_ARGS) == cfg
    shown = {str(w.message) for w in rec}
    assert "ProbeConfig: 'lr' is deprecated, use 'optim.lr' (same meaning)" in shown
    assert "ProbeConfig: 'roi' is deprecated, use 'inference.roi' (same meaning)" in shown
    assert len(shown) == 12  # one per flat option
    assert _parse([]) == ProbeConfig()


def test_probe_help_shows_the_sections(capsys):
    from voxdiff.cli import main

    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    shown = capsys.readouterr().out
    for opt in ("--optim.lr", "--optim.backbone_lr", "--optim.val_every", "--sampling.patch_size", "--head.hidden",
                "--inference.roi", "--runtime.bf16"):
        assert opt in shown, opt
    assert "--lr " not in shown and "--patch_size" not in shown and "--roi " not in shown


@pytest.mark.parametrize("args, problem", [
    (["--optim.steps", "-1"], "optim.steps must be >= 0, got -1"),
    (["--optim.lr", "0"], "optim.lr, backbone_lr and scratch_lr must be > 0"),
    (["--optim.val_every", "0"], "optim.val_every must be >= 1"),
    (["--head.hidden", "0"], "head.hidden must be >= 1"),
    (["--inference.overlap", "1"], "inference.overlap must lie in [0, 1)"),
    (["--inference.roi", "[0, 64, 64]"], "inference.roi must be 3 sizes >= 1"),
    (["--sampling.fg_prob", "2"], "sampling.fg_prob must lie in [0, 1]"),
    (["--sampling.batch_size", "0"], "sampling.batch_size and voxels_per_step must be >= 1"),
    (["--n_classes", "1"], "n_classes (background included) must be >= 2"),
])
def test_probe_refuses_settings_that_cannot_be_meant(args, problem, tmp_path, capsys):
    from voxdiff.cli import main

    # checked before the model or the data is read (neither exists here); nothing written
    out = tmp_path / "probe"
    assert main(["probe", str(tmp_path / "no_model"), str(tmp_path / "no_data"), "-o", str(out), *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"voxdiff: error: {problem}") and not out.exists()
