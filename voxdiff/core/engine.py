"""One training engine for every loop of voxdiff: BPR training, pretraining, head fitting, fine-tuning.

The engine owns everything a training loop does besides computing a loss: the optimiser (AdamW,
the fused kernel on CUDA and the CPU), the learning-rate schedule (linear warm-up + cosine decay, or constant),
gradient clipping, an EMA of the weights (one ``foreach`` lerp per step), the non-finite loss stop
(the last good train state on disk is kept), metrics (``metrics.jsonl``; TensorBoard when it is
installed), one atomic train-state format with exact resume (:mod:`voxdiff.core.trainstate`), the
device, CPU threads, DDP, bf16 autocast and an optional ``torch.compile``.

A loop is a :class:`TrainTask`: it supplies the module to train and a step function (loss and
metrics from a batch), and overrides named hooks where it differs (the nnU-Net trainer / Lightning
module pattern: one loop owns training, tasks fill in the steps)::

    class MyTask(TrainTask):
        def module(self):            return self.net
        def step(self, model, batch, step, gen):
            x, y = batch
            return F.mse_loss(model(x), y), {}

    engine = Engine(EngineConfig(steps=100, lr=1e-3), MyTask(), state_dir=out / "train_state",
                    metrics_path=out / "metrics.jsonl", resume=False)  # resume=True: continue exactly
    engine.fit()

Hooks (all optional): ``param_groups`` (custom optimiser groups, e.g. a backbone learning rate),
``ema_module`` (what the EMA follows), ``batches`` (an iterator of batches; default: the step
numbers), ``on_fit_start`` (training mode), ``on_step_start`` (e.g. unfreeze a backbone), ``needs_sync`` + ``after_step`` (validation,
early stopping, online probes: the engine checks the loss before them), ``log_extras`` and
``on_log`` (more metric fields, other log files), ``on_checkpoint`` (before a train state is
written), ``state``/``load_state`` (task state in the train state: sampler generators, best
states), ``check_resume`` (refuse a resume with a different configuration) and
``find_unused_parameters`` (DDP).

Nothing in a step waits for the device: the loss and metrics are summed where they live
(:class:`MetricLog`), the losses await the non-finite check on the device, and both reach the host every
``log_every`` steps, before every checkpoint and before every hook that asks for it (a NaN is
reported with the step it appeared at and never reaches a checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import prefixed, unprefixed
from .errors import InputError, ModelError, TrainingError
from .outputs import atomic_write
from .precision import bf16_autocast, use_bf16
from .runtime import num_threads, prefer_channels_last, resolve_device
from .schedule import warmup_cosine
from .trainstate import (
    flatten_optimizer,
    latest_train_state,
    python_rng_from_json,
    python_rng_to_json,
    read_train_state,
    unflatten_optimizer,
    write_train_state,
)

ENGINE_STATE_VERSION = 1


# --------------------------------------------------------------------------------- config


@dataclass
class EngineConfig:
    """What the engine needs to know; each loop fills it from its own (public) config.

    Args:
        steps: optimiser steps of the whole run (the schedule's length).
        lr: peak learning rate of parameter groups without their own ``base_lr``.
        warmup_steps: linear warm-up steps (schedule ``cosine``).
        min_lr_ratio: final learning rate as a fraction of the peak (schedule ``cosine``).
        schedule: ``cosine`` (warm-up, then cosine decay) | ``constant``.
        weight_decay: AdamW weight decay.
        no_decay_1d: no weight decay on 1-d parameters (biases, norm weights), as in pretraining.
        betas: AdamW betas.
        grad_clip: maximum gradient norm (0 = off).
        ema_decay: decay of an EMA of ``TrainTask.ema_module`` (``None`` = no EMA).
        bf16: bf16 autocast around the step where the device computes bf16 natively.
        device: auto | cpu | cuda | cuda:N.
        threads: intra-op CPU threads during :meth:`Engine.fit` (0 = leave torch's setting).
        compile: ``torch.compile`` the trained module (its ``forward``) before training.
        seed: seed of the engine's generators (``torch``, python ``random``, the step generator).
        log_every: steps between metric lines (and host synchronisations).
        checkpoint_every: steps between train states (0 = only at the end of :meth:`Engine.fit`;
            nothing is written without a ``state_dir``).
        keep_checkpoints: train states kept on disk.
        tensorboard: also write TensorBoard scalars (when ``tensorboard`` is installed).
        progress: show a progress bar (rank 0).
        desc: the progress bar's label.
        label: what the non-finite loss message starts with (e.g. the head's name; empty: nothing).
        nan_hint: what the non-finite loss message suggests after the checkpoint it names.
    """

    steps: int
    lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.05
    schedule: str = "cosine"
    weight_decay: float = 0.0
    no_decay_1d: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0
    ema_decay: float | None = None
    bf16: bool = False
    device: str = "auto"
    threads: int = 0
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    tensorboard: bool = False
    progress: bool = True
    desc: str = "train"
    label: str = ""
    nan_hint: str = "continue from it with --resume (e.g. with a lower --lr)"


def lr_factor_at(step: int, cfg: EngineConfig, peak: float) -> float:
    """Learning rate of step ``step`` (0-based) for a group whose peak is ``peak``."""
    if cfg.schedule == "constant":
        return peak
    return warmup_cosine(step, cfg.steps, peak, cfg.warmup_steps, cfg.min_lr_ratio)


# --------------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device_pref: str) -> Dist:
    """The process group of a ``torchrun`` launch (gloo on CPU, nccl on CUDA), or a one-process
    :class:`Dist` when ``WORLD_SIZE`` is not above 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    owns = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, owns_group=owns)


def close_distributed(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------- pieces


def param_groups(module: nn.Module, weight_decay: float, no_decay_1d: bool = True) -> list[dict[str, Any]]:
    """Trainable parameters of ``module`` as AdamW groups: weight decay on every parameter, or (with
    ``no_decay_1d``) on matrices/kernels only, none on biases and norm weights."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not no_decay_1d:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``groups``: the fused kernel on CUDA (one launch for every tensor) and on the CPU
    (one pass over each tensor: 0.6 against 2.2 ms per step of torch's per-tensor default for the demo's
    backbone; the same update up to float rounding, about 4e-8), torch's default elsewhere. Each group
    keeps its peak learning rate in ``base_lr``."""
    for g in groups:
        g.setdefault("base_lr", lr)
        g.setdefault("lr", g["base_lr"])
    kw: dict[str, Any] = {"fused": True} if device.type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **kw)  # type: ignore[arg-type]


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (moments) its parameter's memory layout. A train state
    stores them contiguous; the fused AdamW kernel walks a parameter, its gradient and its moments as
    one flat array each, so channels-last weights (:func:`voxdiff.core.runtime.prefer_channels_last`)
    with contiguous moments would pair the wrong elements after a resume."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


class EMA:
    """Exponential moving average of a module's parameters and buffers (float32 copies)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """``shadow = d * shadow + (1 - d) * value`` with ``d = min(decay, (1 + step) / (10 + step))``
        for every floating tensor (one fused ``foreach`` lerp, no host synchronisation); other
        tensors (counters) are copied."""
        d = min(self.decay, (1 + step) / (10 + step))
        shadows, values = [], []
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                shadows.append(s)
                values.append(v.detach() if v.dtype == s.dtype else v.detach().to(s.dtype))
            else:
                s.copy_(v)
        if shadows:
            torch._foreach_lerp_(shadows, values, 1.0 - d)

    def state(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise ModelError(None, f"train state EMA lacks {sorted(missing)[:3]}")
        for k in self.shadow:
            self.shadow[k] = tensors[k].float().clone().to(self.shadow[k].device)


class MetricLog:
    """Averages metrics over a log interval without a host synchronisation per step.

    A metric value is a python float, a list/tuple of per-sample floats, a tensor (the mean of its
    elements, weighted by their number) or ``{"sum": tensor, "count": tensor}``. Tensors are summed
    where they live (on the device); :meth:`reduce` brings everything to the host once."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.dev: dict[str, torch.Tensor] = {}  # key -> float64 [sum, count] on the device

    def _add_dev(self, k: str, s: torch.Tensor, c: torch.Tensor | int) -> None:
        s = s.detach().to(torch.float64)
        acc = self.dev.get(k)
        if acc is None:
            acc = self.dev[k] = torch.zeros(2, dtype=torch.float64, device=s.device)
        acc[0] += s
        acc[1] += c.detach().to(torch.float64) if torch.is_tensor(c) else float(c)

    def add(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                self._add_dev(k, torch.as_tensor(v["sum"]), v["count"])
                continue
            if torch.is_tensor(v):
                self._add_dev(k, v.detach().float().sum(), v.numel())
                continue
            vals = v if isinstance(v, (list, tuple)) else [v]
            for x in vals:
                x = float(x)
                self.sums[k] = self.sums.get(k, 0.0) + x
                self.counts[k] = self.counts.get(k, 0) + 1

    def reduce(self, d: Dist, device: torch.device) -> dict[str, float]:
        keys = sorted(set(self.sums) | set(self.dev))
        if d.world == 1:  # one process: one transfer of every device sum, no tensors for host sums
            dev_keys = sorted(self.dev)
            host = torch.stack([self.dev[k] for k in dev_keys]).cpu().tolist() if dev_keys else []
            acc = {k: [self.sums.get(k, 0.0), float(self.counts.get(k, 0))] for k in keys}
            for k, (sm, ct) in zip(dev_keys, host):
                acc[k] = [acc[k][0] + sm, acc[k][1] + ct]
            self.sums.clear()
            self.counts.clear()
            self.dev.clear()
            return {k: acc[k][0] / acc[k][1] for k in keys if acc[k][1] > 0}
        if d.world > 1:
            # ranks may see different keys (t-buckets): gather names, then sum
            all_keys: list[list[str]] = [None] * d.world  # type: ignore[list-item]
            dist.all_gather_object(all_keys, keys)
            keys = sorted({k for ks in all_keys for k in ks})
        rows = []
        for k in keys:
            r = torch.tensor([self.sums.get(k, 0.0), float(self.counts.get(k, 0))], dtype=torch.float64, device=device)
            if k in self.dev:
                r = r + self.dev[k].to(device)
            rows.append(r)
        t = torch.stack(rows) if rows else torch.zeros((1, 2), dtype=torch.float64, device=device)
        if d.world > 1:
            dist.all_reduce(t)
        t = t.cpu()  # the one synchronisation of the interval
        out = {k: float(t[i, 0] / t[i, 1]) for i, k in enumerate(keys) if t[i, 1] > 0}
        self.sums.clear()
        self.counts.clear()
        self.dev.clear()
        return out


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of a JSONL metrics file logged after ``step`` (a resumed run rewrites them)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError, ValueError):
            continue
    atomic_write(path, "".join(x + "\n" for x in keep))


def tensorboard_writer(folder: Path):
    """A TensorBoard ``SummaryWriter`` for ``folder``, or ``None`` (with a warning) when TensorBoard
    is not installed: it is an optional dependency."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        import warnings

        warnings.warn("tensorboard is not installed: --tensorboard ignored (pip install tensorboard)")
        return None
    return SummaryWriter(str(folder))


def rng_states(gen: torch.Generator, d: Dist, device: torch.device) -> tuple[list, dict[str, torch.Tensor]]:
    """Every rank's RNG states: ``(json docs per rank, tensors rng.<name>.<rank>)``."""
    mine = {"python": python_rng_to_json(random.getstate()), "batches": "step_generator(seed, rank, step)"}
    t = {"torch": torch.get_rng_state(), "gen": gen.get_state().cpu()}
    if device.type == "cuda":
        t["cuda"] = torch.cuda.get_rng_state(device)
    if d.world > 1:
        docs: list = [None] * d.world
        tens: list = [None] * d.world
        dist.all_gather_object(docs, mine)
        dist.all_gather_object(tens, {k: v.numpy().tolist() for k, v in t.items()})
        tensors = {f"rng.{k}.{r}": torch.tensor(v, dtype=torch.uint8) for r, tt in enumerate(tens) for k, v in tt.items()}
        return docs, tensors
    return [mine], {f"rng.{k}.0": v for k, v in t.items()}


# --------------------------------------------------------------------------------- task


class TrainTask:
    """A training loop's part: the module, the step function and the hooks it overrides."""

    def module(self) -> nn.Module:
        """The module whose parameters the optimiser trains (and DDP wraps, and the train state holds)."""
        raise NotImplementedError

    def step(self, model: nn.Module, batch: Any, step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss (a scalar tensor) and metrics (see :class:`MetricLog`) of one step. ``model`` is
        :meth:`module`, wrapped by DDP / ``torch.compile`` when they are on; ``step`` counts from 0."""
        raise NotImplementedError

    def param_groups(self, module: nn.Module, cfg: EngineConfig) -> list[dict[str, Any]] | None:
        """Optimiser groups (a group may set ``base_lr``, its own peak); ``None``: :func:`param_groups`."""
        return None

    def ema_module(self, module: nn.Module) -> nn.Module:
        """What the EMA (``ema_decay``) follows."""
        return module

    def batches(self, start: int, end: int) -> Iterable[Any]:
        """The batches of steps ``start .. end - 1`` (default: the step numbers; the step function
        then draws its own batch). An iterator with a ``close`` method is closed at the end."""
        return range(start, end)

    def on_fit_start(self, engine: "Engine") -> None:
        """Before the first step of :meth:`Engine.fit` (default: training mode for the module)."""
        engine.module.train()

    def on_step_start(self, engine: "Engine", step: int) -> None:
        """Before step ``step`` (0-based)."""

    def needs_sync(self, done: int) -> bool:
        """Whether :meth:`after_step` after ``done`` steps looks at the model (the engine checks the
        loss first)."""
        return False

    def after_step(self, engine: "Engine", done: int) -> bool:
        """After ``done`` steps (and after the log line of that step); ``True`` stops training."""
        return False

    def log_extras(self, steps: int, seconds: float) -> dict[str, Any]:
        """More fields of a metric line (``steps`` steps took ``seconds`` since the last line)."""
        return {}

    def on_log(self, engine: "Engine", row: dict[str, Any]) -> None:
        """A metric line (rank 0)."""

    def on_checkpoint(self, engine: "Engine", step: int) -> None:
        """Just before the train state of ``step`` is written (every rank)."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Task state for the train state: ``(tensors, JSON document)``."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
        """Restore :meth:`state` on resume."""

    def check_resume(self, saved_config: dict[str, Any], path: Path) -> None:
        """Raise when a saved run cannot be continued with this configuration."""

    def find_unused_parameters(self, engine: "Engine") -> bool:
        """Whether DDP needs ``find_unused_parameters=True`` (some parameters get no gradient)."""
        return False


# --------------------------------------------------------------------------------- engine


class Engine:
    """Trains ``task.module()`` with ``cfg``; train states go to ``state_dir`` (optional), metric
    lines to ``metrics_path`` (optional), both on rank 0 only.

    Construction builds the optimiser and the EMA and, with ``resume``, restores the latest train
    state (weights, EMA, optimiser, every RNG, the task's state): :attr:`start` is then the step to
    continue from. :meth:`fit` runs steps ``start .. end - 1``.
    """

    def __init__(self, cfg: EngineConfig, task: TrainTask, state_dir: str | os.PathLike | None = None,
                 metrics_path: str | os.PathLike | None = None, dist_info: Dist | None = None,
                 config: Any = None, resume: bool = False, meta: dict[str, Any] | None = None):
        self.cfg = cfg
        self.task = task
        self.d = dist_info or Dist()
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.metrics_path = Path(metrics_path) if metrics_path is not None else None
        self.config = config if config is not None else cfg
        self.meta = dict(meta or {})
        self.device = resolve_device(cfg.device, local_rank=self.d.local_rank if self.d.world > 1 else None)
        self.module = prefer_channels_last(task.module().to(self.device), self.device, use_bf16(self.device, cfg.bf16))
        groups = task.param_groups(self.module, cfg)
        if groups is None:
            groups = param_groups(self.module, cfg.weight_decay, cfg.no_decay_1d)
        self.optimizer = make_optimizer(groups, cfg.lr, cfg.betas, self.device)
        self.ema = EMA(task.ema_module(self.module), cfg.ema_decay) if cfg.ema_decay is not None else None
        seed = int(cfg.seed) * 1000003 + self.d.rank
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        random.seed(seed)
        self.start = 0
        self.last_saved: int | None = None
        self.step = 0
        self.lr = cfg.lr
        self.model: nn.Module = self.module
        self.stopped_early = False
        self.writer: Any = None  # the TensorBoard writer during fit (rank 0, --tensorboard)
        if resume:
            self._restore()

    # ----------------------------------------------------------------------------- state

    def latest(self) -> Path | None:
        return latest_train_state(self.state_dir) if self.state_dir is not None else None

    def _restore(self) -> None:
        ckpt = self.latest()
        if ckpt is None:
            raise InputError(self.state_dir, "nothing to resume: no train_state/latest checkpoint in this folder")
        tensors, info = read_train_state(ckpt)
        meta = info["meta"]
        self.task.check_resume(info.get("config") or {}, ckpt)
        start = int(meta["step"])
        if start > self.cfg.steps:
            raise InputError(ckpt, f"the checkpoint is at step {start}, beyond --steps {self.cfg.steps}")
        try:
            self.module.load_state_dict({k: v.to(self.device) for k, v in unprefixed(tensors, "model.").items()},
                                        strict=True)
            if self.ema is not None:
                self.ema.load(unprefixed(tensors, "ema."))
            self.optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
            match_state_layout(self.optimizer)
            self.task.load_state(unprefixed(tensors, "task."), meta.get("task") or {})
        except (RuntimeError, KeyError, ValueError, IndexError) as e:
            raise ModelError(ckpt, f"train state does not match this model ({str(e).splitlines()[0]})") from None
        rstates = meta.get("rng") or []
        r = self.d.rank
        if r < len(rstates):
            random.setstate(python_rng_from_json(rstates[r]["python"]))
            torch.set_rng_state(tensors[f"rng.torch.{r}"])
            self.gen.set_state(tensors[f"rng.gen.{r}"])
            if self.device.type == "cuda" and f"rng.cuda.{r}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{r}"], self.device)
        self.start = self.step = self.last_saved = start
        if self.d.main and self.metrics_path is not None:
            truncate_metrics(self.metrics_path, start)

    def save(self, step: int) -> None:
        """Write the train state of ``step`` (every rank takes part; rank 0 writes)."""
        self.task.on_checkpoint(self, step)
        rng_doc, rng_t = rng_states(self.gen, self.d, self.device)
        task_t, task_doc = self.task.state()
        if self.d.main and self.state_dir is not None:
            tensors = prefixed(self.module.state_dict(), "model.")
            if self.ema is not None:
                tensors.update(prefixed(self.ema.state(), "ema."))
            ot, odoc = flatten_optimizer(self.optimizer.state_dict())
            tensors.update(ot)
            tensors.update(rng_t)
            tensors.update(prefixed(task_t, "task."))
            meta = {"optimizer": odoc, "rng": rng_doc, "world_size": self.d.world, "engine": ENGINE_STATE_VERSION,
                    "task": task_doc, **self.meta}
            write_train_state(self.state_dir, step, tensors, self.config, meta, keep=self.cfg.keep_checkpoints)
        self.last_saved = step
        self.d.barrier()

    # ----------------------------------------------------------------------------- loop

    def set_lr(self, step: int) -> float:
        for g in self.optimizer.param_groups:
            g["lr"] = lr_factor_at(step, self.cfg, g.get("base_lr", self.cfg.lr))
        self.lr = float(self.optimizer.param_groups[0]["lr"])
        return self.lr

    def _wrap(self) -> nn.Module:
        model: nn.Module = self.module
        if self.d.world > 1:
            unused = self.task.find_unused_parameters(self)
            flag = torch.tensor([float(unused)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(flag.item() > 0))
        if self.cfg.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        return bf16_autocast(self.device, self.cfg.bf16)

    def fit(self, end: int | None = None) -> int:
        """Run steps ``start .. end - 1`` (``end``: ``cfg.steps``); returns the number of steps done
        (less than ``end`` when a hook stopped training). The last step is always checkpointed
        (with a ``state_dir``)."""
        end = self.cfg.steps if end is None else min(self.cfg.steps, max(self.start, int(end)))
        if self.start >= end:
            return self.start
        with num_threads(self.cfg.threads):
            self.model = self._wrap()
            if self.cfg.tensorboard and self.d.main and self.metrics_path is not None:
                self.writer = tensorboard_writer(self.metrics_path.parent / "tensorboard")
            try:
                return self._loop(end, self.writer)
            finally:
                if self.writer is not None:
                    self.writer.close()
                self.writer = None

    def _loop(self, end: int, writer) -> int:
        from tqdm.auto import tqdm

        cfg, d, task, device = self.cfg, self.d, self.task, self.device
        log = MetricLog()
        bar = tqdm(total=end, initial=self.start, desc=cfg.desc, unit="step", leave=False,
                   disable=True if not (cfg.progress and d.main) else None, dynamic_ncols=True)
        batches = task.batches(self.start, end)
        never = torch.iinfo(torch.int64).max
        pending: list[torch.Tensor] = []  # the losses since the last check (device scalars)
        params = list(self.module.parameters())  # clipped in module order (the norm sums in this order)
        mfile = open(self.metrics_path, "a") if (d.main and self.metrics_path is not None) else None

        def check_finite() -> None:
            """Raise when a loss since the last check was not finite (one host synchronisation)."""
            if not pending and d.world == 1:
                return
            first = done - len(pending)  # step index of pending[0]
            if pending:
                vals = torch.stack(pending)
                bad = torch.isfinite(vals).logical_not()
                at_t = torch.where(bad.any(), bad.to(torch.int64).argmax() + (first + 1),
                                   torch.full((), never, dtype=torch.int64, device=vals.device))
            else:
                vals = torch.zeros(0, device=device)
                at_t = torch.full((), never, dtype=torch.int64, device=device)
            if d.world > 1:
                flag = at_t.clone()
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            else:
                flag = at_t
            at = int(flag.item())
            pending.clear()
            if at == never:
                return
            mine = int(at_t.item())
            value = float(vals[mine - first - 1].item()) if mine == at else float("nan")
            ls = self.last_saved
            where = (f"the last good checkpoint (step {ls}) is kept in {self.state_dir}; {cfg.nan_hint}"
                     if ls and self.state_dir is not None else "no checkpoint had been written yet")
            raise TrainingError(f"{cfg.label + ': ' if cfg.label else ''}loss is {value} at step {at}: training stopped; {where}")

        t0 = time.perf_counter()
        n_since = 0
        done = self.start
        task.on_fit_start(self)
        try:
            for step, batch in zip(range(self.start, end), batches):
                self.step = step
                task.on_step_start(self, step)
                lr = self.set_lr(step)
                with self.autocast():
                    loss, metrics = task.step(self.model, batch, step, self.gen)
                lval = loss.detach().float()
                pending.append(lval)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = None
                if cfg.grad_clip > 0:
                    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(task.ema_module(self.module), step)
                log.add({"loss": lval})
                log.add(metrics)
                if gnorm is not None:
                    log.add({"grad_norm": gnorm.detach()})
                n_since += 1
                done = step + 1
                bar.update(1)
                is_log = done % cfg.log_every == 0 or done == end
                is_ckpt = self.state_dir is not None and (
                    done == end or (cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0))
                is_sync = task.needs_sync(done)
                if is_log or is_ckpt or is_sync:
                    check_finite()
                if is_log:
                    row = log.reduce(d, device)
                    dt = time.perf_counter() - t0
                    row = {"step": done, **row, "lr": lr, **task.log_extras(n_since, dt)}
                    if d.main:
                        if mfile is not None:
                            mfile.write(json.dumps(row) + "\n")
                            mfile.flush()  # (the online probe appends its own lines)
                        if "loss" in row:
                            bar.set_postfix(loss=f"{row['loss']:.4f}")
                        if writer is not None:
                            for k, v in row.items():
                                if k != "step" and isinstance(v, (int, float)):
                                    writer.add_scalar(k, v, done)
                        task.on_log(self, row)
                    t0 = time.perf_counter()
                    n_since = 0
                stop = task.after_step(self, done)
                if stop and self.state_dir is not None and not is_ckpt:
                    is_ckpt = True
                if is_ckpt:
                    self.save(done)
                if stop:
                    self.stopped_early = True
                    break
        finally:
            close = getattr(batches, "close", None)
            if callable(close):
                close()
            if mfile is not None:
                mfile.close()
            bar.close()
        self.step = done
        return done


def old_train_state_error(path: str | os.PathLike, what: str = "run") -> InputError:
    """The one-line error for a resume from a train state written before the engine's format."""
    return InputError(path, f"this {what} was checkpointed in an older train-state format that this voxdiff cannot "
                            "resume; start it again (--force) or finish it with the voxdiff version that began it")
