"""Why do frozen features plateau? Hypothesis tests on the backbones of a multi-seed benchmark.

Runs on a finished (or partly finished) ``voxdiff experiment compare --seeds ...`` folder and reuses
each seed's pretrained backbones, heads and split; nothing is pretrained again. Each test prints
one JSON line per (test, method, seed, variant) with its value (the mean test Dice in %, mean over
cases of each case's organ mean; or a loss), and a summary over seeds at the end:

* ``shift``: the experiment's fitted non-linear head (its segmenter bundle) scored on the test
  phantoms with every HU value shifted by -30 / 0 / +30, and on its own training phantoms (the
  train-vs-test gap).
* ``floor``: a non-linear head fitted on the BPR map alone (the diffusion + BPR model's whole-volume
  condition, 3 channels for ape), the floor any BPR-conditioned feature should beat.
* ``levels``: a non-linear head fitted on one pyramid level at a time (the others set to zero), to
  see which levels carry organ information.
* ``window``: features extracted with windows of the training patch, of the budget's probe window
  (its ``roi``), and of the whole volume (one window), each with its own fitted non-linear head:
  does the window size matter (GroupNorm statistics are per window), and can extraction use one
  window per volume (several times less compute than overlapping windows)? Each is scored on the
  test cases and (``..., validation``) on the validation case, the one a setting may be chosen on.
* ``passes`` (diffusion models): the feature passes changed at extraction only, each with its own
  fitted non-linear head: features averaged over 4 fixed noise draws, and the clean image at every
  pass with its timestep's embedding (the task's ``feature_input: clean``; with ``--only clean`` the
  reference is refitted beside it, and both are also scored on the validation case).
* ``clean_t`` (diffusion models): clean feature passes (``feature_input: clean``) at other
  timesteps (CLEAN_T: one pass at t = 1 or 250, or t = 1 with 50, 500 or 900), each with its own
  head, scored on the validation and the test cases.
* ``mix``: a learned mix over pyramid levels x timesteps (``mix`` head, diffusion hyperfeatures)
  against the experiment's non-linear head on the same features. Diffusion models take features at
  MIX_T (five timesteps) once; the budget's own timesteps are channel blocks of them, so the
  reference (budget t, non-linear head) and the mixes (budget t; all five) share one extraction.
  The learned weight of each (level, timestep) block is printed too (metric ``weight``).
* ``clean_mix`` (diffusion models): more clean feature passes, and the ``mix`` head over them.
  Clean passes at CLEAN_MIX_T are extracted once; the variants (CLEAN_MIX_VARIANTS: the preset's
  t = 1, 250; t = 1, 250, 900; all five) are channel blocks of them, each with its own non-linear
  head and ``mix`` head, scored on the validation and the test cases.
* ``encoder``: non-linear heads on the UNet's encoder outputs at each stride, on its decoder pyramid
  (the reference, refitted) and on both concatenated per level, from one extraction: does the
  denoiser's decoder, trained to predict the noise, carry less organ information than the encoder
  that reads the image?
* ``augment``: the non-linear head trained on the labelled phantoms plus 0 / 2 / 4 / 8 randomly
  deformed copies of each (the probe's ``sampling.deformed_copies``: rotation, scaling, shift),
  scored on the validation and the test cases: do the heads overfit their few subjects?
* ``augment_mix``: each method's strongest frozen recipe trained with 4 deformed copies of each
  labelled phantom: the ``clean_mix`` test's five clean passes with the ``mix`` head for diffusion
  models, the single pass with the ``mix`` head over levels for the others.
* ``bottleneck`` (diffusion models): the denoising loss (MSE of the training target) per timestep
  on 64 test patches, as trained and with the deepest level's path cut (the first upsampling from
  the bottleneck outputs zeros): how much of the denoising at each t depends on the deepest level.

    .venv/bin/python benchmarks/hypotheses.py runs/bench --tests shift,floor,levels \
        --methods diffusion-ape,contrastive --out runs/bench/hypotheses.json

Heads use the experiment's probe settings and seed (the seed folder's), one CPU thread unless
``--threads``. Whole-volume features are computed once per (seed, method) and reused by every
variant of that backbone. ``--labels N`` trains every head on the first N labelled phantoms only
(validation and test cases unchanged). ``--head_steps N`` / ``--head_hidden W`` change every fitted
head's steps / width (validation every the budget's ``val_every`` steps keeps the best state); the
results record them, and a rerun resumes only results with the same labels and head settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from voxdiff.core.runtime import tune_allocator
from voxdiff.evaluate.metrics import dice_per_class
from voxdiff.experiments.base import Experiment
from voxdiff.pretrain.backbone import LevelInfo
from voxdiff.pretrain.load import load_pretrained
from voxdiff.probe import voxel
from voxdiff.probe.bundle import load_segmenter
from voxdiff.probe.predict import logits_to_labels, unit_image

SHIFTS = (-30.0, 0.0, 30.0)
ONLY: list[str] = []  # --only: variant names (prefixes) of the window and passes tests to run


def seed_folders(root: Path, seeds: str = "") -> list[Path]:
    """The ``seed-S`` folders of ``root`` in seed order; ``seeds``: comma-separated seeds to keep
    (empty: all)."""
    folders = sorted(root.glob("seed-*"), key=lambda p: int(p.name.split("-")[1]))
    if seeds:
        want = {int(s) for s in seeds.split(",")}
        folders = [f for f in folders if int(f.name.split("-")[1]) in want]
    return folders


def open_seed(folder: Path) -> Experiment:
    return Experiment.reopen(folder)


FEATURE_INPUT: list[str] = []  # --feature_input: the diffusion models' feature passes (empty: as pretrained)
FEATURE_SIDE: list[str] = []  # --feature_side: the pyramid every test reads (empty: the experiment's budget's)


def pretrained(exp: Experiment, method: str):
    """The experiment's pretrained extractor of ``method`` (a fresh copy on every call) on the feature
    side of ``--feature_side`` (default: the budget's), its diffusion feature passes set by
    ``--feature_input`` when given."""
    from voxdiff.features.extract import with_feature_side

    side = FEATURE_SIDE[0] if FEATURE_SIDE else exp.probe_cfg().feature_side
    ext = with_feature_side(load_pretrained(exp.out / f"pretrain-{method}" / "model"), side)
    if FEATURE_INPUT and ext.method == "diffusion":
        from voxdiff.features.extract import with_feature_input

        with_feature_input(ext, FEATURE_INPUT[0])
    return ext


def clean_passes(exp: Experiment, method: str, timesteps: tuple[int, ...], ext=None):
    """The method's extractor (``ext``, or a freshly loaded one) with clean feature passes at
    ``timesteps``; None when it is not a diffusion model."""
    from voxdiff.features.extract import with_feature_input, with_timesteps

    ext = ext if ext is not None else pretrained(exp, method)
    if ext.method != "diffusion":
        return None
    with_timesteps(ext, timesteps)
    return with_feature_input(ext, "clean")


HEAD: dict[str, int] = {}  # --head_steps / --head_hidden: ProbeConfig's flat names steps / hidden, overriding the budget


def probe_settings(exp: Experiment) -> tuple[int, Any]:
    """The experiment's voxels per head-training step and its ProbeConfig, with the head's steps and
    width of ``--head_steps`` / ``--head_hidden`` when given (validation every ``val_every`` steps as
    the budget says; the best-validation state is kept)."""
    return int(exp.budget.get("probe_voxels", 8192)), exp.probe_cfg(**HEAD)


class FeatureCache:
    """Whole-volume pyramids keyed by (backbone, image content): computed once, reused by variants.
    Installed as the probe's feature source (:func:`voxdiff.probe.voxel.set_feature_source`) while a
    backbone is tested."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.key = ""
        self.transform: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
        self._real = voxel.compute_volume_pyramid

    def __call__(self, extractor, image_unit: np.ndarray, cfg) -> list[torch.Tensor]:
        h = hashlib.sha1(np.ascontiguousarray(image_unit, dtype=np.float32).tobytes()).hexdigest()
        k = (self.key, h)
        if k not in self.store:
            self.store[k] = self._real(extractor, image_unit, cfg)
        pyr = self.store[k]
        return self.transform(pyr) if self.transform is not None else pyr

    def install(self, key: str) -> None:
        self.key = key
        self.transform = None
        voxel.set_feature_source(self)

    def clear(self) -> None:
        self.store.clear()


def score(ext, head, cases, pcfg, shift: float = 0.0) -> float:
    """Mean over cases of each case's organ-mean Dice; ``shift`` HU added to every image."""
    vals = []
    for case in cases:
        c = dataclasses.replace(case, image=np.asarray(case.image, dtype=np.float32) + shift) if shift else case
        lg = voxel.predict_logits_volume(ext, {"h": head}, unit_image(c, ext.preprocess.hu_window), pcfg)["h"]
        d = dice_per_class(logits_to_labels(lg), np.asarray(case.label), pcfg.n_classes)
        v = [x for x in d.values() if x is not None and np.isfinite(x)]
        vals.append(float(np.mean(v)) if v else float("nan"))
    return float(np.nanmean(vals))


def fit_nonlinear(ext, train, val, pcfg, vox: int):
    return voxel.fit_heads_voxels(ext, train, val, ("nonlinear",), pcfg, progress=False, voxels_per_step=vox)["nonlinear"]


def fit_and_emit(emit, test_name: str, method: str, variant: str, ext, folds, pcfg, vox: int) -> None:
    """Fit a non-linear head on ``ext`` and emit its test Dice and (``variant, validation``) its
    validation Dice: the case a setting may be chosen on."""
    train, val, test = folds
    head = fit_nonlinear(ext, train, val, pcfg, vox)
    emit(test_name, method, variant, score(ext, head, test, pcfg))
    emit(test_name, method, variant + ", validation", score(ext, head, val, pcfg))


def test_shift(exp: Experiment, method: str, folds, emit) -> None:
    train, val, test = folds
    seg = load_segmenter(exp.out / f"probe-{method}-f0" / "segmenter-nonlinear")
    pcfg = exp.probe_cfg()
    for s in SHIFTS:
        emit("shift", method, f"test {s:+.0f} HU", score(seg.extractor, seg.head, test, pcfg, s))
    emit("shift", method, "train (fitted on)", score(seg.extractor, seg.head, train, pcfg))


def test_floor(exp: Experiment, method: str, folds, emit, cache: FeatureCache) -> None:
    """Head on the condition map alone: the extractor's forward returns the coordinates it was given."""
    train, val, test = folds
    ext = pretrained(exp, method)
    if ext.condition_channels == 0:
        return
    n = ext.condition_channels

    def coords_only(image_unit, voxel_index=None, coords=None):
        if coords is None:
            raise RuntimeError("no condition map was passed (condition 'auto' should pass one)")
        return [coords.to(image_unit.device, torch.float32)]

    ext.forward = coords_only  # type: ignore[method-assign]
    ext.levels = [LevelInfo("bpr", n, 1)]
    cache.install(f"{exp.out}/{method}/floor")
    vox, pcfg = probe_settings(exp)
    head = fit_nonlinear(ext, train, val, pcfg, vox)
    emit("floor", method, "BPR map only", score(ext, head, test, pcfg))


def test_levels(exp: Experiment, method: str, folds, emit, cache: FeatureCache) -> None:
    train, val, test = folds
    ext = pretrained(exp, method)
    cache.install(f"{exp.out}/{method}")
    vox, pcfg = probe_settings(exp)
    for keep in range(len(ext.levels)):
        cache.transform = lambda pyr, k=keep: [p if i == k else torch.zeros_like(p) for i, p in enumerate(pyr)]
        head = fit_nonlinear(ext, train, val, pcfg, vox)
        emit("levels", method, f"level {keep} only (stride {ext.levels[keep].stride})", score(ext, head, test, pcfg))
    cache.transform = None


def test_window(exp: Experiment, method: str, folds, emit, cache: FeatureCache) -> None:
    train, val, test = folds
    ext = pretrained(exp, method)
    vox, base = probe_settings(exp)
    rois = {"training patch": tuple(ext.patch_size), "probe window (roi)": tuple(base.inference.roi),
            "whole volume": (1024, 1024, 1024)}
    for name, roi in rois.items():
        if ONLY and not any(name.startswith(o) for o in ONLY):
            continue
        pcfg = exp.probe_cfg(roi=roi, feature_roi=roi)  # feature_roi (cpu-small's) would override roi
        cache.install(f"{exp.out}/{method}/roi{roi}")
        head = fit_nonlinear(ext, train, val, pcfg, vox)
        t = time.time()
        dice = score(ext, head, test, pcfg)
        pyr_s = time.time() - t
        label = f"{name} {'x'.join(map(str, roi)) if name != 'whole volume' else ''}".strip()
        emit("window", method, label, dice)
        emit("window", method, label + ", validation", score(ext, head, val, pcfg))
        emit("window", method, f"{name}: seconds to score the test cases", pyr_s, "seconds")


def test_passes(exp: Experiment, method: str, folds, emit, cache: FeatureCache) -> None:
    from voxdiff.features.extract import with_feature_input

    train, val, test = folds
    vox, pcfg = probe_settings(exp)

    ext = pretrained(exp, method)
    if ext.method != "diffusion":
        return
    task = ext.task
    real = type(ext).forward.__get__(ext)
    opts0 = task.opts

    def averaged(image_unit, voxel_index=None, coords=None, draws=4):
        pyrs = []
        for k in range(draws):
            task.opts = dataclasses.replace(opts0, noise_seed=opts0.noise_seed + k)
            pyrs.append(real(image_unit, voxel_index=voxel_index, coords=coords))
        task.opts = opts0
        return [torch.stack(level).mean(0) for level in zip(*pyrs)]

    ext.forward = averaged  # type: ignore[method-assign]
    cache.install(f"{exp.out}/{method}/avg4")
    if not ONLY or any("features averaged".startswith(o) for o in ONLY):
        head = fit_nonlinear(ext, train, val, pcfg, vox)
        emit("passes", method, "features averaged over 4 noise draws", score(ext, head, test, pcfg))
    if ONLY and not any("clean image".startswith(o) for o in ONLY):
        return

    # the reference refitted beside it, and both scored on the validation case too: the case a
    # setting may be chosen on (the test phantoms may not)
    ext = pretrained(exp, method)
    cache.install(f"{exp.out}/{method}/plain")
    fit_and_emit(emit, "passes", method, "reference refitted", ext, folds, pcfg, vox)

    # every pass on the clean image with its timestep's embedding: the task's ``feature_input: clean``
    # (until the twenty-seventh session this test replaced only passes at t >= 100, by hand)
    with_feature_input(ext, "clean")
    cache.install(f"{exp.out}/{method}/clean")
    fit_and_emit(emit, "passes", method, "clean image at every pass", ext, folds, pcfg, vox)


CLEAN_T = ((1,), (250,), (1, 50), (1, 500), (1, 900))


def test_clean_t(exp: Experiment, method: str, folds, emit, cache: FeatureCache) -> None:
    """Clean feature passes at other timesteps than the budget's: one pass, or t = 1 with another
    second t; each with its own head, scored on the validation case and the test cases."""
    vox, pcfg = probe_settings(exp)
    for ts in CLEAN_T:
        ext = clean_passes(exp, method, ts)
        if ext is None:
            return
        cache.install(f"{exp.out}/{method}/clean-{'-'.join(map(str, ts))}")
        fit_and_emit(emit, "clean_t", method, f"clean t = {', '.join(map(str, ts))}", ext, folds, pcfg, vox)


MIX_T = (1, 25, 100, 250, 500)


def timestep_blocks(extracted: tuple[int, ...], keep: tuple[int, ...]) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """A pyramid transform that keeps the channel blocks of timesteps ``keep`` from features extracted
    at ``extracted`` (each level holds one equal block per pass, in the order of ``extracted``)."""
    idx = [extracted.index(t) for t in keep]

    def pick(pyr: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for f in pyr:
            dim = 0 if f.ndim == 4 else 1
            blocks = f.chunk(len(extracted), dim=dim)
            out.append(torch.cat([blocks[k] for k in idx], dim=dim))
        return out

    return pick


CLEAN_MIX_T = (1, 100, 250, 500, 900)
CLEAN_MIX_VARIANTS = ((1, 250), (1, 250, 900), CLEAN_MIX_T)


def test_clean_mix(exp: Experiment, method: str, folds, emit, cache: FeatureCache) -> None:
    """Clean passes at several timesteps, each set with a non-linear and a ``mix`` head, on the
    validation and the test cases; one extraction at CLEAN_MIX_T serves every variant."""
    train, val, test = folds
    vox, pcfg = probe_settings(exp)
    ext = clean_passes(exp, method, CLEAN_MIX_T)
    if ext is None:
        return
    cache.install(f"{exp.out}/{method}/clean-mix{CLEAN_MIX_T}")
    for ts in CLEAN_MIX_VARIANTS:
        cache.transform = timestep_blocks(CLEAN_MIX_T, ts)
        ext.passes = len(ts)
        heads = voxel.fit_heads_voxels(ext, train, val, ("nonlinear", "mix"), pcfg, progress=False,
                                       voxels_per_step=vox)
        name = f"clean t = {', '.join(map(str, ts))}"
        for h, what in (("nonlinear", "non-linear head"), ("mix", "mix head")):
            emit("clean_mix", method, f"{name}, {what}", score(ext, heads[h], test, pcfg))
            emit("clean_mix", method, f"{name}, {what}, validation", score(ext, heads[h], val, pcfg))
    cache.transform = None


def test_mix(exp: Experiment, method: str, folds, emit, cache: FeatureCache) -> None:
    from voxdiff.features.extract import with_timesteps

    train, val, test = folds
    vox, pcfg = probe_settings(exp)
    ext = pretrained(exp, method)
    variants: list[tuple[str, tuple[int, ...] | None]] = [("", None)]
    if ext.method == "diffusion":
        own = tuple(int(t) for t in ext.task.opts.feature_timesteps)
        if not set(own) <= set(MIX_T):
            raise RuntimeError(f"the budget's timesteps {own} are not all in MIX_T {MIX_T}")
        with_timesteps(ext, MIX_T)
        variants = [(f"t={','.join(map(str, own))}", own), (f"t={','.join(map(str, MIX_T))}", MIX_T)]
    cache.install(f"{exp.out}/{method}/mix{MIX_T if ext.method == 'diffusion' else ''}")
    for label, ts in variants:
        if ts is not None:
            cache.transform = timestep_blocks(MIX_T, ts)
            ext.passes = len(ts)
        heads = voxel.fit_heads_voxels(ext, train, val, ("nonlinear", "mix"), pcfg, progress=False,
                                       voxels_per_step=vox)
        name = f"{label}, " if label else ""
        emit("mix", method, f"{name}non-linear head (concatenated)", score(ext, heads["nonlinear"], test, pcfg))
        emit("mix", method, f"{name}learned mix over levels x timesteps", score(ext, heads["mix"], test, pcfg))
        for w in heads["mix"].mix_weights():
            tw = f"t={ts[w['pass']]}" if ts is not None else "single pass"
            emit("mix", method, f"{name}mix weight of level {w['level']}, {tw}", w["weight"], "weight")
    cache.transform = None


def encoder_blocks(widths: list[int], passes: int, keep: str) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """A pyramid transform over ``feature_side="both"`` features keeping ``encoder``, ``decoder``
    or ``both`` blocks of every pass (the bottleneck is kept whole)."""

    def pick(pyr: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, f in enumerate(pyr):
            if i == len(pyr) - 1 or keep == "both":
                out.append(f)
                continue
            w, dim = widths[i], 0 if f.ndim == 4 else 1
            chunks = f.split(2 * w, dim=dim)  # one (encoder, decoder) block per pass
            out.append(torch.cat([c.narrow(dim, 0 if keep == "encoder" else w, w) for c in chunks], dim))
        return out

    return pick


def test_encoder(exp: Experiment, method: str, folds, emit, cache: FeatureCache) -> None:
    """Non-linear heads on the UNet's encoder outputs, on its decoder outputs (the pyramid every probe
    used before the thirty-first session: the reference refitted) and on both concatenated per level
    (``feature_side``), from one extraction of both; each scored on the validation and the test cases."""
    from voxdiff.features.extract import with_feature_side

    vox, pcfg = probe_settings(exp)
    ext = with_feature_side(pretrained(exp, method), "both")  # the heads take their widths from the features
    widths = [int(lv.channels) for lv in ext.backbone.levels]
    cache.install(f"{exp.out}/{method}/encoder")
    for keep, label in (("decoder", "decoder pyramid (reference refitted)"), ("encoder", "encoder outputs"),
                        ("both", "encoder and decoder concatenated")):
        if ONLY and not any(label.startswith(o) for o in ONLY):
            continue
        cache.transform = encoder_blocks(widths, ext.passes, keep)
        fit_and_emit(emit, "encoder", method, label, ext, folds, pcfg, vox)
    cache.transform = None


AUG_COPIES = (0, 2, 4, 8)


def test_augment(exp: Experiment, method: str, folds, emit, cache: FeatureCache) -> None:
    """The non-linear head trained on the labelled phantoms and on AUG_COPIES randomly deformed copies
    of each (the probe's ``sampling.deformed_copies``; the copies' features extracted like any
    volume's, and copy i of a phantom is the same for every count), scored on the validation and the
    test cases: is the head's train/test gap a matter of too few subjects?"""
    vox, pcfg = probe_settings(exp)
    ext = pretrained(exp, method)
    cache.install(f"{exp.out}/{method}/augment")
    for k in AUG_COPIES:
        name = f"{k} deformed copies per labelled phantom"
        if ONLY and not any(name.startswith(o) for o in ONLY):
            continue
        kcfg = dataclasses.replace(pcfg, sampling=dataclasses.replace(pcfg.sampling, deformed_copies=k))
        fit_and_emit(emit, "augment", method, name, ext, folds, kcfg, vox)


def test_augment_mix(exp: Experiment, method: str, folds, emit) -> None:
    """Each method's strongest frozen recipe trained with 4 deformed copies of each labelled phantom:
    clean passes at CLEAN_MIX_T with the ``mix`` head for diffusion models (without copies:
    ``clean_mix``), the single pass with the ``mix`` head over levels for the others (without copies:
    ``mix``)."""
    vox, pcfg = probe_settings(exp)
    ext = pretrained(exp, method)
    if ext.method == "diffusion":
        clean_passes(exp, method, CLEAN_MIX_T, ext)  # sets the passes of ext in place
        name = f"clean t = {', '.join(map(str, CLEAN_MIX_T))}, mix head"
    else:
        name = "single pass, mix head over levels"
    # no feature cache (main() removes it before every test): five passes of both sides for 7 x 5
    # training volumes fill most of 24 GiB once, and a cache would hold them twice
    kcfg = dataclasses.replace(pcfg, sampling=dataclasses.replace(pcfg.sampling, deformed_copies=4))
    train, val, test = folds
    head = voxel.fit_heads_voxels(ext, train, val, ("mix",), kcfg, progress=False, voxels_per_step=vox)["mix"]
    name += ", 4 deformed copies per labelled phantom"
    emit("augment_mix", method, name, score(ext, head, test, kcfg))
    emit("augment_mix", method, name + ", validation", score(ext, head, val, kcfg))


BOTTLENECK_T = (1, 10, 50, 250, 500, 900)


@torch.no_grad()
def test_bottleneck(exp: Experiment, method: str, folds, emit) -> None:
    from voxdiff.pretrain.diffusion import to_model_range

    _, _, test = folds
    ext = pretrained(exp, method)
    if ext.method != "diffusion":
        return
    task, net = ext.task, ext.backbone
    if not hasattr(net, "up"):
        raise RuntimeError("the bottleneck test knows the unet backbone only")
    task.prepare(test)
    rng = np.random.default_rng(1234)
    batch = task.sample_batch(test, 64, tuple(ext.patch_size), rng)
    x0 = to_model_range(batch["image"].float())
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=g)
    cut = net.up[len(net.up) - 1]  # bottleneck -> next level
    for t_val in [t for t in BOTTLENECK_T if t < task.process.num_steps]:
        t = torch.full((x0.shape[0],), t_val, dtype=torch.long)
        x_t = task.process.add_noise(x0, noise, t)
        inp = task._join(x_t, task.batch_condition(batch))
        target = task.process.target(x0, noise, t)
        errs = []
        for zero in (False, True):
            h = cut.register_forward_hook(lambda m, i, o: torch.zeros_like(o)) if zero else None
            try:
                pred = torch.cat([net(inp[i:i + 8], t[i:i + 8])[0] for i in range(0, len(t), 8)])
            finally:
                if h is not None:
                    h.remove()
            errs.append(float(((pred - target) ** 2).mean()))
        emit("bottleneck", method, f"t={t_val} as trained", errs[0], "loss")
        emit("bottleneck", method, f"t={t_val} bottleneck cut", errs[1], "loss")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", help="a `voxdiff experiment compare --seeds` folder")
    ap.add_argument("--tests", default="shift,floor,levels")
    ap.add_argument("--methods", default="diffusion-ape,contrastive")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (default: every seed-S folder)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="JSON file for the results (default: BENCH/hypotheses.json)")
    ap.add_argument("--only", default="", help="comma-separated variant names (prefixes) of the window / passes / "
                                               "augment tests")
    ap.add_argument("--labels", type=int, default=0,
                    help="labelled phantoms that train the heads: the first N of the fold, as label-efficiency "
                         "takes them (default 0: all); the variants' names then start with 'N labelled: '")
    ap.add_argument("--feature_input", default="", choices=("", "noisy", "clean"),
                    help="the diffusion models' feature passes in every test (default: as pretrained)")
    ap.add_argument("--feature_side", default="", choices=("", "decoder", "encoder", "both"),
                    help="the pyramid every test reads (default: the experiment's budget's; the encoder test "
                         "sets its own)")
    ap.add_argument("--head_steps", type=int, default=0,
                    help="steps of every fitted head (default 0: the budget's); validation every the budget's "
                         "val_every steps keeps the best state, so more steps are chosen on validation")
    ap.add_argument("--head_hidden", type=int, default=0, help="width of the non-linear / mix heads (default 0: "
                                                               "the budget's)")
    args = ap.parse_args()
    HEAD.clear()
    HEAD.update({k: v for k, v in (("steps", args.head_steps), ("hidden", args.head_hidden)) if v})
    ONLY[:] = [o.strip() for o in args.only.split(",") if o.strip()]
    FEATURE_INPUT[:] = [args.feature_input] if args.feature_input else []
    FEATURE_SIDE[:] = [args.feature_side] if args.feature_side else []
    tune_allocator()
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(args.threads)
    bench = Path(args.bench)
    folders = seed_folders(bench, args.seeds)
    tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = Path(args.out) if args.out else bench / "hypotheses.json"
    results: list[dict[str, Any]] = json.loads(out.read_text()) if out.is_file() else []
    # a test is done for (method, seed) once it has a result trained on as many labelled phantoms
    # and with the same head settings
    done = {(r["test"], r["method"], r["seed"]) for r in results
            if r.get("labels", 0) == args.labels and r.get("head", {}) == HEAD}
    cache = FeatureCache()
    try:
        for folder in folders:
            seed = int(folder.name.split("-")[1])
            exp = open_seed(folder)
            folds = exp.folds()[0]
            if args.labels:
                folds = (folds[0][:args.labels], folds[1], folds[2])
            for method in methods:
                if not (folder / f"probe-{method}-f0" / "result.json").is_file():
                    print(json.dumps({"skip": f"{folder.name}/{method}: its probe has not finished"}), flush=True)
                    continue
                t0 = time.time()

                def emit(test: str, m: str, variant: str, value: float, metric: str = "dice") -> None:
                    """``metric`` dice: a fraction, stored in % ; loss: stored as it is."""
                    v = round(100 * value, 2) if metric == "dice" else round(value, 5)
                    if args.labels:
                        variant = f"{args.labels} labelled: {variant}"
                    if HEAD:
                        variant += "".join(f", head {k} {v}" for k, v in sorted(HEAD.items()))
                    r = {"test": test, "method": m, "seed": seed, "variant": variant, "metric": metric, "value": v,
                         "labels": args.labels, "head": dict(HEAD), "seconds": round(time.time() - t0)}
                    print(json.dumps(r), flush=True)
                    results.append(r)
                    out.write_text(json.dumps(results, indent=1))

                for test in tests:
                    if (test, method, seed) in done:
                        continue
                    # tests that reuse features install the cache themselves; the others must not see it
                    voxel.set_feature_source(None)
                    {"shift": lambda: test_shift(exp, method, folds, emit),
                     "floor": lambda: test_floor(exp, method, folds, emit, cache),
                     "levels": lambda: test_levels(exp, method, folds, emit, cache),
                     "window": lambda: test_window(exp, method, folds, emit, cache),
                     "passes": lambda: test_passes(exp, method, folds, emit, cache),
                     "clean_t": lambda: test_clean_t(exp, method, folds, emit, cache),
                     "mix": lambda: test_mix(exp, method, folds, emit, cache),
                     "clean_mix": lambda: test_clean_mix(exp, method, folds, emit, cache),
                     "encoder": lambda: test_encoder(exp, method, folds, emit, cache),
                     "augment": lambda: test_augment(exp, method, folds, emit, cache),
                     "augment_mix": lambda: test_augment_mix(exp, method, folds, emit),
                     "bottleneck": lambda: test_bottleneck(exp, method, folds, emit)}[test]()
                cache.clear()
    finally:
        voxel.set_feature_source(None)
    print_summary(results)


def print_summary(results: list[dict[str, Any]]) -> None:
    groups: dict[tuple[str, str, str, str], list[float]] = {}
    for r in results:
        groups.setdefault((r["test"], r["method"], r["variant"], r.get("metric", "dice")), []).append(r["value"])
    print("\n| test | method | variant | metric | mean ± std over seeds | seeds |\n|---|---|---|---|---|---|")
    for (t, m, v, metric), d in groups.items():
        a = np.asarray(d)
        fmt = ".1f" if metric == "dice" else ".4f"
        sd = f" ± {a.std(ddof=1):{fmt}}" if a.size > 1 else ""
        print(f"| {t} | {m} | {v} | {'Dice %' if metric == 'dice' else metric} | {a.mean():{fmt}}{sd} | {a.size} |")


if __name__ == "__main__":
    main()
