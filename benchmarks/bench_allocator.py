"""Benchmark: glibc allocator setting (``voxdiff.core.runtime.tune_allocator``) on and off.

Times a Backbone training step (forward, epsilon-MSE loss, backward, AdamW) and a feature window
(no-grad pyramid of ``--window_batch`` windows of ``--window`` voxels) in fresh subprocesses, one
with the setting applied before any large allocation and one without (``VOXDIFF_NO_MALLOPT=1`` and
no ``MALLOC_*`` variables in its environment). Runs alternate (off, on, off, on, ...); it prints the
median wall and process CPU seconds (user + system, less sensitive to other load on a shared
machine) per step/window and the minor page faults per step/window (``ru_minflt``), then one
JSON line.

    .venv/bin/python benchmarks/bench_allocator.py                           # 2 x 64^3, base 16, 4 levels
    .venv/bin/python benchmarks/bench_allocator.py --shape 128 128 32 --batch 8 --levels 6   # paper patch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def child(args: argparse.Namespace) -> None:
    if args.mode == "on":
        from voxdiff.core.runtime import tune_allocator

        applied = tune_allocator()
    else:
        applied = False
    import resource

    import torch

    from voxdiff.pretrain.backbone import Backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    in_ch = 1 + args.cond
    net = Backbone(in_ch, 1, base_channels=args.base, num_levels=args.levels)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(args.batch, in_ch, *args.shape)
    target = torch.randn(args.batch, 1, *args.shape)
    t = torch.randint(0, 1000, (args.batch,))

    def minflt() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def measure(fn, n: int, warmup: int) -> tuple[float, float, float]:
        for _ in range(warmup):
            fn()
        secs, cpu, faults = [], [], []
        for _ in range(n):
            f0, c0, t0 = minflt(), time.process_time(), time.perf_counter()
            fn()
            secs.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            faults.append(minflt() - f0)
        return statistics.median(secs), statistics.median(cpu), statistics.median(faults)

    def train_step() -> None:
        pred, _ = net(x, t)
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    net.train()
    step_s, step_c, step_f = measure(train_step, args.steps, args.warmup)
    net.eval()
    w = torch.rand(args.window_batch, in_ch, *args.window)
    tw = torch.full((args.window_batch,), 10)

    def window() -> None:
        with torch.inference_mode():
            net.pyramid(w, tw)

    win_s, win_c, win_f = measure(window, args.steps, args.warmup)
    print(json.dumps({"mode": args.mode, "applied": applied, "step_s": step_s, "step_cpu_s": step_c,
                      "step_minflt": step_f, "window_s": win_s, "window_cpu_s": win_c, "window_minflt": win_f, "threads": torch.get_num_threads()}))


def run_child(mode: str, argv: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if mode == "off":
        env["VOXDIFF_NO_MALLOPT"] = "1"
    else:
        env.pop("VOXDIFF_NO_MALLOPT", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--mode", mode] + argv
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(res.returncode)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64], help="training patch")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--cond", type=int, default=0, help="condition channels (3 = APE BPR)")
    ap.add_argument("--window", type=int, nargs=3, default=[96, 96, 64], help="feature window (features ROI)")
    ap.add_argument("--window_batch", type=int, default=2, help="windows per pass (sw_batch_size)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (and windows) per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="alternating off/on process pairs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--mode", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    from voxdiff.core.cli import underscore_options  # no torch import: the allocator is still untouched

    args = ap.parse_args(underscore_options(sys.argv[1:]))  # --a-b: hidden alias of --a_b
    if args.child:
        child(args)
        return
    argv = [a for a in sys.argv[1:]]
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            runs[mode].append(run_child(mode, argv))
    wall = time.perf_counter() - t0

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    import torch

    print(f"torch {torch.__version__}, threads {runs['on'][0]['threads']}, train batch {args.batch} x "
          f"{'x'.join(map(str, args.shape))}, base {args.base}, {args.levels} levels; feature window "
          f"{args.window_batch} x {'x'.join(map(str, args.window))}; medians of {args.steps} steps x {args.repeats} runs")
    print(f"{'':22s}{'off (glibc default)':>22s}{'on (tune_allocator)':>22s}{'speed-up':>10s}")
    report = {}
    for key, name, label in (("step", "train_step", "training step"), ("window", "feature_window", "feature window")):
        off_s, on_s = med("off", f"{key}_s"), med("on", f"{key}_s")
        off_c, on_c = med("off", f"{key}_cpu_s"), med("on", f"{key}_cpu_s")
        off_f, on_f = med("off", f"{key}_minflt"), med("on", f"{key}_minflt")
        print(f"{label + ' s':22s}{off_s:22.3f}{on_s:22.3f}{off_s / on_s:9.2f}x")
        print(f"{label + ' CPU s':22s}{off_c:22.3f}{on_c:22.3f}{off_c / on_c:9.2f}x")
        print(f"{label + ' page faults':22s}{off_f:22,.0f}{on_f:22,.0f}")
        report[name] = {"off_s": round(off_s, 4), "on_s": round(on_s, 4), "speedup": round(off_s / on_s, 3),
                       "off_cpu_s": round(off_c, 4), "on_cpu_s": round(on_c, 4),
                       "off_minflt": off_f, "on_minflt": on_f}
    report.update({"applied": runs["on"][0]["applied"], "shape": args.shape, "batch": args.batch, "base": args.base,
                   "levels": args.levels, "window": args.window, "window_batch": args.window_batch,
                   "steps": args.steps, "repeats": args.repeats, "threads": runs["on"][0]["threads"],
                   "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                   "wall_s": round(wall, 1)})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
