"""Config sections (voxdiff.core.config): nested layout written, nested and flat layouts read,
shared flat names detected, and the command line's section options with hidden flat aliases."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from voxdiff.core.cli import add_config
from voxdiff.core.config import flat_names, flatten, from_dict, from_namespace, nest_flat, to_dict
from voxdiff.core.errors import VoxdiffDeprecationWarning
from voxdiff.core.sections import OptimConfig, RuntimeConfig


@dataclass
class Files:
    VALUE_FIELD: ClassVar[str] = "paths"

    paths: list[str] = field(default_factory=list)
    kind: str = "auto"


@dataclass
class Job:
    SECTIONS: ClassVar[tuple[str, ...]] = ("files", "optim", "runtime")
    FLAT_NAMES: ClassVar[dict[str, str]] = {"files_kind": "files.kind"}

    name: str = "job"
    seed: int = 0
    files: Files = field(default_factory=Files)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, steps=10))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def test_nested_written_and_both_layouts_read():
    cfg = Job(seed=3, files=Files(paths=["a"], kind="folder"), optim=OptimConfig(lr=0.5, steps=7),
              runtime=RuntimeConfig(bf16=False, threads=2))
    d = to_dict(cfg)
    assert d["optim"]["lr"] == 0.5 and d["files"] == {"paths": ["a"], "kind": "folder"} and "lr" not in d
    assert from_dict(Job, d) == cfg
    flat = {"seed": 3, "files": ["a"], "files_kind": "folder", "lr": 0.5, "steps": 7, "bf16": False, "threads": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the flat layout is read silently (saved configs, budgets)
        assert from_dict(Job, flat) == cfg
    # the field's own name works too, and a mix of both layouts
    assert from_dict(Job, {"seed": 3, "files": {"paths": ["a"]}, "kind": "folder", "optim": {"lr": 0.5},
                           "steps": 7, "runtime": {"bf16": False}, "threads": 2}) == cfg
    # a partial section keeps the parent's defaults (lr 1e-3, steps 10 here), not the section class's
    assert from_dict(Job, {"optim": {"lr": 0.5}}).optim == OptimConfig(lr=0.5, steps=10)
    assert from_dict(Job, {"lr": 0.5}).optim == OptimConfig(lr=0.5, steps=10)
    # both layouts for one field: the nested value wins
    assert from_dict(Job, {"lr": 0.1, "optim": {"lr": 0.2}}).optim.lr == 0.2


def test_unknown_keys_and_flatten():
    with pytest.raises(ValueError, match="unknown config keys"):
        from_dict(Job, {"nope": 1})
    with pytest.raises(ValueError, match="unknown config keys"):
        from_dict(Job, {"optim": {"nope": 1}})
    assert from_dict(Job, {"nope": 1, "optim": {"nope": 2}}, strict=False) == Job()
    f = flatten(Job, to_dict(Job()))
    assert f["optim.lr"] == 1e-3 and f["files.paths"] == [] and f["seed"] == 0 and "optim" not in f
    assert flatten(Job, {"lr": 0.5, "files": ["x"]}) == {"optim.lr": 0.5, "files.paths": ["x"]}
    assert nest_flat(Job, {"lr": 0.5, "name": "n"}) == {"name": "n", "optim": {"lr": 0.5}}


def test_old_names_of_section_fields_still_map():
    with pytest.warns(VoxdiffDeprecationWarning, match="'amp' is deprecated, use 'bf16'"):
        assert from_dict(Job, {"amp": False}).runtime.bf16 is False
    with pytest.warns(VoxdiffDeprecationWarning):
        assert from_dict(Job, {"runtime": {"amp": False}}).runtime.bf16 is False
    assert flat_names(Job)["amp"] == "runtime.amp"


def test_a_flat_name_shared_by_two_sections_is_an_error_unless_settled():
    @dataclass
    class Two:
        SECTIONS: ClassVar[tuple[str, ...]] = ("a", "b")

        a: OptimConfig = field(default_factory=OptimConfig)
        b: OptimConfig = field(default_factory=OptimConfig)

    with pytest.raises(TypeError, match=r"'steps' is a field of several sections \(a\.steps, b\.steps\)"):
        from_dict(Two, {})
    with pytest.raises(TypeError, match="several sections"):
        flat_names(Two)

    @dataclass
    class Settled(Two):
        FLAT_NAMES: ClassVar[dict[str, str | None]] = {
            n: ("a." + n if n == "lr" else None) for n in ("steps", "lr", "warmup_steps", "min_lr_ratio",
                                                          "weight_decay", "grad_clip", "ema_decay")}

    cfg = from_dict(Settled, {"lr": 0.5, "b": {"lr": 0.25}})
    assert cfg.a.lr == 0.5 and cfg.b.lr == 0.25 and "steps" not in flat_names(Settled)
    with pytest.raises(ValueError, match="unknown config keys"):  # not flat at all: unknown
        from_dict(Settled, {"steps": 3})

    @dataclass
    class Wrong:
        SECTIONS: ClassVar[tuple[str, ...]] = ("a",)
        FLAT_NAMES: ClassVar[dict[str, str]] = {"x": "a.nope"}

        a: OptimConfig = field(default_factory=OptimConfig)

    with pytest.raises(TypeError, match="not a section field"):
        flat_names(Wrong)

    @dataclass
    class NotADataclass:
        SECTIONS: ClassVar[tuple[str, ...]] = ("a",)

        a: int = 0

    with pytest.raises(TypeError, match="not a dataclass-typed field"):
        from_dict(NotADataclass, {})


def _parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile)
    add_config(p, Job)
    return p


def test_command_line_sections_value_form_and_hidden_flat_options(tmp_path, capsys):
    p = _parser()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = from_namespace(Job, p.parse_args(["--optim.lr", "0.5", "--files", "a", "b", "--files.kind", "x",
                                                "--runtime.bf16", "false"]))
    assert cfg.optim == OptimConfig(lr=0.5, steps=10) and cfg.files == Files(["a", "b"], "x") and not cfg.runtime.bf16
    assert from_namespace(Job, p.parse_args([])) == Job()
    # the flat options: hidden, still work, with a warning naming the new option
    with pytest.warns(VoxdiffDeprecationWarning, match="'lr' is deprecated, use 'optim.lr'"):
        assert from_namespace(Job, p.parse_args(["--lr", "0.5"])).optim.lr == 0.5
    with pytest.warns(VoxdiffDeprecationWarning, match="'amp' is deprecated, use 'runtime.bf16'"):
        assert from_namespace(Job, p.parse_args(["--amp", "false"])).runtime.bf16 is False
    with pytest.warns(VoxdiffDeprecationWarning, match="'files_kind' is deprecated, use 'files.kind'"):
        assert from_namespace(Job, p.parse_args(["--files_kind", "y"])).files.kind == "y"
    # --config files: nested, flat, and a section given as a plain value
    y = tmp_path / "c.yaml"
    y.write_text("files: [p, q]\noptim:\n  steps: 3\n")
    assert from_namespace(Job, p.parse_args(["--config", str(y)])) == Job(files=Files(["p", "q"]),
                                                                          optim=OptimConfig(lr=1e-3, steps=3))
    y.write_text("steps: 4\nthreads: 2\n")
    with pytest.warns(VoxdiffDeprecationWarning):
        cfg = from_namespace(Job, p.parse_args(["--config", str(y)]))
    assert cfg.optim.steps == 4 and cfg.runtime.threads == 2
    # a section option still takes a YAML file of the section
    s = tmp_path / "optim.yaml"
    s.write_text("lr: 0.25\n")
    assert from_namespace(Job, p.parse_args(["--optim", str(s)])).optim == OptimConfig(lr=0.25, steps=10)
    # ... while any other existing file is a value (a data "folder" may be a file)
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"")
    assert from_namespace(Job, p.parse_args(["--files", str(ct)])).files.paths == [str(ct)]
    p.print_help()
    shown = capsys.readouterr().out
    assert "--optim.lr" in shown and "--files.kind" in shown
    assert "--lr " not in shown and "--amp" not in shown and "--files_kind" not in shown


def test_read_config_doc_returns_what_was_written_beside_the_config(tmp_path):
    from voxdiff.core.config import read_config_doc, write_config
    from voxdiff.core.errors import InputError

    write_config(tmp_path, {"a": 1}, extra={"slice_teacher_signature": "abc"})
    doc = read_config_doc(tmp_path / "config.yaml")
    assert doc["config"] == {"a": 1} and doc["slice_teacher_signature"] == "abc"
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(InputError, match="bad.yaml.*not valid YAML"):
        read_config_doc(tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="config file not found"):
        read_config_doc(tmp_path / "missing.yaml")


def test_versions_are_read_once_and_each_artifact_gets_its_own_copy(tmp_path):
    """``versions()`` looks the packages up once per process; a caller that edits its dict does not
    change what the next artifact records."""
    import torch

    from voxdiff.core import config as c

    first = c.versions()
    assert first["torch"] == torch.__version__ and first["python"]
    first["torch"] = "edited"
    assert c.versions()["torch"] == torch.__version__
    p = c.write_config(tmp_path, RuntimeConfig())
    assert yaml.safe_load(p.read_text())["versions"]["torch"] == torch.__version__
