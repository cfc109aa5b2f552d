"""Training segmentation heads on frozen features, fine-tuning, and from-scratch training.

Loss: softmax cross-entropy + soft Dice (batch Dice over the foreground classes), the nnU-Net
choice. The BTCV labels are mutually exclusive, so a softmax over 14 classes and an argmax give the
label map directly; vox2vec's per-class sigmoid + BCE needs a threshold and a tie rule instead.

Patches: with probability ``fg_prob`` a patch is centred (with jitter) on a voxel of an organ drawn
uniformly among the organs present in the training cases (class-uniform), so small organs
(adrenals, esophagus) are seen as often as the liver; the rest are uniformly random.

Modes (``ProbeConfig.heads``):

* ``linear`` / ``nonlinear`` / ``mix``: heads on the frozen extractor (eval mode, no gradients: norm statistics
  and weights never change). All frozen heads are trained in one pass: each batch's features are
  computed once and fed to every head.
* ``finetune``: a copy of the extractor's backbone with the non-linear head; the backbone stays
  frozen for ``optim.warmup_steps`` and is then trained with ``optim.backbone_lr``.
* ``scratch``: the same backbone architecture, randomly re-initialised, trained end to end.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voxdiff.core.config import check_window, warn_renamed
from voxdiff.core.engine import Engine, EngineConfig, TrainTask
from voxdiff.core.errors import InputError, TrainingError
from voxdiff.core.metrics import mean_dice
from voxdiff.core.runtime import resolve_device
from voxdiff.core.sections import OptimConfig, RuntimeConfig, engine_settings
from voxdiff.features.norm import NORM_STATS

from .heads import NonLinearHead, count_parameters, feature_stats, make_head
from .predict import features, logits_to_labels, predict_logits, set_frozen, unit_image

FROZEN_MODES = ("linear", "nonlinear", "mix")
TUNED_MODES = ("finetune", "scratch")
# checkpoint rules of fine-tuning / from-scratch training (ProbeOptim.selection)
SELECTIONS = ("best", "smoothed", "last")
# which pretrained weights fine-tuning starts from (ProbeConfig.transfer)
TRANSFERS = ("all", "encoder")
# which backbone weights fine-tuning trains (ProbeConfig.tune)
TUNED_PARTS = ("all", "decoder", "head")
# refused by check_probe_config and by fit_network itself (a direct call skips the config check)
NEW_DECODER_STATS = "transfer encoder re-initialises the decoder, which has no pretrained statistics; use norm_stats window"
TUNE_HEAD_NEW_DECODER = ("tune head keeps the backbone frozen, so transfer encoder's new decoder would stay random; "
                         "use transfer all")
ALL_MODES = FROZEN_MODES + TUNED_MODES


@dataclass
class ProbeSampling:
    """Which labelled cases train, and how each step samples them.

    Args:
        patch_size: training patch (x, y, z) in voxels; multiples of the backbone's largest stride.
        batch_size: patches per step.
        fg_prob: fraction of patches (voxels, with ``frozen_training=voxels``) centred on an organ
            voxel (organ drawn uniformly).
        voxels_per_step: voxels per optimisation step with ``frozen_training=voxels``.
        train_cases: use only the first N labelled training cases (label-efficiency studies); null = all.
        val_from_train: training cases held out for checkpoint selection; 0 = select on the fold's
            validation cases (nnU-Net style; then the fold's score is optimistic).
        fresh_noise: fine-tuning and from-scratch training of a diffusion backbone: every training
            patch gets its own draw of the feature passes' noise (the positional noise of voxel
            indices shifted by a random offset per patch) instead of the fixed noise of its voxels.
            Fixed noise is a per-voxel code that stays the same at every step, so a network trained
            end to end on a few volumes could learn where it is from the noise; validation, frozen
            heads and inference keep the fixed noise. No effect on methods without noisy passes.
            Measured at one labelled phantom: no change in test Dice (docs/RESULTS.md), so off.
        deformed_copies: add this many randomly deformed copies (rotation about the cranio-caudal
            axis, scaling, shift; :mod:`voxdiff.data.augment`) of each labelled training case to the
            training cases of every head and network (frozen heads read the copies' features like any
            volume's; fine-tuning and from scratch sample patches from them). Made once per run from
            the case ids and ``seed``, so every method trained with the same settings sees the same
            copies; validation and test cases are never copied. The copies are held in memory (K more
            volumes per labelled case, and their features for frozen heads). 0 = off.
        fov_crops: frozen heads: add this many random field-of-view crops of each labelled training
            case (:func:`voxdiff.data.augment.fov_crops`: 50-100 % of z, 80-100 % in-plane), each read
            in a feature window of its own, so that a head fitted on few cases does not learn where
            organs lie in those scans. Measured on three seeds with 2,400 head steps, frozen diffusion +
            APE gained +16.7 ± 3.4 test Dice with two labelled phantoms (64 crops each) and +11.1 ± 2.7
            with all seven (8 each); at one phantom 64 crops gave 33 against 17-19 (docs/RESULTS.md,
            "Field-of-view crops at 1, 2 and all labelled phantoms"). Off by default for its cost: one
            feature window per crop. Not used by fine-tuning and from-scratch training (their patches
            are crops already). 0 = off.
        whole_volume: fine-tuning and from-scratch training: every step trains on ``batch_size``
            whole labelled volumes (drawn uniformly; each at voxel 0, padded at its end to a multiple of
            the backbone's divisor, as the whole-volume feature path pads it) instead of patches, and
            validation uses whole-volume features (the window of ``inference.feature_roi``), as the
            frozen voxel probe does. ``patch_size`` and ``fg_prob`` are then unused. A diffusion
            backbone's features depend on the window they are computed in: the demo's frozen probe
            head, fitted on whole volumes, scores about 1 Dice on 48 x 48 x 32 patches, and fine-tuning
            from it on patches loses half the probe's Dice (docs/RESULTS.md, "Fine-tuning on whole
            volumes"). Each step costs about as many voxels as the volumes hold, up to a limit: an axis
            longer than the feature window (``inference.feature_roi``, else ``roi``) is cut to a window of
            that length at a random start, as the whole-volume feature path tiles such a volume, so
            that a long scan cannot exhaust memory (a demo phantom's 1.6 M voxels: 7-9 GiB peak for an
            LP-FT step of its diffusion backbone in fp32 on the CPU; a 160^3 window holds 4.1 M).
    """

    patch_size: tuple[int, int, int] = (64, 64, 32)
    batch_size: int = 2
    fg_prob: float = 0.67
    voxels_per_step: int = 8192
    train_cases: int | None = None
    val_from_train: int = 1
    fresh_noise: bool = False
    deformed_copies: int = 0
    fov_crops: int = 0
    whole_volume: bool = False

    def __post_init__(self) -> None:
        for name in ("deformed_copies", "fov_crops"):
            if int(getattr(self, name)) < 0:
                raise InputError(None, f"sampling.{name} must be >= 0, not {getattr(self, name)}")


@dataclass
class ProbeOptim(OptimConfig):
    """:class:`~voxdiff.core.sections.OptimConfig` with the probe's defaults and its own fields. AdamW
    with weight decay on every parameter, no clipping (``grad_clip`` 0), no EMA; frozen heads decay
    from ``lr`` to ``min_lr_ratio * lr`` (cosine, no warm-up), fine-tuning and from-scratch training
    keep constant learning rates.

    Args:
        steps: optimisation steps per head / network.
        lr: learning rate of the heads.
        warmup_steps: fine-tuning only: steps with the backbone frozen (the head alone) before it is
            unfrozen (not a learning-rate warm-up).
        backbone_lr: learning rate of the backbone when fine-tuning.
        scratch_lr: learning rate of the from-scratch network (backbone and head).
        val_every: validate (whole volumes, sliding window) every this many steps and at the end.
        patience: fine-tuning / from scratch: stop early after this many validations in a row without
            a better validation Dice (0 = run all ``steps``); the best-validation state is returned
            either way.
        min_steps: early stopping never stops before this many steps (a network that still predicts
            almost nothing gives validation Dice near zero, whose noise would otherwise run out the
            patience before it starts learning).
        selection: fine-tuning / from scratch: which state is returned. best: the state with the best
            validation Dice; smoothed: the state at the end of the ``smooth_window`` validations in a
            row with the best mean Dice (one validation case gives noisy Dice; a single lucky
            validation then does not decide); last: the final state. Early stopping watches the
            rule's own score (best: each validation, smoothed: the window's mean; last: each
            validation).
        smooth_window: validations averaged by the smoothed rule (fewer at the start of training).
        ema_decay: must stay null (the probe keeps no EMA of the weights).
        anchor_decay: fine-tuning: decoupled weight decay of the backbone toward its pretrained
            weights instead of toward zero (L2-SP, Li et al. 2018, in AdamW's decoupled form): after
            each step every backbone parameter w moves by ``backbone_lr * anchor_decay * (w0 - w)``.
            Adam's steps are about the learning rate in size, so a weight that the gradient keeps
            pushing one way settles about ``1 / anchor_decay`` from where pretraining left it. 0 =
            off; from-scratch training refuses it (there is no pretrained start to keep).
        refine_steps: frozen heads fitted on voxels (``frozen_training voxels``): after the voxel steps,
            this many steps that refine every head on the whole training volumes' cached features
            (one volume a step, the segmentation loss of fine-tuning, the heads' BatchNorm statistics
            kept; :func:`voxdiff.probe.voxel.refine_heads_volume`); 0 = off. The heads before
            refinement are the first candidate of the validation, so a refinement that does not
            help on the validation cases is not kept.
        refine_lr: the refinement's learning rate (constant).
        refine_val_every: validate the refined heads every this many steps and at the end.
        validate_start: fine-tuning / from scratch: validate the network as it starts (the pretrained
            backbone with its head: LP-FT's frozen probe, or a new head) before the first step; that
            state is the selection rule's first candidate (step 0), so a run whose steps never beat
            it on validation returns its start. Off: the first candidate is the first validation.
    """

    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-5
    grad_clip: float = 0.0
    ema_decay: float | None = None  # type: ignore[assignment]
    backbone_lr: float = 3e-4
    scratch_lr: float = 1e-3
    val_every: int = 100
    patience: int = 0
    min_steps: int = 0
    selection: str = "best"
    smooth_window: int = 3
    anchor_decay: float = 0.0
    refine_steps: int = 0
    refine_lr: float = 1e-4
    refine_val_every: int = 10
    validate_start: bool = False

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise InputError(None, f"optim.selection must be one of {', '.join(SELECTIONS)}, not {self.selection!r}")
        if int(self.smooth_window) < 1:
            raise InputError(None, f"optim.smooth_window must be at least 1, not {self.smooth_window}")


UPSAMPLE_CHOICES = ("auto", "nearest", "trilinear")
# ``head.upsample: auto``: how each voxel-probe head brings its coarse levels to full resolution (chosen on
# 8 held-out phantoms over 19 finished non-linear, 10 mix and 6 linear probes; docs/PROBING.md)
AUTO_UPSAMPLE = {"linear": "nearest", "nonlinear": "trilinear", "mix": "trilinear"}


def head_upsample(name: str, setting: str) -> str:
    """The upsampling a voxel-probe head ``name`` uses under the ``head.upsample`` setting."""
    return AUTO_UPSAMPLE[name] if setting == "auto" else setting


@dataclass
class ProbeHead:
    """The non-linear (and mix) head's size, and how voxel-probe heads upsample.

    Args:
        hidden: width of the non-linear head.
        blocks: kernel-1 residual blocks per level in the non-linear head.
        upsample: heads fitted on gathered voxels (``frozen_training voxels``): how they bring the
            coarse levels to full resolution on whole volumes (validation, scores, saved segmenters).
            ``nearest`` (vox2vec's): each voxel reads its own cell of every level, so inference applies
            exactly the per-voxel function that training fitted; ``trilinear``: the coarse maps are
            interpolated between cells; ``auto`` (the default): trilinear for the non-linear and mix
            heads, nearest for the linear head, as measured on held-out phantoms (docs/PROBING.md,
            "Upsampling of voxel-probe heads"). Training is the same either way (gathered voxels need
            no upsampling).
    """

    hidden: int = 32
    blocks: int = 1
    upsample: str = "auto"


@dataclass
class ProbeWindow:
    """Sliding-window inference: validation and the saved segmenters.

    Args:
        roi: sliding-window size for validation and for the saved segmenter.
        overlap: sliding-window overlap.
        feature_roi: frozen voxel probing (``frozen_training=voxels``): the window of the whole-volume
            feature extraction, for training, validation and the saved segmenter; null = ``roi``. A
            size at least the volume's (e.g. [1024, 1024, 1024]) extracts each volume in one window:
            no overlap to compute (about half the time of 64^3 windows with overlap 0.25) and, on the
            phantom benchmark's validation cases, features as good or better (docs/RESULTS.md, "One
            feature window per volume"; the ``cpu-small`` budget uses [160, 160, 160]); memory grows
            with the window, so keep windows for large grids.
    """

    roi: tuple[int, int, int] = (96, 96, 64)
    overlap: float = 0.5
    feature_roi: tuple[int, int, int] | None = None


def _probe_runtime() -> RuntimeConfig:
    return RuntimeConfig(device="auto", threads=0, bf16=False, log_every=0, checkpoint_every=0, keep_checkpoints=1)


@dataclass
class ProbeConfig:
    """Probing / fine-tuning options (defaults sized for a CPU), in sections (``cfg.optim.lr``; on
    the command line ``--optim.lr``). Configs saved before the sections (flat: ``steps``, ``roi``,
    ``hidden``, ...) load too (:mod:`voxdiff.core.config`).

    Args:
        heads: what to train: linear, nonlinear, mix (frozen features, one shared pass; ``mix`` is the
            learned level x timestep mix, :class:`voxdiff.probe.heads.MixHead`), finetune, scratch.
        seed: seed of patch sampling and head initialisation.
        n_classes: output classes incl. background (14 = BTCV).
        frozen_training: how linear/non-linear heads are trained: ``voxels`` (voxel samples of cached
            whole-volume features, exact for these per-voxel heads and much faster; see
            :mod:`voxdiff.probe.voxel`) or ``patches`` (vox2vec's patch training, :func:`fit_heads`).
        t: diffusion models: feature timesteps to use instead of the model's own (several: one pass
            each, concatenated; as ``voxdiff features --t``); saved in the segmenter bundles.
        feature_input: diffusion models: noisy or clean feature passes instead of the model's own
            ``task.feature_input`` (as ``voxdiff features --feature_input``); saved in the bundles.
        feature_side: which outputs of the backbone form the pyramid the heads see and fine-tuning
            trains through: decoder (vox2vec's FPN pyramid), encoder, or both concatenated per level
            (as ``voxdiff features --feature_side``); saved in the bundles.
        norm_stats: how the backbone's GroupNorms normalise for frozen heads and fine-tuning:
            ``window`` (each input's own statistics, as in pretraining) or ``fixed`` (statistics
            estimated once on ``norm_crops`` random crops of the model's training patch size from the
            labelled training images, so that a voxel's features do not depend on the window;
            :mod:`voxdiff.features.norm`); saved in the bundles. From-scratch training always uses
            ``window``.
        norm_crops: crops the fixed statistics are estimated on.
        transfer: fine-tuning: which pretrained weights the network starts from: ``all`` (the whole
            backbone) or ``encoder`` (the stem, encoder and time embedding; the decoder path is
            re-initialised at random, seeded like from-scratch training, and trains at ``scratch_lr``
            while the kept weights train at ``backbone_lr``). ``encoder`` needs the decoder pyramid
            (``feature_side decoder`` or ``both``), each window's own statistics (``norm_stats window``:
            a new decoder has no pretrained statistics) and a random head (a fitted probe head read
            the pretrained decoder). From-scratch training and frozen heads ignore it.
        tune: fine-tuning: which backbone weights train: ``all``, or ``decoder`` (the decoder path
            alone; the stem, encoder and time embedding stay frozen at their pretrained values, a
            smaller network to fit to a few labelled cases). With ``transfer encoder`` this trains a
            new decoder on the frozen pretrained encoder. Needs the decoder pyramid; from-scratch
            training refuses it. ``head``: the head alone trains on the backbone's frozen features,
            read through the fine-tuning path (patches, or whole volumes with
            ``sampling.whole_volume``); from a fitted probe head (LP-FT's start) it shows what
            fine-tuning's steps do to the head alone. A fine-tuning head upsamples its coarse levels
            trilinearly, also when it starts from a voxel probe's head, which used nearest
            neighbour (docs/RESULTS.md, "Where LP-FT's gain comes from").
        sampling: training cases, patches / voxels and batches.
        optim: optimiser, learning rates, validation and early stopping (:class:`ProbeOptim`).
        head: the non-linear head's size.
        inference: sliding-window size and overlap (validation and saved segmenters).
        runtime: ``device`` (auto, cpu or cuda), ``bf16`` (bf16 autocast for the feature extractor
            where the device computes bf16 natively; fp32 elsewhere; ``amp`` is the deprecated old
            name, still accepted), ``threads`` (0 = torch's setting), ``compile``; ``log_every`` and
            ``checkpoint_every`` 0 = at every validation (``optim.val_every``).
        amp: deprecated: the old name of ``runtime.bf16`` (still accepted, with a warning).
    """

    SECTIONS: ClassVar[tuple[str, ...]] = ("sampling", "optim", "head", "inference", "runtime")

    heads: tuple[str, ...] = ("linear", "nonlinear")
    seed: int = 0
    n_classes: int = 14
    frozen_training: str = "voxels"
    t: tuple[int, ...] | None = None
    feature_input: str | None = None
    feature_side: str = "decoder"
    norm_stats: str = "window"
    norm_crops: int = 48
    transfer: str = "all"
    tune: str = "all"
    sampling: ProbeSampling = field(default_factory=ProbeSampling)
    optim: ProbeOptim = field(default_factory=ProbeOptim)
    head: ProbeHead = field(default_factory=ProbeHead)
    inference: ProbeWindow = field(default_factory=ProbeWindow)
    runtime: RuntimeConfig = field(default_factory=_probe_runtime)
    amp: InitVar[bool | None] = None  # the old keyword of runtime.bf16

    def __post_init__(self, amp: bool | None = None) -> None:
        if amp is not None:
            warn_renamed(type(self), "amp", "runtime.bf16")
            self.runtime.bf16 = bool(amp)


def apply_norm_stats(extractor, cfg: ProbeConfig, train_cases: Sequence, mode: str = "frozen"):
    """Make ``extractor``'s backbone normalise as ``cfg.norm_stats`` says (in place; returns it), after
    its feature settings are made (the statistics depend on the feature passes): fixed statistics are
    estimated on the labelled ``train_cases`` with ``cfg.seed``, once per set of cases (where the
    extractor runs now). ``mode`` ``scratch`` keeps each input's own statistics (a re-initialised
    network has no others)."""
    from voxdiff.features.norm import with_norm_stats

    norm = "window" if mode == "scratch" else cfg.norm_stats
    window = extractor.preprocess.hu_window
    key = tuple((getattr(c, "case_id", None), tuple(np.asarray(c.image).shape)) for c in train_cases)
    try:
        return with_norm_stats(extractor, norm, lambda: [unit_image(c, window) for c in train_cases],
                               n=int(cfg.norm_crops), seed=int(cfg.seed), key=key)
    except ValueError as e:
        raise InputError(None, str(e)) from None


def training_cases(cases: Sequence, cfg: ProbeConfig, crops: bool = True) -> list:
    """The labelled training cases with ``cfg.sampling.deformed_copies`` deformed copies of each, then
    (``crops``: frozen heads) ``cfg.sampling.fov_crops`` field-of-view crops of each labelled case."""
    from voxdiff.data.augment import fov_crops, with_deformed_copies

    out = with_deformed_copies(cases, int(cfg.sampling.deformed_copies), cfg.seed)
    if crops and int(cfg.sampling.fov_crops) > 0:
        out += [c for case in cases for c in fov_crops(case, int(cfg.sampling.fov_crops), cfg.seed)]
    return out


def volume_roi(cfg: ProbeConfig) -> tuple[int, int, int]:
    """The window of whole-volume feature extraction (voxel probing): ``feature_roi`` or ``roi``."""
    return tuple(int(r) for r in (cfg.inference.feature_roi or cfg.inference.roi))  # type: ignore[return-value]


def move_extractor(extractor, device: torch.device) -> None:
    """Move a feature extractor (a module, or an object holding ``backbone`` / ``bpr`` modules) to ``device``."""
    if hasattr(extractor, "to") and callable(extractor.to):
        extractor.to(device)
    else:
        for name in ("backbone", "bpr"):
            m = getattr(extractor, name, None)
            if isinstance(m, nn.Module):
                m.to(device)


# ------------------------------------------------------------------------------------ sampling


def class_voxel_index(labels: Sequence[np.ndarray], rng: np.random.Generator | None = None,
                      max_per_class: int | None = None) -> dict[int, list[tuple[int, np.ndarray]]]:
    """Organ class -> ``[(case index, flat voxel indices of that class in the case)]`` (background
    left out); with ``max_per_class`` a random subset of at most that many voxels per case and class."""
    where: dict[int, list[tuple[int, np.ndarray]]] = {}
    for i, lab in enumerate(labels):
        flat = np.asarray(lab).ravel()
        for c in np.unique(flat):
            if c == 0:
                continue
            idx = np.flatnonzero(flat == c)
            if max_per_class is not None and idx.size > max_per_class:
                idx = (rng or np.random.default_rng(0)).choice(idx, max_per_class, replace=False)
            where.setdefault(int(c), []).append((i, idx))
    return where


class PatchSampler:
    """Random training patches with class-uniform organ centring.

    cases: preprocessed cases (HU image, uint8 label).
    window: HU window mapped to [0, 1].
    fields: whole-volume BPR coordinate fields of the cases (:func:`condition_fields`), or None.

    After :meth:`sample`, :meth:`extractor_inputs` gives what the extractor needs to see the last
    batch as parts of their volumes: each patch's absolute voxel indices (the diffusion model's fixed
    feature noise) and the crop of its volume's BPR field (the condition it was pretrained with).
    """

    def __init__(self, cases: Sequence, window: Sequence[float], patch_size: Sequence[int], fg_prob: float,
                 rng: np.random.Generator, max_voxels_per_class: int = 20000, fields: Sequence | None = None,
                 sincos: int = 0, fresh_noise: bool = False, whole_volume: bool = False, divisor: int = 1,
                 max_window: Sequence[int] | None = None):
        """``whole_volume``: each item is a whole volume at voxel 0, the batch padded at its end to
        the largest of its volumes rounded up to a multiple of ``divisor`` (``patch_size`` unused).
        ``max_window``: with ``whole_volume``, an axis longer than this is cut to a window of this
        length at a random start (the whole-volume feature path tiles such a volume with windows of
        that size), so that a step never holds more than one window's activations per item."""
        if not cases:
            raise InputError(None, "no labelled training cases")
        self.fields, self.sincos = fields, int(sincos)
        self.fresh_noise = bool(fresh_noise)
        self.whole_volume, self.divisor = bool(whole_volume), max(1, int(divisor))
        self.max_window = None if max_window is None else tuple(int(n) for n in max_window)
        self.last: tuple[list[int], list[list[int]]] = ([], [])
        self.noise_offsets: np.ndarray | None = None
        self.images = [unit_image(c, window) for c in cases]
        self.labels = [np.asarray(c.label, dtype=np.uint8) for c in cases]
        self.size = tuple(int(s) for s in patch_size)
        self.fg_prob = float(fg_prob)
        self.rng = rng
        self.where = class_voxel_index(self.labels, rng, max_voxels_per_class)
        self.classes = sorted(self.where)

    def _crop(self, arr: np.ndarray, start: Sequence[int], fill: float) -> np.ndarray:
        from voxdiff.data.patches import crop_or_pad

        return crop_or_pad(arr, start, self.size, fill)

    def _draw_volumes(self, batch_size: int) -> tuple[list[int], list[list[int]]]:
        """Whole volumes: their indices and starts (voxel 0, or a random start on an axis longer than
        ``max_window``); sets the batch's padded size."""
        where = [int(self.rng.integers(len(self.images))) for _ in range(batch_size)]
        cap = self.max_window or (None, None, None)
        extent = [[n if w is None else min(n, w) for n, w in zip(self.images[i].shape, cap)] for i in where]
        starts = [[0 if n == e else int(self.rng.integers(0, n - e + 1)) for n, e in zip(self.images[i].shape, ext)]
                  for i, ext in zip(where, extent)]
        d = self.divisor
        self.size = tuple(int(-(-max(e[a] for e in extent) // d) * d) for a in range(3))
        return where, starts

    def _draw_patches(self, batch_size: int) -> tuple[list[int], list[list[int]]]:
        """Patches: their volumes' indices and starts (organ-centred with probability ``fg_prob``)."""
        where, starts = [], []
        for _ in range(batch_size):
            if self.classes and self.rng.random() < self.fg_prob:
                c = self.classes[int(self.rng.integers(len(self.classes)))]
                i, idx = self.where[c][int(self.rng.integers(len(self.where[c])))]
                centre = np.unravel_index(int(idx[int(self.rng.integers(idx.size))]), self.labels[i].shape)
                jitter = [int(self.rng.integers(-(n // 4), n // 4 + 1)) for n in self.size]
                start = [int(cc) - n // 2 + j for cc, n, j in zip(centre, self.size, jitter)]
            else:
                i = int(self.rng.integers(len(self.images)))
                start = [int(self.rng.integers(min(0, sh - n), max(0, sh - n) + 1))
                         for sh, n in zip(self.images[i].shape, self.size)]
            where.append(i)
            starts.append(start)
        return where, starts

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        where, starts = (self._draw_volumes if self.whole_volume else self._draw_patches)(batch_size)
        xs = [self._crop(self.images[i], st, 0.0) for i, st in zip(where, starts)]
        ys = [self._crop(self.labels[i], st, 0) for i, st in zip(where, starts)]
        self.last = (where, starts)
        # far from any volume's indices, so the hashed positional noise is a new draw for each patch
        self.noise_offsets = self.rng.integers(1 << 20, 1 << 30, size=(batch_size, 3)) if self.fresh_noise else None
        x = torch.from_numpy(np.stack(xs)[:, None].astype(np.float32))
        y = torch.from_numpy(np.stack(ys).astype(np.int64))
        return x, y

    def extractor_inputs(self, device: Any = "cpu") -> dict[str, torch.Tensor]:
        """``voxel_index`` and (with fields) ``coords`` of the last batch, for :func:`features`
        (with ``fresh_noise`` the indices carry the patch's random offset: they then only seed the
        noise; the condition is cropped at the true position)."""
        from voxdiff.pretrain.diffusion import index_grid

        where, starts = self.last
        origins = np.asarray(starts, dtype=np.int64).reshape(-1, 3)
        if self.noise_offsets is not None:
            origins = origins + self.noise_offsets
        out = {"voxel_index": index_grid(self.size, torch.from_numpy(origins), len(origins)).to(device)}
        if self.fields is not None:
            from voxdiff.bpr.fields import crop_fields

            out["coords"] = crop_fields(self.fields, where, starts, self.size, self.sincos).to(device)
        return out


def condition_fields(extractor, cases: Sequence) -> list | None:
    """The whole-volume BPR fields of ``cases`` when the extractor was pretrained on them
    (``condition_source volume``), else None (the condition is then computed per patch)."""
    task = getattr(extractor, "task", None)
    if not getattr(task, "uses_volume_fields", False):
        return None
    return task.case_fields(cases)


def make_sampler(extractor, cases: Sequence, cfg: "ProbeConfig", rng: np.random.Generator,
                 end_to_end: bool = False) -> PatchSampler:
    """The patch sampler of head fitting (``end_to_end`` False) and of fine-tuning / from-scratch
    training (True: ``cfg.sampling.fresh_noise`` applies) for ``extractor``."""
    sincos = int(getattr(getattr(getattr(extractor, "task", None), "opts", None), "bpr_sincos", 0) or 0)
    whole = bool(end_to_end and cfg.sampling.whole_volume)
    divisor = 1
    if whole:
        from .predict import extractor_window

        divisor = int(extractor_window(extractor))
    return PatchSampler(cases, extractor.preprocess.hu_window, cfg.sampling.patch_size, cfg.sampling.fg_prob, rng,
                        fields=condition_fields(extractor, cases), sincos=sincos,
                        fresh_noise=end_to_end and cfg.sampling.fresh_noise, whole_volume=whole, divisor=divisor,
                        max_window=volume_roi(cfg) if whole else None)


# ------------------------------------------------------------------------------------ loss / metrics


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Cross-entropy + (1 - soft batch Dice averaged over the foreground classes present in ``target``)."""
    n = logits.shape[1]
    ce = F.cross_entropy(logits, target)
    p = torch.softmax(logits, 1)
    onehot = F.one_hot(target, n).movedim(-1, 1).to(p.dtype)
    dims = (0,) + tuple(range(2, logits.ndim))
    inter = (p * onehot).sum(dims)
    denom = p.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    present = onehot.sum(dims)[1:] > 0  # foreground classes in this batch (absent ones: CE only)
    if not bool(present.any()):
        return ce
    return ce + (1.0 - dice[1:][present].mean())


def validate(extractor, heads: dict[str, nn.Module], cases: Sequence, cfg: ProbeConfig, device: torch.device,
             window: Sequence[float]) -> dict[str, float]:
    """Mean Dice of every head over whole validation volumes (one feature pass per window)."""
    if not cases:
        return {}
    scores: dict[str, list[float]] = {n: [] for n in heads}
    for case in cases:
        out = predict_logits(extractor, heads, unit_image(case, window), cfg.inference.roi, cfg.inference.overlap,
                             device=device, amp=cfg.runtime.bf16)
        for n, lg in out.items():
            scores[n].append(mean_dice(logits_to_labels(lg), np.asarray(case.label), cfg.n_classes))
    return {n: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for n, v in scores.items()}


# ------------------------------------------------------------------------------------ training


def keep_best(best: dict[str, tuple[float, dict]], models: dict[str, nn.Module], val: dict[str, float],
              last: bool) -> None:
    """Keep each head's state with the best validation Dice (the last state when nothing validates)."""
    for n, m in models.items():
        score = val.get(n, float("nan"))
        if not val or (np.isfinite(score) and score > best[n][0]) or (last and best[n][0] == -math.inf):
            best[n] = (score if np.isfinite(score) else best[n][0], copy.deepcopy(m.state_dict()))


def restore_best(models: dict[str, nn.Module], best: dict[str, tuple[float, dict]]) -> dict[str, nn.Module]:
    """Load each head's best state, switch to eval and record ``best_val_dice``."""
    for n, m in models.items():
        m.load_state_dict(best[n][1])
        m.eval()
        m.best_val_dice = None if best[n][0] == -math.inf else float(best[n][0])  # type: ignore[attr-defined]
    return models


def train_keeping_norm_stats(head: nn.Module, keep: bool = True) -> None:
    """``head`` in training mode; with ``keep``, its BatchNorm layers stay in eval mode (they normalise
    with the statistics the head was fitted with and do not update them)."""
    head.train()
    if keep:
        for m in head.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


class HeadsTask(TrainTask):
    """Frozen heads as one engine task: one optimiser over every head (AdamW is per parameter, so
    this equals one optimiser per head), the loss is the sum of the heads' losses (their gradients
    do not mix: the features carry none). ``losses_of(models, step)`` gives each head's loss of a
    step, ``validate_of(models)`` the validation Dice and the heads to keep when they are the best
    so far. The sampler's generator, smoothed losses, best states and history live in the train state."""

    def __init__(self, models: dict[str, nn.Module], losses_of, validate_of, cfg: ProbeConfig, sampler,
                 history: list | None, keep_norm_stats: bool = False):
        """``keep_norm_stats``: the heads' BatchNorm statistics stay as fitted (whole-volume refinement)."""
        self.models = nn.ModuleDict(models)
        self.keep_norm_stats = bool(keep_norm_stats)
        self.losses_of, self.validate_of, self.cfg, self.sampler = losses_of, validate_of, cfg, sampler
        self.history = history if history is not None else []
        self.running: dict[str, torch.Tensor] = {}
        self.best = {n: (-math.inf, copy.deepcopy(m.state_dict())) for n, m in models.items()}

    def module(self) -> nn.Module:
        return self.models

    def step(self, model, batch, step: int, gen):
        for m in self.models.values():
            train_keeping_norm_stats(m, self.keep_norm_stats)
        losses = self.losses_of(dict(self.models.items()), step)
        for n, loss in losses.items():
            v = loss.detach().double()  # smoothed in float64, as python floats were
            self.running[n] = 0.9 * self.running[n] + 0.1 * v if step > 0 else v
        total = torch.stack(list(losses.values())).sum()
        return total, {f"loss_{n}": v.detach() for n, v in losses.items()}

    def needs_sync(self, done: int) -> bool:
        return done % self.cfg.optim.val_every == 0 or done == self.cfg.optim.steps

    def after_step(self, engine: Engine, done: int) -> bool:
        if self.needs_sync(done):
            val, keep = self.validate_of(dict(self.models.items()))
            keep_best(self.best, keep, val, last=done == self.cfg.optim.steps)
            self.history.append({"step": done, "loss": {n: float(v) for n, v in self.running.items()},
                                 "val_dice": val})
        return False

    def state(self):
        tensors = {f"running.{n}": v for n, v in self.running.items()}
        for n, (_, sd) in self.best.items():
            tensors.update({f"best.{n}.{k}": v for k, v in sd.items()})
        return tensors, {"sampler_rng": _rng_doc(self.sampler.rng), "history": self.history,
                         "best_score": {n: _finite_or_none(b[0]) for n, b in self.best.items()}}

    def load_state(self, tensors, doc) -> None:
        self.sampler.rng.bit_generator.state = doc["sampler_rng"]
        self.running = {n: tensors[f"running.{n}"] for n in self.models if f"running.{n}" in tensors}
        for n in self.models:
            sd = {k[len(f"best.{n}."):]: v for k, v in tensors.items() if k.startswith(f"best.{n}.")}
            score = doc["best_score"].get(n)
            self.best[n] = (-math.inf if score is None else float(score), sd)
        self.history[:] = doc.get("history") or []


def _rng_doc(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def probe_engine_settings(cfg: ProbeConfig) -> dict[str, Any]:
    """The :class:`~voxdiff.core.engine.EngineConfig` settings that every probe loop shares: the
    sections' mapping (:func:`voxdiff.core.sections.engine_settings`) with AdamW weight decay on every
    parameter and no EMA; metric lines and train states at every validation unless ``runtime`` says
    otherwise. Each loop sets its own schedule (``optim.warmup_steps`` is the probe's backbone freeze,
    not a learning-rate warm-up), and the probe's ``runtime.bf16`` is the extractor's autocast, not the
    engine's: heads and the tuned network train in fp32."""
    o, r = cfg.optim, cfg.runtime
    if o.ema_decay is not None:
        raise InputError(None, "optim.ema_decay: the probe keeps no EMA of the weights (leave it null)")
    s = engine_settings(o, r)
    for k in ("warmup_steps", "min_lr_ratio", "bf16"):
        s.pop(k)

    def every(n: int) -> int:  # 0: at each validation
        return int(n) if int(n) > 0 else int(o.val_every)

    s.update(no_decay_1d=False, threads=max(int(r.threads), 0), seed=cfg.seed, log_every=every(r.log_every),
             checkpoint_every=every(r.checkpoint_every))
    return s


def heads_engine_config(cfg: ProbeConfig, names: Sequence[str], progress: bool, desc: str) -> EngineConfig:
    """Head fitting on the engine: AdamW (weight decay on every parameter), cosine decay from ``lr``
    to ``min_lr_ratio`` (5 %) of it without warm-up, no clipping by default, no EMA; the extractor's
    own autocast (``runtime.bf16``)."""
    return EngineConfig(**probe_engine_settings(cfg), warmup_steps=0, min_lr_ratio=cfg.optim.min_lr_ratio, progress=progress, desc=desc,
                        label="+".join(names), nan_hint="continue from it with resume=True")


def fit_heads(
    extractor,
    train_cases: Sequence,
    val_cases: Sequence = (),
    heads: Sequence[str] = ("linear", "nonlinear"),
    cfg: ProbeConfig | None = None,
    progress: bool = True,
    history: list | None = None,
    state_dir: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, nn.Module]:
    """Train several heads on the frozen extractor in one pass; return ``{name: best head}`` (eval mode).

    Every batch goes through the extractor once (no grad, eval mode) and feeds all heads. With
    validation cases the head state with the best validation Dice is returned, else the last one.
    ``history`` (a list) receives ``{"step", "loss": {...}, "val_dice": {...}}`` records.
    ``state_dir``: train states every ``val_every`` steps there (:mod:`voxdiff.core.engine`);
    ``resume`` continues the latest exactly; ``stop_after`` stops after that many steps (the best
    heads so far are returned).
    """
    cfg = cfg or ProbeConfig()
    names = list(heads)
    bad = [n for n in names if n not in FROZEN_MODES]
    if bad:
        raise ValueError(f"fit_heads trains frozen heads only ({FROZEN_MODES}); use fit_network for {bad}")
    device = resolve_device(cfg.runtime.device)
    set_frozen(extractor)
    move_extractor(extractor, device)
    apply_norm_stats(extractor, cfg, train_cases)
    window = extractor.preprocess.hu_window
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_cases = training_cases(train_cases, cfg)
    sampler = make_sampler(extractor, train_cases, cfg, rng)
    chans = [int(lv.channels) for lv in extractor.levels]
    groups = int(getattr(extractor, "passes", 1))
    models = {n: make_head(n, chans, cfg.n_classes, cfg.head.hidden, cfg.head.blocks, groups=groups).to(device) for n in names}
    stats = _measure_stats(extractor, sampler, cfg, device)
    for m in models.values():
        m.set_feature_stats(stats)

    def losses_of(ms: dict[str, nn.Module], step: int) -> dict[str, torch.Tensor]:
        x, y = sampler.sample(cfg.sampling.batch_size)
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            pyr = features(extractor, x, amp=cfg.runtime.bf16, **sampler.extractor_inputs(device))
        return {n: dice_ce_loss(m(pyr, out_size=x.shape[2:]), y) for n, m in ms.items()}

    def validate_of(ms: dict[str, nn.Module]):
        return validate(extractor, ms, val_cases, cfg, device, window), ms

    task = HeadsTask(models, losses_of, validate_of, cfg, sampler, history)
    engine = Engine(heads_engine_config(cfg, names, progress, "probe " + "+".join(names)), task, state_dir=state_dir,
                    config=cfg, resume=resume)
    engine.fit(stop_after)
    return restore_best(models, task.best)


def _measure_stats(extractor, sampler: PatchSampler, cfg: ProbeConfig, device, batches: int = 4):
    """Per-channel feature statistics on a few training batches (drawn from a copy of the sampler's
    generator so the training patches do not change)."""
    rng = sampler.rng
    sampler.rng = np.random.default_rng(cfg.seed + 7919)
    try:
        pyrs = []
        with torch.no_grad():
            for _ in range(batches):
                x, _ = sampler.sample(cfg.sampling.batch_size)
                pyrs.append(features(extractor, x.to(device), amp=cfg.runtime.bf16, **sampler.extractor_inputs(device)))
    finally:
        sampler.rng = rng
    return feature_stats(pyrs)


def reinit_(module: nn.Module, seed: int) -> nn.Module:
    """Random re-initialisation of every sub-module that can reset itself (same architecture)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
    return module


def smoothed_score(history: Sequence[dict], mode: str, window: int) -> float:
    """Mean validation Dice of ``mode`` over the last ``window`` validations in ``history`` (fewer
    at the start; NaN-free values only; NaN when there are none)."""
    vals = [h.get("val_dice", {}).get(mode, float("nan")) for h in list(history)[-max(int(window), 1):]]
    vals = [float(v) for v in vals if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


class NetworkTask(TrainTask):
    """Fine-tuning / from-scratch training as an engine task: backbone + non-linear head, the
    backbone frozen (and in eval mode) for the first ``warm`` steps, validation every ``val_every``
    steps keeping the best (backbone, head) state, early stopping after ``patience`` validations
    without a better Dice."""

    def __init__(self, ext, backbone: nn.Module, head: nn.Module, sampler: PatchSampler, cfg: ProbeConfig, mode: str,
                 device: torch.device, val_cases: Sequence, history: list | None, warm: int | None = None,
                 track: Sequence[str] = (), fresh: Sequence[nn.Module] = (),
                 trained: Sequence[nn.Module] | None = None):
        """``warm``: steps with the backbone frozen (default: ``cfg.optim.warmup_steps`` when fine-tuning).
        ``track``: checkpoint rules whose states are kept beside ``cfg.optim.selection``'s (``best``
        is always kept; ``smoothed`` here or in the config keeps the smoothed rule's state too).
        ``fresh``: fine-tuning: modules of the backbone re-initialised at random (``cfg.transfer``);
        they train at ``scratch_lr`` in a group of their own, and L2-SP leaves them alone.
        ``trained``: the backbone modules that train (``cfg.tune``); None: the whole backbone. The
        rest stays frozen at its weights."""
        self.ext, self.backbone, self.head, self.sampler, self.cfg = ext, backbone, head, sampler, cfg
        self.mode, self.device, self.val_cases = mode, device, val_cases
        self.history = history if history is not None else []
        self.net = nn.ModuleDict({"head": head, "backbone": backbone})
        self.warm = 0 if mode == "scratch" else min(cfg.optim.warmup_steps if warm is None else warm, cfg.optim.steps)
        self.fitted_head = False  # a head fitted beforehand (LP-FT) trains at the backbone's learning rate
        self.unfrozen = False
        self.best: tuple[float, Any] = (-math.inf, None)
        self.best_step, self.since_best = 0, 0
        # the smoothed rule's (mean Dice of the window, state) and its step, when tracked
        self.smooth_on = "smoothed" in (cfg.optim.selection, *track)
        self.smooth: tuple[float, Any] = (-math.inf, None)
        self.smooth_step = 0
        self.running: torch.Tensor | None = None
        fresh_ids = {id(p) for m in fresh for p in m.parameters()}
        trained_ids = None if trained is None else {id(p) for m in trained for p in m.parameters()}
        self.train_params = [p for p in backbone.parameters() if trained_ids is None or id(p) in trained_ids]
        self.fresh_params = [p for p in self.train_params if id(p) in fresh_ids]
        self.kept_params = [p for p in self.train_params if id(p) not in fresh_ids]
        # L2-SP (optim.anchor_decay): the pretrained weights as fine-tuning found them (a resumed run
        # rebuilds them from the same pretrained network before the engine restores its state)
        self.anchor: list[torch.Tensor] | None = None
        if mode == "finetune" and float(cfg.optim.anchor_decay) > 0 and self.kept_params:
            self.anchor = [p.detach().clone() for p in self.kept_params]

    def module(self) -> nn.Module:
        return self.net

    def param_groups(self, module: nn.Module, cfg: EngineConfig):
        # the backbone's group is there from the start; its parameters get gradients (and AdamW
        # state) only once unfrozen, which is what adding the group at that step would do
        c = self.cfg
        head_lr = c.optim.scratch_lr if self.mode == "scratch" else (c.optim.backbone_lr if self.fitted_head else c.optim.lr)
        bb_lr = c.optim.scratch_lr if self.mode == "scratch" else c.optim.backbone_lr
        groups = [{"params": list(self.head.parameters()), "base_lr": head_lr, "weight_decay": c.optim.weight_decay}]
        if self.kept_params:
            groups.append({"params": self.kept_params, "base_lr": bb_lr, "weight_decay": c.optim.weight_decay,
                           "name": "backbone"})
        if self.fresh_params:
            groups.append({"params": self.fresh_params, "base_lr": c.optim.scratch_lr,
                           "weight_decay": c.optim.weight_decay, "name": "fresh"})
        return groups

    @torch.no_grad()
    def _pull_to_anchor(self, engine: Engine) -> None:
        """L2-SP's decoupled step: every backbone weight ``lr * anchor_decay`` of the way back to its
        pretrained value (after the optimiser's step; the backbone group's current learning rate)."""
        assert self.anchor is not None
        lr = next(float(g["lr"]) for g in engine.optimizer.param_groups if g.get("name") == "backbone")
        rate = lr * float(self.cfg.optim.anchor_decay)
        for p, p0 in zip(self.kept_params, self.anchor):
            p.lerp_(p0, rate)

    def _head_train(self) -> None:
        """The head in training mode; a head fitted beforehand (LP-FT) and trained on whole volumes
        keeps its BatchNorm statistics (those it was fitted with, as it is scored): one volume's
        batch statistics, mostly air, are far from the class-balanced voxels it was fitted on."""
        train_keeping_norm_stats(self.head, keep=self.fitted_head and self.cfg.sampling.whole_volume)

    def on_fit_start(self, engine: Engine) -> None:
        if self.cfg.optim.validate_start and engine.start == 0:
            self.backbone.eval()
            self._validate(0)  # the start as the first candidate (a resumed run kept it in its state)
        self._head_train()  # the backbone stays in eval mode (frozen) until it is unfrozen
        if self.unfrozen:
            self._unfreeze()

    def _unfreeze(self) -> None:
        self.backbone.train()
        for p in self.train_params:
            p.requires_grad_(True)
        self.unfrozen = True

    def on_step_start(self, engine: Engine, step: int) -> None:
        if not self.unfrozen and step + 1 > self.warm and self.train_params:  # (tune head: never)
            self._unfreeze()

    def step(self, model, batch, step: int, gen):
        x, y = self.sampler.sample(self.cfg.sampling.batch_size)
        x, y = x.to(self.device), y.to(self.device)
        self._head_train()
        if self.unfrozen:
            pyr = features(self.ext, x, amp=self.cfg.runtime.bf16, grad=True, **self.sampler.extractor_inputs(self.device))
            if not any(f.requires_grad for f in pyr):
                raise TrainingError("the feature extractor returns no gradients; it cannot be fine-tuned")
        else:
            with torch.no_grad():
                pyr = features(self.ext, x, amp=self.cfg.runtime.bf16, **self.sampler.extractor_inputs(self.device))
        loss = dice_ce_loss(self.head(pyr, out_size=x.shape[2:]), y)
        v = loss.detach().double()
        self.running = 0.9 * self.running + 0.1 * v if (step > 0 and self.running is not None) else v
        return loss, {}

    def needs_sync(self, done: int) -> bool:
        return done % self.cfg.optim.val_every == 0 or done == self.cfg.optim.steps

    def after_step(self, engine: Engine, done: int) -> bool:
        if self.anchor is not None and self.unfrozen:
            self._pull_to_anchor(engine)
        if not self.needs_sync(done):
            return False
        self.backbone.eval()
        stop = self._validate(done)
        if self.unfrozen:
            self.backbone.train()
        return stop

    def _validate(self, done: int) -> bool:
        """Validate the current state after ``done`` steps (0: the start), keep it when the rule
        says so and record it; whether early stopping asks to stop."""
        cfg, mode = self.cfg, self.mode
        if cfg.sampling.whole_volume:  # the window it trains in: whole-volume features, as the voxel probe
            from .voxel import validate_volume

            val = validate_volume(self.ext, {mode: self.head}, self.val_cases, cfg)
        else:
            val = validate(self.ext, {mode: self.head}, self.val_cases, cfg, self.device, self.ext.preprocess.hu_window)
        score = val.get(mode, float("nan"))
        improved = bool(val) and np.isfinite(score) and score > self.best[0]
        if not val or improved or (done == cfg.optim.steps and self.best[1] is None):
            self.best = (score if np.isfinite(score) else self.best[0], self._snapshot())
            self.best_step = done
        rec: dict[str, Any] = {"step": done, "val_dice": val}
        if done > 0:
            rec["loss"] = {mode: float(self.running) if self.running is not None else 0.0}
        self.history.append(rec)
        if self.smooth_on:
            mean = smoothed_score(self.history, mode, cfg.optim.smooth_window)
            smooth_improved = bool(val) and np.isfinite(mean) and mean > self.smooth[0]
            if not val or smooth_improved or (done == cfg.optim.steps and self.smooth[1] is None):
                self.smooth = (mean if np.isfinite(mean) else self.smooth[0], self._snapshot())
                self.smooth_step = done
            if cfg.optim.selection == "smoothed":
                improved = smooth_improved
        self.since_best = 0 if improved else self.since_best + 1
        # early stopping: no better validation Dice for `patience` validations in a row, not before min_steps
        return bool(cfg.optim.patience > 0 and val and self.since_best >= cfg.optim.patience and self.best[1] is not None
                    and done >= cfg.optim.min_steps)

    def _snapshot(self) -> tuple[dict, dict]:
        return copy.deepcopy(self.backbone.state_dict()), copy.deepcopy(self.head.state_dict())

    def selected(self, rule: str, steps_run: int) -> tuple[float | None, int, tuple[dict, dict]]:
        """(the rule's validation score, step, (backbone state, head state)) after ``steps_run``
        steps: the best or smoothed rule's kept state, or the current (last) one. A rule that kept
        nothing (stopped on request before the first validation) gives the current state."""
        if rule not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, not {rule!r}")
        if rule == "smoothed" and not self.smooth_on:
            raise ValueError("the smoothed rule was not tracked in this run")
        kept, step = (self.best, self.best_step) if rule == "best" else (self.smooth, self.smooth_step)
        if rule == "last" or kept[1] is None:
            last = [h["val_dice"].get(self.mode) for h in self.history if h.get("step") == steps_run]
            score = last[0] if rule == "last" and last and last[0] is not None and np.isfinite(last[0]) else None
            return score, steps_run, self._snapshot()
        return (None if kept[0] == -math.inf else float(kept[0])), step, kept[1]

    def state(self):
        tensors: dict[str, torch.Tensor] = {}
        if self.running is not None:
            tensors["running"] = self.running
        for prefix, kept in (("best", self.best), ("smoothed", self.smooth)):
            if kept[1] is not None:
                bstate, hstate = kept[1]
                tensors.update({f"{prefix}.backbone.{k}": v for k, v in bstate.items()})
                tensors.update({f"{prefix}.head.{k}": v for k, v in hstate.items()})
        return tensors, {"sampler_rng": _rng_doc(self.sampler.rng), "history": self.history,
                         "best_score": _finite_or_none(self.best[0]), "has_best": self.best[1] is not None,
                         "best_step": self.best_step, "since_best": self.since_best, "unfrozen": self.unfrozen,
                         "smooth_score": _finite_or_none(self.smooth[0]), "has_smooth": self.smooth[1] is not None,
                         "smooth_step": self.smooth_step}

    def load_state(self, tensors, doc) -> None:
        self.sampler.rng.bit_generator.state = doc["sampler_rng"]
        self.running = tensors.get("running")
        def kept(prefix: str, score) -> tuple[float, Any]:
            return (-math.inf if score is None else float(score),
                    ({k[len(f"{prefix}.backbone."):]: v for k, v in tensors.items() if k.startswith(f"{prefix}.backbone.")},
                     {k[len(f"{prefix}.head."):]: v for k, v in tensors.items() if k.startswith(f"{prefix}.head.")}))

        if doc.get("has_best"):
            self.best = kept("best", doc["best_score"])
        self.best_step, self.since_best = int(doc["best_step"]), int(doc["since_best"])
        if doc.get("has_smooth"):
            self.smooth = kept("smoothed", doc["smooth_score"])
        self.smooth_step = int(doc.get("smooth_step", 0))
        self.unfrozen = bool(doc["unfrozen"])
        self.history[:] = doc.get("history") or []


def fit_network(
    extractor,
    train_cases: Sequence,
    val_cases: Sequence = (),
    mode: str = "finetune",
    cfg: ProbeConfig | None = None,
    progress: bool = True,
    history: list | None = None,
    state_dir: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    init_head: nn.Module | None = None,
    alternatives: dict[str, Any] | None = None,
):
    """Fine-tune (``finetune``) or train from scratch (``scratch``) backbone + non-linear head.

    ``init_head``: fine-tuning only: a non-linear head already fitted on the frozen features (a
    probe's, e.g. :func:`voxdiff.probe.bundle.load_segmenter_head`) to start from instead of a
    random one, with no head-alone warm-up and the head at ``backbone_lr`` too ("linear probing,
    then fine-tuning", LP-FT: the backbone's first gradients come through a trained head, not a
    random one, and a small learning rate keeps what the probe learned).

    ``cfg.t`` (diffusion models): the feature timesteps of the passes trained through, in place of
    the model's own (the returned extractor keeps them).

    Works on a deep copy of ``extractor``; returns ``(tuned_extractor, head)`` in eval mode with the
    state chosen by ``cfg.optim.selection`` (default: the best validation Dice; backbone and head of
    the same step). Only ``extractor.backbone`` is trained (a BPR inside stays frozen). With
    validation cases and ``cfg.optim.patience`` > 0, training stops after ``patience`` validations
    in a row without a better score (early stopping). The head records ``selection`` (the rule),
    ``best_val_dice`` (the rule's validation score of the returned state: a Dice, the window's mean
    Dice for ``smoothed``), ``best_step`` (the step of the returned state) and ``steps_run`` (less
    than ``cfg.optim.steps`` when stopped early).

    ``alternatives``: a dict whose keys name other checkpoint rules (:data:`SELECTIONS`) to compare
    with the configured one in the same run; each value is set to that rule's ``(extractor, head)``,
    recorded the same way. Training is the same whatever the rules (they only choose a state).
    Training runs on the engine
    (:mod:`voxdiff.core.engine`): AdamW, constant learning rates (head ``lr``, backbone
    ``backbone_lr``; ``scratch_lr`` for both from scratch), no clipping, no EMA. ``state_dir``,
    ``resume``, ``stop_after``: as for :func:`fit_heads`.
    """
    if mode not in TUNED_MODES:
        raise ValueError(f"mode must be one of {TUNED_MODES}")
    cfg = cfg or ProbeConfig()
    if mode == "scratch" and float(cfg.optim.anchor_decay) > 0:
        raise InputError(None, "optim.anchor_decay pulls a pretrained backbone toward its start; "
                               "training from scratch has none (set it to 0)")
    if mode == "scratch" and cfg.tune != "all":
        raise InputError(None, f"tune {cfg.tune} keeps pretrained weights frozen; training from scratch has none "
                               "(use tune all)")
    reinit_decoder = mode == "finetune" and cfg.transfer == "encoder"
    if reinit_decoder and cfg.tune == "head":
        raise InputError(None, TUNE_HEAD_NEW_DECODER)
    if reinit_decoder and cfg.norm_stats != "window":
        raise InputError(None, NEW_DECODER_STATS)
    if reinit_decoder and init_head is not None:
        raise InputError(None, "transfer encoder re-initialises the decoder that a fitted head (LP-FT) was fitted on; "
                               "start from a random head or use transfer all")
    device = resolve_device(cfg.runtime.device)
    ext = copy.deepcopy(extractor)
    from voxdiff.features.extract import with_feature_settings

    with_feature_settings(ext, cfg)  # the feature passes the network is trained through (diffusion: --t, --feature_input)
    set_frozen(ext)
    backbone = getattr(ext, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise TrainingError("this feature extractor exposes no backbone module to fine-tune")
    move_extractor(ext, device)
    # fine-tuning: the pretrained network's fixed statistics when asked (those of the frozen probe
    # fitted on the same cases, so an LP-FT head starts on the features it was fitted on)
    apply_norm_stats(ext, cfg, train_cases, mode)
    backbone = ext.backbone
    fresh: list[nn.Module] = []
    trained: list[nn.Module] | None = None
    if mode == "scratch":
        reinit_(backbone, cfg.seed + 1)
    elif reinit_decoder or cfg.tune == "decoder":
        what = "transfer encoder" if reinit_decoder else "tune decoder"
        if not callable(getattr(backbone, "decoder_modules", None)):
            raise InputError(None, f"{what}: the {type(backbone).__name__} backbone does not name its decoder")
        try:
            decoder = list(backbone.decoder_modules())
        except NotImplementedError as e:
            raise InputError(None, f"{what}: {e}") from None
        if reinit_decoder:
            fresh = decoder
            for i, m in enumerate(fresh):
                reinit_(m, cfg.seed + 1 + i)
        if cfg.tune == "decoder":
            trained = decoder
    elif cfg.tune == "head":
        trained = []  # the backbone stays frozen (eval mode, features without gradients)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    sampler = make_sampler(ext, training_cases(train_cases, cfg, crops=False), cfg, rng, end_to_end=True)  # (patches are crops)
    chans = [int(lv.channels) for lv in ext.levels]
    if init_head is not None:
        head = _fitted_head(init_head, chans, cfg, mode).to(device)
    else:
        head = make_head("nonlinear", chans, cfg.n_classes, cfg.head.hidden, cfg.head.blocks).to(device)
        head.set_feature_stats(_measure_stats(ext, sampler, cfg, device))
    others = [r for r in (alternatives or {}) if r != cfg.optim.selection]
    for r in others:
        if r not in SELECTIONS:
            raise ValueError(f"alternatives: unknown checkpoint rule {r!r}; choose from {', '.join(SELECTIONS)}")
    task = NetworkTask(ext, backbone, head, sampler, cfg, mode, device, val_cases, history,
                       warm=0 if init_head is not None else None, track=others, fresh=fresh, trained=trained)
    task.fitted_head = init_head is not None
    ecfg = EngineConfig(**probe_engine_settings(cfg), schedule="constant", progress=progress, desc=mode, label=mode,
                        nan_hint="continue from it with resume=True")
    engine = Engine(ecfg, task, state_dir=state_dir, config=cfg, resume=resume)
    steps_run = engine.fit(stop_after)

    def chosen(rule: str, e, h: nn.Module):
        score, step, (bstate, hstate) = task.selected(rule, steps_run)
        e.backbone.load_state_dict(bstate)
        h.load_state_dict(hstate)
        set_frozen(e)
        h.eval()
        h.selection = rule  # type: ignore[attr-defined]
        h.best_val_dice = score  # type: ignore[attr-defined]
        h.best_step = step  # type: ignore[attr-defined]
        h.steps_run = steps_run  # type: ignore[attr-defined]
        return e, h

    if alternatives is not None:
        for r in list(alternatives):
            alternatives[r] = chosen(r, copy.deepcopy(ext), copy.deepcopy(head))
    return chosen(cfg.optim.selection, ext, head)


def _fitted_head(init_head: nn.Module, chans: list[int], cfg: ProbeConfig, mode: str) -> nn.Module:
    """A trainable copy of a fitted non-linear head, checked against the backbone and the task."""
    if mode != "finetune":
        raise ValueError("init_head applies to fine-tuning only")
    if not isinstance(init_head, NonLinearHead):
        raise ValueError(f"init_head must be a non-linear head, not {type(init_head).__name__}")
    if init_head.level_channels != chans or init_head.n_classes != cfg.n_classes:
        raise ValueError(f"init_head takes channels {init_head.level_channels} and gives {init_head.n_classes} "
                         f"classes; the backbone gives {chans} and the task has {cfg.n_classes}")
    head = copy.deepcopy(init_head)
    head.upsample = "trilinear"  # patches, as the fine-tuning head is built (as a voxel probe's non-linear head scores)
    for p in head.parameters():
        p.requires_grad_(True)
    return head


# ------------------------------------------------------------------------------------ end to end


def select_cases(ids: Sequence[str], splits: list[dict] | None, fold: int | None, cfg: ProbeConfig
                 ) -> tuple[list[str], list[str], list[str]]:
    """(train ids, validation ids for checkpoint selection, test ids) of a fold.

    ``fold=None``: all labelled cases are training cases. Otherwise the fold's ``train`` list trains
    and its ``val`` list (or ``test``, when the splits carry one) is the test set. ``val_from_train``
    cases are held out of training for checkpoint selection (a seeded choice); with 0, the fold's
    validation cases select the checkpoint. ``train_cases`` keeps the first N remaining (seeded order).
    """
    if fold is None:
        train, test = sorted(ids), []
        fold_val: list[str] = []
    else:
        if splits is None or not (0 <= fold < len(splits)):
            raise InputError(None, f"fold {fold} not in the splits ({0 if splits is None else len(splits)} folds)")
        f = splits[fold]
        train = list(f["train"])
        fold_val = list(f.get("val", []))
        test = list(f["test"]) if "test" in f else fold_val
        known = set(ids)
        missing = [c for c in train + test if c not in known]
        if missing:
            raise InputError(None, f"split case ids not in the data set: {', '.join(missing[:5])}")
    rng = np.random.default_rng(cfg.seed)
    order = [train[i] for i in rng.permutation(len(train))]
    if cfg.sampling.val_from_train > 0:
        if len(order) <= cfg.sampling.val_from_train:
            raise InputError(None, f"{len(order)} training case(s) cannot spare {cfg.sampling.val_from_train} for validation")
        val, order = order[: cfg.sampling.val_from_train], order[cfg.sampling.val_from_train:]
    else:
        val = [c for c in fold_val if c not in test] if "test" in (splits[fold] if fold is not None and splits else {}) else fold_val
    if cfg.sampling.train_cases is not None:
        if cfg.sampling.train_cases < 1:
            raise InputError(None, "train_cases must be >= 1")
        order = order[: cfg.sampling.train_cases]
    return sorted(order), sorted(val), sorted(test)


def _three_positive(v: Any) -> bool:
    try:
        return len(v) == 3 and all(int(x) >= 1 for x in v)
    except (TypeError, ValueError):
        return False


def check_probe_config(cfg: ProbeConfig) -> None:
    """Refuse numbers that cannot be meant (a negative step count, a zero learning rate or width, an
    overlap of 1, ...) with one line naming the option, before anything is loaded or written."""
    o, sm, h, w = cfg.optim, cfg.sampling, cfg.head, cfg.inference
    problems = [
        (int(cfg.n_classes) < 2, f"n_classes (background included) must be >= 2, got {cfg.n_classes}"),
        (int(o.steps) < 0, f"optim.steps must be >= 0, got {o.steps}"),
        (int(o.val_every) < 1, f"optim.val_every must be >= 1, got {o.val_every}"),
        (int(o.warmup_steps) < 0 or int(o.patience) < 0 or int(o.min_steps) < 0,
         f"optim.warmup_steps, patience and min_steps must be >= 0, got {o.warmup_steps}, {o.patience}, {o.min_steps}"),
        (not (float(o.lr) > 0 and float(o.backbone_lr) > 0 and float(o.scratch_lr) > 0),
         f"optim.lr, backbone_lr and scratch_lr must be > 0, got {o.lr}, {o.backbone_lr}, {o.scratch_lr}"),
        (float(o.weight_decay) < 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
        (not 0 <= float(o.anchor_decay) * float(o.backbone_lr) < 1,
         f"optim.anchor_decay must be >= 0 with anchor_decay * backbone_lr < 1, got {o.anchor_decay} "
         f"(backbone_lr {o.backbone_lr})"),
        (int(h.hidden) < 1 or int(h.blocks) < 0, f"head.hidden must be >= 1 and head.blocks >= 0, got {h.hidden}, {h.blocks}"),
        (h.upsample not in UPSAMPLE_CHOICES,
         f"head.upsample must be {', '.join(UPSAMPLE_CHOICES[:-1])} or {UPSAMPLE_CHOICES[-1]}, got {h.upsample!r}"),
        (not _three_positive(sm.patch_size), f"sampling.patch_size must be 3 sizes >= 1, got {sm.patch_size}"),
        (int(sm.batch_size) < 1 or int(sm.voxels_per_step) < 1,
         f"sampling.batch_size and voxels_per_step must be >= 1, got {sm.batch_size}, {sm.voxels_per_step}"),
        (not 0 <= float(sm.fg_prob) <= 1, f"sampling.fg_prob must lie in [0, 1], got {sm.fg_prob}"),
        (sm.train_cases is not None and int(sm.train_cases) < 1, f"sampling.train_cases must be >= 1, got {sm.train_cases}"),
        (int(sm.val_from_train) < 0, f"sampling.val_from_train must be >= 0, got {sm.val_from_train}"),
        (not _three_positive(w.roi), f"inference.roi must be 3 sizes >= 1, got {w.roi}"),
        (w.feature_roi is not None and not _three_positive(w.feature_roi),
         f"inference.feature_roi must be 3 sizes >= 1, got {w.feature_roi}"),
        (cfg.norm_stats not in NORM_STATS, f"norm_stats must be one of {', '.join(NORM_STATS)}, got {cfg.norm_stats!r}"),
        (int(cfg.norm_crops) < 1, f"norm_crops must be >= 1, got {cfg.norm_crops}"),
        (cfg.transfer not in TRANSFERS, f"transfer must be one of {', '.join(TRANSFERS)}, got {cfg.transfer!r}"),
        (cfg.transfer == "encoder" and cfg.feature_side == "encoder",
         "transfer encoder re-initialises the decoder, which feature_side encoder never reads; "
         "use feature_side decoder or both"),
        (cfg.transfer == "encoder" and cfg.norm_stats != "window",
         NEW_DECODER_STATS),
        (cfg.tune not in TUNED_PARTS, f"tune must be one of {', '.join(TUNED_PARTS)}, got {cfg.tune!r}"),
        (cfg.tune == "head" and cfg.transfer == "encoder", TUNE_HEAD_NEW_DECODER),
        (int(o.refine_steps) < 0 or int(o.refine_val_every) < 1 or not float(o.refine_lr) > 0,
         f"optim.refine_steps must be >= 0, refine_val_every >= 1 and refine_lr > 0, got {o.refine_steps}, "
         f"{o.refine_val_every}, {o.refine_lr}"),
        (int(o.refine_steps) > 0 and cfg.frozen_training != "voxels",
         "optim.refine_steps refines heads fitted on voxels; use frozen_training voxels"),
        (cfg.tune == "decoder" and cfg.feature_side == "encoder",
         "tune decoder trains the decoder, which feature_side encoder never reads; use feature_side decoder or both"),
    ]
    for bad, msg in problems:
        if bad:
            raise InputError(None, msg)
    check_window(w.overlap, prefix="inference.")


def train_probe(
    cfg: ProbeConfig,
    pretrained_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    fold: int | None = 0,
    splits: str | os.PathLike | list | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Load a pretrained model and a labelled data set, train ``cfg.heads`` and write one segmenter
    bundle per head under ``out_dir/<head>/`` plus ``probe.json`` (case ids, parameter counts,
    validation history) and ``config.yaml``.

    ``splits``: an nnU-Net ``splits_final.json`` (or the folds as a list); default: the data set's
    ``splits_final.json`` when present, else 5-fold splits of its labelled cases.
    """
    from voxdiff.core.config import write_config
    from voxdiff.core.outputs import check_output_path, staged_dir
    from voxdiff.data.adapters import open_dataset
    from voxdiff.data.cache import load_preprocessed
    from voxdiff.data.splits import make_splits, read_splits
    from voxdiff.pretrain.load import load_pretrained

    from .bundle import save_segmenter

    if cfg.frozen_training not in ("voxels", "patches"):
        raise InputError(None, f"frozen_training must be voxels or patches, not {cfg.frozen_training!r}")
    bad = [h for h in cfg.heads if h not in ALL_MODES]
    if bad or not cfg.heads:
        raise InputError(None, f"unknown head/mode {bad or '(none)'}; choose from {', '.join(ALL_MODES)}")
    check_probe_config(cfg)
    check_output_path(out_dir, force=force, inputs=(pretrained_dir, data_dir, splits if isinstance(splits, (str, os.PathLike)) else None))
    device = resolve_device(cfg.runtime.device)
    extractor = load_pretrained(pretrained_dir, device=device)
    from voxdiff.features.extract import feature_input_of, feature_side_of, feature_timesteps, with_feature_settings
    from voxdiff.features.norm import fixed_norm_stats

    with_feature_settings(extractor, cfg)
    ds = open_dataset(data_dir, split="train")
    labelled = [r.case_id for r in ds.labelled]
    if not labelled:
        raise InputError(data_dir, "no labelled training cases")
    ds.refs = [r for r in ds.refs if r.label_path is not None]
    if isinstance(splits, list):
        folds = splits
    elif splits is not None:
        folds = read_splits(splits)
    elif (Path(data_dir) / "splits_final.json").is_file():
        folds = read_splits(Path(data_dir) / "splits_final.json")
    elif fold is not None:
        folds = make_splits(labelled, "kfold", k=min(5, len(labelled)))
    else:
        folds = None
    train_ids, val_ids, test_ids = select_cases(labelled, folds, fold, cfg)
    pre = extractor.preprocess
    train = load_preprocessed(ds, pre, cache_dir=cache_dir, case_ids=train_ids, progress=progress)
    val = load_preprocessed(ds, pre, cache_dir=cache_dir, case_ids=val_ids, progress=progress) if val_ids else []
    history: dict[str, list] = {}
    results: dict[str, tuple[Any, nn.Module]] = {}
    t0 = time.time()
    frozen = [h for h in cfg.heads if h in FROZEN_MODES]
    if frozen:
        hist: list = []
        if cfg.frozen_training == "voxels":
            from .voxel import fit_heads_voxels

            heads = fit_heads_voxels(extractor, train, val, frozen, cfg, voxels_per_step=cfg.sampling.voxels_per_step,
                                     progress=progress, history=hist)
        else:
            heads = fit_heads(extractor, train, val, frozen, cfg, progress=progress, history=hist)
        for n, h in heads.items():
            results[n] = (None, h)
            history[n] = hist
    for mode in [h for h in cfg.heads if h in TUNED_MODES]:
        hist = []
        ext, h = fit_network(extractor, train, val, mode, cfg, progress=progress, history=hist)
        results[mode] = (ext, h)
        history[mode] = hist
    backbone_params = count_parameters(extractor.backbone)
    summary = {
        "fold": fold,
        "train_cases": train_ids,
        "val_cases": val_ids,
        "test_cases": test_ids,
        "pretrained": str(Path(pretrained_dir).resolve()),
        "data": str(Path(data_dir).resolve()),
        "method": getattr(extractor, "method", None),
        "backbone_parameters": backbone_params,
        "heads": {n: {"parameters": count_parameters(h), "best_val_dice": getattr(h, "best_val_dice", None),
                      "ratio_to_backbone": count_parameters(h) / max(1, backbone_params)}
                  for n, (_, h) in results.items()},
        "history": history,
        "seconds": round(time.time() - t0, 1),
    }
    from voxdiff.data.phantom import training_data_record

    origin = training_data_record(data_dir)  # (voxdiff segment says so on real CT)
    with staged_dir(out_dir, force=force) as tmp:
        for n, (ext, h) in results.items():
            # the window its head was trained in: whole-volume features for voxel probes and for
            # networks trained on whole volumes, sliding windows of the training patches otherwise
            volume = (cfg.frozen_training == "voxels") if n in FROZEN_MODES else bool(cfg.sampling.whole_volume)
            save_segmenter(tmp / n, pretrained_dir, h, n, pre, volume_roi(cfg) if volume else cfg.inference.roi, cfg.inference.overlap,
                           tuned_extractor=ext,
                           inference="volume" if volume else "window", timesteps=feature_timesteps(extractor),
                           feature_input=feature_input_of(extractor), feature_side=feature_side_of(extractor),
                           norm_stats=fixed_norm_stats((ext if ext is not None else extractor).backbone),
                           meta={k: summary[k] for k in ("fold", "train_cases", "val_cases", "test_cases", "data")}
                           | {"best_val_dice": summary["heads"][n]["best_val_dice"]} | origin)
        from voxdiff.core.outputs import atomic_write_json

        atomic_write_json(tmp / "probe.json", summary)
        write_config(tmp, cfg, extra={"pretrained": summary["pretrained"], "data": summary["data"], "fold": fold})
    return Path(out_dir)
