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
             if "Unvalidated" in repr(getattr(a, "_typehint", None)) and a.help != argparse.SUPPRESS]
    # left: probe's deprecated --amp (an InitVar alias of --runtime.bf16, kept for old command lines)
    assert loose == ["voxdiff [options] probe: --amp"]


def test_a_value_of_the_wrong_type_is_refused_by_the_parser(capsys):
    import pytest

    from voxdiff.cli import main

    for argv in (["segment", "m", "ct.nii.gz", "-o", "s.nii.gz", "--sw_batch_size", "abc"],
                 ["evaluate", "m", "data", "-o", "e", "--n_classes", "abc"],
                 ["segment", "m", "ct.nii.gz", "-o", "s.nii.gz", "--bf16", "abc"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "Expected a <class" in capsys.readouterr().err
