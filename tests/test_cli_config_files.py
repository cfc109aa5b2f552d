"""A ``--config`` file that is missing, not YAML or not a mapping is refused with one line naming it
(exit 2, nothing written), before jsonargparse would print its usage and a YAML parser's message
without the file's name; a good file and inline YAML still work."""

from __future__ import annotations

import pytest

from voxdiff.cli import config_files, main


def test_config_values_found_in_both_spellings_and_inline_yaml_left_alone():
    argv = ["segment", "m", "ct", "--config", "a.yaml", "--config=b.yml", "--config", "{overlap: 0.3}", "--config"]
    assert config_files(argv) == ["a.yaml", "b.yml"]


@pytest.mark.parametrize("content, problem", [
    (None, "no such config file"),
    ("n_train: [\n", "not valid YAML (expected the node content, but found '<stream end>' at line 2, column 1)"),
    ("- 1\n- 2\n", "a config file must map option names to values, got a list"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "not a text (YAML) file"),
])
def test_bad_config_file_is_one_line_naming_it(content, problem, tmp_path, capsys):
    cfg = tmp_path / "settings.yaml"
    if isinstance(content, str):
        cfg.write_text(content)
    elif isinstance(content, bytes):
        cfg.write_bytes(content)
    out = tmp_path / "ph"
    assert main(["phantom", str(out), "--n_train", "1", "--config", str(cfg)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"voxdiff: error: {cfg}: {problem}"]
    assert not out.exists()


def test_good_config_file_is_read(tmp_path, capsys):
    cfg = tmp_path / "settings.yaml"
    cfg.write_text("n_train: 1\nn_test: 0\nn_unlabelled: 0\nshape: [24, 24, 16]\n")
    out = tmp_path / "ph"
    assert main(["phantom", str(out), "--config", str(cfg)]) == 0
    assert "wrote 1 training, 0 test and 0 unlabelled" in capsys.readouterr().out


@pytest.mark.parametrize("content, shown", [
    ("nosuch: 1\n", "not options of voxdiff bpr train: nosuch (see voxdiff bpr train --help)"),
    ("optim:\n  steps: 3\n  nosuch: 1\n", "not options of voxdiff bpr train: optim.nosuch"),
    ("optim.stepz: 3\ndata:\n  batch_size: 2\n", "not options of voxdiff bpr train: optim.stepz"),
])
def test_config_keys_a_nested_command_does_not_have_are_named(content, shown, tmp_path, capsys):
    # (jsonargparse's own message for a nested command's unknown key was only "'bpr'")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    out = tmp_path / "m"
    assert main(["bpr", "train", "--out", str(out), "--config", str(cfg)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"voxdiff: error: {cfg}: {shown}"] if "(see" in shown else len(err) == 1 and shown in err[0]
    assert not out.exists()


def test_a_config_saved_beside_an_artifact_can_be_given_back(tmp_path):
    import json

    import yaml

    first = tmp_path / "ph1"
    assert main(["phantom", str(first), "--n_train", "1", "--n_test", "0", "--n_unlabelled", "0",
                 "--shape", "[24,24,16]", "--seed", "3", "--quiet"]) == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert set(saved) >= {"config", "versions"}  # voxdiff's own layout: the settings under "config"
    second = tmp_path / "ph2"
    # (the saved settings are the generator's; the counts and seed are the command's own options)
    assert main(["phantom", str(second), "--config", str(first / "config.yaml"), "--n_train", "1", "--n_test", "0",
                 "--n_unlabelled", "0", "--seed", "3", "--quiet"]) == 0
    assert yaml.safe_load((second / "config.yaml").read_text())["config"] == saved["config"]
    a, b = (json.loads((d / "phantoms.json").read_text()) for d in (first, second))
    assert a == b  # the same phantoms
