"""Self-supervised training of the body part regressors on unlabelled CT.

``train_bpr(cfg, out_dir)`` writes into ``out_dir``::

    model.safetensors, model.json   # the calibrated, frozen-ready model (load_bpr(out_dir))
    train_state/                    # the training engine's train state for --resume (voxdiff.core.trainstate)
    config.yaml                     # the resolved BPRTrainConfig
    log.csv                         # step, lr, loss and its parts
    metrics.jsonl                   # the same, one JSON line per step (the engine's metric lines)
    metrics.json                    # final loss, calibration, timing

Training runs on the engine (:mod:`voxdiff.core.engine`) as ``cfg.optim`` says (by default AdamW
with weight decay on every parameter, 5 % linear warm-up then cosine decay, gradient norms clipped
at 5, no EMA) and ``cfg.runtime`` (CPU, one thread, a train state every 100 steps). Every step
draws its randomness from ``numpy.random.default_rng([seed, step])``, so a resumed run draws the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..core.config import flatten, read_config, read_config_doc, to_dict, write_config
from ..core.engine import Engine, EngineConfig, TrainTask, old_train_state_error
from ..core.errors import InputError, ModelError, TrainingError
from ..core.layers import freeze
from ..core.outputs import atomic_write, atomic_write_json, check_output_path, run_folder
from ..core.runtime import num_threads
from ..core.sections import OptimConfig, RuntimeConfig, engine_settings
from ..core.trainstate import latest_train_state
from ..data.preprocess import HU_WINDOW, PreprocessConfig
from . import losses
from .fields import model_signature
from .inference import ape_volume, ct_problem, slice_scores_volume
from .models import ANCHOR_FITS, BPR_KINDS, CONTEXT_FILLS, BodyPartRegressor, body_threshold, build_bpr, save_bpr
from .sampling import Volume, ape_views, random_crop, sample_points, slice_views


@dataclass
class BPRData:
    """What the training volumes come from, and how each step samples and augments them.

    Args:
        path: data folder (any layout voxdiff.data reads: nnU-Net, BTCV, a folder of CTs...).
            ``--data DIR`` on the command line.
        extra: more data folders whose images are added to the training set (e.g. real CT beside
            phantoms).
        extra_ratio: fraction of the volumes drawn at each step that come from ``extra`` (null:
            every volume equally often, whichever folder it is in). E.g. 0.5 with a few real CTs
            beside many phantoms shows the real ones as often as all the phantoms together.
        cache_dir: where preprocessed volumes are cached (default: the data layer's default).
        batch_size: volumes per step (each gives two augmented views; ape: ``ape_crops`` crops)
            (null: slice 8, ape 4).
        slice_patch: in-plane crop size (voxels) for the slice model.
        slices_per_sample: axial slices drawn per volume for the slice model.
        ape_patch: largest cube crop size (voxels) for the ape model (also its sliding-window size).
        ape_patch_min: smallest crop size: each step draws its crop size from [ape_patch_min,
            ape_patch] so the model places small patches too (the diffusion stage calls it on its own
            patches) (null: ape_patch // 2).
        ape_points: voxels sampled per crop for the ape distance losses.
        ape_crops: crops per volume and step for the ape model: two overlapping views (same-voxel
            agreement) and ``ape_crops - 2`` more anywhere in the volume (long-range distances).
        zoom: crops are resampled at a random zoom in [1/zoom, zoom] (scale augmentation) (null: slice
            1.15, ape 1 - the ape model's in-patch distances are the model spacing by construction).
        intensity_aug: strength of contrast/brightness/gamma/noise augmentation (0 = off).
        texture_aug: slice model: strength of the reconstruction-kernel (in-plane blur / sharpening)
            and correlated-noise augmentation (0 = off; 1 = each applied to half of the views).
        slice_fov_aug: slice model with neighbouring slices: share of the views drawn as from a
            shorter scan (a random z-range of the volume, at least 96 mm, whose end slices are
            repeated beyond it), so that the model learns what a scan's ends look like at any
            height and scores near them as elsewhere (0 = off: only the volumes' own ends).
        slice_fov_pair: with ``slice_fov_aug``, only one of the two views is drawn from the shorter
            scan; the other takes the same slices' neighbours from a wider range (up to the whole
            volume), so that the views' agreement (``task.w_consistency``) trains scores that do not
            move with the field of view near a scan's ends (false: both views from the shorter scan).
        slice_fov_pair_range: with ``slice_fov_pair``, where the other view's neighbours come from:
            "wider" (a random range from the shorter scan's up to the whole volume) or "whole" (the
            whole volume: the slices scored as in the longest scan there is).
        slice_trunc_aug: slice model: share of the views whose in-plane field of view is truncated
            (outside a random box keeping half to all of each axis: the window's floor, as a narrow
            reconstruction or crop padded back to the tile), the other view of the same slices kept
            whole, so that the views' agreement trains scores that do not move with the in-plane field
            of view (0 = off).
    """

    VALUE_FIELD: ClassVar[str] = "path"  # `data: folder` (the flat layout) sets the path

    path: str = ""
    extra: tuple[str, ...] = ()
    extra_ratio: float | None = None
    cache_dir: str | None = None
    batch_size: int | None = None
    slice_patch: int = 48
    slices_per_sample: int = 8
    ape_patch: int = 64
    ape_patch_min: int | None = None
    ape_points: int = 256
    ape_crops: int = 4
    zoom: float | None = None
    intensity_aug: float = 0.5
    texture_aug: float = 0.0
    slice_fov_aug: float = 0.0
    slice_fov_pair: bool = False
    slice_fov_pair_range: str = "wider"
    slice_trunc_aug: float = 0.0


@dataclass
class BPROptim(OptimConfig):
    """:class:`~voxdiff.core.sections.OptimConfig` with BPR training's defaults: AdamW with weight
    decay on every parameter, linear warm-up then cosine decay to ``min_lr_ratio * lr``, gradient
    norms clipped at ``grad_clip``, no EMA.

    Args:
        steps: optimisation steps (null: slice 2400, ape 1200; about 3 and 15 minutes on one CPU
            thread at the default sizes on 3 mm phantoms).
        warmup_steps: linear warm-up steps (null: 5 % of ``steps``, at least 1).
        ema_decay: must stay null: the trained weights are the model (no EMA).
    """

    steps: int | None = None  # type: ignore[assignment]
    lr: float = 2e-3
    warmup_steps: int | None = None  # type: ignore[assignment]
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    ema_decay: float | None = None  # type: ignore[assignment]


@dataclass
class BPRModel:
    """The regressor network.

    Args:
        channels: feature channels per level of the network (null: slice (16, 32, 48, 64), ape (16, 32, 64)).
        ape_input_pool: ape: the encoder sees the crop average-pooled by this factor (more context
            for the same cost: where a patch lies needs no fine detail).
        slice_context: slice: neighbouring slices on each side (``slice_context_step`` voxels of the
            model spacing apart) given with each slice as input channels, so that the network sees which way the anatomy
            changes along z (0: one slice at a time, as in Yan 2018).
        slice_context_step: slice: voxels of the model spacing between those neighbouring slices
            (1: adjacent slices; 2 doubles the slab the model sees for the same input channels).
        slice_context_fill: slice with context: what stands for a neighbouring slice beyond the scan's
            end: "repeat" (the end slice repeated) or "mask" (a constant below the intensity window, so
            that the network knows that anatomy is unseen rather than seeing a false copy).
    """

    channels: tuple[int, ...] | None = None
    ape_input_pool: int = 2
    slice_context: int = 0
    slice_context_step: int = 1
    slice_context_fill: str = "repeat"


@dataclass
class BPRTaskOptions:
    """The self-supervised losses, the calibration and the ape model's S anchor.

    Args:
        heuristic_b: slice loss: target score step per mm (one score unit per 1/b mm).
        w_order: weight of the order (slice: Schuhegger heuristic) / displacement (ape) loss (null: 1).
        w_distance: weight of the distance loss (slice: linearity in z; ape: pairwise distances)
            (null: slice 0.05, ape 1).
        w_consistency: weight of the same-voxel/same-slice agreement between the two views
            (null: slice 0.03, ape 1).
        consistency_stop_grad: slice: the agreement pulls only view a toward view b (the fuller view:
            the wider scan of ``data.slice_fov_pair``, the whole in-plane crop of
            ``data.slice_trunc_aug``), whose scores are a fixed target with no gradient through them.
            The shorter view learns to score as the fuller one does (false: each view pulled toward
            the other). Measured, the shared network still flattens its scores as the weight grows
            (docs/BPR.md, "Training the ends of shorter scans ..."): ``slice_teacher`` gives a fixed target.
        slice_teacher: slice: folder of a trained slice model (one model or an ensemble, with the same
            neighbouring slices and preprocessing) whose scores of view b, in mm of its calibration, are
            the target of both views' scores (distillation, weight ``w_distill``). With
            ``data.slice_fov_pair`` (range "whole") the model learns to score the slices near a shorter
            scan's end as the teacher scores them in the whole volume; an ensemble teacher gives one
            model its ordering (null: no teacher).
        w_distill: weight of the distillation loss (with ``slice_teacher``).
        calib_range_mm: ape: mm per calibrated unit (the training median maps to 0.5).
        anchor: ape: where the S offset of a scan comes from: "window" (the votes of the network's
            training-size windows, as R and A) or "slice" (per-slice votes of an embedded slice model,
            ``slice_model``, mapped to mm by a calibrated piecewise-linear curve: field-of-view
            consistent; see docs/BPR.md).
        slice_model: ape with anchor "slice": folder of a trained slice model ('voxdiff bpr train
            --kind slice') at the same spacing and HU window; its weights are copied into the ape model.
        anchor_knots: ape with anchor "slice": knots of the score -> S curve (calibrated on the
            training volumes; 2 = a straight line).
        anchor_fit: ape with anchor "slice": "line" (S of a scan is a straight line through its slices'
            estimates, slope against physical z clipped to ``anchor_slope_range``), "offset" (slope
            1: exactly physical S distances, only the offset from the slices) or "local" (a
            local-linear fit of the slices' estimates, kernel SD ``anchor_bandwidth_mm``: S follows a
            scan whose scores climb at other rates in other regions).
        anchor_slope_range: ape with anchor "slice" and anchor_fit "line" or "local": the slopes allowed
            (of the whole scan's line, or of each local fit).
        anchor_bandwidth_mm: ape with anchor "slice" and anchor_fit "local": SD (mm along z) of the
            Gaussian kernel of the local fit.
    """

    heuristic_b: float = 0.01
    w_order: float | None = None
    w_distance: float | None = None
    w_consistency: float | None = None
    consistency_stop_grad: bool = False
    slice_teacher: str | None = None
    w_distill: float = 1.0
    calib_range_mm: float = 300.0
    anchor: str = "window"
    slice_model: str | None = None
    anchor_knots: int = 8
    anchor_fit: str = "local"
    anchor_slope_range: tuple[float, float] = (0.7, 1.3)
    anchor_bandwidth_mm: float = 45.0


def _bpr_preprocess() -> PreprocessConfig:
    return PreprocessConfig(spacing=(3.0, 3.0, 3.0), hu_window=HU_WINDOW, crop_to_body=True)


def _bpr_runtime() -> RuntimeConfig:
    return RuntimeConfig(device="cpu", threads=1, bf16=False, log_every=1, checkpoint_every=100, keep_checkpoints=1)


@dataclass
class BPRTrainConfig:
    """Training of a body part regressor (self-supervised, no labels needed), in sections
    (``cfg.optim.lr``; on the command line ``--optim.lr``). Configs saved before the sections (flat:
    ``steps``, ``spacing``, ``w_order``, ...) load too (:mod:`voxdiff.core.config`).

    Args:
        kind: "slice" (one score per axial slice) or "ape" (3 anatomical coordinates per voxel).
        seed: random seed (initialisation and sampling).
        members: slice: train this many models with seeds ``seed``, ``seed + 1``, ... and write their
            ensemble (the mean of their calibrated scores, as ``voxdiff bpr ensemble``) as the model;
            each member stays a model folder of its own under ``OUT/members/seed-S``, and ``--resume``
            continues from the first member that is not finished. 1 (default): one model.
        data: training data, crops, batches and augmentation.
        preprocess: the grid the model works at (stored in the model; predict/pretraining use it):
            ``spacing`` (mm; coarse spacing keeps CPU training fast), ``hu_window`` (mapped to [0, 1]),
            ``crop_to_body`` (crop volumes to the body before training).
        optim: optimiser and schedule (:class:`BPROptim`).
        model: the network's size.
        task: loss weights, calibration and the ape model's S anchor.
        runtime: where and how training runs: ``device`` (cpu only), ``threads`` (torch CPU threads
            during training; 0 = leave torch's setting; small networks train fastest on one thread,
            and many times faster than on two when the CPU is shared), ``checkpoint_every`` (steps
            between train-state checkpoints), ``log_every`` (steps between log.csv lines), ...
    """

    SECTIONS: ClassVar[tuple[str, ...]] = ("data", "preprocess", "optim", "model", "task", "runtime")
    # flat (pre-sections) names that differ from the field's name
    FLAT_NAMES: ClassVar[dict[str, str]] = {"extra_data": "data.extra"}

    kind: str = "slice"
    seed: int = 0
    members: int = 1
    data: BPRData = field(default_factory=BPRData)
    preprocess: PreprocessConfig = field(default_factory=_bpr_preprocess)
    optim: BPROptim = field(default_factory=BPROptim)
    model: BPRModel = field(default_factory=BPRModel)
    task: BPRTaskOptions = field(default_factory=BPRTaskOptions)
    runtime: RuntimeConfig = field(default_factory=_bpr_runtime)


# Per-kind values of the config fields left null (dotted: section.field). ape: 3 levels after 2x
# pooling = cells of 16 voxels, so 32..64 voxel crops hold 2..4 cells per axis.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "slice": {"optim.steps": 2400, "data.batch_size": 8, "data.zoom": 1.15, "model.channels": (16, 32, 48, 64),
              "task.w_order": 1.0, "task.w_distance": 0.05, "task.w_consistency": 0.03},
    "ape": {"optim.steps": 1200, "data.batch_size": 4, "data.zoom": 1.0, "model.channels": (16, 32, 64),
            "task.w_order": 1.0, "task.w_distance": 1.0, "task.w_consistency": 1.0},
}


def resolved(cfg: BPRTrainConfig) -> BPRTrainConfig:
    """The config with the kind's defaults filled in for null fields, and the warm-up (null: 5 % of
    the steps) (what is written to config.yaml)."""
    from dataclasses import replace

    fill: dict[str, dict[str, Any]] = {}
    for path, value in KIND_DEFAULTS.get(cfg.kind, KIND_DEFAULTS["slice"]).items():
        sec, _, name = path.partition(".")
        if getattr(getattr(cfg, sec), name) is None:
            fill.setdefault(sec, {})[name] = value
    out = replace(cfg, **{sec: replace(getattr(cfg, sec), **vals) for sec, vals in fill.items()})
    if out.optim.warmup_steps is None:
        out = replace(out, optim=replace(out.optim, warmup_steps=max(1, int(0.05 * int(out.optim.steps)))))  # type: ignore[arg-type]
    return out


def loss_weights(cfg: BPRTrainConfig) -> tuple[float, float, float]:
    """(order/displacement, distance, consistency) weights with the kind's defaults filled in."""
    t = resolved(cfg).task
    return float(t.w_order), float(t.w_distance), float(t.w_consistency)  # type: ignore[arg-type]


def _validate(cfg: BPRTrainConfig) -> None:
    d, o, t, r = cfg.data, cfg.optim, cfg.task, cfg.runtime
    if cfg.kind not in BPR_KINDS:
        raise InputError(None, f"--kind must be one of {list(BPR_KINDS)}, got {cfg.kind!r}")
    if int(cfg.members) < 1:
        raise InputError(None, f"members must be >= 1, got {cfg.members}")
    if int(cfg.members) > 1 and cfg.kind != "slice":
        raise InputError(None, f"members: ensembles are of slice models (--kind slice), got --kind {cfg.kind}")
    if (o.steps is not None and o.steps < 1) or (d.batch_size is not None and d.batch_size < 1):
        raise InputError(None, "optim.steps and data.batch_size must be >= 1")
    if o.warmup_steps is not None and o.warmup_steps < 0:
        raise InputError(None, "optim.warmup_steps must be >= 0")
    if o.lr <= 0 or o.grad_clip < 0:
        raise InputError(None, "optim.lr must be > 0 and optim.grad_clip >= 0")
    if o.ema_decay is not None:
        raise InputError(None, "optim.ema_decay: BPR training keeps no EMA of the weights (leave it null)")
    if str(r.device) != "cpu":
        raise InputError(None, f"runtime.device: BPR training runs on the CPU (cpu), got {r.device!r}")
    if r.log_every < 1 or r.checkpoint_every < 1 or r.keep_checkpoints < 1:
        raise InputError(None, "runtime.log_every, runtime.checkpoint_every and runtime.keep_checkpoints must be >= 1")
    if d.slices_per_sample < 3 and cfg.kind == "slice":
        raise InputError(None, "data.slices_per_sample must be >= 3")
    if cfg.model.slice_context < 0:
        raise InputError(None, f"model.slice_context must be >= 0, got {cfg.model.slice_context}")
    if not 0.0 <= d.slice_fov_aug <= 1.0:
        raise InputError(None, f"data.slice_fov_aug must be in [0, 1], got {d.slice_fov_aug}")
    if d.slice_fov_aug > 0 and not (cfg.kind == "slice" and cfg.model.slice_context > 0):
        raise InputError(None, "data.slice_fov_aug needs a slice model with neighbouring slices (--model.slice_context > 0)")
    if not 0.0 <= d.slice_trunc_aug <= 1.0:
        raise InputError(None, f"data.slice_trunc_aug must be in [0, 1], got {d.slice_trunc_aug}")
    if d.slice_trunc_aug > 0 and cfg.kind != "slice":
        raise InputError(None, "data.slice_trunc_aug is for the slice model (--kind slice)")
    if d.slice_fov_pair and not d.slice_fov_aug > 0:
        raise InputError(None, "data.slice_fov_pair needs data.slice_fov_aug > 0 (the share of views from a shorter scan)")
    if d.slice_fov_pair_range not in ("wider", "whole"):
        raise InputError(None, f"data.slice_fov_pair_range must be 'wider' or 'whole', got {d.slice_fov_pair_range!r}")
    if d.slice_fov_pair_range != "wider" and not d.slice_fov_pair:
        raise InputError(None, "data.slice_fov_pair_range needs data.slice_fov_pair true")
    if t.slice_teacher and cfg.kind != "slice":
        raise InputError(None, "task.slice_teacher is for the slice model (--kind slice)")
    if not float(t.w_distill) >= 0.0:
        raise InputError(None, f"task.w_distill must be >= 0, got {t.w_distill}")
    if t.consistency_stop_grad and cfg.kind != "slice":
        raise InputError(None, "task.consistency_stop_grad is for the slice model (--kind slice), whose view b is the fuller one")
    if cfg.model.slice_context_step < 1:
        raise InputError(None, f"model.slice_context_step must be >= 1, got {cfg.model.slice_context_step}")
    if cfg.model.slice_context_fill not in CONTEXT_FILLS:
        raise InputError(None, f"model.slice_context_fill must be one of {list(CONTEXT_FILLS)}, got {cfg.model.slice_context_fill!r}")
    if cfg.model.slice_context_fill != "repeat" and not (cfg.kind == "slice" and cfg.model.slice_context > 0):
        raise InputError(None, "model.slice_context_fill needs a slice model with neighbouring slices (--model.slice_context > 0)")
    if d.ape_crops < 2:
        raise InputError(None, f"data.ape_crops must be >= 2 (two overlapping views), got {d.ape_crops}")
    if d.zoom is not None and not float(d.zoom) >= 1.0:
        raise InputError(None, f"data.zoom must be >= 1 (crops are zoomed within [1/zoom, zoom]), got {d.zoom}")
    if int(d.ape_points) < 8:
        raise InputError(None, f"data.ape_points must be >= 8 (voxels per crop for the distance losses), got {d.ape_points}")
    if not float(d.intensity_aug) >= 0 or not float(d.texture_aug) >= 0:
        raise InputError(None, f"data.intensity_aug and data.texture_aug must be >= 0, got {d.intensity_aug}, {d.texture_aug}")
    if min(d.slice_patch, d.ape_patch, d.ape_patch_min or 8) < 8:
        raise InputError(None, "data.slice_patch, data.ape_patch and data.ape_patch_min must be >= 8 voxels")
    spacing = cfg.preprocess.spacing
    if t.heuristic_b <= 0 or spacing is None or any(s <= 0 for s in spacing):
        raise InputError(None, "task.heuristic_b and preprocess.spacing must be positive")
    if d.extra_ratio is not None and not 0.0 <= d.extra_ratio <= 1.0:
        raise InputError(None, f"data.extra_ratio must lie in [0, 1], got {d.extra_ratio}")
    if t.anchor not in ("window", "slice"):
        raise InputError(None, f"--task.anchor must be 'window' or 'slice', got {t.anchor!r}")
    if t.anchor == "slice" and cfg.kind != "ape":
        raise InputError(None, "--task.anchor slice is for --kind ape (it anchors the ape S coordinate on a slice model)")
    if t.anchor == "slice" and not t.slice_model:
        raise InputError(None, "--task.anchor slice needs --task.slice_model DIR (a model from 'voxdiff bpr train --kind slice')")
    if t.anchor_knots < 2:
        raise InputError(None, f"task.anchor_knots must be >= 2, got {t.anchor_knots}")
    if t.anchor_fit not in ANCHOR_FITS:
        raise InputError(None, f"--task.anchor_fit must be one of {', '.join(ANCHOR_FITS)}, got {t.anchor_fit!r}")
    lo, hi = (float(v) for v in t.anchor_slope_range)
    if not 0 < lo <= 1.0 <= hi:
        raise InputError(None, f"task.anchor_slope_range must be positive and contain 1, got {list(t.anchor_slope_range)}")
    if not float(t.anchor_bandwidth_mm) > 0.0:
        raise InputError(None, f"task.anchor_bandwidth_mm must be > 0, got {t.anchor_bandwidth_mm}")


def _matching_slice_model(path: str, cfg: BPRTrainConfig, what: str):
    """A trained slice model at ``cfg``'s spacing and HU window (refused otherwise, naming ``path``)."""
    from .models import load_bpr

    sm = load_bpr(path, kind="slice")
    sp, win = tuple(float(v) for v in sm.preprocess["spacing"]), tuple(float(v) for v in sm.preprocess["hu_window"])
    spacing, hu_window = list(cfg.preprocess.spacing or ()), list(cfg.preprocess.hu_window)
    if sp != tuple(float(v) for v in spacing) or win != tuple(float(v) for v in hu_window):
        raise InputError(path, f"the slice model works at spacing {list(sp)} and HU window {list(win)}; "
                               f"{what} at {spacing} and {hu_window}: train a slice model with "
                               "the same --preprocess.spacing and --preprocess.hu_window")
    return sm


def load_anchor_slice_model(cfg: BPRTrainConfig):
    """The slice model that anchors an ape model's S coordinate (checked against ``cfg``'s preprocessing)."""
    return _matching_slice_model(cfg.task.slice_model, cfg, "this ape model")  # type: ignore[arg-type]


def load_slice_teacher(cfg: BPRTrainConfig):
    """The frozen teacher of ``task.slice_teacher`` (checked against ``cfg``'s preprocessing and
    neighbouring slices: it scores the same stacked views as the model trained)."""
    path = str(cfg.task.slice_teacher)
    sm = _matching_slice_model(path, cfg, "this slice model")
    mine = (int(cfg.model.slice_context), int(cfg.model.slice_context_step) if cfg.model.slice_context else 1)
    theirs = (int(sm.context), int(sm.context_step) if sm.context else 1)
    if mine != theirs:
        raise InputError(path, f"the teacher takes {theirs[0]} neighbouring slices {theirs[1]} apart on each side, this "
                               f"model {mine[0]} {mine[1]} apart: train with the teacher's --model.slice_context and "
                               "--model.slice_context_step")
    return freeze(sm)


def preprocess_config(cfg: BPRTrainConfig) -> PreprocessConfig:
    """The preprocessing of the training volumes (``cfg.preprocess``, tuples as saved in the model)."""
    from dataclasses import replace

    pp = cfg.preprocess
    return replace(pp, spacing=tuple(pp.spacing) if pp.spacing is not None else None, hu_window=tuple(pp.hu_window))


def load_training_cases(cfg: BPRTrainConfig) -> list:
    """Preprocessed cases of ``cfg.data.path`` and ``cfg.data.extra`` (through the data layer's cache)."""
    from ..data.cache import load_preprocessed

    pp = preprocess_config(cfg)
    folders = [f for f in (cfg.data.path, *cfg.data.extra) if f]
    if not folders:
        raise InputError(None, "no training data: pass --data DIR")
    cases = []
    for k, f in enumerate(folders):
        if not Path(f).exists():
            raise InputError(f, "data folder not found")
        got = load_preprocessed(f, pp, cache_dir=cfg.data.cache_dir)
        for c in got:
            c.meta.extra["bpr_group"] = 1 if (k > 0 or not cfg.data.path) else 0
        cases += got
    return cases


def cases_to_volumes(cases: list, hu_window, min_size: tuple[int, int, int] = (8, 8, 4), where: str | None = None) -> list[Volume]:
    """Preprocessed cases (HU) -> in-memory volumes in [0, 1]; unusable ones are skipped with a warning."""
    from ..data.preprocess import hu_to_unit

    vols = []
    for c in cases:
        cid = getattr(c.meta, "case_id", "?")
        problem = ct_problem(c.image)
        if problem is None and any(s < m for s, m in zip(c.image.shape, min_size)):
            problem = f"volume {tuple(c.image.shape)} is smaller than {min_size} voxels at the model spacing"
        if problem:
            warnings.warn(f"skipping case {cid}: {problem}", stacklevel=2)
            continue
        unit = torch.from_numpy(hu_to_unit(c.image, hu_window))[None, None].contiguous()
        vols.append(Volume(unit, np.asarray(c.meta.affine, dtype=np.float64), cid,
                           int((getattr(c.meta, "extra", None) or {}).get("bpr_group", 0))))
    if not vols:
        raise InputError(where, "no usable CT volumes for training (see the warnings above)")
    return vols


# ------------------------------------------------------------------------------------------ steps

def draw_volumes(vols: list[Volume], n: int, rng: np.random.Generator, extra_ratio: float | None = None) -> np.ndarray:
    """Indices of ``n`` training volumes: uniform, or a fraction ``extra_ratio`` from the extra-data
    group (uniform within each group) when both groups are present."""
    groups = np.array([v.group for v in vols])
    extra, main = np.flatnonzero(groups == 1), np.flatnonzero(groups == 0)
    if extra_ratio is None or not len(extra) or not len(main):
        return rng.integers(len(vols), size=n)
    pick_extra = rng.random(n) < float(extra_ratio)
    return np.where(pick_extra, extra[rng.integers(len(extra), size=n)], main[rng.integers(len(main), size=n)])


def slice_step(model, vols: list[Volume], cfg: BPRTrainConfig, rng: np.random.Generator,
               teacher: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One slice-model step: order, distance and agreement losses on two views of each volume's
    slices; with a ``teacher`` (``task.slice_teacher``) also both views' scores against the teacher's
    scores of view b in the model's raw unit (mm times ``task.heuristic_b``)."""
    d = cfg.data
    idx = draw_volumes(vols, d.batch_size, rng, d.extra_ratio)  # type: ignore[arg-type]
    va, vb, zs, oa, ob = [], [], [], [], []
    for i in idx:
        a, b, z, out_a, out_b = slice_views(
            vols[i], d.slice_patch, d.slices_per_sample, rng, d.zoom, d.intensity_aug, d.texture_aug,
            context=model.context, context_step=model.context_step, fov_aug=d.slice_fov_aug, fov_pair=d.slice_fov_pair,
            trunc_aug=d.slice_trunc_aug, fov_pair_range=d.slice_fov_pair_range, return_outside=True)
        va.append(a)
        vb.append(b)
        zs.append(z)
        oa.append(out_a)
        ob.append(out_b)
    x = torch.cat(va + vb)
    outside = torch.stack(oa + ob)  # (2B, K * (2c + 1)): the stacked slices beyond each view's scan
    s = model.slice_scores_raw(x, stacked=True, outside=outside)
    sa, sb = s[: len(idx)], s[len(idx):]
    z = torch.stack(zs)
    hb = cfg.task.heuristic_b
    l_order = 0.5 * (losses.slice_heuristic_loss(sa, z, b=hb) + losses.slice_heuristic_loss(sb, z, b=hb))
    l_dist = 0.5 * (losses.slice_distance_loss(sa, z) + losses.slice_distance_loss(sb, z))
    l_cons = losses.consistency_loss(sa, sb.detach() if cfg.task.consistency_stop_grad else sb)
    wo, wd, wc = loss_weights(cfg)
    loss = wo * l_order + wd * l_dist + wc * l_cons
    parts = {"order": l_order.item(), "distance": l_dist.item(), "consistency": l_cons.item()}
    if teacher is not None:
        with torch.no_grad():
            target = teacher.slice_scores(x[len(idx):], stacked=True, outside=outside[len(idx):]) * (teacher.mm_per_unit * hb)  # view b
        l_distill = 0.5 * (losses.consistency_loss(sa, target) + losses.consistency_loss(sb, target))
        loss = loss + float(cfg.task.w_distill) * l_distill
        parts["distill"] = l_distill.item()
    return loss, parts


def ape_crop_size(cfg: BPRTrainConfig, cell: int, rng: np.random.Generator) -> int:
    """A crop size in [ape_patch_min, ape_patch]: first a number of encoder cells per axis (uniform
    over those that fit, so every count the sliding window meets is trained as often), then an
    offset within one cell."""
    hi = int(cfg.data.ape_patch)
    lo = min(int(cfg.data.ape_patch_min if cfg.data.ape_patch_min is not None else hi // 2), hi)
    counts = list(range(max(1, -(-lo // cell)), hi // cell + 1))
    if not counts:
        return int(rng.integers(lo, hi + 1))
    k = int(rng.choice(counts))
    return int(k * cell + rng.integers(0, min(cell, hi - k * cell + 1)))


def ape_step(model, vols: list[Volume], cfg: BPRTrainConfig, rng: np.random.Generator,
             teacher: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One ape training step (``teacher``: the slice model's signature; the ape model has none)."""
    if teacher is not None:
        raise ValueError("the ape model trains without a slice teacher (task.slice_teacher is for --kind slice)")
    d = cfg.data
    idx = draw_volumes(vols, d.batch_size, rng, d.extra_ratio)  # type: ignore[arg-type]
    extra = max(0, int(d.ape_crops) - 2)
    size = ape_crop_size(cfg, int(model.stride[0]), rng)
    views = [ape_views(vols[i], size, d.ape_points, rng, d.zoom, d.intensity_aug) for i in idx]
    others = [[random_crop(vols[i], size, d.ape_points, rng, d.zoom, d.intensity_aug) for _ in range(extra)]
              for i in idx]
    b = len(views)
    crops = [v.view_a for v in views] + [v.view_b for v in views] + [o[0] for row in others for o in row]
    # one view per crop (unbind: its backward stacks the crops' gradients once; slicing ``out[k:k+1]``
    # per lookup made each lookup's backward fill a zero gradient of the whole batch: 3x the backward)
    out = model.raw(torch.cat(crops)).unbind(0)
    unit_mm = model.raw_unit_mm
    emb, pos, ca, cb = [], [], [], []
    for k, v in enumerate(views):
        oa, ob = out[k][None], out[b + k][None]
        e = [sample_points(oa, v.pts_a), sample_points(ob, v.pts_b)]
        p = [v.pos_a, v.pos_b]
        for j, (_, pts, wpos) in enumerate(others[k]):
            e.append(sample_points(out[2 * b + k * extra + j][None], pts))
            p.append(wpos)
        emb.append(torch.cat(e))
        pos.append(torch.cat(p))
        ca.append(sample_points(oa, v.common_a))
        cb.append(sample_points(ob, v.common_b))
    emb_t, pos_t = torch.stack(emb), torch.stack(pos)
    l_disp = losses.ape_displacement_loss(emb_t, pos_t, unit_mm)
    l_dist = losses.ape_distance_loss(emb_t, pos_t, unit_mm)
    l_cons = losses.consistency_loss(torch.stack(ca), torch.stack(cb))
    wo, wd, wc = loss_weights(cfg)
    loss = wo * l_disp + wd * l_dist + wc * l_cons
    return loss, {"displacement": l_disp.item(), "distance": l_dist.item(), "consistency": l_cons.item()}


# ------------------------------------------------------------------------------------ engine task

# fields that may not change between a checkpoint and --resume (dotted: section.field)
_RESUME_FIXED = ("kind", "model.channels", "model.slice_context", "model.slice_context_step", "model.slice_context_fill", "preprocess.spacing",
                 "preprocess.hu_window", "data.slice_patch", "data.ape_patch", "model.ape_input_pool", "task.anchor", "task.slice_model", "task.anchor_knots",
                 "task.anchor_fit", "task.anchor_slope_range", "task.slice_teacher")


class BPRTask(TrainTask):
    """BPR training as an engine task: step k draws its volumes, crops and augmentations with
    ``default_rng([seed, k])``; ``log.csv`` gets one line per step, written at each checkpoint."""

    def __init__(self, cfg: BPRTrainConfig, model: BodyPartRegressor, vols: list[Volume], out: Path,
                 teacher: nn.Module | None = None):
        self.cfg, self.model, self.vols, self.out = cfg, model, vols, out
        self.teacher = teacher
        self.lines: list[str] = []
        self.header: list[str] = []
        self.last: dict[str, float] = {}

    def module(self) -> nn.Module:
        return self.model

    def step(self, model, batch, step: int, gen: torch.Generator):
        step_fn = slice_step if self.cfg.kind == "slice" else ape_step  # looked up per call (tests replace them)
        loss, parts = step_fn(model, self.vols, self.cfg, np.random.default_rng([self.cfg.seed, step]), teacher=self.teacher)
        self.parts = list(parts)
        return loss, parts

    def on_log(self, engine: Engine, row: dict[str, Any]) -> None:
        self.last = {"loss": row["loss"], **{k: row[k] for k in self.parts if k in row}}
        self.header = ["step", "lr"] + list(self.last)
        self.lines.append(",".join([str(row["step"] - 1), f"{row['lr']:.6g}"] + [f"{v:.6g}" for v in self.last.values()]))

    def on_checkpoint(self, engine: Engine, step: int) -> None:
        if self.lines:
            _append_log(self.out / "log.csv", self.lines, self.header)
            self.lines = []

    def check_resume(self, saved_config: dict[str, Any], path: Path) -> None:
        # the train state's config: nested, or flat when the run began before the sections
        now, before = flatten(BPRTrainConfig, to_dict(self.cfg)), flatten(BPRTrainConfig, saved_config)
        for key in _RESUME_FIXED:
            if key in before and key in now and now[key] != before[key]:
                raise ModelError(path, f"cannot resume: {key} was {before[key]!r} in the interrupted run, "
                                       f"now {now[key]!r}")


def engine_config(cfg: BPRTrainConfig, progress: bool = True) -> EngineConfig:
    """The engine settings of BPR training: ``cfg.optim`` and ``cfg.runtime`` (the kind's defaults
    and the warm-up filled in), weight decay on every parameter, no EMA."""
    cfg = resolved(cfg)
    settings = engine_settings(cfg.optim, cfg.runtime)
    settings.update(steps=int(cfg.optim.steps), warmup_steps=int(cfg.optim.warmup_steps),  # type: ignore[arg-type]
                    ema_decay=None, threads=max(cfg.runtime.threads, 0))
    return EngineConfig(**settings, no_decay_1d=False, seed=cfg.seed, progress=progress, desc=f"bpr {cfg.kind}",
                        nan_hint="continue from it with --resume (e.g. with a lower --optim.lr)")


# ------------------------------------------------------------------------------------ calibration

@torch.no_grad()
def calibrate(model: BodyPartRegressor, vols: list[Volume], cfg: BPRTrainConfig, max_volumes: int = 24) -> dict[str, Any]:
    """Fix the output scale/offset from the training volumes and store it in the model.

    slice: pooled 1st/99th percentiles of the raw slice scores -> 0 / 1.
    ape: per-channel median of the raw coordinates over body voxels -> 0.5, ``calib_range_mm`` mm per unit;
    anchor head first: the per-axis gain of its patch position estimates (:func:`_calibrate_anchor_gain`).
    """
    model.eval()
    use = vols[:max_volumes]
    if model.kind == "slice":
        raw = np.concatenate([slice_scores_volume(model, v.image[0, 0], raw=True) for v in use])
        p1, p99 = (float(v) for v in np.percentile(raw, [1, 99]))
        span = p99 - p1
        if not span > 1e-6:
            warnings.warn("slice scores do not vary over the training data; calibration left at identity", stacklevel=2)
            scale, offset = 1.0, 0.0
        else:
            scale, offset = 1.0 / span, -p1 / span
        model.calib_scale.fill_(scale)
        model.calib_offset.fill_(offset)
        info = {"method": "percentiles", "raw_p1": p1, "raw_p99": p99, "scale": scale, "offset": offset,
                "mm_per_unit": model.raw_unit_mm * abs(1.0 / scale), "volumes": len(use)}
    else:
        gain_info = _calibrate_anchor_gain(model, use) if getattr(model, "head_kind", "") == "anchor" else {}
        if getattr(model, "anchor", "window") == "slice":
            gain_info.update(calibrate_slice_anchor(model, use))
        thr_maps = []
        for v in use:
            m = ape_volume(model, v.image[0, 0], raw=True)
            body = (v.image[0, 0] > body_threshold(model)).numpy()
            thr_maps.append(m[:, body] if body.any() else m.reshape(3, -1))
        allv = np.concatenate(thr_maps, axis=1)
        med = np.median(allv, axis=1)
        scale = model.raw_unit_mm / float(cfg.task.calib_range_mm)
        model.calib_scale.fill_(scale)
        model.calib_offset.copy_(torch.as_tensor(0.5 - med * scale, dtype=model.calib_offset.dtype))
        info = {"method": "median", "raw_median": med.tolist(), "scale": scale,
                "offset": model.calib_offset.tolist(), "mm_per_unit": float(cfg.task.calib_range_mm), "volumes": len(use),
                **gain_info}
    model.calibration_info = info
    return info


# ------------------------------------------------------------------------------------------ train

def has_train_state(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a train state that ``train_bpr(resume=True)`` continues (or one of
    the format before the engine, which it refuses with a clear message)."""
    out = Path(out_dir)
    return latest_train_state(out / "train_state") is not None or _has_old_train_state(out)


def can_resume(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a train state in the engine's format (``train_bpr(resume=True)``
    continues it; a train state of the format before is not resumable: start again)."""
    return latest_train_state(Path(out_dir) / "train_state") is not None


def _has_old_train_state(out: Path) -> bool:
    return (out / "train_state.safetensors").is_file() and (out / "train_state.json").is_file()


def train_bpr(
    cfg: BPRTrainConfig,
    out_dir: str | Path,
    cases: list | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Train a body part regressor; returns ``out_dir`` (a model folder for :func:`load_bpr`).

    ``cases`` (preprocessed :class:`~voxdiff.data.types.Case` objects at ``cfg.preprocess.spacing``)
    replaces reading ``cfg.data.path``; otherwise the data folders go through the data layer's cache.
    """
    _validate(cfg)
    cfg = resolved(cfg)
    out = Path(out_dir)
    if int(cfg.members) > 1:
        return _train_members(cfg, out, cases, resume, force, progress)
    resuming = resume and has_train_state(out)
    if resume and not resuming and out.exists() and any(out.iterdir()):
        raise InputError(out, "--resume: no train_state checkpoint in this folder")
    if resuming and latest_train_state(out / "train_state") is None:
        raise old_train_state_error(out, "BPR training")
    if not resuming:
        check_output_path(out, force=force, inputs=(cfg.data.path or None, *cfg.data.extra, cfg.task.slice_model or None))
    if cases is None:
        cases = load_training_cases(cfg)
    vols = cases_to_volumes(cases, cfg.preprocess.hu_window, where=cfg.data.path or None)

    with num_threads(max(cfg.runtime.threads, 0)):
        return _train(cfg, out, vols, resuming, progress)


def _train(cfg: BPRTrainConfig, out: Path, vols: list[Volume], resuming: bool, progress: bool) -> Path:
    torch.manual_seed(cfg.seed)
    pp = to_dict(preprocess_config(cfg))
    d, t = cfg.data, cfg.task
    patch = (d.slice_patch, d.slice_patch, d.slices_per_sample) if cfg.kind == "slice" else (d.ape_patch,) * 3
    arch: dict[str, Any] = {"channels": cfg.model.channels, "unit_mm": 1.0 / t.heuristic_b if cfg.kind == "slice" else 100.0,
                            "patch_size": patch}
    if cfg.kind == "slice":  # (the model's saved arch leaves out the defaults)
        arch.update(context=int(cfg.model.slice_context), context_step=int(cfg.model.slice_context_step),
                    context_fill=str(cfg.model.slice_context_fill))
    slice_model = None
    if cfg.kind == "ape":
        arch.update(head="anchor", input_pool=cfg.model.ape_input_pool)
        if t.anchor == "slice":
            slice_model = load_anchor_slice_model(cfg)
            arch.update(anchor="slice", anchor_knots=t.anchor_knots, anchor_fit=t.anchor_fit,
                        anchor_slope_range=tuple(t.anchor_slope_range),
                        anchor_bandwidth_mm=float(t.anchor_bandwidth_mm), slice_arch=slice_model.arch(),
                        slice_preprocess=dict(slice_model.preprocess))
    teacher = load_slice_teacher(cfg) if cfg.kind == "slice" and cfg.task.slice_teacher else None
    # which teacher it was (its weights' signature), beside the path the config holds
    teacher_info = {"slice_teacher_signature": model_signature(teacher)} if teacher is not None else {}
    if resuming and teacher_info and (out / "config.yaml").is_file():  # (the path alone is checked with the config)
        saved = read_config_doc(out / "config.yaml")  # (written beside the config)
        before = saved.get("slice_teacher_signature") if isinstance(saved, dict) else None
        if before not in (None, teacher_info["slice_teacher_signature"]):
            raise ModelError(cfg.task.slice_teacher, "cannot resume: this teacher's weights are not those the "
                                                     "interrupted run was trained toward")
    model = build_bpr(cfg.kind, arch, preprocess=pp)
    if slice_model is not None:
        model.slice_model.load_state_dict(slice_model.state_dict())  # type: ignore[union-attr]
        model.slice_model.calibration_info = dict(slice_model.calibration_info)  # type: ignore[union-attr]
    if not resuming and out.is_dir():
        for name in ("log.csv", "metrics.json", "metrics.jsonl", "model.safetensors", "model.json",
                     "train_state.safetensors", "train_state.json"):  # (the last two: the format before the engine)
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "train_state", ignore_errors=True)
    # a run that stops before its first checkpoint (error, NaN, Ctrl-C) leaves no folder behind
    with run_folder(out, lambda: latest_train_state(out / "train_state") is not None):
        task = BPRTask(cfg, model, vols, out, teacher)
        engine = Engine(engine_config(cfg, progress), task, state_dir=out / "train_state",
                        metrics_path=out / "metrics.jsonl", config=cfg, resume=resuming, meta={"bpr_kind": cfg.kind})
        start = engine.start
        write_config(out, cfg, extra={"cases": [v.case_id for v in vols], **teacher_info})

        t0 = time.time()
        engine.fit()
    train_s = time.time() - t0
    last = task.last

    calib = calibrate(model, vols, cfg)
    save_bpr(out, model, meta={"steps": cfg.optim.steps, "cases": [v.case_id for v in vols], "final": last, **teacher_info})
    atomic_write_json(out / "metrics.json", {"final": last, "calibration": calib, "train_seconds": train_s,
                                             "steps": cfg.optim.steps, "resumed_from": start, "n_volumes": len(vols)})
    return out


MEMBERS_DIR = "members"


def member_dirs(cfg: BPRTrainConfig, out: str | Path) -> list[Path]:
    """The member folders of an ensemble run (``cfg.members`` > 1): ``OUT/members/seed-S``."""
    return [Path(out) / MEMBERS_DIR / f"seed-{int(cfg.seed) + k}" for k in range(int(cfg.members))]


def _member_done(folder: Path) -> bool:
    """A member is finished once its model and final metrics are written (the last files of a run)."""
    return (folder / "model.safetensors").is_file() and (folder / "metrics.json").is_file()


def _check_finished_member(folder: Path, member: BPRTrainConfig) -> None:
    """Refuse to put a member trained with other settings into the ensemble of a resumed run (the
    runtime section aside: threads or checkpoint frequency do not change the model's meaning)."""
    # dotted names, as the train state's own resume check names them (``optim.lr``)
    old = flatten(BPRTrainConfig, read_config(folder / "config.yaml"))
    new = flatten(BPRTrainConfig, to_dict(member))
    keys = sorted(k for k in set(old) | set(new) if not k.startswith("runtime.") and old.get(k) != new.get(k))
    if keys:
        raise InputError(folder, f"--resume: this finished member was trained with other settings ({', '.join(keys)})")


def _train_members(cfg: BPRTrainConfig, out: Path, cases: list | None, resume: bool, force: bool,
                   progress: bool) -> Path:
    """``members`` > 1: train each member as its own slice model (seed ``seed + k``) under
    ``out/members``, then write their ensemble into ``out``. With ``resume`` finished members are
    kept, an interrupted one continues from its train state, and the rest are trained."""
    from dataclasses import replace

    from .ensemble import ensemble_slice_models

    folders = member_dirs(cfg, out)
    started = resume and (out / MEMBERS_DIR).is_dir()
    if resume and not started and out.exists() and any(out.iterdir()):
        raise InputError(out, "--resume: no members/ folder of an ensemble run here")
    if started:
        saved = out / "config.yaml"
        if saved.is_file():  # (each member's own train state checks the rest of its config on resume)
            old, new = read_config(saved), to_dict(cfg)
            diff = sorted(k for k in ("kind", "members", "seed") if old.get(k) != new.get(k))
            if diff:
                raise InputError(saved, f"--resume: {', '.join(diff)} differ from the interrupted run's")
    else:
        check_output_path(out, force=force, inputs=(cfg.data.path or None, *cfg.data.extra))
        if out.is_dir():  # --force: what an earlier run left
            shutil.rmtree(out / MEMBERS_DIR, ignore_errors=True)
            for name in ("model.safetensors", "model.json", "metrics.json", "config.yaml"):
                (out / name).unlink(missing_ok=True)
    if cases is None:
        cases = load_training_cases(cfg)
    vols = cases_to_volumes(cases, cfg.preprocess.hu_window, where=cfg.data.path or None)

    def anything_to_resume() -> bool:
        return any(_member_done(f) or latest_train_state(f / "train_state") is not None for f in folders)

    members = [replace(cfg, members=1, seed=int(cfg.seed) + k) for k in range(len(folders))]
    for folder, member in zip(folders, members):
        if _member_done(folder):
            _check_finished_member(folder, member)
    t0 = time.time()
    with run_folder(out, anything_to_resume), num_threads(max(cfg.runtime.threads, 0)):
        write_config(out, cfg)
        for k, (folder, member) in enumerate(zip(folders, members)):
            if _member_done(folder):
                continue
            if progress:
                print(f"member {k + 1}/{len(folders)}: seed {member.seed} -> {folder}", flush=True)
            _train(member, folder, vols, latest_train_state(folder / "train_state") is not None, progress)
    names = [f"{MEMBERS_DIR}/{f.name}" for f in folders]  # relative to the model folder
    ens = ensemble_slice_models([str(f) for f in folders], names=names)
    save_bpr(out, ens, meta={"members": names, "steps": cfg.optim.steps, "cases": [v.case_id for v in vols]})
    atomic_write_json(out / "metrics.json", {
        "members": {f.name: json.loads((f / "metrics.json").read_text()) for f in folders},
        "mm_per_unit": ens.mm_per_unit, "seconds": time.time() - t0, "n_volumes": len(vols)})
    return out


@torch.no_grad()
def _calibrate_anchor_gain(model: BodyPartRegressor, vols: list[Volume]) -> dict[str, Any]:
    """Anchor head: regress its window position estimates on their known positions within each
    training volume (pooled, per axis). A slope below 1 is regression to the mean: windows far from
    a volume's middle are placed too close to it, so the whole-volume vote would depend on the field
    of view. The gain ``1 / slope`` (clipped to 0.5..3) is stored in the model."""
    model.anchor_gain.fill_(1.0)
    num, den = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for v in vols:
        est, pos, _ = model.window_estimates(v.image[0, 0])
        if len(est) < 2:
            continue
        e, p = (est - est.mean(0)).double(), (pos - pos.mean(0)).double()
        num += (e * p).sum(0)
        den += (p * p).sum(0)
    slope = torch.where(den > 0, num / den.clamp_min(1e-12), torch.ones(3, dtype=torch.float64))
    gain = (1.0 / slope.clamp(1 / 3, 2.0)).float()
    model.anchor_gain.copy_(gain)
    return {"anchor_slope": slope.tolist(), "anchor_gain": gain.tolist()}


@torch.no_grad()
def calibrate_slice_anchor(model: BodyPartRegressor, vols: list[Volume], smooth: float = 1e-3) -> dict[str, Any]:
    """Slice anchor: fit ``g`` (calibrated slice score -> raw S, piecewise linear on
    ``anchor_knots`` knots at quantiles of the training scores) and one offset per training volume
    by least squares so that ``g(s(z)) = d(z) + o_v`` on every body slice ``z`` of volume ``v``
    (``d``: the slice's known displacement from the volume centre). Then ``g(s(z)) - d(z)`` is as
    constant within each volume as the scores allow, which is what makes the per-slice votes of any
    crop agree. A small penalty on changes of slope keeps knots with few scores near them straight."""
    from .inference import slice_scores_volume

    sm = model.slice_model  # type: ignore[attr-defined]
    k = int(model.anchor_knots)  # type: ignore[attr-defined]
    thr = body_threshold(model)
    per_vol = []
    for v in vols:
        img = v.image[0, 0]
        s = np.asarray(slice_scores_volume(sm, img), dtype=np.float64)
        body = (img > thr).float().mean(dim=(0, 1)).double().numpy()
        keep = body >= 0.25 * body.max() if body.max() > 0 else np.ones_like(body, dtype=bool)
        nz = len(s)
        d = (np.arange(nz) - (nz - 1) / 2.0) * model.spacing[2] / model.unit_mm  # type: ignore[attr-defined]
        if keep.sum() >= 2:
            per_vol.append((s[keep], d[keep]))
    if not per_vol:
        raise TrainingError("slice anchor: no training volume has two body slices to calibrate on")
    pooled = np.concatenate([s for s, _ in per_vol])
    knots = np.quantile(pooled, np.linspace(0.01, 0.99, k))
    knots = np.maximum.accumulate(knots + np.arange(k) * 1e-6)  # strictly increasing
    nv = len(per_vol)
    rows, rhs = [], []
    for j, (s, d) in enumerate(per_vol):
        a = np.zeros((len(s), k + nv))
        a[:, :k] = _hat_basis(s, knots)
        a[:, k + j] = -1.0
        rows.append(a)
        rhs.append(d)
    a, b = np.concatenate(rows), np.concatenate(rhs)
    # gauge: the mean volume offset is 0 (the final calibration re-centres anyway)
    gauge = np.zeros((1, k + nv))
    gauge[0, k:] = 1.0
    # change of slope between neighbouring segments (zero for a straight line whatever the knot gaps)
    h = np.diff(knots)
    hm = float(np.mean(h))
    reg = np.zeros((k - 2, k + nv))
    for i in range(k - 2):
        reg[i, i:i + 3] = (hm / h[i], -hm / h[i] - hm / h[i + 1], hm / h[i + 1])
    scale = np.sqrt(len(b) * smooth)
    sol = np.linalg.lstsq(np.concatenate([a, gauge, reg * scale]), np.concatenate([b, [0.0], np.zeros(k - 2)]),
                          rcond=None)[0]
    values = sol[:k]
    resid = b - a @ sol
    model.s_knots.copy_(torch.as_tensor(knots, dtype=model.s_knots.dtype))  # type: ignore[union-attr]
    model.s_values.copy_(torch.as_tensor(values, dtype=model.s_values.dtype))  # type: ignore[union-attr]
    mm = float(model.unit_mm)  # type: ignore[attr-defined]
    return {"slice_anchor_knots": knots.tolist(), "slice_anchor_values_mm": (values * mm).tolist(),
            "slice_anchor_residual_mm": float(np.sqrt(np.mean(resid ** 2)) * mm), "slice_anchor_volumes": nv}


def _hat_basis(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """``(len(x), K)`` weights of the piecewise-linear interpolant through ``knots`` at ``x``,
    continuing the line through the end knots outside (as :func:`voxdiff.bpr.models.interp_linear`)."""
    k = len(knots)
    out = np.zeros((len(x), k))
    i = np.clip(np.searchsorted(knots, x) - 1, 0, k - 2)
    f = (x - knots[i]) / np.maximum(knots[i + 1] - knots[i], 1e-12)
    inside = (x >= knots[0]) & (x <= knots[-1])
    r = np.arange(len(x))
    out[r[inside], i[inside]] = 1.0 - f[inside]
    out[r[inside], i[inside] + 1] += f[inside]
    t = (x[~inside] - knots[0]) / max(knots[-1] - knots[0], 1e-12)
    out[r[~inside], 0] += 1.0 - t
    out[r[~inside], k - 1] += t
    return out


def _append_log(path: Path, lines: list[str], header: list[str]) -> None:
    prev = path.read_text() if path.is_file() else ",".join(header) + "\n"
    atomic_write(path, prev + "".join(l + "\n" for l in lines))


def read_log(path: str | Path) -> list[dict[str, float]]:
    rows = Path(path).read_text().strip().splitlines()
    head = rows[0].split(",")
    return [dict(zip(head, map(float, r.split(",")))) for r in rows[1:]]


__all__ = ["BPRTrainConfig", "BPRData", "BPROptim", "BPRModel", "BPRTaskOptions", "train_bpr", "calibrate", "calibrate_slice_anchor", "load_training_cases", "cases_to_volumes", "read_log"]
