"""Resumable experiment steps.

An experiment is a sequence of named steps; each step writes into its own folder under the
experiment's output folder and finishes by writing ``result.json`` there. A step whose
``result.json`` exists is not run again, so an interrupted experiment resumes where it stopped
(a step interrupted half-way is redone from scratch: it is built in a temporary folder and moved
into place only when it succeeds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from voxdiff.core.outputs import atomic_write_json, staged_dir

RESULT = "result.json"


class StepRunner:
    def __init__(self, root: str | Path, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def path(self, name: str) -> Path:
        return self.root / name

    def done(self, name: str) -> bool:
        return (self.root / name / RESULT).is_file()

    def result(self, name: str) -> dict[str, Any]:
        return json.loads((self.root / name / RESULT).read_text())

    def run(self, name: str, fn: Callable[[Path], dict[str, Any] | None]) -> dict[str, Any]:
        """Run ``fn(step_dir)`` unless the step already finished; return its result dict."""
        if self.done(name):
            self.skipped.append(name)
            self.log(f"[skip] {name} (finished earlier)")
            return self.result(name)
        self.log(f"[run ] {name}")
        t0 = time.perf_counter()
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with staged_dir(target, force=True) as tmp:
            res = fn(tmp) or {}
            res = {**res, "seconds": round(time.perf_counter() - t0, 2)}
            atomic_write_json(tmp / RESULT, res)
        self.ran.append(name)
        return res
