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
        p = ArgumentParser(description=description or help, exit_on_error=True)
        p.add_argument("--config", action=ActionConfigFile, help="YAML file with option values (command-line wins)")
        self._sub.add_subcommand(name, p, help=help)
        self.runners[name] = run
        self.parsers[name] = p
        return p

    def group(self, name: str, help: str) -> "CommandGroup":
        p = ArgumentParser(description=help)
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


def add_config(parser: ArgumentParser, cls: type, skip: set[str] | None = None) -> None:
    """Add every field of dataclass ``cls`` as a flat ``--field`` option; the old names of renamed
    fields (``cls.RENAMED``) become hidden options of the new one's type (also accepted as keys of
    ``--config`` YAML files); :func:`~voxdiff.core.config.from_namespace` maps them with a warning."""
    import argparse
    import typing

    from .config import renamed_fields

    renamed = renamed_fields(cls)
    parser.add_class_arguments(cls, None, as_group=True, skip=(skip or set()) | set(renamed))
    hints = typing.get_type_hints(cls)
    for old, new in renamed.items():
        parser.add_argument(f"--{old}", type=typing.Optional[hints.get(new, Any)], default=None,
                            help=argparse.SUPPRESS)


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
