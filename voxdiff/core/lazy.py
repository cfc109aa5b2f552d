"""Package namespaces that import their submodules on first use (PEP 562).

``voxdiff.bpr``, ``voxdiff.pretrain`` and the other stages re-export their public functions and
classes. Importing them all eagerly loads torch and the training code for any ``import
voxdiff.<stage>.<anything>``, which made every ``voxdiff`` command take 4-5 s to start, ``--help``
included. With :func:`lazy_exports` a package's names stay where they were
(``from voxdiff.bpr import train_bpr``), and each is imported when it is first asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for the package ``package`` whose public names are
    ``exports``: module (relative to the package, or absolute) -> the names it provides. A name is
    imported from its module on first access and then kept in the package. A submodule that is not
    imported yet is imported when asked for as an attribute, as an eager ``__init__`` would have
    made it one."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module, package), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return sorted(where), __getattr__, __dir__
