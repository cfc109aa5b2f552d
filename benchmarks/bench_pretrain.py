"""Diffusion pretraining step of voxdiff's default backbone: against MONAI and against conv3d.

Two comparisons, printed in one run (issue #14's targets):

1. **voxdiff vs MONAI.** The real training step of the engine (``voxdiff.core.engine``): the
   diffusion task's epsilon loss (``DiffusionTask.loss``: noise a clean patch to a random t, join the
   condition channels, MSE on the noise) inside the precision context, ``zero_grad``, backward,
   gradient clipping at 1.0, AdamW built like the engine builds it (``param_groups`` /
   ``make_optimizer``) and the EMA update. The same step body drives voxdiff's ``unet`` backbone
   (``build_backbone("unet", ...)``) and a MONAI ``DiffusionModelUNet`` (no attention levels; its
   middle block always holds one self-attention layer at the coarsest resolution) with the SAME
   full-resolution width (``channels[0] == --base``) and the smallest parameter count >= ours: the
   widths of the coarser levels are searched in multiples of 8 (MONAI's GroupNorm groups).
   After warm-up the two step alternately (AB, BA, AB, ...: pair ``i`` = one step of each), so load
   changes on a shared machine hit both alike; printed: the median step of each, the ratio of the
   medians and the spread of the per-pair ratios. A third row times our network trained by
   ``Engine.fit`` itself (one fit of warm-up + steps, after the pairs; not alternated). Our network
   runs as the engine runs it, its 3D convolution weights channels-last on the CPU; MONAI's is timed
   both as MONAI builds it and channels-last, and the ratio is taken against its faster layout.
2. **voxdiff vs conv3d.** The FLOPs of our training step (``torch.utils.flop_counter``: convolutions
   forward and backward, matmuls) over its median time give its achieved GFLOP/s; every conv layer
   of our network, timed alone (forward + backward at the shape it has in the network), plus a few
   larger 3x3x3 convs of the same kind, each in both weight layouts (the faster counts), give the best
   conv3d rate of this CPU. Printed: the step's
   rate as a percentage of that best rate (target >= 60 %), and the rate of our conv layers alone.

``--passes`` also times each network conv's forward, input gradient and weight gradient apart (where
the conv time goes: with AVX2 kernels oneDNN's weight gradient of the narrow 3D convolutions runs at
about a third of their forward rate; docs/PRETRAIN.md).

Defaults are the ``cpu-small`` pretraining budget (patch 32, batch 4, base 8, 4 levels, 3 condition
channels = the APE map), fp32, 1 thread; ``--bf16`` adds the same measurements under bf16 autocast::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pretrain.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pretrain.py --base 16 --steps 10
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from voxdiff.core.engine import EMA, make_optimizer, param_groups
from voxdiff.core.layers import PointwiseConv3d
from voxdiff.core.runtime import channels_last_wanted, prefer_channels_last, tune_allocator
from voxdiff.pretrain.backbones import build_backbone, count_parameters
from voxdiff.pretrain.tasks.diffusion import DiffusionTask

WIDTH_STEP = 8  # MONAI widths: multiples of its GroupNorm group count
GRAD_CLIP = 1.0  # PretrainConfig.grad_clip
EMA_DECAY = 0.99  # the cpu-small budget's ema_decay


# ------------------------------------------------------------------------------------------ networks
def build_ours(in_ch: int, base: int, levels: int, bf16: bool = False) -> nn.Module:
    """voxdiff's default backbone (registry ``unet``) as ``voxdiff pretrain`` trains it (the engine stores
    its 3D convolution weights channels-last on the CPU in fp32: :func:`voxdiff.core.runtime.prefer_channels_last`)."""
    return prefer_channels_last(build_backbone("unet", in_channels=in_ch, out_channels=1, base_channels=base,
                                               num_levels=levels, time_embedding=True), "cpu", bf16=bf16)


def _monai_kwargs(in_ch: int, channels: tuple[int, ...]) -> dict[str, Any]:
    return dict(spatial_dims=3, in_channels=in_ch, out_channels=1, channels=tuple(channels),
                attention_levels=(False,) * len(channels), num_res_blocks=1, norm_num_groups=WIDTH_STEP,
                num_head_channels=WIDTH_STEP)


def monai_params(in_ch: int, channels: tuple[int, ...]) -> int:
    """Parameter count of a MONAI DiffusionModelUNet (built on the meta device: no memory, ~10 ms)."""
    from monai.networks.nets import DiffusionModelUNet

    with torch.device("meta"):
        net = DiffusionModelUNet(**_monai_kwargs(in_ch, channels))
    return count_parameters(net)


def pick_monai(in_ch: int, base: int, levels: int, min_params: int, max_factor: int = 2) -> tuple[tuple[int, ...], int]:
    """The MONAI channel tuple with ``channels[0] == base``, non-decreasing widths in multiples of 8
    (level i at most ``max_factor * base * 2**i``, doubled until one fits) and the smallest parameter count >= ``min_params``.
    The parameter count grows with every width, so the coarsest width is found by bisection for each
    choice of the others. Returns ``(channels, parameter count)``."""
    if base % WIDTH_STEP:
        raise ValueError(f"MONAI's DiffusionModelUNet needs widths in multiples of {WIDTH_STEP}; base {base}")
    caps = [max_factor * base * 2 ** i for i in range(levels)]
    cache: dict[tuple[int, ...], int] = {}

    def count(ch: tuple[int, ...]) -> int:
        if ch not in cache:
            cache[ch] = monai_params(in_ch, ch)
        return cache[ch]

    best: tuple[int, tuple[int, ...]] | None = None

    def search(prefix: tuple[int, ...]) -> None:
        nonlocal best
        i = len(prefix)
        options = list(range(prefix[-1], caps[i] + 1, WIDTH_STEP))
        if i + 1 < levels:
            for w in options:
                rest = prefix + (w,) * (levels - i)  # the smallest completion of prefix + (w,)
                if count(rest) >= min_params:  # reached: every larger w only adds parameters
                    if best is None or (count(rest), rest) < best:
                        best = (count(rest), rest)
                    break
                search(prefix + (w,))
            return
        lo, hi = 0, len(options) - 1  # the last width: smallest one reaching min_params
        if count(prefix + (options[hi],)) < min_params:
            return
        while lo < hi:
            mid = (lo + hi) // 2
            if count(prefix + (options[mid],)) >= min_params:
                hi = mid
            else:
                lo = mid + 1
        ch = prefix + (options[lo],)
        if best is None or (count(ch), ch) < best:
            best = (count(ch), ch)

    if levels == 1:
        n = count((base,))
        if n < min_params:
            raise ValueError("no one-level MONAI network reaches our parameter count")
        return (base,), n
    search((base,))
    if best is None:
        if max_factor >= 64:
            raise ValueError(f"no MONAI width tuple up to {caps} reaches {min_params} parameters")
        return pick_monai(in_ch, base, levels, min_params, 2 * max_factor)
    return best[1], best[0]


def build_monai(in_ch: int, channels: tuple[int, ...]) -> nn.Module:
    from monai.networks.nets import DiffusionModelUNet

    return MonaiAsBackbone(DiffusionModelUNet(**_monai_kwargs(in_ch, channels)))


class MonaiAsBackbone(nn.Module):
    """MONAI's network called like a voxdiff backbone: ``net(x, t) -> (prediction, pyramid)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.net(x, timesteps=t), None


# ------------------------------------------------------------------------------------------ the step
def precision(bf16: bool) -> Callable[[], contextlib.AbstractContextManager]:
    return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


def make_batch(batch: int, patch: int, cond: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A clean patch in [0, 1] and a condition map (the APE's 3 channels by default)."""
    g = torch.Generator().manual_seed(seed)
    out = {"image": torch.rand(batch, 1, patch, patch, patch, generator=g)}
    if cond:
        out["cond"] = torch.rand(batch, cond, patch, patch, patch, generator=g) * 2 - 1
    return out


def make_step(net: nn.Module, batch: dict[str, torch.Tensor], bf16: bool = False, seed: int = 0) -> Callable[[], torch.Tensor]:
    """One engine training step of ``net`` on ``batch`` (see the module docstring); returns its loss
    (a tensor: no host synchronisation, as in the engine)."""
    task = DiffusionTask({"condition": "none"})  # the condition comes with the batch ("cond")
    opt = make_optimizer(param_groups(net, 0.01), lr=1e-3, betas=(0.9, 0.999), device=torch.device("cpu"))
    ema = EMA(net, EMA_DECAY)
    params = [p for p in net.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    ctx = precision(bf16)
    state = {"step": 0}
    net.train()

    def step() -> torch.Tensor:
        with ctx():
            loss, _ = task.loss(net, batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        ema.update(net, state["step"])
        state["step"] += 1
        return loss.detach()

    return step


def engine_steps(net: nn.Module, batch: dict[str, torch.Tensor], steps: int, warmup: int, bf16: bool = False,
                 threads: int = 1) -> list[float]:
    """Seconds per step of ``net`` trained by the engine itself (:class:`voxdiff.core.engine.Engine`,
    ``fit`` over ``warmup + steps`` steps, the pretraining settings: AdamW, clipping, EMA, warm-up /
    cosine schedule, one log line at the end): the intervals between the starts of consecutive steps
    after the warm-up (the last step: until ``fit`` returns)."""
    from voxdiff.core.engine import Engine, EngineConfig, TrainTask

    task = DiffusionTask({"condition": "none"})
    stamps: list[float] = []

    class Step(TrainTask):
        def module(self) -> nn.Module:
            return net

        def step(self, model, b, step, gen):
            return task.loss(model, b, gen)

        def batches(self, start: int, end: int):
            return (batch for _ in range(start, end))

        def on_step_start(self, engine, step: int) -> None:
            stamps.append(time.perf_counter())

    n = warmup + steps
    cfg = EngineConfig(steps=n, lr=1e-3, warmup_steps=1, weight_decay=0.01, no_decay_1d=True, grad_clip=GRAD_CLIP,
                       ema_decay=EMA_DECAY, bf16=bf16, device="cpu", threads=threads, log_every=n, progress=False)
    Engine(cfg, Step()).fit()
    stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps[warmup:-1], stamps[warmup + 1:])]


def alternate(steps: dict[str, Callable[[], Any]], pairs: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each callable, stepped alternately: ``warmup`` rounds untimed, then
    ``pairs`` rounds of one step each, the order reversed every round (AB, BA, AB, ...)."""
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(pairs):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (forward and backward) as torch's flop counter sees them
    (convolutions, matmuls; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


# ------------------------------------------------------------------------------------------ conv3d
def conv_calls(net: nn.Module, fn: Callable[[], Any]) -> list[dict[str, Any]]:
    """Every Conv3d / ConvTranspose3d call of one ``fn()`` (a step of ``net``): kind, input shape,
    weight shape, stride, padding, whether the input needs a gradient."""
    calls: list[dict[str, Any]] = []

    def hook(mod: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        kind = "ConvTranspose3d" if isinstance(mod, nn.ConvTranspose3d) else (
            "PointwiseConv3d" if isinstance(mod, PointwiseConv3d) else "Conv3d")
        calls.append({"kind": kind, "input": tuple(x.shape), "weight": tuple(mod.weight.shape),
                      "stride": tuple(mod.stride), "padding": tuple(mod.padding), "input_grad": bool(x.requires_grad)})

    handles = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return calls


def larger_convs(batch: int, patch: int) -> list[dict[str, Any]]:
    """3x3x3 'same' convs wider than the cpu-small network's (same kind, input needing a gradient)."""
    out = []
    for c, s in ((16, patch), (32, patch), (64, max(patch // 2, 4)), (64, patch), (128, max(patch // 4, 4))):
        out.append({"kind": "Conv3d", "input": (batch, c, s, s, s), "weight": (c, c, 3, 3, 3), "stride": (1, 1, 1),
                    "padding": (1, 1, 1), "input_grad": True})
    return out


def conv_key(c: dict[str, Any]) -> tuple:
    return (c["kind"], c["input"], c["weight"], c["stride"], c["padding"], c["input_grad"])


def _channels_last(net: nn.Module) -> nn.Module:
    """``net`` with its 5-d weights channels-last whatever the environment says."""
    with torch.no_grad():
        for t in net.parameters():
            if t.dim() == 5:
                t.data = t.data.contiguous(memory_format=torch.channels_last_3d)
    return net


def time_conv(c: dict[str, Any], repeats: int, bf16: bool) -> dict[str, Any]:
    """Forward + backward of one conv layer alone in each weight layout (contiguous, channels-last):
    the faster one's median seconds over ``repeats`` after one warm-up, FLOPs and GFLOP/s."""
    runs = [_time_conv(c, repeats, bf16, cl) for cl in (False, True)]
    return min(runs, key=lambda r: r["seconds"])


def _conv_layer(c: dict[str, Any], channels_last: bool) -> nn.Module:
    """The conv layer of a recorded call, in the given weight layout."""
    layer: nn.Module
    if c["kind"] == "PointwiseConv3d":  # a kernel-1 conv as the network runs it (one matrix product)
        layer = PointwiseConv3d(c["weight"][1], c["weight"][0])
    elif c["kind"] == "Conv3d":
        cout, cin = c["weight"][0], c["weight"][1]
        layer = nn.Conv3d(cin, cout, c["weight"][2:], stride=c["stride"], padding=c["padding"])
    else:
        cin, cout = c["weight"][0], c["weight"][1]
        layer = nn.ConvTranspose3d(cin, cout, c["weight"][2:], stride=c["stride"], padding=c["padding"])
    return _channels_last(layer) if channels_last else layer


def _time_conv(c: dict[str, Any], repeats: int, bf16: bool, channels_last: bool) -> dict[str, Any]:
    layer = _conv_layer(c, channels_last)
    x = torch.randn(c["input"], requires_grad=c["input_grad"])
    ctx = precision(bf16)

    def once() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with ctx():
            y = layer(x)
        y.float().sum().backward()

    flops = count_flops(once)
    once()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        ts.append(time.perf_counter() - t0)
    sec = statistics.median(ts)
    return {**c, "flops": flops, "seconds": sec, "gflops": flops / sec / 1e9,
            "layout": "channels-last" if channels_last else "contiguous"}


def time_passes(c: dict[str, Any], repeats: int, bf16: bool, channels_last: bool) -> dict[str, Any]:
    """One conv layer's three passes timed apart, medians over ``repeats`` after one warm-up: the
    forward, the input gradient (its forward + ``dx`` minus the forward; 0 where the network needs no
    ``dx``) and the weight gradient (forward + ``dW`` and the bias's, minus the forward). Each pass of a
    convolution does the forward's multiply-adds, so each rate is the forward's FLOPs over its time."""
    layer = _conv_layer(c, channels_last)
    params = list(layer.parameters())
    x = torch.randn(c["input"])
    ctx = precision(bf16)
    with ctx():
        g = torch.randn_like(layer(x))

    def run(dx: bool, dw: bool) -> None:
        x.requires_grad_(dx)
        for p in params:
            p.requires_grad_(dw)
        with ctx():
            y = layer(x)
        wrt = ([x] if dx else []) + (params if dw else [])
        if wrt:
            torch.autograd.grad(y, wrt, g.to(y.dtype))

    def median(dx: bool, dw: bool) -> float:
        run(dx, dw)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(dx, dw)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    with ctx():
        flops = count_flops(lambda: layer(x))
    fwd = median(False, False)
    dx = max(median(True, False) - fwd, 0.0) if c["input_grad"] else 0.0
    dw = max(median(False, True) - fwd, 0.0)
    rate = {k: (flops / s / 1e9 if s > 0 else float("nan")) for k, s in (("forward", fwd), ("dx", dx), ("dw", dw))}
    return {**c, "forward_flops": flops, "forward_s": fwd, "dx_s": dx, "dw_s": dw, "rates": rate,
            "layout": "channels-last" if channels_last else "contiguous"}


def passes_table(rows: list[dict[str, Any]], counts: dict[tuple, int]) -> str:
    """Markdown: each conv's forward / dx / dW milliseconds and GFLOP/s, then the network's split
    (every conv weighted by its calls per step)."""
    lines = ["| conv3d, passes apart | calls | forward ms (GFLOP/s) | dx ms (GFLOP/s) | dW ms (GFLOP/s) | layout |",
             "|---|---|---|---|---|---|"]
    tot = {"forward": 0.0, "dx": 0.0, "dw": 0.0}
    work = {"forward": 0.0, "dx": 0.0, "dw": 0.0}
    for r in rows:
        n = counts[conv_key(r)]
        cells = []
        for k in ("forward", "dx", "dw"):
            s = r[f"{k}_s"]
            tot[k] += n * s
            if k != "dx" or r["input_grad"]:
                work[k] += n * r["forward_flops"]
            cells.append("-" if (k == "dx" and not r["input_grad"]) else f"{s * 1e3:.2f} ({r['rates'][k]:.0f})")
        lines.append(f"| {_shape(r)} | {n} | {' | '.join(cells)} | {r['layout']} |")
    all_s = sum(tot.values())
    split = ", ".join(f"{k} {100 * tot[k] / all_s:.0f} % ({work[k] / tot[k] / 1e9:.0f} GFLOP/s)"
                      for k in ("forward", "dx", "dw") if tot[k] > 0)
    lines += ["", f"network convs, passes apart: {all_s * 1e3:.1f} ms a step; {split}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the run
def measure(patch: int = 32, batch: int = 4, base: int = 8, levels: int = 4, cond: int = 3, steps: int = 10,
            warmup: int = 2, conv_repeats: int = 5, bf16: bool = False, larger: bool = True,
            with_monai: bool = True, engine: bool = True, monai_channels: tuple[int, ...] | None = None,
            passes: bool = False) -> dict[str, Any]:
    """Every number the script prints, for one precision (fp32, or bf16 autocast); ``passes``: also
    each network conv's forward, input-gradient and weight-gradient times apart (:func:`time_passes`,
    in the layout that was faster for the whole layer)."""
    in_ch = 1 + cond
    torch.manual_seed(0)
    ours = build_ours(in_ch, base, levels, bf16)
    n_ours = count_parameters(ours)
    data = make_batch(batch, patch, cond)
    res: dict[str, Any] = {"patch": patch, "batch": batch, "base": base, "levels": levels, "cond": cond,
                           "precision": "bf16 autocast" if bf16 else "fp32", "threads": torch.get_num_threads(),
                           "steps": steps, "warmup": warmup,
                           "ours": {"params": n_ours, "channels": tuple(int(w) for w in ours.widths)}}
    step_ours = make_step(ours, data, bf16)
    runs: dict[str, Callable[[], Any]] = {"ours": step_ours}
    if with_monai:
        if monai_channels:
            ch, n_monai = tuple(int(c) for c in monai_channels), monai_params(in_ch, tuple(monai_channels))
        else:
            ch, n_monai = pick_monai(in_ch, base, levels, n_ours)
        torch.manual_seed(0)
        monai = build_monai(in_ch, ch)
        assert count_parameters(monai) == n_monai
        res["monai"] = {"params": n_monai, "channels": ch, "picked": not monai_channels,
                        "matched": ch[0] == base and n_monai >= n_ours}
        runs["monai"] = make_step(monai, data, bf16)
        if channels_last_wanted("cpu", bf16):  # MONAI given the same layout as ours: the ratio is taken to its faster one
            torch.manual_seed(0)
            runs["monai-cl"] = make_step(_channels_last(build_monai(in_ch, ch)), data, bf16)
    # FLOPs and conv shapes of our step (they also warm it up)
    flops = count_flops(step_ours)
    calls = conv_calls(ours, step_ours)
    times = alternate(runs, steps, warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    res["ours"].update(seconds=med["ours"], times=times["ours"], flops=flops, gflops=flops / med["ours"] / 1e9,
                       voxels_per_s=batch * patch ** 3 / med["ours"])
    if with_monai:
        res["monai"].update(seconds=med["monai"], times=times["monai"], voxels_per_s=batch * patch ** 3 / med["monai"])
        fast = "monai"
        if "monai-cl" in times:
            res["monai_cl"] = {"seconds": med["monai-cl"], "times": times["monai-cl"],
                               "voxels_per_s": batch * patch ** 3 / med["monai-cl"]}
            fast = min(("monai", "monai-cl"), key=lambda k: med[k])
        res["monai"]["fastest_layout"] = "channels-last" if fast == "monai-cl" else "contiguous"
        pair = [m / o for o, m in zip(times["ours"], times[fast])]
        res["ratio"] = {"of_medians": med[fast] / med["ours"], "pairs": pair, "min": min(pair), "max": max(pair),
                        "median_pair": statistics.median(pair)}
    if engine:  # after the alternation: one fit, as a run trains
        torch.manual_seed(0)
        et = engine_steps(build_ours(in_ch, base, levels, bf16), data, steps, warmup, bf16, torch.get_num_threads())
        res["engine"] = {"times": et, "seconds": statistics.median(et)}
    # conv3d reference
    uniq: dict[tuple, dict[str, Any]] = {}
    mult: dict[tuple, int] = {}
    for c in calls:
        k = conv_key(c)
        uniq.setdefault(k, c)
        mult[k] = mult.get(k, 0) + 1
    rows = []
    for k, c in uniq.items():
        r = time_conv(c, conv_repeats, bf16)
        r.update(source="network", count=mult[k])
        rows.append(r)
    if larger:
        for c in larger_convs(batch, patch):
            if conv_key(c) not in uniq:
                r = time_conv(c, conv_repeats, bf16)
                r.update(source="larger", count=0)
                rows.append(r)
    if passes:
        res["passes"] = [time_passes(r, conv_repeats, bf16, r["layout"] == "channels-last")
                         for r in rows if r["source"] == "network"]
        res["pass_counts"] = mult
    best = max(rows, key=lambda r: r["gflops"])
    net_rows = [r for r in rows if r["source"] == "network"]
    conv_flops = sum(r["flops"] * r["count"] for r in net_rows)
    conv_sec = sum(r["seconds"] * r["count"] for r in net_rows)
    res["conv"] = {"rows": rows, "best": best, "best_gflops": best["gflops"],
                   "network_convs_flops": conv_flops, "network_convs_seconds": conv_sec,
                   "network_convs_gflops": conv_flops / conv_sec / 1e9}
    res["percent_of_best_conv"] = 100.0 * res["ours"]["gflops"] / best["gflops"]
    res["targets"] = {"conv_60pct": res["percent_of_best_conv"] >= 60.0}
    if with_monai:
        res["targets"]["monai_2x"] = res["ratio"]["of_medians"] >= 2.0
    return res


def _shape(c: dict[str, Any]) -> str:
    k = "x".join(str(s) for s in c["weight"][2:])
    cin, cout = (c["weight"][1], c["weight"][0]) if c["kind"] == "Conv3d" else c["weight"][:2]
    tr = "T" if c["kind"] == "ConvTranspose3d" else ""
    sp = "x".join(str(s) for s in c["input"][2:])
    st = "/2" if c["stride"][0] == 2 else ""
    return f"{k}{tr}{st} {cin}->{cout} @ {c['input'][0]}x{sp}{'' if c['input_grad'] else ' (no dx)'}"


def report(res: dict[str, Any], verbose: bool = True) -> str:
    """The printed tables (markdown)."""
    o = res["ours"]
    lines = [f"### {res['precision']}, {res['threads']} thread(s), patch {res['patch']}^3, batch {res['batch']}, "
             f"{1 + res['cond']} input channels; {res['steps']} alternating pairs after {res['warmup']} warm-up",
             "", "| network | channels | params | s/step (median) | patch voxels/s | min-max s/step |",
             "|---|---|---|---|---|---|"]
    lines.append(f"| voxdiff unet (base {res['base']}, {res['levels']} levels) | {o['channels']} | {o['params']:,} | "
                 f"{o['seconds']:.3f} | {o['voxels_per_s']:,.0f} | {min(o['times']):.3f}-{max(o['times']):.3f} |")
    if "engine" in res:
        e = res["engine"]
        lines.append(f"| same, trained by Engine.fit ({len(e['times'])} steps in one fit, after the pairs) | | | "
                     f"{e['seconds']:.3f} | {res['batch'] * res['patch'] ** 3 / e['seconds']:,.0f} | "
                     f"{min(e['times']):.3f}-{max(e['times']):.3f} |")
    if "monai" in res:
        m = res["monai"]
        how = "" if m["picked"] else ", --monai_channels" + ("" if m["matched"] else ": NOT same first width and >= our params")
        lines.append(f"| MONAI DiffusionModelUNet (no attention levels; mid-block attention{how}) | {m['channels']} | "
                     f"{m['params']:,} | {m['seconds']:.3f} | {m['voxels_per_s']:,.0f} | "
                     f"{min(m['times']):.3f}-{max(m['times']):.3f} |")
        if "monai_cl" in res:
            mc = res["monai_cl"]
            lines.append(f"| same MONAI network, weights channels-last (as ours) | | | {mc['seconds']:.3f} | "
                         f"{mc['voxels_per_s']:,.0f} | {min(mc['times']):.3f}-{max(mc['times']):.3f} |")
        r = res["ratio"]
        lines += ["", f"speed ratio voxdiff / MONAI ({m['fastest_layout']}, its faster layout): {r['of_medians']:.2f}x (ratio of medians); per pair: median "
                      f"{r['median_pair']:.2f}x, min {r['min']:.2f}x, max {r['max']:.2f}x -> target >= 2x "
                      f"{'MET' if res['targets']['monai_2x'] else 'NOT MET'}"]
    c = res["conv"]
    b = c["best"]
    lines += ["", f"train step: {o['flops'] / 1e9:.2f} GFLOP (conv + matmul, forward + backward) in {o['seconds']:.3f} s "
                  f"= {o['gflops']:.1f} GFLOP/s",
              f"conv layers of the step, each timed alone: {c['network_convs_flops'] / 1e9:.2f} GFLOP in "
              f"{c['network_convs_seconds']:.3f} s = {c['network_convs_gflops']:.1f} GFLOP/s",
              f"train step = {100 * o['gflops'] / c['network_convs_gflops']:.0f} % of the rate of its conv layers alone",
              f"best conv3d rate: {b['gflops']:.1f} GFLOP/s ({_shape(b)}, {b['source']}, {b['layout']} weights; "
              f"every conv is timed in both layouts, the faster counts)",
              f"train step = {res['percent_of_best_conv']:.0f} % of the best conv3d rate -> target >= 60 % "
              f"{'MET' if res['targets']['conv_60pct'] else 'NOT MET'}"]
    if verbose:
        lines += ["", "| conv3d (forward + backward) | calls per step | GFLOP | ms | GFLOP/s | faster layout |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(c["rows"], key=lambda r: -r["gflops"]):
            lines.append(f"| {_shape(r)} | {r['count'] if r['source'] == 'network' else 'larger'} | "
                         f"{r['flops'] / 1e9:.3f} | {r['seconds'] * 1e3:.1f} | {r['gflops']:.1f} | {r['layout']} |")
    if "passes" in res:
        lines += ["", passes_table(res["passes"], res["pass_counts"])]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--base", type=int, default=8)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--cond", type=int, default=3, help="condition channels (3 = APE BPR)")
    ap.add_argument("--steps", type=int, default=10, help="alternating pairs timed (one step of each network)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--conv_repeats", type=int, default=5)
    ap.add_argument("--monai_channels", type=int, nargs="+", default=None,
                    help="MONAI widths per level instead of the smallest match (e.g. 16 32 64 128)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="also measure everything under bf16 autocast")
    ap.add_argument("--no_monai", action="store_true", help="only the conv3d comparison")
    ap.add_argument("--brief", action="store_true", help="without the per-conv table")
    ap.add_argument("--passes", action="store_true",
                    help="also time each network conv's forward, input gradient and weight gradient apart")
    args = ap.parse_args()
    if not args.no_monai and args.monai_channels is None and args.base % WIDTH_STEP:
        ap.error(f"--base {args.base}: MONAI's DiffusionModelUNet takes widths in multiples of {WIDTH_STEP} (its "
                 f"GroupNorm), so no MONAI network has this full-resolution width; pass --no_monai for the conv3d "
                 f"comparison alone")
    tune_allocator()  # the CLI's allocator setting (VOXDIFF_NO_MALLOPT=1: glibc default)
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # only possible before the first parallel region
        torch.set_num_interop_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), allocator setting "
          f"{'on' if tune_allocator() else 'off'}")
    precisions = [False]
    if args.bf16:
        from voxdiff.core.precision import bf16_native

        if bf16_native("cpu"):
            precisions.append(True)
        else:
            print("--bf16: this CPU has no native bf16 (emulated bf16 is many times slower): fp32 only")
    for bf16 in precisions:
        res = measure(args.patch, args.batch, args.base, args.levels, args.cond, args.steps, args.warmup,
                      args.conv_repeats, bf16, with_monai=not args.no_monai, monai_channels=args.monai_channels,
                      passes=args.passes)
        print(report(res, verbose=not args.brief), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
