"""Pretraining behind ``voxdiff pretrain``: one task of the training engine for every method.

``pretrain(cfg, out_dir)`` loads the preprocessed cases (int16 memory maps of the cache with
``cache_dir``, float32 arrays in memory without), builds the task (the method) and the backbone
named by ``cfg.backbone`` (:mod:`voxdiff.pretrain.backbones`), and trains them with the engine
(:mod:`voxdiff.core.engine`) as ``cfg.optim`` says: AdamW, linear warm-up + cosine decay, gradient
clipping, an EMA of the backbone weights; and ``cfg.runtime``: (optionally) bf16 autocast, every
``checkpoint_every`` steps the full train
state is written atomically (:mod:`voxdiff.core.trainstate`);
``resume=True`` continues exactly where the last checkpoint left off (same batches, same noise).
Batches come from ``voxdiff.pretrain.data``: the batch of step k is drawn with a generator derived from
(seed, rank, k), in the training process or in ``cfg.data.workers`` processes (same batches either way).

Under ``torchrun --nproc_per_node=N`` the same call runs DDP (gloo on CPU, nccl on GPU): every rank
draws its own patches (its generators are seeded with its rank), gradients are averaged, only rank 0 writes.

Output folder::

    out/
      backbone/            model.safetensors (EMA weights) + model.json (kind "backbone")
      bpr/                 copy of the body part regressor used (conditioned diffusion only)
      train_state/         step_XXXXXXXX/ (+ latest): weights, EMA, optimiser, RNG states
      metrics.jsonl        one JSON line per log interval
      config.yaml          the resolved PretrainConfig + versions
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..core.checkpoint import prefixed, save_checkpoint
from ..core.config import flatten, to_dict, write_config
from ..core.engine import (  # noqa: F401  (EMA, MetricLog, Dist: re-exported for callers of this module)
    EMA,
    Dist,
    Engine,
    EngineConfig,
    MetricLog,
    TrainTask,
    close_distributed,
    init_distributed,
)
from ..core.engine import param_groups as _param_groups
from ..core.errors import InputError
from ..core.outputs import check_output_path, run_folder, staged_dir
from ..core.runtime import num_threads, resolve_device
from ..core.schedule import warmup_cosine
from ..core.sections import OptimConfig, RuntimeConfig, engine_settings
from ..core.trainstate import latest_train_state
from ..data.preprocess import PreprocessConfig
from .backbones import PyramidBackbone, backbone_name, build_backbone, count_parameters
from .tasks.base import available_methods, get_task_class, make_task_config
from .tasks.diffusion import DiffusionFields

BACKBONE_KIND = "backbone"
BACKBONE_FORMAT_VERSION = 1


@dataclass
class PretrainData:
    """What the pretraining batches are drawn from, and how.

    Args:
        paths: data folders (any layout voxdiff.data reads; labels are not used). ``--data FOLDER
            ...`` on the command line.
        kind: data set layout (auto, btcv, nnunet, flare, amos, folder).
        cache_dir: preprocessing cache folder (optional).
        patch_size: training patch size in voxels (multiple of 2**(num_levels-1)).
        batch_size: patches per step and per process.
        workers: processes drawing batches (0 = in the training process). The batch of step k is a
            function of (seed, rank, k) only: the same for any number of workers and after --resume.
        prefetch_factor: batches each worker keeps ready (workers > 0).
    """

    VALUE_FIELD: ClassVar[str] = "paths"  # `data: [folder]` (the flat layout) sets the paths

    paths: list[str] = field(default_factory=list)
    kind: str = "auto"
    cache_dir: str | None = None
    patch_size: tuple[int, int, int] = (32, 32, 32)
    batch_size: int = 2
    workers: int = 0
    prefetch_factor: int = 2


@dataclass
class BackboneConfig:
    """The network being pretrained.

    Args:
        name: architecture: unet (GroupNorm UNet, the default) | fpn3d (vox2vec's FPN; its recipe
            is --backbone.num_levels 6 --backbone.blocks_per_level 2 --backbone.base_channels 16).
            See docs/PRETRAIN.md. ``--backbone NAME`` on the command line.
        base_channels: backbone width of the finest level.
        num_levels: backbone resolutions (pyramid levels).
        blocks_per_level: residual blocks per level (encoder and decoder).
        norm_groups: maximum GroupNorm groups (unet; fpn3d uses BatchNorm unless built with norm="group").
    """

    VALUE_FIELD: ClassVar[str] = "name"  # `backbone: unet` (the flat layout) sets the name

    name: str = "unet"
    base_channels: int = 16
    num_levels: int = 4
    blocks_per_level: int = 1
    norm_groups: int = 8


@dataclass
class TaskOptions(DiffusionFields):
    """Options of the method (the task): the diffusion task's main options are fields (those of
    ``voxdiff.pretrain.tasks.diffusion.DiffusionFields``, read by the diffusion method only);
    every other option, of any method, goes in ``options``.

    Args:
        options: other method options as a dict (e.g. {"temperature": 0.1} for contrastive,
            {"min_snr_gamma": 5} for diffusion).
    """

    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OnlineProbeConfig:
    """The online probe: a linear head fitted on frozen EMA features of a few labelled cases,
    its Dice logged in metrics.jsonl.

    Args:
        every: steps between online probes (0 = off; needs data).
        data: labelled data folder for the online probe.
        cases: number of labelled cases used by the online probe.
    """

    every: int = 0
    data: str | None = None
    cases: int = 2


@dataclass
class PretrainConfig:
    """Pretraining of a backbone by one method, in sections (``cfg.optim.lr``; on the command
    line ``--optim.lr``). Configs saved before the sections (flat: ``lr``, ``data_kind``,
    ``probe_every``, ...) load too (:mod:`voxdiff.core.config`).

    Args:
        method: diffusion | restorative | contrastive | random.
        seed: seed of weights, patches and noise.
        preprocess: how volumes are brought to the training grid (saved with the model).
        data: training data, patches and batches.
        optim: optimiser, schedule and EMA.
        backbone: the network's architecture and size.
        task: the method's options.
        runtime: device, precision, threads, checkpoints and logs.
        probe: the online probe (off by default).
    """

    SECTIONS: ClassVar[tuple[str, ...]] = ("data", "optim", "backbone", "task", "runtime", "probe")
    # flat (pre-sections) names that differ from the field's name
    FLAT_NAMES: ClassVar[dict[str, str]] = {"data_kind": "data.kind", "probe_every": "probe.every",
                                            "probe_data": "probe.data", "probe_cases": "probe.cases",
                                            "task_options": "task.options"}

    method: str = "diffusion"
    seed: int = 0
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: PretrainData = field(default_factory=PretrainData)
    optim: OptimConfig = field(default_factory=OptimConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    task: TaskOptions = field(default_factory=TaskOptions)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    probe: OnlineProbeConfig = field(default_factory=OnlineProbeConfig)


# fields that may change between a checkpoint and --resume (dotted: section.field)
_RESUME_FREE = {"optim.steps", "runtime.checkpoint_every", "runtime.keep_checkpoints", "runtime.log_every",
                "runtime.tensorboard", "runtime.device", "runtime.threads", "runtime.compile", "probe.every",
                "probe.data", "probe.cases", "data.workers", "data.prefetch_factor", "data.paths", "data.kind",
                "data.cache_dir", "task.bpr_path"}


# --------------------------------------------------------------------------------- pieces


class _Joint(nn.Module):
    """Backbone + task as one module so that DDP sees one forward (the task's loss)."""

    def __init__(self, backbone: PyramidBackbone, task: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.task = task

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator):
        return self.task.loss(self.backbone, batch, generator)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    return warmup_cosine(step, cfg.optim.steps, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of pretraining: no weight decay on biases and norm weights."""
    return _param_groups(module, weight_decay, no_decay_1d=True)


def engine_config(cfg: PretrainConfig, progress: bool = True, main: bool = True) -> EngineConfig:
    """The engine settings of a pretraining run."""
    return EngineConfig(**engine_settings(cfg.optim, cfg.runtime), no_decay_1d=True, seed=cfg.seed,
                        progress=progress and main, desc=f"pretrain {cfg.method}",
                        nan_hint="continue from it with --resume (e.g. with a lower --optim.lr)")


def unused_parameter_names(joint: nn.Module, task: nn.Module, cases: list, cfg: PretrainConfig,
                           device: torch.device) -> list[str]:
    """Trainable parameters that get no gradient from the task's loss (e.g. the backbone's output
    convolution under the contrastive loss, which uses the pyramid only, or the null time embedding
    of a diffusion backbone that always gets a timestep). Found with one real forward/backward on a
    one-patch batch drawn with its own generators; weights, buffers (BatchNorm statistics), RNG
    states and gradients are restored afterwards, so training is not affected."""
    import copy

    from .data import step_generator

    saved = copy.deepcopy(joint.state_dict())
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        batch = task.sample_batch(cases, 1, tuple(cfg.data.patch_size), step_generator(cfg.seed, 0, 2**62))
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        gen = torch.Generator(device=device).manual_seed(12345)
        was = joint.training
        joint.train()
        loss, _ = joint(batch, gen)
        joint.zero_grad(set_to_none=True)
        loss.backward()
        names = [n for n, p in joint.named_parameters() if p.requires_grad and p.grad is None]
        joint.train(was)
    finally:
        joint.zero_grad(set_to_none=True)
        joint.load_state_dict(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
    return names


def has_unused_parameters(joint: nn.Module, task: nn.Module, cases: list, cfg: PretrainConfig,
                          device: torch.device) -> bool:
    """Whether DDP needs ``find_unused_parameters=True`` for this task and backbone."""
    return bool(unused_parameter_names(joint, task, cases, cfg, device))


# --------------------------------------------------------------------------------- setup


def validate_config(cfg: PretrainConfig) -> None:
    methods = available_methods()
    if cfg.method not in methods:
        raise InputError(None, f"unknown method {cfg.method!r}; choose from {', '.join(methods)}")
    if len(cfg.data.patch_size) != 3 or any(int(s) < 1 for s in cfg.data.patch_size):
        raise InputError(None, f"data.patch_size must be three positive integers, got {cfg.data.patch_size}")
    div = 2 ** (cfg.backbone.num_levels - 1)
    if any(int(s) % div for s in cfg.data.patch_size):
        raise InputError(None, f"data.patch_size {tuple(cfg.data.patch_size)} must be a multiple of {div} "
                               f"(2**(backbone.num_levels-1))")
    for name, value in (("data.batch_size", cfg.data.batch_size), ("backbone.base_channels", cfg.backbone.base_channels),
                        ("backbone.num_levels", cfg.backbone.num_levels),
                        ("backbone.blocks_per_level", cfg.backbone.blocks_per_level),
                        ("runtime.log_every", cfg.runtime.log_every),
                        ("runtime.checkpoint_every", cfg.runtime.checkpoint_every)):
        if int(value) < 1:
            raise InputError(None, f"{name} must be >= 1")
    if cfg.optim.steps < 0:
        raise InputError(None, "optim.steps must be >= 0")
    if int(cfg.data.workers) < 0:
        raise InputError(None, "data.workers must be >= 0")
    if int(cfg.data.prefetch_factor) < 1:
        raise InputError(None, "data.prefetch_factor must be >= 1")
    if cfg.optim.lr <= 0:
        raise InputError(None, "optim.lr must be > 0")
    if not 0 <= cfg.optim.ema_decay < 1:
        raise InputError(None, "optim.ema_decay must lie in [0, 1)")


def build_task_and_backbone(cfg: PretrainConfig, bpr: nn.Module | None = None
                            ) -> tuple[nn.Module, PyramidBackbone, dict]:
    cls = get_task_class(cfg.method)
    try:
        task_cfg = make_task_config(cls, cfg.task.options, defaults=cfg.task, preprocess=cfg.preprocess)
    except ValueError as e:
        raise InputError(None, str(e)) from None
    try:
        task = cls(task_cfg, bpr=bpr) if bpr is not None else cls(task_cfg)
    except (ValueError, TypeError) as e:
        raise InputError(None, f"invalid options for method {cfg.method!r}: {e}") from None
    common: dict[str, Any] = dict(in_channels=task.in_channels, out_channels=task.out_channels,
                                  base_channels=cfg.backbone.base_channels, num_levels=cfg.backbone.num_levels,
                                  blocks_per_level=cfg.backbone.blocks_per_level, time_embedding=bool(task.uses_timestep),
                                  norm_groups=cfg.backbone.norm_groups, coord_channels=task.in_channels - 1)
    try:
        backbone = build_backbone(cfg.backbone.name, **common)
    except (ValueError, TypeError) as e:
        raise InputError(None, f"invalid options for backbone {cfg.backbone.name!r}: {e}") from None
    if any(int(s) % backbone.divisor for s in cfg.data.patch_size):
        raise InputError(None, f"data.patch_size {tuple(cfg.data.patch_size)} must be a multiple of {backbone.divisor} "
                               f"(the largest stride of the {cfg.backbone.name} backbone)")
    coarsest = int(np.prod([int(s) // backbone.divisor for s in cfg.data.patch_size]))
    if cfg.data.batch_size * coarsest < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules()):
        raise InputError(None, f"the {cfg.backbone.name} backbone's BatchNorm needs more than one value per channel at its "
                               f"coarsest level: use data.batch_size >= 2 or a larger data.patch_size")
    task.setup(backbone)
    return task, backbone, task_cfg


def load_cases(cfg: PretrainConfig, progress: bool = False) -> list:
    from ..data.cache import load_preprocessed

    if not cfg.data.paths:
        raise InputError(None, "no training data given (--data FOLDER)")
    cases = []
    for p in cfg.data.paths:
        if not Path(p).exists():
            raise InputError(p, "data folder not found")
        # with a cache: int16 memory maps of the cached volumes (no float32 copy of a whole volume
        # in memory; the tasks read patches from the maps); without: float32 volumes in memory
        cases.extend(load_preprocessed(p, cfg.preprocess, cache_dir=cfg.data.cache_dir, kind=cfg.data.kind,
                                       progress=progress, mmap=cfg.data.cache_dir is not None))
    if not cases:
        raise InputError(cfg.data.paths[0], "no cases found")
    return cases


def _bpr_source(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        return [p]
    if p.suffix in (".safetensors", ".json"):
        return [p.with_suffix(".safetensors"), p.with_suffix(".json")]
    return [p]


def copy_bpr(path: str, dest: Path) -> None:
    """Copy a BPR (folder or file pair) to ``dest`` (a folder with model.safetensors/json)."""
    src = _bpr_source(path)
    if len(src) == 1 and src[0].is_dir():
        shutil.copytree(src[0], dest)
    else:
        dest.mkdir(parents=True)
        shutil.copy2(src[0], dest / "model.safetensors")
        shutil.copy2(src[1], dest / "model.json")


def backbone_document(cfg: PretrainConfig, backbone: PyramidBackbone, task_cfg: dict, has_bpr: bool) -> dict[str, Any]:
    """The ``config`` written in backbone/model.json: ``backbone_name`` (registry name) and
    ``backbone`` (its constructor arguments) rebuild the network (``load_backbone``)."""
    return {
        "backbone_name": backbone_name(backbone),
        "backbone": backbone.config(),
        "levels": [dataclasses.asdict(lv) for lv in backbone.levels],
        "method": cfg.method,
        "task": to_dict(task_cfg),
        "preprocess": to_dict(cfg.preprocess),
        "bpr": "../bpr" if has_bpr else None,
        "patch_size": list(cfg.data.patch_size),
    }


def save_backbone(path: Path, cfg: PretrainConfig, backbone: PyramidBackbone, weights: dict[str, torch.Tensor],
                  task: nn.Module, task_cfg: dict, has_bpr: bool, meta: dict[str, Any] | None = None) -> Path:
    tensors = dict(weights)
    tensors.update(prefixed(task.state_dict(), "task."))
    return save_checkpoint(path, tensors, BACKBONE_KIND, backbone_document(cfg, backbone, task_cfg, has_bpr),
                           meta=meta, format_version=BACKBONE_FORMAT_VERSION)


# --------------------------------------------------------------------------------- main entry


def pretrain(cfg: PretrainConfig, out_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
             force: bool = False, cases: list | None = None, bpr: nn.Module | None = None,
             stop_after: int | None = None, probe_set: list | None = None) -> Path:
    """Pretrain a backbone; returns ``out_dir``.

    ``cases``: preprocessed cases to use instead of reading ``cfg.data.paths`` (Python API / tests).
    ``bpr``: a BPR module to use instead of loading ``cfg.task.bpr_path`` (then no ``bpr/`` copy is made).
    ``stop_after``: stop after this many steps (a checkpoint is written there) without finishing,
    e.g. to split a long run into jobs; continue with ``resume=True``.
    ``probe_set``: labelled preprocessed cases for the online probe instead of ``cfg.probe.data``.
    """
    d = init_distributed(cfg.runtime.device)
    cudnn_benchmark = torch.backends.cudnn.benchmark
    try:
        with num_threads(cfg.runtime.threads):
            return _pretrain(cfg, Path(out_dir), resume, progress, force, cases, bpr, stop_after, d, probe_set)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark  # set for the run only (see _pretrain)
        close_distributed(d)


def _check_resume_config(saved: dict[str, Any], cfg: PretrainConfig, path: Path) -> None:
    # a train state saved before the sections holds the flat layout: compare section.field by section.field
    now, before = flatten(PretrainConfig, to_dict(cfg)), flatten(PretrainConfig, saved)
    diff = [k for k in now if k not in _RESUME_FREE and k in before and before[k] != now[k]]
    if diff:
        raise InputError(path, f"--resume with a different configuration ({', '.join(sorted(diff))}); "
                               "use the same options as the interrupted run")


class PretrainTask(TrainTask):
    """Pretraining as an engine task: the joint module (backbone + method), batches from
    :mod:`voxdiff.pretrain.data` (step k's batch is a function of (seed, rank, k)), an EMA of the
    backbone, throughput in the metric lines and the online probe."""

    def __init__(self, cfg: PretrainConfig, joint: _Joint, cases: list | None, d: Dist, out: Path,
                 probe_set: list | None = None):
        self.cfg, self.joint, self.cases, self.d, self.out, self.probe_set = cfg, joint, cases, d, out, probe_set
        self.engine: Engine | None = None

    def module(self) -> nn.Module:
        return self.joint

    def ema_module(self, module: nn.Module) -> nn.Module:
        return module.backbone  # type: ignore[return-value]

    def batches(self, start: int, end: int):
        from .data import StepBatches, step_batches, to_device

        cfg = self.cfg
        device = self.engine.device if self.engine is not None else torch.device("cpu")
        it = step_batches(StepBatches(self.joint.task.sample_batch, self.cases, cfg.data.batch_size, tuple(cfg.data.patch_size),
                                      cfg.seed, self.d.rank),
                          start, end, workers=int(cfg.data.workers), pin_memory=device.type == "cuda",
                          prefetch_factor=int(cfg.data.prefetch_factor))
        return _DeviceBatches(it, device, to_device)

    def step(self, model: nn.Module, batch: Any, step: int, gen: torch.Generator):
        return model(batch, gen)

    def log_extras(self, steps: int, seconds: float) -> dict[str, Any]:
        pps = steps * self.cfg.data.batch_size * self.d.world / max(seconds, 1e-9)
        return {"patches_per_s": pps, "voxels_per_s": pps * int(np.prod(self.cfg.data.patch_size))}

    def needs_sync(self, done: int) -> bool:
        return bool(self.cfg.probe.every) and done % self.cfg.probe.every == 0

    def after_step(self, engine: Engine, done: int) -> bool:
        if self.needs_sync(done):
            _online_probe(self.cfg, self.joint, engine.ema, engine.device, self.d, self.out, done, engine.writer,
                          self.probe_set)
        return False

    def check_resume(self, saved_config: dict[str, Any], path: Path) -> None:
        _check_resume_config(saved_config, self.cfg, path)

    def find_unused_parameters(self, engine: Engine) -> bool:
        trains = bool(getattr(self.joint.task, "trains", True))
        return bool(trains and self.cases) and has_unused_parameters(self.joint, self.joint.task, self.cases or [],
                                                                      self.cfg, engine.device)


class _DeviceBatches:
    """The batches of ``it`` moved to ``device`` (and ``it`` closed by :meth:`close`)."""

    def __init__(self, it, device: torch.device, to_device):
        self.it, self.device, self.to_device = it, device, to_device

    def __iter__(self):
        for b in self.it:
            yield self.to_device(b, self.device)

    def close(self) -> None:
        self.it.close()


def _pretrain(cfg: PretrainConfig, out: Path, resume: bool, progress: bool, force: bool, cases: list | None,
              bpr: nn.Module | None, stop_after: int | None, d: Dist, probe_set: list | None = None) -> Path:
    validate_config(cfg)
    if cfg.probe.every and probe_set is None:
        if not cfg.probe.data:
            raise InputError(None, "--probe.every needs --probe.data (a labelled data folder)")
        if not Path(cfg.probe.data).exists():
            raise InputError(cfg.probe.data, "probe data folder not found")
    state_root = out / "train_state"
    if resume and latest_train_state(state_root) is None:
        raise InputError(out, "nothing to resume: no train_state/latest checkpoint in this folder")
    device = resolve_device(cfg.runtime.device, local_rank=d.local_rank if d.world > 1 else None)

    # build everything before touching the output folder (bad input leaves no output)
    torch.manual_seed(cfg.seed)
    task, backbone, task_cfg = build_task_and_backbone(cfg, bpr)
    has_bpr = getattr(task, "bpr", None) is not None and bpr is None and bool(cfg.task.bpr_path)
    trains = bool(getattr(task, "trains", True))
    if cases is None and (trains or cfg.data.paths):  # the random baseline needs no data
        cases = load_cases(cfg, progress=progress and d.main)
    if trains and not cases:
        raise InputError(None, "no training cases")
    if trains:
        task.prepare(cases, cache_dir=cfg.data.cache_dir, progress=progress and d.main)

    if d.main and not resume:
        check_output_path(out, force=force, inputs=(*cfg.data.paths, cfg.task.bpr_path or None))
        if force and out.exists():
            shutil.rmtree(out)
    # on the main rank, a run that stops before its first checkpoint (error, NaN, Ctrl-C) takes back
    # what it wrote, so that the folder does not block the next attempt
    with (run_folder(out, lambda: latest_train_state(state_root) is not None) if d.main
          else contextlib.nullcontext(out)):
        d.barrier()

        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the patch size is fixed: pick the fastest kernels once
        ptask = PretrainTask(cfg, _Joint(backbone, task), cases, d, out, probe_set)
        engine = Engine(engine_config(cfg, progress, d.main), ptask, state_dir=state_root,
                        metrics_path=out / "metrics.jsonl", dist_info=d, config=cfg, resume=resume,
                        meta={"method": cfg.method})
        ptask.engine = engine
        assert engine.ema is not None
        start = engine.start

        if d.main:
            write_config(out, cfg, extra={"method": cfg.method, "parameters": count_parameters(backbone),
                                          "world_size": d.world})

        end = cfg.optim.steps if stop_after is None else min(cfg.optim.steps, max(start, int(stop_after)))
        if trains and start < end:
            engine.fit(end)

        if end < cfg.optim.steps:  # stopped early on request: the checkpoint is the result
            if engine.last_saved != end:
                engine.save(end)
            return out

        if trains and engine.last_saved != cfg.optim.steps and cfg.optim.steps > 0:
            engine.save(cfg.optim.steps)

        if d.main:
            ema_backbone = {k: v for k, v in engine.ema.state().items()}
            if not trains:  # random init: the initial weights
                ema_backbone = {k: v.detach().float() for k, v in backbone.state_dict().items()}
            if has_bpr:
                bdest = out / "bpr"
                if bdest.exists():
                    shutil.rmtree(bdest)
                with staged_dir(bdest, force=True) as tmp:
                    shutil.rmtree(tmp)
                    copy_bpr(cfg.task.bpr_path, tmp)  # type: ignore[arg-type]
            with staged_dir(out / "backbone", force=True) as tmp:
                save_backbone(tmp, cfg, backbone, ema_backbone, task, task_cfg, has_bpr,
                              meta={"steps": cfg.optim.steps, "parameters": count_parameters(backbone),
                                    "seed": cfg.seed, "world_size": d.world})
        d.barrier()
        return out


def _online_probe(cfg, joint, ema, device, d: Dist, out: Path, step: int, writer, probe_set=None) -> None:
    """Fit a linear head on frozen EMA features of a few labelled cases; log Dice (rank 0)."""
    if not d.main:
        return
    from .probe_online import online_probe

    was = joint.training
    res = online_probe(cfg, joint, ema.state(), device, cases=probe_set)
    joint.train(was)
    row = {"step": step, **{f"probe_{k}": v for k, v in res.items()}}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if writer is not None:
        for k, v in row.items():
            if k != "step":
                writer.add_scalar(k, v, step)
