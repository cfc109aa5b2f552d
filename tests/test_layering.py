"""Data flows one way through the stages: a lower layer never imports a higher one, by an import
statement or by name (a lazy_exports table, a config class given to add_config as a string)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

LAYERS = ["core", "data", "bpr", "pretrain", "features", "probe", "evaluate", "segment", "experiments"]
PKG = Path(__file__).resolve().parents[1] / "voxdiff"


def _imported_layers(path: Path) -> set[str]:
    rel = path.relative_to(PKG).with_suffix("").parts
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(rel[:-1])
                up = node.level - 1
                base = base[: len(base) - up] if up else base
                mod = base + (node.module.split(".") if node.module else [])
            else:
                if not (node.module or "").startswith("voxdiff."):
                    continue
                mod = node.module.split(".")[1:]
            if mod:
                found.add(mod[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("voxdiff."):
                    found.add(a.name.split(".")[1])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # imports by name: a stage package's lazy_exports table, a config class given to add_config
            m = re.fullmatch(r"voxdiff\.(\w+)(\.\w+)*(:\w+)?", node.value)
            if m:
                found.add(m.group(1))
    return found & set(LAYERS)


@pytest.mark.parametrize("layer", LAYERS)
def test_no_upward_imports(layer):
    rank = LAYERS.index(layer)
    bad = []
    for f in sorted((PKG / layer).rglob("*.py")):
        for imp in _imported_layers(f):
            if LAYERS.index(imp) > rank:
                bad.append(f"{f.relative_to(PKG)} imports voxdiff.{imp}")
    assert not bad, "upward imports: " + "; ".join(bad)
