"""BPR training speed against the torch thread count (the demo's BPR models on the demo's phantoms).

The budgets train the BPR with ``runtime.threads`` 0 (all of torch's threads). Its networks are
small (channels 8-32 at 3 mm), so on a many-core machine more threads may not help, or may hurt.
This times ``train_bpr`` at each thread count for each kind and prints seconds per step, after
``--warmup`` steps timed apart (the first steps build the sampler and warm the kernels).

    python benchmarks/bench_bpr_threads.py --out /tmp/bt --threads 1 2 4 8 16 --steps 60
    python benchmarks/bench_bpr_threads.py --quick          # dry run with tiny sizes (tests)

The phantoms are those of ``voxdiff demo`` (``--budget``, default cpu-small), generated into
``OUT/exp`` once and reused. A slice model of ``--warmup`` + ``--steps`` steps is the ape model's
S anchor (trained once, at the first thread count; its quality does not matter for timing).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time_train(exp, kind: str, threads: int, steps: int, out: Path, slice_model: str | None) -> float:
    """Seconds of ``train_bpr`` for ``steps`` steps at ``threads`` threads (no calibration split out:
    the same work at every count)."""
    from voxdiff.bpr.train import train_bpr

    over = {"steps": steps, "threads": threads, "checkpoint_every": 10**6}
    cfg = exp.bpr_config(kind, **over)
    if slice_model is not None:
        cfg.task.slice_model = slice_model
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    train_bpr(cfg, out, cases=exp.cases("unlabelled"), force=True, progress=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/bench_bpr_threads")
    ap.add_argument("--budget", default="cpu-small")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, os.cpu_count() or 1])
    ap.add_argument("--steps", type=int, default=60, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=10, help="steps of a run timed apart and subtracted")
    ap.add_argument("--kinds", default="slice,ape")
    ap.add_argument("--quick", action="store_true", help="tiny budget and few steps (a dry run)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    if a.quick:
        a.budget, a.steps, a.warmup = "tiny", 3, 1

    from voxdiff.core.runtime import tune_allocator
    from voxdiff.experiments.base import Experiment
    from voxdiff.experiments.demo import demo_config

    tune_allocator()
    out = Path(a.out)
    exp_dir = out / "exp"
    cfg = demo_config(a.budget, 0)
    exp = Experiment.reopen(exp_dir) if (exp_dir / "config.yaml").exists() else Experiment(cfg, exp_dir, log=lambda *x: None)
    exp.data_dir()  # the phantoms (generated once)
    kinds = [k for k in a.kinds.split(",") if k]
    rows = []
    for kind in kinds:
        anchor = None
        if kind == "ape" and exp.bpr_config("ape").task.anchor == "slice":
            anchor = str(out / "slice-anchor")
            _time_train(exp, "slice", a.threads[0], a.warmup + a.steps, Path(anchor), None)
        # untimed: the first run of a kind pays once per process for imports, the phantoms' first
        # read and (ape) the anchor's slice scores of every volume, which are then cached
        _time_train(exp, kind, a.threads[0], a.warmup, out / f"{kind}-first", anchor)
        for t in a.threads:
            short = _time_train(exp, kind, t, a.warmup, out / f"{kind}-t{t}-warm", anchor)
            full = _time_train(exp, kind, t, a.warmup + a.steps, out / f"{kind}-t{t}", anchor)
            per = (full - short) / a.steps
            rows.append({"kind": kind, "threads": t, "s_per_step": per, "run_s": full, "steps": a.warmup + a.steps})
            print(f"{kind:5s} threads {t:3d}: {per * 1e3:8.1f} ms/step  ({full:.1f} s for {a.warmup + a.steps} steps)",
                  flush=True)
    print(f"\n| kind | threads | ms/step | vs {a.threads[0]} thread(s) |\n|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["kind"] == r["kind"] and x["threads"] == a.threads[0])
        print(f"| {r['kind']} | {r['threads']} | {r['s_per_step'] * 1e3:.1f} | {base['s_per_step'] / r['s_per_step']:.2f}x |")
    env = {"cpus": os.cpu_count(), "budget": a.budget, "steps": a.steps, "warmup": a.warmup}
    if a.json:
        Path(a.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
