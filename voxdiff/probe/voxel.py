"""Probing on cached whole-volume features with voxel sampling (the fast path for frozen heads).

Both vox2vec heads are per-voxel functions of the frozen pyramid: every convolution has kernel 1
and the levels are upsampled with nearest neighbour, so the logits at a voxel depend only on the
feature vectors of that voxel at every level (level ``l`` read at ``voxel // stride_l``). Training
them therefore does not need patches: the pyramid of every training volume is computed once by
sliding window (:func:`voxdiff.features.extract_volume`, float16, each level at its own stride),
and each optimisation step draws a batch of voxels (half of them on organ voxels, organ drawn
uniformly so that small organs are seen) and feeds their gathered feature vectors to the heads as
``(N, C_l, 1, 1, 1)`` pyramids. The heads are the same modules used at inference, so a head trained
here plugs into :func:`voxdiff.probe.predict.predict_logits` and the segmenter bundle unchanged. Built
with ``upsample="nearest"`` the two computations are identical; with ``trilinear`` the whole-volume
inference interpolates the coarse maps the head computes (training is the same: gathered voxels are
not upsampled). ``head.upsample: auto`` (the default) builds the non-linear and mix heads trilinear and the linear
head nearest, which held-out phantoms favoured (docs/PROBING.md).

Features of the training volumes come from the same sliding-window pass that inference uses, which
also removes the train/test mismatch of patch-wise features near window borders. This is the
DDPM-seg recipe (per-pixel MLPs on frozen diffusion features) applied to vox2vec's heads, and it
sees orders of magnitude more labelled voxels per second on a CPU than patch training.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voxdiff.core.engine import Engine, EngineConfig
from voxdiff.core.errors import InputError
from voxdiff.core.metrics import mean_dice
from voxdiff.core.runtime import resolve_device
from voxdiff.features.extract import extract_volume, largest_stride, level_strides

from .heads import LinearHead, MixHead, NonLinearHead
from .predict import set_frozen, unit_image
from .train import (
    AUTO_UPSAMPLE,
    FROZEN_MODES,
    HeadsTask,
    ProbeConfig,
    apply_norm_stats,
    class_voxel_index,
    dice_ce_loss,
    head_upsample,
    heads_engine_config,
    keep_best,
    move_extractor,
    probe_engine_settings,
    restore_best,
    training_cases,
    volume_roi,
)


def compute_volume_pyramid(extractor, image_unit: np.ndarray, cfg: ProbeConfig) -> list[torch.Tensor]:
    """Float16 pyramid ``[(C_l, X'/s_l, Y'/s_l, Z'/s_l)]`` of a [0,1] volume, ``X'`` the volume's size
    rounded up to a multiple of the largest stride, so that every level is an exact subsampling of the
    full grid and nearest upsampling is exact. The extraction sees the volume itself (it pads the
    windows' grid at the far end with 0 = below the window, as before), so a whole-volume condition
    map (BPR, in-plane position) is the volume's own, as in pretraining, not that of a padded volume
    whose centre lies up to ``(s - 1) / 2`` voxels further; levels are then zero-filled to ``X'/s_l``
    (those voxels lie outside the volume and are never read)."""

    d = largest_stride(extractor)
    pyr = extract_volume(extractor, image_unit, roi=volume_roi(cfg), overlap=cfg.inference.overlap, progress=False,
                         bf16=cfg.runtime.bf16)
    out = []
    for lv, f in zip(extractor.levels, pyr):
        f = f[0]  # drop the batch axis
        want = [-(-n // d) * d // int(lv.stride) for n in image_unit.shape]
        pad = [w - n for w, n in zip(want, f.shape[1:])]
        if any(pad):
            f = torch.nn.functional.pad(f, (0, pad[2], 0, pad[1], 0, pad[0]))
        out.append(f)
    return out


# Where whole-volume pyramids come from: None = computed (:func:`compute_volume_pyramid`); scripts that
# score many variants on the same volumes set a caching function (benchmarks/hypotheses.py).
_feature_source = None


def set_feature_source(fn) -> None:
    """Route :func:`volume_pyramid` through ``fn(extractor, image_unit, cfg) -> pyramid`` (e.g. a cache
    in front of :func:`compute_volume_pyramid`); ``None`` restores plain computation."""
    global _feature_source
    _feature_source = fn


def volume_pyramid(extractor, image_unit: np.ndarray, cfg: ProbeConfig) -> list[torch.Tensor]:
    """The whole-volume pyramid of :func:`compute_volume_pyramid`, or of the function installed with
    :func:`set_feature_source`."""
    if _feature_source is not None:
        return _feature_source(extractor, image_unit, cfg)
    return compute_volume_pyramid(extractor, image_unit, cfg)


def case_pyramids(extractor, cases: Sequence, cfg: ProbeConfig, progress: bool = False, convert=None) -> list:
    """Whole-volume pyramids (see :func:`volume_pyramid`) of preprocessed HU cases; ``convert``: a
    function applied to each pyramid as soon as it is computed (one pyramid in memory at a time)."""
    from tqdm import tqdm

    window = extractor.preprocess.hu_window
    out = []
    for c in tqdm(cases, desc="features", unit="case", disable=None if progress else True, leave=False):
        pyr = volume_pyramid(extractor, unit_image(c, window), cfg)
        out.append(convert(pyr) if convert is not None else pyr)
    return out


@torch.no_grad()
def predict_logits_volume(extractor, heads: dict[str, nn.Module], image_unit: np.ndarray, cfg: ProbeConfig,
                          pyramid: list[torch.Tensor] | None = None, chunk: int = 32) -> dict[str, torch.Tensor]:
    """Logits ``(C, X, Y, Z)`` (on the CPU) of every head from one whole-volume feature pass (the
    features the heads were trained on); heads run slab by slab along z, on their own device, to bound
    memory."""
    pyr = pyramid if pyramid is not None else volume_pyramid(extractor, image_unit, cfg)
    strides = level_strides(extractor)
    d = max(strides)
    X, Y, Z = image_unit.shape
    full = [p.shape[1] * s for p, s in zip(pyr, strides)]
    out: dict[str, torch.Tensor] = {}
    step = max(d, (chunk // d) * d)
    for n, h in heads.items():
        h.eval()
        dev = next(h.parameters()).device  # the pyramid stays on the CPU; each slab goes to the head
        parts = []
        for z0 in range(0, pyr[0].shape[3], step):
            sub = [p[None, :, :, :, z0 // s:(z0 + step) // s].to(dev).float() for p, s in zip(pyr, strides)]
            size = (full[0], pyr[0].shape[2], sub[0].shape[4])
            parts.append(h(sub, out_size=size)[0].cpu())
        out[n] = torch.cat(parts, 3)[:, :X, :Y, :Z].contiguous()
    return out


def validate_volume(extractor, heads: dict[str, nn.Module], cases: Sequence, cfg: ProbeConfig,
                    pyramids: Sequence[list[torch.Tensor]] | None = None) -> dict[str, float]:
    """Mean Dice of every head over whole validation volumes (whole-volume features; ``pyramids``:
    those of ``cases`` when already computed)."""
    from .predict import logits_to_labels

    if not cases:
        return {}
    scores: dict[str, list[float]] = {n: [] for n in heads}
    window = extractor.preprocess.hu_window
    for k, case in enumerate(cases):
        pyr = pyramids[k] if pyramids is not None else None
        for n, lg in predict_logits_volume(extractor, heads, unit_image(case, window), cfg, pyramid=pyr).items():
            scores[n].append(mean_dice(logits_to_labels(lg), np.asarray(case.label), cfg.n_classes))
    return {n: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for n, v in scores.items()}


class VoxelSampler:
    """Class-balanced voxel batches: ``fg_prob`` of them on organ voxels (organ drawn uniformly)."""

    def __init__(self, labels: Sequence[np.ndarray], fg_prob: float, rng: np.random.Generator):
        self.labels = [np.asarray(lab, dtype=np.uint8) for lab in labels]
        self.shapes = [lab.shape for lab in self.labels]
        self.fg_prob = float(fg_prob)
        self.rng = rng
        self.where = class_voxel_index(self.labels)
        self.classes = sorted(self.where)
        if not self.classes:
            raise InputError(None, "the training cases contain no organ voxels")

    def sample(self, n: int) -> list[tuple[int, np.ndarray]]:
        """``[(case index, flat voxel indices)]`` for a batch of ``n`` voxels."""
        n_fg = int(round(n * self.fg_prob))
        picks: dict[int, list[np.ndarray]] = {}
        cls = self.rng.integers(len(self.classes), size=n_fg)
        for c_idx, k in zip(*np.unique(cls, return_counts=True)):
            lists = self.where[self.classes[int(c_idx)]]
            which = self.rng.integers(len(lists), size=int(k))
            for j, kk in zip(*np.unique(which, return_counts=True)):
                i, idx = lists[int(j)]
                picks.setdefault(i, []).append(idx[self.rng.integers(idx.size, size=int(kk))])
        cases = self.rng.integers(len(self.labels), size=n - n_fg)
        for i, kk in zip(*np.unique(cases, return_counts=True)):
            size = int(np.prod(self.shapes[int(i)]))
            picks.setdefault(int(i), []).append(self.rng.integers(size, size=int(kk)))
        return [(i, np.concatenate(v)) for i, v in picks.items()]


class VoxelTable:
    """One pyramid level of one volume, voxel-major: ``rows`` is ``(M, C)`` (float16 from
    :func:`volume_pyramid`), row ``m`` the feature vector of flat voxel ``m`` of the level's grid
    ``shape``. A batch of voxels is then one ``index_select`` of contiguous rows, 15x faster than
    advanced indexing of ``(C, X, Y, Z)``."""

    __slots__ = ("rows", "shape")

    def __init__(self, level: torch.Tensor):
        self.shape = tuple(int(n) for n in level.shape[1:])
        self.rows = level.reshape(level.shape[0], -1).t().contiguous()


def voxel_tables(pyramid: Sequence[torch.Tensor]) -> list[VoxelTable]:
    """:class:`VoxelTable` of every level of a ``[(C_l, X_l, Y_l, Z_l)]`` pyramid."""
    return [VoxelTable(p) for p in pyramid]


def gather(tables: list[list[VoxelTable]], labels: list[np.ndarray], strides: Sequence[int],
           batch: list[tuple[int, np.ndarray]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Feature vectors of the sampled voxels and their labels.

    ``tables``: per volume, its :func:`voxel_tables`. The pyramid comes back as ``(1, C_l, N, 1, 1)``
    float32 with channels-last strides: the N voxels side by side along one spatial axis (every level
    the same size, so the heads' nearest upsampling is the identity and BatchNorm normalises over
    the N voxels), a layout in which the heads' kernel-1 convolutions are plain matrix products.
    The logits of voxel ``n`` are ``head(pyramid)[0, :, n, 0, 0]``."""
    levels: list[list[torch.Tensor]] = [[] for _ in strides]
    ys = []
    for i, flat in batch:
        x, y, z = np.unravel_index(flat, labels[i].shape)
        ys.append(torch.from_numpy(labels[i].ravel()[flat].astype(np.int64)))
        for lv, s in enumerate(strides):
            t = tables[i][lv]
            _, ny, nz = t.shape
            rows = (x // s) * (ny * nz) + (y // s) * nz + z // s
            levels[lv].append(t.rows.index_select(0, torch.from_numpy(rows)))
    pyr = [torch.cat(lv, 0).float().t()[None, :, :, None, None] for lv in levels]
    return pyr, torch.cat(ys)


def voxel_logits(head: nn.Module, pyramid: list[torch.Tensor]) -> torch.Tensor:
    """``(N, n_classes)`` logits of a :func:`gather` batch."""
    return head(pyramid, out_size=pyramid[0].shape[2:])[0, :, :, 0, 0].t()


def make_voxel_head(name: str, level_channels: Sequence[int], cfg: ProbeConfig, groups: int = 1) -> nn.Module:
    """A frozen head for voxel probing; its upsampling on whole volumes follows ``cfg.head.upsample``
    (:func:`~voxdiff.probe.train.head_upsample`; gathered voxels, all levels at one size, are not
    upsampled: training does not depend on it)."""
    if name not in AUTO_UPSAMPLE:
        raise ValueError(f"voxel probing trains frozen heads only ({FROZEN_MODES}), not {name!r}")
    up = head_upsample(name, cfg.head.upsample)
    if name == "mix":
        return MixHead(level_channels, cfg.n_classes, groups=groups, hidden=cfg.head.hidden, blocks=cfg.head.blocks,
                       upsample=up)
    if name == "linear":
        return LinearHead(level_channels, cfg.n_classes, upsample=up)
    return NonLinearHead(level_channels, cfg.n_classes, cfg.head.hidden, cfg.head.blocks, upsample=up)


def prior_log_ratio(labels: Sequence[np.ndarray], sampler: VoxelSampler, n_classes: int) -> torch.Tensor:
    """``log p_volume(c) - log p_sampled(c)`` per class: the logit shift that turns a classifier
    trained on class-balanced voxels into one calibrated for whole volumes (prior correction)."""
    counts = np.zeros(n_classes, dtype=np.float64)
    for lab in labels:
        counts += np.bincount(lab.ravel(), minlength=n_classes)[:n_classes]
    p_vol = counts / counts.sum()
    p_fg = np.zeros(n_classes)
    for c in sampler.classes:
        if c < n_classes:
            p_fg[c] = 1.0 / len(sampler.classes)
    p_s = sampler.fg_prob * p_fg + (1.0 - sampler.fg_prob) * p_vol
    eps = 1e-8
    ratio = np.where(p_s > 0, np.log(p_vol + eps) - np.log(p_s + eps), 0.0)
    return torch.tensor(ratio, dtype=torch.float32)


def prior_corrected(head: nn.Module, log_ratio: torch.Tensor) -> nn.Module:
    """A copy of ``head`` (eval mode) whose output bias includes the prior correction."""
    h = copy.deepcopy(head).eval()
    last = h.out if isinstance(h, (NonLinearHead, MixHead)) else h.convs[0]
    with torch.no_grad():
        last.bias.add_(log_ratio.to(last.bias))
    return h


def fit_heads_voxels(extractor, train_cases: Sequence, val_cases: Sequence = (),
                     heads: Sequence[str] = ("linear", "nonlinear"), cfg: ProbeConfig | None = None,
                     voxels_per_step: int = 8192, progress: bool = True, history: list | None = None,
                     state_dir: str | os.PathLike | None = None, resume: bool = False,
                     stop_after: int | None = None) -> dict[str, nn.Module]:
    """Train frozen heads on voxel samples of cached whole-volume features; ``{name: best head}``.

    ``cfg.optim.steps`` optimisation steps of ``voxels_per_step`` voxels; cross-entropy (voxels are
    class-balanced by the sampler, which is what the soft Dice term does for patches); validation
    on whole volumes every ``cfg.optim.val_every`` steps keeps the best state per head. Training runs on
    the engine (:func:`voxdiff.probe.train.heads_engine_config`); ``state_dir``, ``resume`` and
    ``stop_after`` as for :func:`voxdiff.probe.train.fit_heads`.
    """
    cfg = cfg or ProbeConfig()
    device = resolve_device(cfg.runtime.device)
    set_frozen(extractor)
    move_extractor(extractor, device)  # features are extracted where the probe runs, as fit_heads does
    if not train_cases:
        raise InputError(None, "no labelled training cases")
    apply_norm_stats(extractor, cfg, train_cases)  # (of the labelled cases, not their copies or crops)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    labelled = list(train_cases)
    train_cases = training_cases(train_cases, cfg)
    tables = case_pyramids(extractor, train_cases, cfg, progress=progress, convert=voxel_tables)
    labels = [np.asarray(c.label, dtype=np.uint8) for c in train_cases]
    strides = level_strides(extractor)
    chans = [int(t.rows.shape[1]) for t in tables[0]]
    sampler = VoxelSampler(labels, cfg.sampling.fg_prob, rng)
    groups = int(getattr(extractor, "passes", 1))
    models = {n: make_voxel_head(n, chans, cfg, groups).to(device) for n in heads}
    # fixed per-channel standardisation from a large voxel sample (keeps the linear head linear)
    stat_pyr, _ = gather(tables, labels, strides, sampler.sample(min(65536, 8 * voxels_per_step)))
    stats = [(f[0, :, :, 0, 0].mean(1), f[0, :, :, 0, 0].std(1)) for f in stat_pyr]
    for m in models.values():
        m.set_feature_stats(stats)
    log_ratio = prior_log_ratio(labels, sampler, cfg.n_classes).to(device)

    def losses_of(ms: dict[str, nn.Module], step: int) -> dict[str, torch.Tensor]:
        pyr, y = gather(tables, labels, strides, sampler.sample(voxels_per_step))
        pyr, y = [p.to(device) for p in pyr], y.to(device)
        return {n: F.cross_entropy(voxel_logits(m, pyr), y) for n, m in ms.items()}

    val_pyrs: list[list[torch.Tensor]] = []  # the validation cases' features, computed at the first validation

    def validate_of(ms: dict[str, nn.Module]):
        if val_cases and not val_pyrs:
            val_pyrs.extend(case_pyramids(extractor, val_cases, cfg))
        corrected = {n: prior_corrected(m, log_ratio) for n, m in ms.items()}
        return validate_volume(extractor, corrected, val_cases, cfg, pyramids=val_pyrs), corrected

    task = HeadsTask(models, losses_of, validate_of, cfg, sampler, history)
    ecfg = heads_engine_config(cfg, list(models), progress, "probe(voxels) " + "+".join(models))
    engine = Engine(ecfg, task, state_dir=state_dir, config=cfg, resume=resume)
    done = engine.fit(stop_after)
    best = restore_best(models, task.best)
    if int(cfg.optim.refine_steps) <= 0 or (stop_after is not None and done < int(cfg.optim.steps)):
        return best
    whole = len(training_cases(labelled, cfg, crops=False))  # the cases' whole volumes (and copies) come first
    pyramids = [[table_level(t) for t in tables[i]] for i in range(whole)]
    refine_state = None if state_dir is None else os.path.join(os.fspath(state_dir), "refine")
    return refine_heads_volume(extractor, best, train_cases[:whole], val_cases, cfg, pyramids=pyramids,
                               val_pyramids=val_pyrs or None, progress=progress, history=history,
                               state_dir=refine_state, resume=resume)


def table_level(table: VoxelTable) -> torch.Tensor:
    """The ``(C, X, Y, Z)`` level a :class:`VoxelTable` was made from, as a view of its rows
    (channels-last strides, the table's dtype)."""
    x, y, z = table.shape
    return table.rows.t().reshape(table.rows.shape[1], x, y, z)


def refine_heads_volume(extractor, heads: dict[str, nn.Module], train_cases: Sequence, val_cases: Sequence,
                        cfg: ProbeConfig, pyramids: Sequence[list[torch.Tensor]] | None = None,
                        val_pyramids: Sequence[list[torch.Tensor]] | None = None, progress: bool = False,
                        history: list | None = None, state_dir: str | os.PathLike | None = None,
                        resume: bool = False) -> dict[str, nn.Module]:
    """Refine fitted frozen heads on whole training volumes; ``{name: refined head}`` (eval mode).

    The voxel probe fits its heads on class-balanced voxels and shifts their output bias to the
    volumes' class frequencies (:func:`prior_log_ratio`). This trains copies of ``heads`` further on
    the whole-volume features of ``train_cases`` (``pyramids``: theirs when already computed, as
    :func:`volume_pyramid` gives them), one volume a step (drawn at random), with fine-tuning's
    segmentation loss (:func:`voxdiff.probe.train.dice_ce_loss`) over the whole volume: LP-FT's
    whole-volume steps with the backbone frozen, its features computed once and each head keeping its
    own upsampling.
    ``cfg.optim.refine_steps`` steps at the constant ``refine_lr``; the heads' BatchNorm statistics
    stay those they were fitted with (one volume's statistics, mostly air, are not the voxels'). Every
    ``refine_val_every`` steps the heads are scored on whole validation volumes, and each head's best
    state is kept, the heads as given being the first candidate (no validation cases: the last state).
    ``extractor`` is used as given: its feature settings and normalisation statistics must be those the
    heads were fitted with (a segmenter bundle's extractor, or the one :func:`fit_heads_voxels` prepared).
    On the engine, with ``state_dir`` / ``resume`` as elsewhere."""
    steps = int(cfg.optim.refine_steps)
    if steps <= 0:
        return heads
    if not train_cases:
        raise InputError(None, "no labelled training cases to refine the heads on")
    device = resolve_device(cfg.runtime.device)
    set_frozen(extractor)
    move_extractor(extractor, device)
    if pyramids is None:
        pyramids = case_pyramids(extractor, train_cases, cfg, progress=progress)
    labels = [torch.from_numpy(np.asarray(c.label, dtype=np.int64)) for c in train_cases]
    models = {n: copy.deepcopy(h).to(device) for n, h in heads.items()}
    val_pyrs: list[list[torch.Tensor]] = list(val_pyramids or [])
    if val_cases and not val_pyrs:
        val_pyrs.extend(case_pyramids(extractor, val_cases, cfg))
    rcfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, steps=steps, lr=float(cfg.optim.refine_lr),
                                                              val_every=int(cfg.optim.refine_val_every)))
    picker = SimpleNamespace(rng=np.random.default_rng(int(cfg.seed) + 1))  # which volume each step trains on

    def losses_of(ms: dict[str, nn.Module], step: int) -> dict[str, torch.Tensor]:
        i = int(picker.rng.integers(len(pyramids)))
        pyr = [p[None].to(device).float() for p in pyramids[i]]
        y = labels[i][None].to(device)
        out = {}
        for n, m in ms.items():
            logits = m(pyr, out_size=pyr[0].shape[2:])
            out[n] = dice_ce_loss(logits[:, :, :y.shape[1], :y.shape[2], :y.shape[3]], y)
        return out

    def validate_of(ms: dict[str, nn.Module]):
        return validate_volume(extractor, ms, val_cases, cfg, pyramids=val_pyrs), ms

    steps_log: list = []  # the refinement's validations (step 0: the heads as given)
    task = HeadsTask(models, losses_of, validate_of, rcfg, picker, steps_log, keep_norm_stats=True)
    if val_cases:  # the heads as given: the first candidate
        first = validate_volume(extractor, models, val_cases, cfg, pyramids=val_pyrs)
        keep_best(task.best, models, first, last=False)
        steps_log.append({"step": 0, "val_dice": first})
    ecfg = EngineConfig(**probe_engine_settings(rcfg), schedule="constant", progress=progress,
                        desc="refine(volumes) " + "+".join(models), label="refine " + "+".join(models),
                        nan_hint="continue from it with resume=True")
    Engine(ecfg, task, state_dir=state_dir, config=rcfg, resume=resume).fit()
    if history is not None:
        history.extend({"refine": True, **h} for h in steps_log)
    return restore_best(models, task.best)
