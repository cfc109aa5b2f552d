"""The ``voxdiff`` command: one thin subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from jsonargparse import ArgumentParser

from . import __version__
from .core.cli import (
    CommandGroup,
    WarningPrinter,
    comma_lists,
    command_of,
    complete_options,
    one_line,
    underscore_options,
    usage_error_line,
)
from .core.errors import VoxdiffError
from .core.outputs import protecting_inputs
from .core.runtime import tune_allocator

# Each module defines register(group). Order = order in --help. Registering imports nothing heavy:
# the stage packages load their modules on first use (voxdiff.core.lazy) and the command modules
# name their config classes as strings, so every stage is registered for every command line.
STAGE_CLIS = [
    "voxdiff.data.cli",
    "voxdiff.data.phantom.cli",
    "voxdiff.bpr.cli",
    "voxdiff.pretrain.cli",
    "voxdiff.features.cli",
    "voxdiff.probe.cli",
    "voxdiff.evaluate.cli",
    "voxdiff.segment.cli",
    "voxdiff.experiments.cli",
]


def build_parser(argv: list[str] | None = None) -> tuple[ArgumentParser, CommandGroup]:
    """The ``voxdiff`` parser and its command tree. Without ``argv`` every command's options are
    built; given the command line ``argv``, only the options of the command it names (none for a
    group, ``--help`` or a typo: those are answered from the command tree)."""
    # exit_on_error off: main() prints a bad command line as one line (CommandGroup's parsers too)
    parser = ArgumentParser(prog="voxdiff", description=__doc__, version=__version__, exit_on_error=False)
    parser.add_argument("--quiet", action="store_true", help="no warnings (also accepted after the command)")
    root = CommandGroup(parser, dest="command")
    for mod in STAGE_CLIS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and (e.name == mod or mod.startswith(e.name + ".")):
                continue  # stage not present in this build
            raise
        m.register(root)
    # a line that names no command (--help, a group, a typo) is answered from the command tree alone:
    # no command's options are built, and no config class is imported
    if argv is None:
        to_complete = root.command_parsers()
    else:
        named = command_of(root, list(argv))[1]
        to_complete = [named] if named is not None else []
    for p in to_complete:
        complete_options(p)
    for p in root.command_parsers():  # commands with their own --quiet (no progress bar) keep it
        if "--quiet" not in getattr(p, "_option_string_actions", {}):
            p.add_argument("--quiet", action="store_true", help="no warnings")
    return parser, root


def config_files(argv: list[str]) -> list[str]:
    """The values of every ``--config`` option in ``argv`` that name a file (not inline YAML)."""
    values = []
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            values.append(a.split("=", 1)[1])
        elif a == "--config" and i + 1 < len(argv):
            values.append(argv[i + 1])
    return [v for v in values if "\n" not in v and not v.lstrip().startswith(("{", "["))]


def check_config_files(argv: list[str], root: CommandGroup | None = None) -> list[str]:
    """Refuse a ``--config`` file that is missing, not YAML, not a mapping, or (given ``root``) names
    an option the command does not have, with one line naming it (jsonargparse would print its usage
    and a message without the file's name, or nothing useful for a nested command).

    A config that voxdiff saved beside an artifact (``config.yaml``: the settings under ``config``,
    with ``versions``) is accepted as it is: ``argv`` is returned with such a file replaced by a
    temporary copy of its settings (removed at exit)."""
    import atexit
    import tempfile

    import yaml

    from .core.errors import InputError

    words, command = command_of(root, argv) if root is not None else ([], None)
    out = list(argv)
    for v in config_files(argv):
        p = os.path.expanduser(v)
        if not os.path.isfile(p):
            raise InputError(v, "no such config file" if not os.path.exists(p) else "a config must be a YAML file, not a folder")
        try:
            with open(p, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except UnicodeDecodeError:
            raise InputError(v, "not a text (YAML) file") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise InputError(v, f"not valid YAML ({what}{where})") from None
        if doc is not None and not isinstance(doc, dict):
            raise InputError(v, f"a config file must map option names to values, got a {type(doc).__name__}")
        saved = isinstance(doc, dict) and isinstance(doc.get("config"), dict) and "versions" in doc
        if saved:  # written by voxdiff beside an artifact: its settings are under "config"
            doc = doc["config"]
        if command is not None and doc:
            bad = unknown_options(command, doc)
            if bad:
                where = " ".join(["voxdiff", *words])
                raise InputError(v, f"not options of {where}: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''} "
                                    f"(see {where} --help)")
        if saved:
            fd, tmp = tempfile.mkstemp(prefix="voxdiff-config-", suffix=".yaml")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                yaml.safe_dump(doc, f, sort_keys=False)
            atexit.register(lambda t=tmp: os.path.exists(t) and os.remove(t))
            out = [tmp if a == v else (f"--config={tmp}" if a == f"--config={v}" else a) for a in out]
    return out


def unknown_options(parser: ArgumentParser, doc: dict) -> list[str]:
    """The keys of a config mapping (sections as nested mappings or dotted keys) that are not options
    or positional arguments of ``parser``."""
    names = {"config"}
    for act in parser._actions:
        if act.option_strings:
            names.update(o[2:] for o in act.option_strings if o.startswith("--"))
        else:  # a positional argument: its name is the key
            names.add(act.dest)
    bad: list[str] = []

    def walk(d: dict, prefix: str) -> None:
        for k, val in d.items():
            key = f"{prefix}{k}"
            if isinstance(val, dict) and any(n.startswith(key + ".") for n in names):
                walk(val, key + ".")
            elif key not in names:
                bad.append(key)

    walk(doc, "")
    return bad


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # before any large allocation; VOXDIFF_NO_MALLOPT=1 turns it off
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, root = build_parser(argv)
    try:
        args = comma_lists(underscore_options(argv), root)
        args = check_config_files(args, root)
        try:
            ns = parser.parse_args(args)
        except argparse.ArgumentError as e:  # a mistyped option or value: one line, not a page of usage
            print(f"voxdiff: error: {usage_error_line(str(e), args, root)}", file=sys.stderr)
            return 2
        quiet = bool(ns.get("quiet")) or bool(getattr(root.leaf(ns), "quiet", False))
        # a stage command never replaces what it reads; an experiment rewrites its own step folders
        guard = contextlib.nullcontext() if ns.get("command") in ("experiment", "demo") else protecting_inputs()
        with WarningPrinter(quiet=quiet), guard:
            root.dispatch(ns)
    except VoxdiffError as e:
        msg = one_line(str(e), limit=1000)
        print(f"voxdiff: error: {msg}", file=sys.stderr)
        if os.environ.get("VOXDIFF_DEBUG"):
            raise
        return e.exit_code
    except KeyboardInterrupt:
        print("voxdiff: interrupted", file=sys.stderr)
        return 130
    except MemoryError as e:  # numpy/torch allocation failures: one line, not a traceback
        if os.environ.get("VOXDIFF_DEBUG"):
            raise
        what = one_line(str(e), limit=300) or "an allocation failed"
        print(f"voxdiff: error: out of memory ({what}); use smaller windows or batches, a coarser spacing, "
              f"or a machine with more memory", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
