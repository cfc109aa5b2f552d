"""Config sections shared by the training loops: the optimiser and the run's machinery.

A training config holds them as sections (``cfg.optim.lr``, ``cfg.runtime.device``; see
:mod:`voxdiff.core.config`) and hands them to the engine with :func:`engine_settings`. The defaults
are pretraining's; a loop with other defaults gives its own ``default_factory``
(``field(default_factory=lambda: OptimConfig(lr=1e-3))``): a partial section in a YAML file or a
saved config keeps the loop's defaults for the fields it leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, gradient clipping and an EMA of the weights.

    Args:
        steps: optimiser steps.
        lr: peak learning rate (AdamW).
        warmup_steps: linear warm-up steps; then cosine decay to min_lr_ratio * lr.
        min_lr_ratio: final learning rate as a fraction of lr.
        weight_decay: AdamW weight decay.
        grad_clip: max gradient norm (0 = off).
        ema_decay: EMA decay of the weights saved as the final model.
    """

    steps: int = 1000
    lr: float = 2e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999


@dataclass
class RuntimeConfig:
    """Where and how a training run executes, checkpoints and logs (nothing here changes the
    result, except ``bf16`` on devices that compute it natively).

    Args:
        device: auto | cpu | cuda | cuda:N.
        threads: intra-op CPU threads (0 = torch's default; 1 is faster on a busy shared machine).
        bf16: bf16 autocast where the device has native bf16 (about 2x faster there, same loss
            curve); fp32 elsewhere (emulated bf16 is many times slower, see voxdiff.core.precision).
        compile: ``torch.compile`` the trained module before training (compiling takes minutes on
            a CPU and pays off on long GPU runs).
        log_every: steps between metric lines.
        checkpoint_every: steps between train-state checkpoints (the last step is always saved).
        keep_checkpoints: how many train-state checkpoints to keep.
        tensorboard: also write tensorboard logs (if tensorboard is installed).
    """

    RENAMED: ClassVar[dict[str, str]] = {"amp": "bf16"}  # the old name of the precision switch

    device: str = "auto"
    threads: int = 0
    bf16: bool = True
    compile: bool = False
    log_every: int = 10
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    tensorboard: bool = False


def engine_settings(optim: OptimConfig, runtime: RuntimeConfig) -> dict[str, Any]:
    """The :class:`~voxdiff.core.engine.EngineConfig` keyword arguments of the two sections."""
    return dict(steps=optim.steps, lr=optim.lr, warmup_steps=optim.warmup_steps, min_lr_ratio=optim.min_lr_ratio,
                weight_decay=optim.weight_decay, grad_clip=optim.grad_clip, ema_decay=optim.ema_decay,
                bf16=runtime.bf16, device=runtime.device, threads=runtime.threads, compile=bool(runtime.compile),
                log_every=runtime.log_every, checkpoint_every=runtime.checkpoint_every,
                keep_checkpoints=runtime.keep_checkpoints, tensorboard=runtime.tensorboard)
