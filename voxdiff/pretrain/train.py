"""The pretraining engine behind ``voxdiff pretrain``: one loop for every method.

``pretrain(cfg, out_dir)`` loads the preprocessed cases (int16 memory maps of the cache with
``cache_dir``, float32 arrays in memory without), builds the task (the method) and the backbone
named by ``cfg.backbone`` (:mod:`voxdiff.pretrain.backbones`), and trains with AdamW, linear warm-up + cosine
decay, gradient clipping, an EMA of the backbone weights and (optionally) bf16 autocast. Every
``checkpoint_every`` steps the full train state is written atomically (``voxdiff.pretrain.state``);
``resume=True`` continues exactly where the last checkpoint left off (same batches, same noise).
Batches come from ``voxdiff.pretrain.data``: the batch of step k is drawn with a generator derived from
(seed, rank, k), in the training process or in ``workers`` processes (same batches either way).

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

import dataclasses
import functools
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..core.checkpoint import prefixed, save_checkpoint, unprefixed
from ..core.config import to_dict, write_config
from ..core.errors import InputError, ModelError, TrainingError
from ..core.outputs import atomic_write, check_output_path, staged_dir
from ..core.precision import bf16_autocast
from ..core.runtime import num_threads, resolve_device
from ..core.schedule import warmup_cosine
from ..data.preprocess import PreprocessConfig
from .backbones import PyramidBackbone, backbone_name, build_backbone, count_parameters
from .state import (
    flatten_optimizer,
    latest_train_state,
    python_rng_from_json,
    python_rng_to_json,
    read_train_state,
    unflatten_optimizer,
    write_train_state,
)
from .tasks.base import available_methods, get_task_class, make_task_config

BACKBONE_KIND = "backbone"
BACKBONE_FORMAT_VERSION = 1


@dataclass
class PretrainConfig:
    """Pretraining of a backbone by one method.

    Args:
        method: diffusion | restorative | contrastive | random.
        data: data folders (any layout voxdiff.data reads; labels are not used).
        data_kind: data set layout (auto, btcv, nnunet, flare, amos, folder).
        cache_dir: preprocessing cache folder (optional).
        preprocess: how volumes are brought to the training grid (saved with the model).
        patch_size: training patch size in voxels (multiple of 2**(num_levels-1)).
        batch_size: patches per step and per process.
        steps: optimiser steps.
        lr: peak learning rate (AdamW).
        warmup_steps: linear warm-up steps; then cosine decay to min_lr_ratio * lr.
        min_lr_ratio: final learning rate as a fraction of lr.
        weight_decay: AdamW weight decay (conv/linear weights only).
        grad_clip: max gradient norm (0 = off).
        ema_decay: EMA decay of the backbone weights saved as the final model.
        bf16: bf16 autocast where the device has native bf16 (about 2x faster there, same loss
            curve); fp32 elsewhere (emulated bf16 is many times slower, see voxdiff.core.precision).
        seed: seed of weights, patches and noise.
        checkpoint_every: steps between train-state checkpoints (the last step is always saved).
        keep_checkpoints: how many train-state checkpoints to keep.
        log_every: steps between metric lines.
        probe_every: steps between online probes (0 = off; needs probe_data).
        probe_data: labelled data folder for the online probe.
        probe_cases: number of labelled cases used by the online probe.
        tensorboard: also write tensorboard logs (if tensorboard is installed).
        device: auto | cpu | cuda.
        threads: intra-op CPU threads (0 = torch's default; 1 is faster on a busy shared machine).
        backbone: architecture: unet (GroupNorm UNet, the default) | fpn3d (vox2vec's FPN; its recipe
            is --num_levels 6 --blocks_per_level 2 --base_channels 16). See docs/PRETRAIN.md.
        workers: processes drawing batches (0 = in the training process). The batch of step k is a
            function of (seed, rank, k) only: the same for any number of workers and after --resume.
        prefetch_factor: batches each worker keeps ready (workers > 0).
        base_channels: backbone width of the finest level.
        num_levels: backbone resolutions (pyramid levels).
        blocks_per_level: residual blocks per level (encoder and decoder).
        norm_groups: maximum GroupNorm groups (unet; fpn3d uses BatchNorm unless built with norm="group").
        condition: diffusion: none | slice | ape.
        bpr_path: diffusion: body part regressor folder (condition slice/ape).
        bpr_sincos: diffusion: sin/cos frequencies appended to the BPR coordinates.
        diffusion_steps: diffusion: number of diffusion steps T.
        beta_schedule: diffusion: linear | cosine.
        prediction: diffusion: epsilon | v | sample.
        feature_timesteps: diffusion: timestep(s) of the frozen features.
        noise_seed: diffusion: seed of the fixed feature noise.
        condition_source: diffusion: volume (the BPR map of each whole volume, computed once and
            cropped per patch) | patch (the BPR of each patch alone).
        task_options: other method options as a dict (e.g. {"temperature": 0.1} for contrastive).
    """

    method: str = "diffusion"
    data: list[str] = field(default_factory=list)
    data_kind: str = "auto"
    cache_dir: str | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    patch_size: tuple[int, int, int] = (32, 32, 32)
    batch_size: int = 2
    steps: int = 1000
    lr: float = 2e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = True
    seed: int = 0
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    probe_every: int = 0
    probe_data: str | None = None
    probe_cases: int = 2
    tensorboard: bool = False
    device: str = "auto"
    threads: int = 0
    backbone: str = "unet"
    workers: int = 0
    prefetch_factor: int = 2
    base_channels: int = 16
    num_levels: int = 4
    blocks_per_level: int = 1
    norm_groups: int = 8
    condition: str = "none"
    bpr_path: str | None = None
    bpr_sincos: int = 0
    diffusion_steps: int = 1000
    beta_schedule: str = "linear"
    prediction: str = "epsilon"
    feature_timesteps: tuple[int, ...] = (10,)
    noise_seed: int = 0
    condition_source: str = "volume"
    task_options: dict[str, Any] = field(default_factory=dict)


# fields that may change between a checkpoint and --resume
_RESUME_FREE = {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "probe_every", "probe_data",
                "probe_cases", "tensorboard", "device", "threads", "workers", "prefetch_factor", "data", "data_kind", "cache_dir", "bpr_path"}


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
    return warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class EMA:
    """Exponential moving average of a module's parameters and buffers (float32 copies)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """``shadow = d * shadow + (1 - d) * value`` for every floating tensor (one fused ``foreach``
        lerp, no host synchronisation); other tensors (counters) are copied."""
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
            self.shadow[k] = tensors[k].float().clone()


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


def make_optimizer(module: nn.Module, cfg: PretrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``: the fused kernel on CUDA (one launch for every tensor), torch's
    default (``foreach``) elsewhere."""
    kw: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), **kw)


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
        batch = task.sample_batch(cases, 1, tuple(cfg.patch_size), step_generator(cfg.seed, 0, 2**62))
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
    if len(cfg.patch_size) != 3 or any(int(s) < 1 for s in cfg.patch_size):
        raise InputError(None, f"patch_size must be three positive integers, got {cfg.patch_size}")
    div = 2 ** (cfg.num_levels - 1)
    if any(int(s) % div for s in cfg.patch_size):
        raise InputError(None, f"patch_size {tuple(cfg.patch_size)} must be a multiple of {div} (2**(num_levels-1))")
    for name in ("batch_size", "base_channels", "num_levels", "blocks_per_level", "log_every", "checkpoint_every"):
        if int(getattr(cfg, name)) < 1:
            raise InputError(None, f"{name} must be >= 1")
    if cfg.steps < 0:
        raise InputError(None, "steps must be >= 0")
    if int(cfg.workers) < 0:
        raise InputError(None, "workers must be >= 0")
    if int(cfg.prefetch_factor) < 1:
        raise InputError(None, "prefetch_factor must be >= 1")
    if cfg.lr <= 0:
        raise InputError(None, "lr must be > 0")
    if not 0 <= cfg.ema_decay < 1:
        raise InputError(None, "ema_decay must lie in [0, 1)")


def build_task_and_backbone(cfg: PretrainConfig, bpr: nn.Module | None = None
                            ) -> tuple[nn.Module, PyramidBackbone, dict]:
    cls = get_task_class(cfg.method)
    try:
        task_cfg = make_task_config(cls, cfg.task_options, defaults=cfg, preprocess=cfg.preprocess)
    except ValueError as e:
        raise InputError(None, str(e)) from None
    try:
        task = cls(task_cfg, bpr=bpr) if bpr is not None else cls(task_cfg)
    except (ValueError, TypeError) as e:
        raise InputError(None, f"invalid options for method {cfg.method!r}: {e}") from None
    common: dict[str, Any] = dict(in_channels=task.in_channels, out_channels=task.out_channels,
                                  base_channels=cfg.base_channels, num_levels=cfg.num_levels,
                                  blocks_per_level=cfg.blocks_per_level, time_embedding=bool(task.uses_timestep),
                                  norm_groups=cfg.norm_groups, coord_channels=task.in_channels - 1)
    try:
        backbone = build_backbone(cfg.backbone, **common)
    except (ValueError, TypeError) as e:
        raise InputError(None, f"invalid options for backbone {cfg.backbone!r}: {e}") from None
    if any(int(s) % backbone.divisor for s in cfg.patch_size):
        raise InputError(None, f"patch_size {tuple(cfg.patch_size)} must be a multiple of {backbone.divisor} "
                               f"(the largest stride of the {cfg.backbone} backbone)")
    coarsest = int(np.prod([int(s) // backbone.divisor for s in cfg.patch_size]))
    if cfg.batch_size * coarsest < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules()):
        raise InputError(None, f"the {cfg.backbone} backbone's BatchNorm needs more than one value per channel at its "
                               f"coarsest level: use batch_size >= 2 or a larger patch_size")
    task.setup(backbone)
    return task, backbone, task_cfg


def load_cases(cfg: PretrainConfig, progress: bool = False) -> list:
    from ..data.cache import load_preprocessed

    if not cfg.data:
        raise InputError(None, "no training data given (--data FOLDER)")
    cases = []
    for p in cfg.data:
        if not Path(p).exists():
            raise InputError(p, "data folder not found")
        # with a cache: int16 memory maps of the cached volumes (no float32 copy of a whole volume
        # in memory; the tasks read patches from the maps); without: float32 volumes in memory
        cases.extend(load_preprocessed(p, cfg.preprocess, cache_dir=cfg.cache_dir, kind=cfg.data_kind,
                                       progress=progress, mmap=cfg.cache_dir is not None))
    if not cases:
        raise InputError(cfg.data[0], "no cases found")
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
        "patch_size": list(cfg.patch_size),
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

    ``cases``: preprocessed cases to use instead of reading ``cfg.data`` (Python API / tests).
    ``bpr``: a BPR module to use instead of loading ``cfg.bpr_path`` (then no ``bpr/`` copy is made).
    ``stop_after``: stop after this many steps (a checkpoint is written there) without finishing,
    e.g. to split a long run into jobs; continue with ``resume=True``.
    ``probe_set``: labelled preprocessed cases for the online probe instead of ``cfg.probe_data``.
    """
    d = init_distributed(cfg.device)
    cudnn_benchmark = torch.backends.cudnn.benchmark
    try:
        with num_threads(cfg.threads):
            return _pretrain(cfg, Path(out_dir), resume, progress, force, cases, bpr, stop_after, d, probe_set)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark  # set for the run only (see _pretrain)
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _check_resume_config(saved: dict[str, Any], cfg: PretrainConfig, path: Path) -> None:
    now = to_dict(cfg)
    diff = [k for k in now if k not in _RESUME_FREE and k in saved and saved[k] != now[k]]
    if diff:
        raise InputError(path, f"--resume with a different configuration ({', '.join(sorted(diff))}); "
                               "use the same options as the interrupted run")


def _pretrain(cfg: PretrainConfig, out: Path, resume: bool, progress: bool, force: bool, cases: list | None,
              bpr: nn.Module | None, stop_after: int | None, d: Dist, probe_set: list | None = None) -> Path:
    validate_config(cfg)
    if cfg.probe_every and probe_set is None:
        if not cfg.probe_data:
            raise InputError(None, "--probe_every needs --probe_data (a labelled data folder)")
        if not Path(cfg.probe_data).exists():
            raise InputError(cfg.probe_data, "probe data folder not found")
    state_root = out / "train_state"
    ckpt = None
    if resume:
        ckpt = latest_train_state(state_root)
        if ckpt is None:
            raise InputError(out, "nothing to resume: no train_state/latest checkpoint in this folder")
    device = resolve_device(cfg.device, local_rank=d.local_rank if d.world > 1 else None)

    # build everything before touching the output folder (bad input leaves no output)
    torch.manual_seed(cfg.seed)
    task, backbone, task_cfg = build_task_and_backbone(cfg, bpr)
    has_bpr = getattr(task, "bpr", None) is not None and bpr is None and bool(getattr(cfg, "bpr_path", None))
    trains = bool(getattr(task, "trains", True))
    if cases is None and (trains or cfg.data):  # the random baseline needs no data
        cases = load_cases(cfg, progress=progress and d.main)
    if trains and not cases:
        raise InputError(None, "no training cases")
    if trains:
        task.prepare(cases, cache_dir=cfg.cache_dir, progress=progress and d.main)

    if d.main and not resume:
        check_output_path(out, force=force)
        if force and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    d.barrier()

    joint = _Joint(backbone, task).to(device)
    ema = EMA(backbone, cfg.ema_decay)
    opt = make_optimizer(joint, cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the patch size is fixed: pick the fastest kernels once
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000003 + d.rank)
    random.seed(cfg.seed * 1000003 + d.rank)
    start = 0

    if ckpt is not None:
        tensors, info = read_train_state(ckpt)
        _check_resume_config(info.get("config") or {}, cfg, ckpt)
        meta = info["meta"]
        start = int(meta["step"])
        if start > cfg.steps:
            raise InputError(ckpt, f"the checkpoint is at step {start}, beyond --steps {cfg.steps}")
        try:
            joint.load_state_dict({k: v.to(device) for k, v in unprefixed(tensors, "model.").items()}, strict=True)
            ema.load(unprefixed(tensors, "ema."))
            opt.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
        except (RuntimeError, KeyError, ValueError) as e:
            raise ModelError(ckpt, f"train state does not match this model ({str(e).splitlines()[0]})") from None
        rstates = meta.get("rng") or []
        if d.rank < len(rstates):
            # (the batches need no state: step k's batch is drawn with step_generator(seed, rank, k))
            r = rstates[d.rank]
            random.setstate(python_rng_from_json(r["python"]))
            torch.set_rng_state(tensors[f"rng.torch.{d.rank}"])
            gen.set_state(tensors[f"rng.gen.{d.rank}"])
            if device.type == "cuda" and f"rng.cuda.{d.rank}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{d.rank}"], device)
        if d.main:
            _truncate_metrics(out / "metrics.jsonl", start)

    model: nn.Module = joint
    if d.world > 1:
        unused = bool(trains and cases) and has_unused_parameters(joint, task, cases, cfg, device)
        flag = torch.tensor([float(unused)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        model = nn.parallel.DistributedDataParallel(
            joint, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(flag.item() > 0))

    if d.main:
        write_config(out, cfg, extra={"method": cfg.method, "parameters": count_parameters(backbone),
                                      "world_size": d.world})

    writer = _tensorboard(out) if (cfg.tensorboard and d.main) else None
    end = cfg.steps if stop_after is None else min(cfg.steps, max(start, int(stop_after)))
    last_saved = start if ckpt is not None else None

    def save_state(step: int) -> None:
        nonlocal last_saved
        rng_doc, rng_t = _rng_states(gen, d, device)
        if d.main:
            tensors = prefixed(joint.state_dict(), "model.")
            tensors.update(prefixed(ema.state(), "ema."))
            ot, odoc = flatten_optimizer(opt.state_dict())
            tensors.update(ot)
            tensors.update(rng_t)
            write_train_state(state_root, step, tensors, cfg,
                              {"optimizer": odoc, "rng": rng_doc, "world_size": d.world, "method": cfg.method},
                              keep=cfg.keep_checkpoints)
        last_saved = step
        d.barrier()

    def probe(step: int) -> None:
        _online_probe(cfg, joint, ema, device, d, out, step, writer, probe_set)

    if trains and start < end:
        _loop(cfg, model, joint, task, cases, opt, ema, gen, device, d, out, start, end, progress,
              writer, save_state, lambda: last_saved, probe)
    if writer is not None:
        writer.close()

    if end < cfg.steps:  # stopped early on request: the checkpoint is the result
        if last_saved != end:
            save_state(end)
        return out

    if trains and last_saved != cfg.steps and cfg.steps > 0:
        save_state(cfg.steps)

    if d.main:
        ema_backbone = {k: v for k, v in ema.state().items()}
        if not trains:  # random init: the initial weights
            ema_backbone = {k: v.detach().float() for k, v in backbone.state_dict().items()}
        if has_bpr:
            bdest = out / "bpr"
            if bdest.exists():
                shutil.rmtree(bdest)
            with staged_dir(bdest, force=True) as tmp:
                shutil.rmtree(tmp)
                copy_bpr(cfg.bpr_path, tmp)  # type: ignore[arg-type]
        with staged_dir(out / "backbone", force=True) as tmp:
            save_backbone(tmp, cfg, backbone, ema_backbone, task, task_cfg, has_bpr,
                          meta={"steps": cfg.steps, "parameters": count_parameters(backbone),
                                "seed": cfg.seed, "world_size": d.world})
    d.barrier()
    return out


def _loop(cfg, model, joint, task, cases, opt, ema, gen, device, d: Dist, out: Path, start: int, end: int,
          progress: bool, writer, save_state, last_saved, probe) -> None:
    """Steps ``start .. end - 1``. Nothing here waits for the device between log steps: the loss,
    metrics and gradient norm are summed on the device and the non-finite check is a device flag;
    both are brought to the host every ``log_every`` steps and before every checkpoint or probe (a
    NaN is reported with the step it appeared at and never reaches a checkpoint)."""
    from tqdm import tqdm

    from .data import StepBatches, step_batches, to_device

    autocast = functools.partial(bf16_autocast, device, cfg.bf16)
    log = MetricLog()
    bar = tqdm(total=end, initial=start, desc=f"pretrain {cfg.method}", unit="step",
               disable=not (progress and d.main), dynamic_ncols=True)
    batches = step_batches(StepBatches(task.sample_batch, cases, cfg.batch_size, tuple(cfg.patch_size), cfg.seed, d.rank),
                           start, end, workers=int(cfg.workers), pin_memory=device.type == "cuda",
                           prefetch_factor=int(cfg.prefetch_factor))
    never = torch.iinfo(torch.int64).max
    first_bad = torch.full((), never, dtype=torch.int64, device=device)  # first step with a non-finite loss
    bad_loss = torch.zeros((), dtype=torch.float32, device=device)  # its loss

    def check_finite() -> None:
        flag = first_bad.clone()
        if d.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        at = int(flag.item())
        if at == never:
            return
        value = float(bad_loss.item()) if int(first_bad.item()) == at else float("nan")
        ls = last_saved()
        where = (f"the last good checkpoint (step {ls}) is kept in {out / 'train_state'}; "
                 "continue from it with --resume (e.g. with a lower --lr)") if ls else \
            "no checkpoint had been written yet"
        raise TrainingError(f"loss is {value} at step {at}: training stopped; {where}")

    t0 = time.perf_counter()
    n_since = 0
    model.train()
    try:
        for step, batch in zip(range(start, end), batches):
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = to_device(batch, device)
            with autocast():
                loss, metrics = model(batch, gen)
            lval = loss.detach().float()
            newly = torch.isfinite(lval).logical_not() & (first_bad == never)
            first_bad = torch.where(newly, torch.full_like(first_bad, step + 1), first_bad)
            bad_loss = torch.where(newly, lval, bad_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = None
            if cfg.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(joint.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(joint.backbone, step)
            log.add({"loss": lval})
            log.add(metrics)
            if gnorm is not None:
                log.add({"grad_norm": gnorm.detach()})
            n_since += 1
            done = step + 1
            bar.update(1)
            is_log = done % cfg.log_every == 0 or done == end
            is_ckpt = done == end or done % cfg.checkpoint_every == 0
            is_probe = bool(cfg.probe_every) and done % cfg.probe_every == 0
            if is_log or is_ckpt or is_probe:
                check_finite()
            if is_log:
                row = log.reduce(d, device)
                dt = time.perf_counter() - t0
                pps = n_since * cfg.batch_size * d.world / max(dt, 1e-9)
                row = {"step": done, **row, "lr": lr, "patches_per_s": pps,
                       "voxels_per_s": pps * int(np.prod(cfg.patch_size))}
                if d.main:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    bar.set_postfix(loss=f"{row['loss']:.4f}", patches_s=f"{pps:.1f}")
                    if writer is not None:
                        for k, v in row.items():
                            if k != "step":
                                writer.add_scalar(k, v, done)
                t0 = time.perf_counter()
                n_since = 0
            if is_probe:
                probe(done)
            if is_ckpt:
                save_state(done)
    finally:
        batches.close()
        bar.close()


def _rng_states(gen: torch.Generator, d: Dist, device: torch.device):
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


def _truncate_metrics(path: Path, step: int) -> None:
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


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        import warnings

        warnings.warn("tensorboard is not installed: --tensorboard ignored (pip install tensorboard)")
        return None
    return SummaryWriter(str(out / "tensorboard"))


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
