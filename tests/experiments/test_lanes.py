"""Several processes on one experiment folder: step locks, deferred pieces, and ``--jobs`` results."""

from __future__ import annotations

import threading

import pytest

from voxdiff.experiments import experiments as ex
from voxdiff.experiments.base import ExperimentConfig
from voxdiff.experiments.lanes import available_cores, lane_order, resolve_jobs, work_through
from voxdiff.experiments.runner import StepBusy, StepRunner


def test_a_running_step_is_busy_for_others_and_waited_for(tmp_path):
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow(d):
        calls.append("slow")
        started.set()
        release.wait(10)
        return {"value": 7}

    owner = StepRunner(tmp_path, log=lambda s: None)
    t = threading.Thread(target=owner.run, args=("s", slow))
    t.start()
    assert started.wait(10)
    # flock conflicts between separate opens of the lock file, also within one process
    with pytest.raises(StepBusy) as e:
        StepRunner(tmp_path, log=lambda s: None, wait=False).run("s", lambda d: calls.append("other"))
    assert e.value.name == "s"
    logs: list[str] = []
    waiting = threading.Event()

    def log(line: str) -> None:
        logs.append(line)
        if line.startswith("[wait]"):
            waiting.set()

    waiter = StepRunner(tmp_path, log=log)
    got: dict = {}
    w = threading.Thread(target=lambda: got.update(waiter.run("s", lambda d: calls.append("waiter") or {})))
    w.start()
    assert waiting.wait(10)
    release.set()
    t.join(10)
    w.join(10)
    assert calls == ["slow"]  # run once, by the process that took the lock
    assert got["value"] == 7 and waiter.skipped == ["s"]
    assert logs[0].startswith("[wait] s") and "finished in another process" in logs[-1]


def test_a_busy_dependency_leaves_no_partial_work_folder(tmp_path):
    owner = StepRunner(tmp_path, log=lambda s: None)
    inner_started, release = threading.Event(), threading.Event()
    t = threading.Thread(target=owner.run, args=("dep", lambda d: (inner_started.set(), release.wait(10), {})[-1]))
    t.start()
    assert inner_started.wait(10)
    other = StepRunner(tmp_path, log=lambda s: None, wait=False)

    def outer(d):
        other.run("dep", lambda d2: {})
        return {}

    with pytest.raises(StepBusy):
        other.run("outer", outer, resumable=True)
    release.set()
    t.join(10)
    assert not (tmp_path / ".outer.partial").exists() and not (tmp_path / "outer").exists()
    assert other.run("outer", outer, resumable=True) == {"seconds": pytest.approx(0, abs=5)}


def test_busy_pieces_are_tried_again_after_the_others():
    done: list[str] = []
    busy = {"b": 2}  # "b" is busy twice, then runs

    def piece(key):
        def fn():
            if busy.get(key, 0) > 0:
                busy[key] -= 1
                raise StepBusy(f"step-{key}")
            done.append(key)
        return key, fn

    logs: list[str] = []
    work_through([piece("a"), piece("b"), piece("c")], logs.append, poll=0.01)
    assert done == ["a", "c", "b"]
    assert logs == ["[later] b: step-b is running in another process"]  # told once


def test_lane_orders_start_at_different_ends():
    items = list(range(8))
    assert lane_order(items, 0) == items
    assert lane_order(items, 1) == items[::-1]
    assert sorted(lane_order(items, 2)) == items and lane_order(items, 2)[0] != 0
    assert resolve_jobs(3) == 3 and resolve_jobs(0) in (1, 2)
    import torch

    if not torch.cuda.is_available():  # auto: two lanes on any CPU of 2 or more cores (the demo's default)
        assert resolve_jobs(0) == (2 if available_cores() >= 2 else 1)
    from voxdiff.cli import build_parser

    parser, _ = build_parser(["demo"])
    assert parser.parse_args(["demo"]).demo.jobs == 0  # `make demo` runs the auto rule


@pytest.mark.skipif(available_cores() != 2, reason="the jobs get cores // 2 threads: equal to one job's only on 2 cores")
def test_compare_in_two_jobs_gives_the_results_of_one(tmp_path):
    base = dict(budget="tiny", methods=("random", "restorative"), heads=("linear", "nonlinear"),
                scratch=False, finetune=("restorative",), workers=1, progress=False)
    from voxdiff.core.runtime import num_threads

    with num_threads(1):  # as many threads per step as each of the two jobs has (on 2 cores)
        one = ex.compare(ExperimentConfig(**base, jobs=1), tmp_path / "one", log=lambda s: None)
    logs: list[str] = []
    two = ex.compare(ExperimentConfig(**base, jobs=2), tmp_path / "two", log=logs.append)
    assert [(r["method"], r["head"]) for r in two["rows"]] == [(r["method"], r["head"]) for r in one["rows"]]
    for a, b in zip(one["rows"], two["rows"]):
        assert a["per_case"] == b["per_case"], (a["method"], a["head"])
    assert logs[0].startswith("2 jobs")
    # the number of jobs is not a result setting: the folder resumes with another, and nothing reruns
    logs.clear()
    ex.compare(ExperimentConfig(**base, jobs=1), tmp_path / "two", log=logs.append)
    assert not [line for line in logs if line.startswith("[run ]")]


def test_lanes_leave_whole_volume_fine_tuning_to_the_pass_after_them(tmp_path):
    """With the budget's LP-FT on whole volumes (the demo's rows) the lanes' pieces of ``compare`` leave the
    fine-tuned rows out (two at once doubled the demo's memory); the caller's pass runs them after the lanes.
    Fine-tuning on patches and the from-scratch row stay pieces of the lanes."""
    from voxdiff.experiments.base import Experiment
    from voxdiff.experiments.lanes import _items

    cfg = ExperimentConfig(budget="tiny", methods=("random", "restorative", "contrastive"), heads=("linear", "nonlinear"),
                           scratch=True, finetune=("restorative", "contrastive"))
    e = Experiment(cfg, tmp_path / "e", log=lambda *a: None)
    every = ["probes of random", "probes of restorative", "finetune restorative", "probes of contrastive",
             "finetune contrastive", "scratch from-scratch"]
    assert not ex.finetunes_whole_volumes(e)
    assert [k for k, _ in _items(e, "compare")] == [k for k, _ in ex.compare_items(e)] == every
    e.budget["lpft"] = {"whole_volume": True, "batch_size": 1}
    assert ex.finetunes_whole_volumes(e)
    assert [k for k, _ in ex.compare_items(e)] == every  # one process runs everything
    assert [k for k, _ in _items(e, "compare")] == [k for k in every if not k.startswith("finetune")]
    e.budget["finetune_init"] = "random"  # LP-FT settings apply to fine-tuning from the probe's head only
    assert not ex.finetunes_whole_volumes(e) and [k for k, _ in _items(e, "compare")] == every
