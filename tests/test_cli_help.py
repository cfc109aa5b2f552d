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
