"""PretrainConfig in sections: the flat layout of configs saved before the sections still loads
(config.yaml, train states, budgets), the command line takes the nested options and the old flat
ones (hidden, with a warning), and a resume from a flat train state works."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from pretrain_synth import synthetic_cases

from voxdiff.core.checkpoint import load_checkpoint
from voxdiff.core.config import flat_names, flatten, from_dict, from_namespace, read_config, to_dict, write_config
from voxdiff.core.errors import InputError, VoxdiffDeprecationWarning
from voxdiff.core.sections import OptimConfig, RuntimeConfig
from voxdiff.core.trainstate import latest_train_state
from voxdiff.data.preprocess import PreprocessConfig
from voxdiff.pretrain.load import load_pretrained
from voxdiff.pretrain.train import (
    BackboneConfig,
    OnlineProbeConfig,
    PretrainConfig,
    PretrainData,
    TaskOptions,
    pretrain,
)

# a config.yaml's "config" as written before the sections (every field, flat)
FLAT = {
    "method": "diffusion", "data": [], "data_kind": "auto", "cache_dir": None,
    "preprocess": {"spacing": [3.0, 3.0, 3.0], "hu_window": [-1350.0, 1000.0], "crop_to_body": True,
                   "body_threshold_hu": -500.0, "body_margin_mm": 10.0},
    "patch_size": [16, 16, 16], "batch_size": 2, "steps": 4, "lr": 0.002, "warmup_steps": 1, "min_lr_ratio": 0.05,
    "weight_decay": 0.01, "grad_clip": 1.0, "ema_decay": 0.9, "bf16": False, "seed": 1, "checkpoint_every": 2,
    "keep_checkpoints": 2, "log_every": 1, "probe_every": 0, "probe_data": None, "probe_cases": 2,
    "tensorboard": False, "device": "cpu", "threads": 0, "backbone": "unet", "workers": 0, "prefetch_factor": 2,
    "base_channels": 4, "num_levels": 3, "blocks_per_level": 1, "norm_groups": 8, "condition": "none",
    "bpr_path": None, "bpr_sincos": 0, "diffusion_steps": 50, "beta_schedule": "linear", "prediction": "epsilon",
    "feature_timesteps": [1, 5], "noise_seed": 0, "condition_source": "volume", "task_options": {},
    "compile": False,
}

NESTED = PretrainConfig(
    method="diffusion", seed=1, preprocess=PreprocessConfig(spacing=(3.0, 3.0, 3.0)),
    data=PretrainData(patch_size=(16, 16, 16), batch_size=2),
    optim=OptimConfig(steps=4, lr=0.002, warmup_steps=1, ema_decay=0.9),
    backbone=BackboneConfig(name="unet", base_channels=4, num_levels=3),
    task=TaskOptions(diffusion_steps=50, feature_timesteps=(1, 5)),
    runtime=RuntimeConfig(device="cpu", bf16=False, log_every=1, checkpoint_every=2),
    probe=OnlineProbeConfig(),
)


def _flat(cfg: PretrainConfig) -> dict:
    """``cfg`` in the layout written before the sections (the inverse of the flat names)."""
    back = {path: name for name, path in flat_names(PretrainConfig).items()}
    back.update({path: name for name, path in PretrainConfig.FLAT_NAMES.items()})
    back.update({"data.paths": "data", "backbone.name": "backbone"})
    return {back.get(k, k): v for k, v in flatten(PretrainConfig, to_dict(cfg)).items()}


def test_flat_and_nested_layouts_give_one_config(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # saved configs load silently
        assert from_dict(PretrainConfig, FLAT) == NESTED
    new_only = {"feature_input": "noisy"}  # fields added after the flat layout, at their defaults
    flat = _flat(NESTED)
    assert {k: flat.pop(k) for k in new_only} == new_only
    assert flat == FLAT  # every old field has its place
    d = to_dict(NESTED)
    assert set(d) == {"method", "seed", "preprocess", "data", "optim", "backbone", "task", "runtime", "probe"}
    assert d["optim"]["lr"] == 0.002 and d["backbone"]["name"] == "unet" and d["data"]["paths"] == []
    assert from_dict(PretrainConfig, d) == NESTED
    # a saved config.yaml of either layout
    write_config(tmp_path / "new", NESTED)
    assert read_config(tmp_path / "new" / "config.yaml", PretrainConfig) == NESTED
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({"config": FLAT, "config_class": "voxdiff.pretrain.train.PretrainConfig"}))
    assert read_config(tmp_path / "old.yaml", PretrainConfig) == NESTED
    # the values that shared a name with a section: data folders and the backbone's name
    cfg = from_dict(PretrainConfig, {"data": ["a", "b"], "backbone": "fpn3d", "task_options": {"temperature": 0.2},
                                     "probe_every": 5, "data_kind": "folder"})
    assert cfg.data.paths == ["a", "b"] and cfg.data.kind == "folder" and cfg.backbone.name == "fpn3d"
    assert cfg.task.options == {"temperature": 0.2} and cfg.probe.every == 5
    # the experiments' flat budget overrides
    assert from_dict(PretrainConfig, {"steps": 200, "lr": 1e-3, "base_channels": 8}).optim.lr == 1e-3


def test_a_model_trained_from_a_flat_config_loads_and_matches(tmp_path):
    cases = synthetic_cases(2)
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({"config": FLAT}))
    old = pretrain(read_config(tmp_path / "old.yaml", PretrainConfig), tmp_path / "old", cases=cases, progress=False)
    new = pretrain(NESTED, tmp_path / "new", cases=cases, progress=False)
    wa, ia = load_checkpoint(old / "backbone", kind="backbone")
    wb, ib = load_checkpoint(new / "backbone", kind="backbone")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ia["config"] == ib["config"]  # model.json: unchanged by the sections
    ex = load_pretrained(old, device="cpu")
    assert ex.method == "diffusion" and ex.patch_size == (16, 16, 16)
    # the saved config.yaml is nested and reads back to the same config
    doc = yaml.safe_load((new / "config.yaml").read_text())["config"]
    assert doc["optim"]["steps"] == 4 and from_dict(PretrainConfig, doc) == NESTED


def test_resume_from_a_flat_train_state(tmp_path):
    """A run interrupted before the sections (its train state holds the flat config) continues,
    also with a resume-free field changed, and refuses other changes naming the dotted field."""
    cases = synthetic_cases(2)
    a = pretrain(NESTED, tmp_path / "a", cases=cases, progress=False)
    b = pretrain(NESTED, tmp_path / "b", cases=cases, progress=False, stop_after=2)
    js = latest_train_state(b / "train_state") / "model.json"
    doc = json.loads(js.read_text())
    assert doc["config"] == to_dict(NESTED)
    doc["config"] = FLAT
    js.write_text(json.dumps(doc))
    changed = from_dict(PretrainConfig, {**FLAT, "lr": 0.01})
    with pytest.raises(InputError, match=r"different configuration \(optim\.lr\)"):
        pretrain(changed, b, cases=cases, progress=False, resume=True)
    free = from_dict(PretrainConfig, {**FLAT, "log_every": 2, "keep_checkpoints": 3, "threads": 1})
    pretrain(free, b, cases=cases, progress=False, resume=True)
    wa, _ = load_checkpoint(a / "backbone", kind="backbone")
    wb, _ = load_checkpoint(b / "backbone", kind="backbone")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _parse(argv: list[str]) -> PretrainConfig:
    from voxdiff.cli import build_parser

    parser, root = build_parser()
    return from_namespace(PretrainConfig, root.leaf(parser.parse_args(["pretrain", "out", *argv])))


NESTED_ARGS = ["--data", "d1", "d2", "--data.kind", "folder", "--data.patch_size", "[16,16,16]", "--optim.steps", "4",
               "--optim.lr", "0.002", "--backbone", "fpn3d", "--backbone.base_channels", "4", "--task.condition", "ape",
               "--task.options", '{"temperature": 0.2}', "--runtime.bf16", "false", "--probe.every", "2", "--seed", "1"]
FLAT_ARGS = ["--data", "d1", "d2", "--data_kind", "folder", "--patch_size", "[16,16,16]", "--steps", "4",
             "--lr", "0.002", "--backbone", "fpn3d", "--base_channels", "4", "--condition", "ape",
             "--task_options", '{"temperature": 0.2}', "--bf16", "false", "--probe_every", "2", "--seed", "1"]


def test_command_line_nested_options_and_old_flat_ones():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = _parse(NESTED_ARGS)
    assert cfg.data.paths == ["d1", "d2"] and cfg.data.kind == "folder" and cfg.data.patch_size == (16, 16, 16)
    assert cfg.optim == OptimConfig(steps=4, lr=0.002) and cfg.backbone == BackboneConfig(name="fpn3d", base_channels=4)
    assert cfg.task.condition == "ape" and cfg.task.options == {"temperature": 0.2} and cfg.probe.every == 2
    assert cfg.runtime.bf16 is False and cfg.seed == 1
    with pytest.warns(VoxdiffDeprecationWarning) as rec:
        assert _parse(FLAT_ARGS) == cfg
    shown = {str(w.message) for w in rec}
    assert "PretrainConfig: 'steps' is deprecated, use 'optim.steps' (same meaning)" in shown
    assert len(shown) == 9  # one per flat option (--data and --backbone are the sections' own options)
    assert _parse([]) == PretrainConfig()


def test_pretrain_help_shows_the_sections(capsys):
    from voxdiff.cli import main

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    shown = capsys.readouterr().out
    for opt in ("--optim.lr", "--data.patch_size", "--backbone.base_channels", "--runtime.bf16", "--task.condition",
                "--probe.every", "--data PATHS|CONFIG"):
        assert opt in shown, opt
    assert "--lr " not in shown and "--data_kind" not in shown and "--base_channels" not in shown
