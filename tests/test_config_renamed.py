"""One name for the precision switch: ``bf16`` everywhere; the old ``amp`` of the probe, evaluate and
segment configs still works (keyword, saved config, YAML, command line) with a deprecation warning.
And ``device`` defaults to ``auto`` in every config and model loader."""

from __future__ import annotations

import pytest
import yaml
from jsonargparse import ArgumentParser

from voxdiff.core.cli import add_config
from voxdiff.core.config import from_dict, from_namespace, read_config, to_dict, write_config
from voxdiff.core.errors import VoxdiffDeprecationWarning
from voxdiff.evaluate.report import EvaluateConfig
from voxdiff.probe.train import ProbeConfig
from voxdiff.segment.segment import SegmentConfig

CONFIGS = [EvaluateConfig, SegmentConfig]  # flat; ProbeConfig's bf16 is runtime.bf16 (below)


@pytest.mark.parametrize("cls", CONFIGS)
def test_bf16_is_the_field_and_amp_is_gone_from_saved_configs(cls, tmp_path):
    cfg = cls(bf16=True)
    assert cfg.bf16 is True and "amp" not in to_dict(cfg) and to_dict(cfg)["bf16"] is True
    write_config(tmp_path, cfg)
    assert read_config(tmp_path / "config.yaml", cls).bf16 is True


@pytest.mark.parametrize("cls", CONFIGS)
def test_old_amp_keyword_and_saved_configs_still_load(cls, tmp_path):
    with pytest.warns(VoxdiffDeprecationWarning, match="'amp' is deprecated, use 'bf16'"):
        assert cls(amp=True).bf16 is True
    with pytest.warns(VoxdiffDeprecationWarning):
        assert from_dict(cls, {"amp": True}).bf16 is True
    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump({"config": {"amp": True}}))  # a config.yaml written before the rename
    with pytest.warns(VoxdiffDeprecationWarning):
        assert read_config(old, cls).bf16 is True
    with pytest.warns(VoxdiffDeprecationWarning):  # both given: the new name wins
        assert from_dict(cls, {"amp": True, "bf16": False}).bf16 is False


@pytest.mark.parametrize("cls", CONFIGS)
def test_command_line_and_yaml_accept_amp_as_a_hidden_alias(cls, tmp_path, capsys):
    p = ArgumentParser(exit_on_error=False)
    from jsonargparse import ActionConfigFile

    p.add_argument("--config", action=ActionConfigFile)
    add_config(p, cls)
    assert from_namespace(cls, p.parse_args(["--bf16", "true"])).bf16 is True
    assert from_namespace(cls, p.parse_args([])).bf16 is False
    with pytest.warns(VoxdiffDeprecationWarning):
        assert from_namespace(cls, p.parse_args(["--amp", "true"])).bf16 is True
    y = tmp_path / "opts.yaml"
    y.write_text("amp: true\n")
    with pytest.warns(VoxdiffDeprecationWarning):
        assert from_namespace(cls, p.parse_args(["--config", str(y)])).bf16 is True
    p.print_help()
    shown = capsys.readouterr().out
    assert "--bf16" in shown and "--amp" not in shown


def test_probe_amp_is_runtime_bf16_by_every_old_spelling(tmp_path):
    """ProbeConfig's switch moved into its runtime section: the old ``amp`` keyword, flat key, saved
    config.yaml and hidden option still set it, with a deprecation warning; flat ``bf16`` silently."""
    with pytest.warns(VoxdiffDeprecationWarning, match="'amp' is deprecated, use 'runtime.bf16'"):
        assert ProbeConfig(amp=True).runtime.bf16 is True
    with pytest.warns(VoxdiffDeprecationWarning, match="'amp' is deprecated, use 'bf16'"):
        assert from_dict(ProbeConfig, {"amp": True}).runtime.bf16 is True
    assert from_dict(ProbeConfig, {"bf16": True}).runtime.bf16 is True
    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump({"config": {"amp": True, "steps": 5}}))
    with pytest.warns(VoxdiffDeprecationWarning):
        cfg = read_config(old, ProbeConfig)
    assert cfg.runtime.bf16 is True and cfg.optim.steps == 5 and "amp" not in to_dict(cfg)["runtime"]
    p = ArgumentParser(exit_on_error=False)
    add_config(p, ProbeConfig)
    with pytest.warns(VoxdiffDeprecationWarning, match="runtime.bf16"):
        assert from_namespace(ProbeConfig, p.parse_args(["--amp", "true"])).runtime.bf16 is True
    assert from_namespace(ProbeConfig, p.parse_args(["--runtime.bf16", "true"])).runtime.bf16 is True


def test_every_device_setting_defaults_to_auto():
    import dataclasses
    import inspect

    from voxdiff.features.extract import ExtractConfig
    from voxdiff.pretrain.load import load_backbone, load_pretrained
    from voxdiff.pretrain.sample import SampleConfig
    from voxdiff.pretrain.train import PretrainConfig
    from voxdiff.probe.bundle import load_segmenter

    for cls in (*CONFIGS, ExtractConfig, SampleConfig):
        assert {f.name: f.default for f in dataclasses.fields(cls)}["device"] == "auto", cls
    assert PretrainConfig().runtime.device == "auto"  # the runtime section's
    assert ProbeConfig().runtime.device == "auto"
    for fn in (load_backbone, load_pretrained, load_segmenter):
        assert inspect.signature(fn).parameters["device"].default == "auto", fn


def test_one_option_style_underscores_with_hyphenated_hidden_aliases(capsys):
    from voxdiff.cli import build_parser, main
    from voxdiff.core.cli import underscore_options

    assert underscore_options(["phantom", "o", "--n-train", "2", "--spacing-xy=[1,2]", "-o", "x-y", "--", "--a-b"]) == \
        ["phantom", "o", "--n_train", "2", "--spacing_xy=[1,2]", "-o", "x-y", "--", "--a-b"]
    parser, root = build_parser()
    long_options = [o for p in root.command_parsers() for o in getattr(p, "_option_string_actions", {})
                    if o.startswith("--")]
    assert long_options and not [o for o in long_options if "-" in o[2:]]
    with pytest.raises(SystemExit):
        main(["phantom", "--help"])
    shown = capsys.readouterr().out
    assert "--n_train" in shown and "--n-train" not in shown
