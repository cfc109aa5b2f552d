"""Resumable experiment steps.

An experiment is a sequence of named steps; each step writes into its own folder under the
experiment's output folder and finishes by writing ``result.json`` there. A step whose
``result.json`` exists is not run again, so an interrupted experiment resumes where it stopped.

A step is built in a work folder and moved into place only when it succeeds, so a step folder is
always complete. What happens to the work folder of a step that failed or was interrupted depends
on the step: an ordinary step (minutes of work at most) is discarded and redone from scratch; a
``resumable`` step (BPR training, pretraining: hours on real budgets) keeps its work folder,
``.NAME.partial``, with the training state checkpoints in it, and the next run hands that folder
back to the step, which continues from its last checkpoint.

Several processes may work on one experiment folder at once (``voxdiff experiment compare --jobs``):
each step is run under an exclusive lock (``.locks/NAME.lock``, ``flock``), so a step is run by one
process only. Another process that needs it waits for it (``wait=True``) or gets :class:`StepBusy`
and does other work first (``wait=False``); either way it then reads the finished step's result.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from voxdiff.core.outputs import atomic_write_json, kept_work_dir, staged_dir

RESULT = "result.json"
LOCKS = ".locks"  # one empty lock file per step (flock), under the experiment folder
ELAPSED = ".elapsed"


class StepBusy(Exception):
    """The step is being run by another process (raised by ``StepRunner(wait=False)``)."""

    def __init__(self, name: str):
        super().__init__(f"step {name} is running in another process")
        self.name = name


class StepRunner:
    def __init__(self, root: str | Path, log: Callable[[str], None] = print, wait: bool = True):
        """``wait``: when another process is running a step, wait for it (True) or raise
        :class:`StepBusy` (False)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.wait = wait
        self.log_skips = True  # "[skip] NAME" lines (off where several processes share the work)
        self._announced: set[str] = set()
        # seconds spent in steps run from inside each step now running (innermost last): a step's
        # "seconds" are its own, not those of the steps it needed and ran first
        self._nested: list[float] = []
        self.ran: list[str] = []
        self.skipped: list[str] = []

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """Hold the step's lock for the block (see the module docstring)."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): one process per experiment folder
            yield
            return
        lock = self.root / LOCKS / f"{name}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not self.wait:
                    raise StepBusy(name) from None
                self.log(f"[wait] {name} (running in another process)")
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def path(self, name: str) -> Path:
        return self.root / name

    def work_dir(self, name: str) -> Path:
        """The work folder kept by an interrupted resumable step."""
        return kept_work_dir(self.root / name)

    def done(self, name: str) -> bool:
        return (self.root / name / RESULT).is_file()

    def result(self, name: str) -> dict[str, Any]:
        return json.loads((self.root / name / RESULT).read_text())

    def step_seconds(self) -> float:
        """Seconds recorded by every finished step in the folder, each counted once (a step's seconds
        exclude the steps it ran inside itself; files inside a step folder and unfinished or staged
        steps are not steps): the compute behind a report, also the part of it that finished in
        earlier invocations."""
        steps: list[Path] = []
        for res in sorted(self.root.rglob(RESULT), key=lambda p: len(p.parts)):
            rel = res.parent.relative_to(self.root)
            if not rel.parts or any(part.startswith(".") for part in rel.parts):
                continue
            if any(step in res.parent.parents for step in steps):
                continue
            steps.append(res.parent)
        total = 0.0
        for step in steps:
            try:
                total += float(json.loads((step / RESULT).read_text()).get("seconds") or 0.0)
            except (OSError, ValueError, TypeError, AttributeError):
                continue  # an unreadable result is the runner's business when the step is used
        return total

    def run(self, name: str, fn: Callable[[Path], dict[str, Any] | None], resumable: bool = False) -> dict[str, Any]:
        """Run ``fn(step_dir)`` unless the step already finished; return its result dict.

        ``resumable``: keep the work folder when ``fn`` fails or is interrupted, and give it to
        ``fn`` again on the next run (``fn`` finds its own checkpoints in it).
        """
        if self.done(name):
            self.skipped.append(name)
            if self.log_skips:
                self.log(f"[skip] {name} (finished earlier)")
            return self.result(name)
        with self._locked(name):
            if self.done(name):  # finished by another process while this one waited
                self.skipped.append(name)
                if self.log_skips:
                    self.log(f"[skip] {name} (finished in another process)")
                return self.result(name)
            return self._run(name, fn, resumable)

    def _run(self, name: str, fn: Callable[[Path], dict[str, Any] | None], resumable: bool) -> dict[str, Any]:
        target = self.root / name
        work = self.work_dir(name)
        spent = work / ELAPSED  # seconds of the earlier, interrupted runs of a resumable step
        if name not in self._announced:  # once: a step put back for later (StepBusy) starts again quietly
            self._announced.add(name)
            self.log(f"[run ] {name}" + (f" (continuing the interrupted run kept in {work})"
                                         if resumable and work.is_dir() else ""))
        t0 = time.perf_counter()
        self._nested.append(0.0)

        def own() -> float:  # this step's seconds so far, without the steps it ran inside itself
            return time.perf_counter() - t0 - self._nested[-1]

        try:
            with staged_dir(target, force=True, keep=resumable) as tmp:
                before = float(spent.read_text()) if resumable and spent.is_file() else 0.0
                try:
                    res = fn(tmp) or {}
                except StepBusy:  # a step this one needs is running in another process: try again later
                    if resumable and work.is_dir() and not any(work.iterdir()):
                        work.rmdir()  # nothing done yet: not an interrupted run to continue
                    raise
                except BaseException:
                    if resumable:
                        spent.write_text(f"{before + own():.2f}")
                        self.log(f"[kept] {name}: its work so far is in {work}; run the experiment again to continue it")
                    raise
                if resumable:
                    spent.unlink(missing_ok=True)
                res = {**res, "seconds": round(before + own(), 2)}
                atomic_write_json(tmp / RESULT, res)
        finally:
            self._nested.pop()
            if self._nested:
                self._nested[-1] += time.perf_counter() - t0
        self.ran.append(name)
        return res
