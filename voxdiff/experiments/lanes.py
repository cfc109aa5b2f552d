"""Independent experiment steps in parallel processes (``--jobs N``).

An experiment such as ``compare`` is a set of independent pieces (one method's pretraining and
probes, one fine-tuned row, ...) that share a few steps (phantoms, the BPR models). With ``jobs``
> 1, ``jobs`` processes ("lanes") each walk through all the pieces, in different orders, with
``cores // jobs`` torch threads each. The step lock of :class:`~voxdiff.experiments.runner.StepRunner`
makes sure every step runs once: a lane that reaches a step another lane is running leaves that
piece for later and goes on with the next one, and comes back when it has nothing else to do.
The main process is lane 0 (with the progress bars); the others log with a ``[job K]`` prefix.

What it buys depends on the machine. On 2-core VMs with AVX-512 two one-thread lanes ran the demo no
faster than one process (901 s both ways in the fifth session; 433 s against 438 s in the twenty-eighth,
AVX2 kernels forced; docs/RESULTS.md, "The demo in two lanes"). On the slowest type seen, a 2-core
AVX2-only EPYC, where a step gains only 1.3-1.6x from its second thread, they ran it in 932 s against
1,098 s of wall time (fifty-eighth session, "The demo in two lanes on the slowest CPU type"). So ``voxdiff demo``
runs two lanes by default (``--jobs 0``, auto). Lanes are also the way to run long experiments
(label-efficiency) in independent processes that can be stopped and resumed.

The steps and their seeds are those of ``jobs=1``, and no step depends on the order in which they run.
Only the thread count per step changes. That changes the order of floating-point sums: the last bits of
one step, which a training carries on (up to 2.6 Dice points in a row of the demo's table, on three
test phantoms).
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from typing import Any, Callable

from voxdiff.core.config import from_dict, to_dict

from .runner import StepBusy

POLL_SECONDS = 2.0


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_jobs(jobs: int) -> int:
    """``jobs`` > 0 as given; 0 (auto): 2 lanes on a CPU of at least 2 cores, else 1, and 1 where CUDA
    is available (a GPU runs one step at a time best). Two lanes were never slower than one process on
    the 2-core VMs measured here and 15 % faster on the slowest (module docstring)."""
    if jobs > 0:
        return int(jobs)
    try:
        import torch

        if torch.cuda.is_available():
            return 1
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return 2 if available_cores() >= 2 else 1


def lane_order(items: list, lane: int) -> list:
    """Lane 0 walks the pieces in order, lane 1 backwards, lanes 2 and 3 the same from the middle, ..."""
    if not items:
        return []
    shift = (lane // 2) * len(items) // 4
    order = items[shift:] + items[:shift]
    return order[::-1] if lane % 2 else order


def work_through(items: list[tuple[str, Callable[[], Any]]], log: Callable[[str], None],
                 poll: float = POLL_SECONDS) -> None:
    """Run every piece; a piece whose steps another process is running is put back and tried again
    after the others (with a pause when nothing else could run)."""
    pending = list(items)
    told: set[tuple[str, str]] = set()
    while pending:
        later = []
        for key, fn in pending:
            try:
                fn()
            except StepBusy as e:
                if (key, e.name) not in told:
                    told.add((key, e.name))
                    log(f"[later] {key}: {e.name} is running in another process")
                later.append((key, fn))
        if len(later) == len(pending):
            time.sleep(poll)
        pending = later


def _lane_main(cfg_dict: dict[str, Any], out: str, budget: dict[str, Any], experiment: str, lane: int,
               jobs: int, threads: int) -> None:
    """A child lane: a fresh process (spawn) that opens the same experiment folder."""
    import signal

    import torch

    from voxdiff.core.runtime import tune_allocator

    from .base import Experiment, ExperimentConfig

    def stop(signum, frame):  # terminated by the main process: unwind, so work folders are cleaned up
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    tune_allocator()
    torch.set_num_threads(threads)
    prefix = f"[job {lane + 1}] "

    def log(msg: str) -> None:
        print(prefix + msg, flush=True)

    try:
        cfg = from_dict(ExperimentConfig, cfg_dict)
        exp = Experiment(cfg, out, log=log, budget=budget)
        exp.cfg = dataclasses.replace(exp.cfg, progress=False)  # the main lane shows the progress bars
        exp.runner.log_skips = False
        exp.data_dir()  # every step needs the data: wait for it (the main lane makes the phantoms)
        items = _items(exp, experiment)
        exp.runner.wait = False
        work_through(lane_order(items, lane), log)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as e:  # the main process runs what is left and reports the error itself
        log(f"stopped: {type(e).__name__}: {e}")
        if os.environ.get("VOXDIFF_DEBUG"):
            traceback.print_exc()
        raise SystemExit(1) from None


def _items(exp, experiment: str) -> list[tuple[str, Callable[[], Any]]]:
    from . import experiments

    if experiment == "compare":
        # whole-volume fine-tuning (the demo's LP-FT rows) holds a whole volume's activations: two at once in
        # two lanes took the demo to 18 GiB of resident memory against 10 in one process (fifty-eighth
        # session). The lanes leave those rows to the caller's pass after them, one at a time on every core.
        return experiments.compare_items(exp, whole_volume=False)
    if experiment == "label-efficiency":
        return experiments.label_items(exp)
    raise ValueError(f"no lanes for experiment {experiment!r}")


def run_lanes(exp, experiment: str = "compare") -> int:
    """Run the pieces of ``experiment`` on ``exp`` (an open :class:`Experiment`) in
    ``exp.cfg.jobs`` lanes; returns the number of lanes. Steps that a failed lane left undone are
    left for the caller, whose own (sequential) pass then runs them and reports any error; so are the
    fine-tuned rows of ``compare`` that train on whole volumes (:func:`_items`), which that pass runs one
    at a time with every core's thread."""
    import multiprocessing as mp

    from voxdiff.core.runtime import num_threads

    jobs = resolve_jobs(exp.cfg.jobs)
    if jobs <= 1:
        return 1
    try:
        import fcntl  # noqa: F401  (the step locks)
    except ImportError:
        exp.log("--jobs needs flock (POSIX); running the steps in one process")
        return 1
    exp.runner.log_skips = False  # with several lanes "[skip]" lines say nothing; the caller's pass is quiet too
    threads = max(1, available_cores() // jobs)
    exp.log(f"{jobs} jobs of {threads} thread(s) each: independent steps run side by side")
    ctx = mp.get_context("spawn")
    args = (to_dict(exp.cfg), str(exp.out), exp.budget, experiment)
    procs = [ctx.Process(target=_lane_main, args=(*args, k, jobs, threads), name=f"voxdiff-job-{k + 1}")
             for k in range(1, jobs)]
    for p in procs:
        p.start()
    ok = False
    try:
        with num_threads(threads):
            exp.data_dir()
            items = _items(exp, experiment)
            exp.runner.wait = False
            try:
                work_through(lane_order(items, 0), exp.log)
            finally:
                exp.runner.wait = True
        ok = True
    finally:
        if not ok:
            for p in procs:
                p.terminate()
        for p in procs:
            p.join()
    failed = [p.name for p in procs if p.exitcode not in (0, None)]
    if failed:
        exp.log(f"{', '.join(failed)} stopped early; the steps they left are run here")
    return jobs
