"""A small layer over jsonargparse so that each stage adds thin subcommands over its function.

A stage's ``cli.py`` defines ``register(group: CommandGroup)`` and adds commands like::

    def register(group):
        p = group.command("phantom", run_phantom, help="Generate synthetic abdominal CT phantoms")
        p.add_argument("out", type=str, help="output folder")
        p.add_argument("--force", action="store_true")
        add_config(p, PhantomConfig)          # every dataclass field becomes --field

    def run_phantom(ns):
        cfg = from_namespace(PhantomConfig, ns)
        make_phantom_dataset(ns.out, cfg, force=ns.force)

Every command accepts ``--config file.yaml`` (values there, overridden by the command line) and
``--quiet`` (no warnings; commands that show progress bars also hide them). Errors of type
:class:`~voxdiff.core.errors.VoxdiffError` become one line on stderr and exit 2; warnings become
one line ``voxdiff: warning: ...`` each, printed once (:class:`WarningPrinter`).
"""

from __future__ import annotations

from typing import Any, Callable

from jsonargparse import ActionConfigFile, ArgumentParser


class CommandGroup:
    """A level of subcommands (``voxdiff data ...``)."""

    def __init__(self, parser: ArgumentParser, dest: str):
        self.parser = parser
        self.dest = dest
        self._sub = parser.add_subcommands(required=True, dest=dest)
        self.runners: dict[str, Callable[[Any], Any] | CommandGroup] = {}
        self.parsers: dict[str, ArgumentParser] = {}

    def command(self, name: str, run: Callable[[Any], Any], help: str, description: str | None = None) -> ArgumentParser:
        # exit_on_error off (here and for groups): a bad command line raises ArgumentError, which
        # voxdiff.cli.main prints as one line (usage_error_line) instead of a page of usage
        p = ArgumentParser(description=description or help, exit_on_error=False)
        p.add_argument("--config", action=ActionConfigFile, help="YAML file with option values (command-line wins)")
        # add_config on this parser waits until the command is used (complete_options): building every
        # command's options from its dataclasses took 0.3 s of each `voxdiff` call
        p._voxdiff_deferred = []  # type: ignore[attr-defined]
        self._sub.add_subcommand(name, p, help=help)
        self.runners[name] = run
        self.parsers[name] = p
        return p

    def group(self, name: str, help: str) -> "CommandGroup":
        p = ArgumentParser(description=help, exit_on_error=False)
        self._sub.add_subcommand(name, p, help=help)
        g = CommandGroup(p, dest=f"{self.dest}_{name}")
        self.runners[name] = g
        return g

    def command_parsers(self) -> list[ArgumentParser]:
        """Every command's parser, this level and below."""
        out = list(self.parsers.values())
        for r in self.runners.values():
            if isinstance(r, CommandGroup):
                out += r.command_parsers()
        return out

    def leaf(self, ns: Any) -> Any:
        """The namespace of the command that ``ns`` selects."""
        name = ns[self.dest] if self.dest in ns else ns.get(self.dest)
        runner, sub = self.runners[name], ns[name]
        return runner.leaf(sub) if isinstance(runner, CommandGroup) else sub

    def dispatch(self, ns: Any) -> Any:
        name = ns[self.dest] if self.dest in ns else ns.get(self.dest)
        runner = self.runners[name]
        sub = ns[name]
        if isinstance(runner, CommandGroup):
            return runner.dispatch(sub)
        return runner(sub)


def add_config(parser: ArgumentParser, cls: type | str, skip: set[str] | None = None) -> None:
    """Add every field of dataclass ``cls`` (the class, or ``"module:Name"``: imported when the options
    are built, so that registering a command loads nothing heavy) as a ``--field`` option (a section ``sec`` of a sectioned
    class, see :mod:`voxdiff.core.config`, as ``--sec.field`` options); the old names of renamed
    fields (``cls.RENAMED``) and the flat names of a sectioned class's fields (``--lr`` for
    ``--optim.lr``) become hidden options of the new one's type (also accepted as keys of
    ``--config`` YAML files); :func:`~voxdiff.core.config.from_namespace` maps them with a warning.
    A section with a ``VALUE_FIELD`` also takes a plain value: ``--data A B`` sets ``--data.paths``
    (the section option still takes a YAML file or a JSON/YAML mapping of the section, as usual).

    On a parser made by :meth:`CommandGroup.command` the options are added later, in the order of the
    calls, by :func:`complete_options` (``voxdiff.cli.build_parser`` completes the command a command
    line names, or every command when it is given no line)."""
    deferred = getattr(parser, "_voxdiff_deferred", None)
    if deferred is not None:
        deferred.append((cls, skip))
        return
    _add_config(parser, cls, skip)


def complete_options(parser: ArgumentParser) -> ArgumentParser:
    """Add the options that :func:`add_config` deferred on a command's parser (once); the parser."""
    deferred = getattr(parser, "_voxdiff_deferred", None)
    parser._voxdiff_deferred = None  # type: ignore[attr-defined]  # from now on add_config adds at once
    for cls, skip in deferred or ():
        _add_config(parser, cls, skip)
    return parser


def config_class(cls: type | str) -> type:
    """``cls`` itself, or the class that ``"module:Name"`` names (imported now)."""
    if not isinstance(cls, str):
        return cls
    import importlib

    module, _, name = cls.partition(":")
    return getattr(importlib.import_module(module), name)


def _add_config(parser: ArgumentParser, cls: type | str, skip: set[str] | None = None) -> None:
    import argparse
    import dataclasses
    import typing

    from .config import flat_names, renamed_fields, section_classes

    cls = config_class(cls)
    renamed = renamed_fields(cls)
    hints = typing.get_type_hints(cls)
    # init-only keywords (old names kept as ``InitVar``s): jsonargparse would take them unvalidated
    initvars = {k: h.type for k, h in hints.items() if isinstance(h, dataclasses.InitVar)}
    parser.add_class_arguments(cls, None, as_group=True, skip=(skip or set()) | set(renamed) | set(initvars))
    for old, new in renamed.items():
        parser.add_argument(f"--{old}", type=typing.Optional[hints.get(new, Any)], default=None,
                            help=argparse.SUPPRESS)
    for name, tp in initvars.items():
        if name not in (skip or set()) and f"--{name}" not in parser._option_string_actions:
            parser.add_argument(f"--{name}", type=typing.Optional[tp], default=None, help=argparse.SUPPRESS)
    sections = section_classes(cls)
    for sec, scls in sections.items():
        vf = getattr(scls, "VALUE_FIELD", None)
        action = parser._option_string_actions.get(f"--{sec}")
        if vf is not None and action is not None:
            _section_takes_value(action, vf, typing.get_type_hints(scls).get(vf, Any))
    for flat, path in flat_names(cls).items():
        sec, _, fld = path.partition(".")
        if sec in (skip or set()) or f"--{flat}" in parser._option_string_actions:
            continue
        shints = typing.get_type_hints(sections[sec])
        tp = shints.get(renamed_fields(sections[sec]).get(fld, fld), Any)
        parser.add_argument(f"--{flat}", type=typing.Optional[tp], default=None, help=argparse.SUPPRESS)


def _section_takes_value(action: Any, field: str, tp: Any) -> None:
    """Let the ``--sec`` option of a section (jsonargparse's: a config file or mapping of the
    section) also take a plain value for the section's ``field``: ``--backbone fpn3d`` (and
    ``backbone: fpn3d`` in a ``--config`` file); several values for a list field (``--data A B``)."""
    import os

    from jsonargparse import Namespace

    many = _is_sequence_hint(tp)
    base = type(action)

    def is_section(v: Any) -> bool:  # what the section option takes as before: a YAML/JSON file or a mapping
        if not isinstance(v, str):
            return False
        return v.lstrip().startswith("{") or (v.lower().endswith((".yaml", ".yml", ".json")) and os.path.isfile(v))

    class SectionOrValue(base):  # type: ignore[valid-type,misc]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if len(args) >= 3 and isinstance(args[2], list) and len(args[2]) == 1 and is_section(args[2][0]):
                args = (args[0], args[1], args[2][0], *args[3:])
            return base.__call__(self, *args, **kwargs)

        def _load_config(self, value: Any, parser: Any) -> Any:
            if isinstance(value, (str, list)) and not is_section(value):
                vals = value if isinstance(value, list) else [value]
                return Namespace({field: list(vals) if many else vals[-1]})
            return base._load_config(self, value, parser)

    action.__class__ = SectionOrValue
    action.metavar = f"{field.upper()}|CONFIG"
    action.help = (f"the section's {field} ({'one or more values' if many else 'a value'}), or a YAML file / "
                   f"mapping of the section")
    if many:
        action.nargs = "+"


def underscore_options(argv: list[str]) -> list[str]:
    """Options are spelt with underscores (``--n_train``, ``--spacing_xy``); a hyphenated spelling
    (``--n_train``) is accepted as a hidden alias: ``--a-b[=v]`` becomes ``--a_b[=v]``. Values (tokens
    not starting with ``--``) and everything after a bare ``--`` are left alone."""
    out: list[str] = []
    rest = False
    for tok in argv:
        if rest or not tok.startswith("--") or tok == "--":
            rest = rest or tok == "--"
            out.append(tok)
            continue
        name, eq, value = tok.partition("=")
        out.append("--" + name[2:].replace("-", "_") + eq + value)
    return out


def _sequence_items(tp: Any) -> tuple[Any, ...] | None:
    """The item types of ``tuple[int, ...]``, ``list[str]`` or an Optional / Union holding one (those
    of every sequence member of a Union); None when ``tp`` is no sequence hint."""
    import typing

    if typing.get_origin(tp) in (list, tuple):
        return typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:
        found = [i for a in typing.get_args(tp) if (i := _sequence_items(a)) is not None]
        return tuple(x for i in found for x in i) if found else None
    return None


def _is_sequence_hint(tp: Any) -> bool:
    """``tuple[int, ...]``, ``list[str]``, or an Optional / Union holding one."""
    return _sequence_items(tp) is not None


def _holds_strings(tp: Any) -> bool:
    """Whether a sequence hint (possibly Optional) holds strings: ``tuple[str, ...]``, ``list[str]``."""
    return str in (_sequence_items(tp) or ())


def comma_lists(argv: list[str], root: CommandGroup) -> list[str]:
    """A list option of the named command also takes its items comma-separated, or one item alone:
    ``--seeds 7,8`` and ``--seeds 7`` become ``--seeds [7,8]`` / ``--seeds [7]`` (jsonargparse's own
    spelling, which keeps working, like ``--seeds '[7, 8]'``, a YAML/JSON mapping or an empty
    ``[]``). Items of a list of strings (methods, paths) are passed as JSON strings, so that YAML
    does not read ``#``, ``: `` or quotes in them; a value that names an existing file or folder is one
    item even when it holds a comma. Options of a section that take several plain values (``--data
    A B``) are left alone, as is everything after a bare ``--``."""
    import json
    import os

    parser = command_of(root, argv)[1]
    if parser is None:
        return list(argv)
    actions = parser._option_string_actions  # noqa: SLF001 (argparse keeps no public index of options)

    def listish(opt: str) -> bool:
        a = actions.get(opt)
        return a is not None and a.nargs is None and _is_sequence_hint(getattr(a, "_typehint", None))

    def wrap(opt: str, v: str) -> str:
        s = v.strip()
        if not s or s[0] in "[{(" or (s.lower().endswith((".yaml", ".yml", ".json")) and os.path.isfile(s)):
            return v
        if _holds_strings(getattr(actions[opt], "_typehint", None)):
            items = [v] if os.path.exists(v) else [i.strip() for i in v.split(",")]
            return json.dumps(items, ensure_ascii=False)
        return "[" + s + "]"

    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            return out + list(argv[i:])
        name, eq, value = tok.partition("=")
        if tok.startswith("--") and listish(name):
            if eq:
                out.append(f"{name}={wrap(name, value)}")
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out += [tok, wrap(tok, argv[i + 1])]
                i += 1
            else:
                out.append(tok)
        else:
            out.append(tok)
        i += 1
    return out


def command_of(root: CommandGroup, argv: list[str]) -> tuple[list[str], ArgumentParser | None]:
    """The command words at the start of ``argv`` (commands and groups; flags of the top level before
    them, such as ``voxdiff --quiet``, are passed over) and the parser of the command they name (None
    when they stop at a group, or name nothing)."""
    words: list[str] = []
    g: CommandGroup | None = root
    for a in argv:
        if not words and a.startswith("-"):  # the top level's own flags take no value
            continue
        if g is None or a not in g.runners:
            break
        words.append(a)
        r = g.runners[a]
        if isinstance(r, CommandGroup):
            g = r
        else:
            return words, g.parsers[a]
    return words, None


def usage_error_line(message: str, argv: list[str], root: "CommandGroup | None" = None, prog: str = "voxdiff") -> str:
    """jsonargparse's message for a bad command line (several lines after a page of usage) as one line:
    ``--sampling.batch_size: expected int, got 'x' (see voxdiff probe --help)``."""
    import re

    command = command_of(root, argv)[0] if root is not None else []
    m = re.match(r'Parser key "([^"]+)":(.*)', message, flags=re.S)
    if m:
        key, rest = m.groups()
        kinds = [k for k in re.findall(r"Expected a <class '([^']+)'>", rest) if k != "NoneType"]
        got = re.search(r"(?:Got|Given) value: (.*)", rest)
        text = f"--{key}: "
        text += f"expected {' or '.join(dict.fromkeys(kinds))}, got {got.group(1).strip()!r}" if kinds and got else rest
    elif m := re.match(r"argument command\S*: invalid choice: (\S+) (.*)", message, flags=re.S):
        text = f"unknown command {m.group(1)} {m.group(2)}"
    elif m := re.match(r'expected "\S+" to be one of (\{.*\}), but it was not provided', message):
        text = f"a command is needed, one of {m.group(1)}"
    elif message.startswith("the following arguments are required:") and command:
        text = re.sub(r"\b" + re.escape(".".join(command)) + r"\.", "", message)  # probe.data -> data
    else:
        text = message
    return one_line(f"{text} (see {' '.join([prog, *command])} --help)", limit=500)


def one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line (whitespace runs collapsed), cut at a word boundary past ``limit``."""
    s = " ".join(str(text).split())
    if len(s) <= limit:
        return s
    cut = s[:limit].rsplit(" ", 1)[0].rstrip(",;:(")
    return cut + " ..."


class WarningPrinter:
    """Show Python warnings the CLI's way: ``voxdiff: warning: <message>`` on one line, each
    message once, no source file or line; nothing at all when ``quiet``."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream
        self.seen: set[str] = set()
        self._ctx: Any = None

    def show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if self.quiet:
            return
        text = one_line(str(message))
        if text in self.seen:
            return
        self.seen.add(text)
        import sys

        print(f"voxdiff: warning: {text}", file=self.stream or sys.stderr)

    def __enter__(self) -> "WarningPrinter":
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("always")  # our own once-per-message rule replaces Python's registry
        warnings.showwarning = self.show
        return self

    def __exit__(self, *exc) -> None:
        assert self._ctx is not None
        self._ctx.__exit__(*exc)
        self._ctx = None
