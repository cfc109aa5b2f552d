"""Every option and argument of every ``voxdiff`` subcommand says what it does in ``--help``.

The help of config fields comes from the config dataclasses' docstrings (their ``Args:`` section,
read by jsonargparse through docstring_parser), so a docstring in another layout, a role such as
``:class:`` that makes the parser read it as reST, or a field added without a line leaves an option
with a bare ``(type: ..., default: ...)``.
"""

from __future__ import annotations

import argparse

from voxdiff.cli import build_parser


def _undocumented() -> list[str]:
    _, root = build_parser()
    parsers = root.command_parsers()
    assert len(parsers) >= 10  # every stage registered its commands
    out = []
    for p in parsers:
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help == argparse.SUPPRESS:
                continue
            if type(a).__name__ in ("_ActionConfigLoad", "ActionConfigFile", "_ActionPrintConfig"):
                continue  # jsonargparse's own options (config files, --print_config) carry its text
            if not (a.help or "").strip():
                out.append(f"{p.prog}: {(a.option_strings or [a.dest])[0]}")
    return out


def test_every_cli_option_has_help():
    missing = _undocumented()
    assert not missing, "options without help text:\n" + "\n".join(missing)


def test_the_check_sees_a_missing_help(monkeypatch):
    """The check can fail: a config field whose docstring line is removed is reported."""
    from voxdiff.segment import segment

    doc = segment.SegmentConfig.__doc__
    assert doc is not None and "sw_batch_size:" in doc
    stripped = "\n".join(line for line in doc.splitlines() if "sw_batch_size:" not in line)
    monkeypatch.setattr(segment.SegmentConfig, "__doc__", stripped)
    assert any(m.endswith("--sw_batch_size") and "segment" in m for m in _undocumented())


def test_every_typed_option_is_validated_by_the_parser():
    # jsonargparse turns the options of a dataclass into "Unvalidated" types when its base is a plain
    # class with a __post_init__ (SegmentConfig, EvaluateConfig once): --bf16 abc then set bf16 to
    # the string 'abc', and --sw_batch_size abc ended in a ValueError traceback
    _, root = build_parser()
    loose = [f"{p.prog}: {a.option_strings[0]}" for p in root.command_parsers() for a in p._actions
             if "Unvalidated" in repr(getattr(a, "_typehint", None))]
    # (probe's deprecated --amp, an InitVar alias of --runtime.bf16, was the last one: now a typed hidden option)
    assert loose == []


def test_a_value_of_the_wrong_type_is_refused_by_the_parser(capsys):
    from voxdiff.cli import main

    for argv, shown in ((["segment", "m", "ct.nii.gz", "-o", "s.nii.gz", "--sw_batch_size", "abc"],
                         "--sw_batch_size: expected int, got 'abc' (see voxdiff segment --help)"),
                        (["evaluate", "m", "data", "-o", "e", "--n_classes", "abc"], "--n_classes: expected int, got 'abc'"),
                        (["segment", "m", "ct.nii.gz", "-o", "s.nii.gz", "--bf16", "abc"], "--bf16: expected bool, got 'abc'"),
                        (["probe", "m", "d", "-o", "p", "--amp", "banana"], "--amp: expected bool, got 'banana'"),
                        (["bpr", "train", "--out", "b", "--optim.steps", "1.5"],
                         "--optim.steps: expected int, got '1.5' (see voxdiff bpr train --help)")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and shown in err, err  # one line, not a page of usage


def test_command_line_mistakes_are_one_line(capsys, tmp_path):
    from voxdiff.cli import main

    for argv, shown in ((["probe", "m", "d", "-o", str(tmp_path / "p"), "--nosuch", "1"], "unrecognized arguments: --nosuch 1"),
                        (["probe", "m"], "the following arguments are required: data, out (see voxdiff probe --help)"),
                        (["nosuch"], "unknown command 'nosuch'"),
                        (["bpr", "nosuch"], "unknown command 'nosuch' (choose from 'train', 'predict', 'evaluate', 'ensemble') "
                                            "(see voxdiff bpr --help)"),
                        (["data"], "a command is needed, one of {prepare,check,splits} (see voxdiff data --help)"),
                        (["phantom", str(tmp_path / "ph"), "--shape", "[1,2"], "--shape: expected tuple")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("voxdiff: error: ") and err.count("\n") == 1 and shown in err, err
    assert not list(tmp_path.iterdir())


def test_version_names_the_program_once(capsys):
    import pytest

    from voxdiff import __version__
    from voxdiff.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"voxdiff {__version__}"


def test_a_command_line_builds_only_the_options_of_its_command_and_parses_as_the_full_parser():
    """``build_parser(argv)`` (what ``voxdiff`` does) adds the dataclass options of the command the
    line names and leaves the others' for later; that command parses as with every option built.
    A line that names no command (``--help``, a group, a typo) builds none: it is answered from the
    command tree; ``build_parser()`` without a line builds them all."""
    line = ["--quiet", "bpr", "train", "--out", "m", "--optim.steps", "7", "--kind", "ape"]
    parser, root = build_parser(line)
    options = {name: set(p._option_string_actions) for name, p in root.runners["bpr"].parsers.items()}
    assert "--optim.steps" in options["train"] and "--out" in options["train"]
    assert "--n_crops" not in options["evaluate"] and "--out" in options["evaluate"]  # its own, not its config's
    full, _ = build_parser()
    lazy_ns, full_ns = parser.parse_args(line), full.parse_args(line)
    assert lazy_ns.bpr.train.optim.steps == 7 and lazy_ns.as_dict() == full_ns.as_dict()
    for words in (["bpr"], ["bpr", "trian"], ["--help"]):
        _, r = build_parser(words)
        assert "--n_crops" not in r.runners["bpr"].parsers["evaluate"]._option_string_actions, words
    assert "--n_crops" in build_parser()[1].runners["bpr"].parsers["evaluate"]._option_string_actions


def test_a_command_line_loads_no_torch_before_it_runs_a_command_that_needs_it():
    """Every stage registers its commands without importing torch (the stage packages load their
    modules on first use, voxdiff.core.lazy; the command modules name config classes as strings), so
    ``voxdiff --help``, a group's help, a typo, ``voxdiff phantom`` and ``voxdiff data`` start in about
    a second (4.5-5 s before); a command whose options need torch loads it."""
    import json
    import subprocess
    import sys

    # One fresh interpreter builds the parser for each line in turn and says after each whether torch is
    # loaded: torch, once loaded, stays, so the lines that must not load it come first and each is
    # checked on its own; the command whose options need torch comes last.
    probe = ("import json, sys; from voxdiff.cli import build_parser\n"
             "for line in json.loads(sys.argv[1]):\n"
             "    _, root = build_parser(line)\n"
             "    print(json.dumps([line, len(root.runners), 'torch' in sys.modules]))")
    n_commands = len(build_parser()[1].runners)
    lines = (["phantom", "out", "--n_train", "2"], ["--quiet", "data", "check", "x"], ["--help"], ["bpr"], ["phantomx"],
             ["bpr", "train", "--out", "m"])
    out = subprocess.run([sys.executable, "-c", probe, json.dumps(lines)], capture_output=True, text=True, check=True,
                         timeout=120)
    got = [json.loads(r) for r in out.stdout.strip().splitlines()[-len(lines):]]
    assert got == [[list(line), n_commands, line[:2] == ["bpr", "train"]] for line in lines], got
