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

Every command accepts ``--config file.yaml`` (values there, overridden by the command line).
Errors of type :class:`~voxdiff.core.errors.VoxdiffError` become one line on stderr and exit 2.
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

    def command(self, name: str, run: Callable[[Any], Any], help: str, description: str | None = None) -> ArgumentParser:
        p = ArgumentParser(description=description or help, exit_on_error=True)
        p.add_argument("--config", action=ActionConfigFile, help="YAML file with option values (command-line wins)")
        self._sub.add_subcommand(name, p, help=help)
        self.runners[name] = run
        return p

    def group(self, name: str, help: str) -> "CommandGroup":
        p = ArgumentParser(description=help)
        self._sub.add_subcommand(name, p, help=help)
        g = CommandGroup(p, dest=f"{self.dest}_{name}")
        self.runners[name] = g
        return g

    def dispatch(self, ns: Any) -> Any:
        name = ns[self.dest] if self.dest in ns else ns.get(self.dest)
        runner = self.runners[name]
        sub = ns[name]
        if isinstance(runner, CommandGroup):
            return runner.dispatch(sub)
        return runner(sub)


def add_config(parser: ArgumentParser, cls: type, skip: set[str] | None = None) -> None:
    """Add every field of dataclass ``cls`` as a flat ``--field`` option."""
    parser.add_class_arguments(cls, None, as_group=True, skip=skip or set())
