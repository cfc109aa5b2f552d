"""Anatomy-guided diffusion pretraining (Li et al. 2025) and its ablations.

Training: a clean patch x0 (in [0, 1], mapped to [-1, 1]) is noised to x_t with t uniform in
{0..T-1}; the frozen Body Part Regressor (BPR) turns the *clean* patch into a coordinate map
(no gradient), which is concatenated to x_t; the backbone predicts the noise (or v / x0) and the
loss is the MSE. ``condition``:

* ``none``: no BPR, the backbone sees x_t only (the "diffusion without BPR" ablation; same code);
* ``slice``: a slice-score BPR (1 channel, Yan et al. / Schuhegger et al.);
* ``ape``: a 3D anatomical positional embedding BPR (3 channels, Goncharov et al.);
* ``position``: no BPR; 2 channels holding each voxel's in-plane position (x and y, mm over
  :data:`POSITION_UNIT_MM`) about the centre of its preprocessed volume (cropped to the body, so
  about the body's centre). A control for what the BPR's anatomy adds: on the phantom benchmark it
  did as well as ``ape`` (docs/RESULTS.md, "What a perfect body part regressor would give").

The kind of the BPR file must match ``condition``. ``bpr_sincos`` > 0 appends a sin/cos encoding
of the coordinates (``voxdiff.bpr.coords_for_patches``).

Where the condition comes from (``condition_source``):

* ``volume`` (default): the BPR maps every whole preprocessed volume once
  (:func:`voxdiff.bpr.fields.volume_field`, cached beside the preprocessing cache) and each training
  patch gets the crop of its volume's map at the patch's voxels (:meth:`prepare` then
  :meth:`sample_batch`). A voxel has the same coordinates in every patch that contains it, and
  feature extraction (:meth:`volume_condition`) hands the backbone the same map.
* ``patch``: the BPR maps each training patch from that patch alone (the first implementation; its
  coordinates depend on the patch's field of view).

Features: the clean image is noised to each of ``feature_timesteps`` with a FIXED noise that is a
pure function of (``noise_seed``, absolute voxel index) (:func:`~voxdiff.pretrain.diffusion.positional_noise`),
so every call, every volume and every overlapping sliding window sees the same noise at the same
voxel. Pass ``voxel_index`` (the window's absolute voxel indices) for sliding windows; without it the
window is taken to start at voxel (0, 0, 0). Several feature timesteps give one pass each and the
pyramids are concatenated level by level. With ``feature_input: clean`` every pass sees the clean
image itself, with its timestep's embedding (no noise).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...bpr.models import encoded_channels
from ...core.errors import InputError
from ...core.layers import freeze
from ..diffusion import GaussianDiffusion, index_grid, positional_noise, to_model_range
from .base import PretextTask, random_patches, register_task

CONDITIONS = ("none", "slice", "ape", "position")
BPR_CONDITIONS = ("slice", "ape")  # the conditions that need a body part regressor
POSITION_UNIT_MM = 300.0  # mm per unit of the ``position`` condition (the scale of the APE's channels)


def position_field(shape: tuple[int, int, int], spacing) -> Any:
    """The ``position`` condition of a whole volume: channel 0 varies along x, channel 1 along y,
    each the voxel's distance (mm / :data:`POSITION_UNIT_MM`) from the volume's centre."""
    from voxdiff.bpr.fields import CoordinateField

    sp = tuple(float(v) for v in spacing)
    if len(sp) != 3 or min(sp) <= 0:
        raise InputError(None, f"the position condition needs a positive 3D spacing, got {spacing}")
    prof = tuple((np.arange(n) - (n - 1) / 2.0) * sp[a] / POSITION_UNIT_MM for a, n in enumerate(shape[:2]))
    return CoordinateField(tuple(int(n) for n in shape), (0, 1), prof)


@dataclass
class DiffusionFields:
    """The diffusion task's options that the pretraining config names as its own fields
    (``PretrainConfig.task``); ``DiffusionConfig`` adds the rest.

    Args:
        condition: none | slice | ape (BPR concatenated to x_t) | position (no BPR: the voxel's
            in-plane position about its volume's centre, a control).
        bpr_path: body part regressor folder (required for slice and ape).
        bpr_sincos: sin/cos frequencies appended to the BPR coordinates (0 = raw coordinates).
        diffusion_steps: number of diffusion steps T.
        beta_schedule: linear | cosine.
        prediction: epsilon | v | sample (training target).
        feature_timesteps: timestep(s) t at which frozen features are taken (several: concatenated).
        noise_seed: seed of the fixed feature noise.
        feature_input: noisy (default: each feature pass sees x_t, the clean image noised to its
            timestep with the fixed noise) | clean (each pass sees the clean image x0 with its
            timestep's embedding, in the manner of CleanDIFT: the timestep still selects what the
            network computes, without noise; +5.1 ± 3.1 validation Dice over five benchmark seeds,
            docs/RESULTS.md, "Clean feature passes").
        condition_source: volume (the BPR map of the whole volume, cropped per patch) | patch (the BPR
            of each patch alone).
    """

    condition: str = "none"
    bpr_path: str | None = None
    bpr_sincos: int = 0
    diffusion_steps: int = 1000
    beta_schedule: str = "linear"
    prediction: str = "epsilon"
    feature_timesteps: tuple[int, ...] = (10,)
    noise_seed: int = 0
    feature_input: str = "noisy"
    condition_source: str = "volume"


@dataclass
class DiffusionConfig(DiffusionFields):
    """Options of the diffusion task: those of ``DiffusionFields`` and

    Args:
        min_snr_gamma: Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is their choice); 0 = off
            (every t weighted alike for the training target).
        condition_dropout: share of training samples whose condition channels are set to zero
            (classifier-free style), so that the denoiser must also use the image; features always
            get the condition.
        skip_dropout: probability, per training sample and decoder level, that the encoder's skip
            connection into that level is zeroed (backbones with skips: unet), so that the denoiser
            must carry the image through its coarser levels; features always get every skip.
    """

    min_snr_gamma: float = 0.0
    condition_dropout: float = 0.0
    skip_dropout: float = 0.0


CONDITION_SOURCES = ("volume", "patch")
FEATURE_INPUTS = ("noisy", "clean")


def check_feature_input(value: str, where: object = None) -> None:
    """Refuse a ``feature_input`` that is not one of :data:`FEATURE_INPUTS` (one-line InputError)."""
    if value not in FEATURE_INPUTS:
        raise InputError(where, f"unknown feature_input {value!r}; choose from {', '.join(FEATURE_INPUTS)}")


def _bpr_api():
    try:
        from voxdiff.bpr import coords_for_patches, load_bpr  # type: ignore[attr-defined]
    except ImportError:
        from voxdiff.bpr.models import coords_for_patches, load_bpr
    return load_bpr, coords_for_patches


def options_of(config: Any) -> DiffusionConfig:
    """DiffusionConfig from the task config dict (flat keys or a ``diffusion`` section)."""
    from voxdiff.core.config import from_dict

    if isinstance(config, DiffusionConfig):
        return config
    d = dict(config or {})
    sec = d.get("diffusion") if isinstance(d.get("diffusion"), dict) else {}
    names = DiffusionConfig.__dataclass_fields__.keys()
    vals = {k: d[k] for k in names if k in d}
    vals.update({k: v for k, v in sec.items() if k in names})
    opts = from_dict(DiffusionConfig, vals, strict=False)
    if isinstance(opts.feature_timesteps, int):
        opts.feature_timesteps = (opts.feature_timesteps,)
    opts.feature_timesteps = tuple(int(t) for t in opts.feature_timesteps)
    return opts


@register_task("diffusion")
class DiffusionTask(PretextTask):
    """DDPM denoising of x_t with the BPR map of x0 concatenated."""

    Config = DiffusionConfig

    def __init__(self, config: Any = None, bpr: nn.Module | None = None):
        super().__init__(config)
        o = options_of(config)
        if o.condition not in CONDITIONS:
            raise InputError(None, f"unknown condition {o.condition!r}; choose from {', '.join(CONDITIONS)}")
        if o.condition_source not in CONDITION_SOURCES:
            raise InputError(None, f"unknown condition_source {o.condition_source!r}; choose from {', '.join(CONDITION_SOURCES)}")
        check_feature_input(o.feature_input)
        if o.condition == "position" and o.condition_source != "volume":
            raise InputError(None, "the position condition is defined on whole volumes (condition_source volume)")
        if not 0.0 <= o.condition_dropout < 1.0:
            raise InputError(None, f"condition_dropout must lie in [0, 1), got {o.condition_dropout}")
        if not 0.0 <= o.skip_dropout < 1.0:
            raise InputError(None, f"skip_dropout must lie in [0, 1), got {o.skip_dropout}")
        if o.min_snr_gamma < 0:
            raise InputError(None, f"min_snr_gamma must be >= 0 (0 = off), got {o.min_snr_gamma}")
        self.opts = o
        self._fields: list | None = None  # whole-volume coordinate fields of the training cases
        self.process = GaussianDiffusion(o.diffusion_steps, o.beta_schedule, o.prediction)
        bad = [t for t in o.feature_timesteps if not 0 <= t < o.diffusion_steps]
        if bad or not o.feature_timesteps:
            raise InputError(None, f"feature_timesteps {list(o.feature_timesteps)} must lie in 0..{o.diffusion_steps - 1}")
        # the frozen BPR is kept out of state_dict (saved as bpr/ beside the backbone)
        self.__dict__["bpr"] = None
        self._cond_channels = encoded_channels(2, o.bpr_sincos) if o.condition == "position" else 0
        if o.condition in BPR_CONDITIONS:
            if bpr is None:
                if not o.bpr_path:
                    raise InputError(None, f"condition {o.condition!r} needs a body part regressor (--task.bpr_path)")
                if not os.path.exists(o.bpr_path):
                    raise InputError(o.bpr_path, "body part regressor not found")
                load_bpr, _ = _bpr_api()
                bpr = load_bpr(o.bpr_path, kind=o.condition)
            self.set_bpr(bpr)

    def setup(self, backbone: nn.Module) -> None:
        if self.opts.skip_dropout > 0 and not getattr(backbone, "num_skips", 0):
            raise InputError(None, f"skip_dropout needs a backbone with skip connections (unet); "
                                   f"{getattr(backbone, 'name', type(backbone).__name__)} has none to drop")

    # ------------------------------------------------------------------------------------------
    def set_bpr(self, bpr: nn.Module) -> None:
        kind = getattr(bpr, "kind", None)
        if kind is not None and kind != self.opts.condition:
            raise InputError(self.opts.bpr_path, f"this is a '{kind}' body part regressor, but condition is '{self.opts.condition}'")
        freeze(bpr)
        self.__dict__["bpr"] = bpr
        self._cond_channels = encoded_channels(int(getattr(bpr, "out_channels", 1)), self.opts.bpr_sincos)

    @property
    def condition(self) -> str:
        return self.opts.condition

    @property
    def in_channels(self) -> int:
        return 1 + self._cond_channels

    @property
    def out_channels(self) -> int:
        return 1

    @property
    def uses_timestep(self) -> bool:
        return True

    def _bpr_input(self, image: torch.Tensor) -> torch.Tensor:
        """Map [0,1] under our HU window to the BPR's own window when they differ."""
        pre = getattr(self.bpr, "preprocess", None) or {}
        w = pre.get("hu_window") if isinstance(pre, dict) else None
        if w is None:
            return image
        lo, hi = self.hu_window
        blo, bhi = float(w[0]), float(w[1])
        if (lo, hi) == (blo, bhi):
            return image
        hu = image * (hi - lo) + lo
        return ((hu - blo) / (bhi - blo)).clamp(0, 1)

    def _spacing(self) -> tuple[float, float, float] | None:
        pre = self.config.get("preprocess") if isinstance(self.config, dict) else None
        sp = (pre or {}).get("spacing")
        return None if sp is None else tuple(float(s) for s in sp)  # type: ignore[return-value]

    @torch.no_grad()
    def condition_map(self, image: torch.Tensor) -> torch.Tensor | None:
        """The BPR map (B, C, X, Y, Z) of clean ``image`` in [0, 1]; None when unconditioned."""
        if self.opts.condition == "position":  # the image taken as a whole volume
            return self.volume_condition(image)
        if self.bpr is None:
            return None
        _, coords_for_patches = _bpr_api()
        bpr_dev = next(self.bpr.parameters()).device
        if bpr_dev != image.device:
            self.bpr.to(image.device)
        x = self._bpr_input(image.float())
        sp = self._spacing()
        bsp = tuple(float(s) for s in getattr(self.bpr, "preprocess", {}).get("spacing", sp or (1, 1, 1))) \
            if isinstance(getattr(self.bpr, "preprocess", None), dict) else sp
        kwargs = {"spacing": sp} if sp is not None and bsp is not None and tuple(sp) != tuple(bsp) else {}
        try:
            out = coords_for_patches(self.bpr, x, sincos=self.opts.bpr_sincos, **kwargs)
        except TypeError:  # a stand-in without the spacing argument
            out = coords_for_patches(self.bpr, x, sincos=self.opts.bpr_sincos)
        return out.float()

    @property
    def uses_volume_fields(self) -> bool:
        return (self.bpr is not None and self.opts.condition_source == "volume") or self.opts.condition == "position"

    def case_fields(self, cases: list, cache_dir: str | os.PathLike | None = None, progress: bool = False) -> list:
        """The whole-volume condition fields of preprocessed ``cases`` (BPR maps, cached in
        ``cache_dir``; or the ``position`` fields, computed from each case's shape and spacing)."""
        if self.opts.condition == "position":
            return [position_field(tuple(c.image.shape), c.meta.spacing) for c in cases]
        from voxdiff.bpr.fields import case_fields

        return case_fields(self.bpr, cases, cache_dir=cache_dir, progress=progress)

    def prepare(self, cases: list, cache_dir: str | os.PathLike | None = None, progress: bool = False) -> None:
        """Map every training volume once (``condition_source == "volume"``); cached in ``cache_dir``."""
        if not self.uses_volume_fields:
            return
        self._fields = self.case_fields(cases, cache_dir=cache_dir, progress=progress)

    def sample_batch(self, cases: list, batch_size: int, patch_size: tuple[int, int, int],
                     rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Random patches; with volume fields also each patch's crop of its volume's coordinate map,
        as 1D profiles (``cond_profiles`` (B, C, L), ``cond_axes`` (C,)): every channel of a field
        varies along one axis, so the batch carries a few kB instead of C patch-sized maps, and
        :meth:`batch_condition` expands them on the device the step runs on."""
        from voxdiff.bpr.fields import crop_profiles

        batch = random_patches(cases, batch_size, patch_size, rng, window=self.hu_window, with_coords=False)
        if self.uses_volume_fields:
            if self._fields is None or len(self._fields) != len(cases) or \
                    any(f.shape != tuple(c.image.shape) for f, c in zip(self._fields, cases)):
                self.prepare(cases)  # other cases than the ones prepared: map these
            batch["cond_profiles"], batch["cond_axes"] = crop_profiles(
                self._fields, batch["case_index"].tolist(), batch["origin"].tolist(), patch_size)
        return batch

    def batch_condition(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The dense condition ``(B, C, X, Y, Z)`` of a batch of :meth:`sample_batch` (expanded from
        its profiles where they are), or the ``cond`` maps a caller put in the batch; None without."""
        if "cond" in batch:
            return batch["cond"]
        if "cond_profiles" not in batch:
            return None
        from voxdiff.bpr.fields import expand_profiles

        # the axes from the task's own fields where it has them (a device copy of cond_axes would be
        # read back to the host)
        axes = self._fields[0].axes if self._fields else batch["cond_axes"]
        return expand_profiles(batch["cond_profiles"], axes, tuple(batch["image"].shape[2:]), self.opts.bpr_sincos)

    @torch.no_grad()
    def volume_condition(self, image: torch.Tensor, size: tuple[int, int, int] | None = None) -> torch.Tensor | None:
        """The BPR map of whole volumes ``image`` (B, 1, X, Y, Z) in [0, 1] under this model's window,
        over voxels 0..size-1 (``size`` >= the volume: the map continues past its end, e.g. over the
        padding of sliding windows); None when unconditioned. With ``condition_source == "patch"``
        this is the BPR of the volume as one input (:meth:`condition_map`)."""
        position = self.opts.condition == "position"
        if self.bpr is None and not position:
            return None
        if self.opts.condition_source == "patch":
            out = self.condition_map(image)
            if size is not None and tuple(size) != tuple(image.shape[2:]):
                pads = [s - n for s, n in zip(size, image.shape[2:])]
                out = F.pad(out, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")
            return out
        from voxdiff.bpr.fields import volume_field
        from voxdiff.bpr.models import sincos_encode

        sp = self._spacing() or (None if position else tuple(float(s) for s in self.bpr.spacing))
        if sp is None:
            raise InputError(None, "the position condition needs the preprocessing spacing in the task config")
        lo, hi = self.hu_window
        size = tuple(int(s) for s in (size or image.shape[2:]))
        maps = []
        for b in range(image.shape[0]):
            if position:  # the same field as prepare() gives a training case of this shape
                field = position_field(tuple(image.shape[2:]), sp)
            else:
                field = volume_field(self.bpr, image[b, 0].float().cpu() * (hi - lo) + lo, sp)
            maps.append(torch.from_numpy(field.crop((0, 0, 0), size)))
        return sincos_encode(torch.stack(maps), self.opts.bpr_sincos).to(image.device)

    def _join(self, x_t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return x_t if cond is None else torch.cat([x_t, cond.to(x_t.dtype)], 1)

    # ------------------------------------------------------------------------------------------
    def loss(self, backbone: nn.Module, batch: dict[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        image = batch["image"].float()
        b = image.shape[0]
        x0 = to_model_range(image)
        t = self.process.sample_timesteps(b, generator, image.device)
        noise = torch.randn(x0.shape, generator=generator, device=image.device, dtype=x0.dtype)
        x_t = self.process.add_noise(x0, noise, t)
        cond = self.batch_condition(batch)
        if cond is None:
            cond = self.condition_map(image)
        if cond is not None and self.opts.condition_dropout > 0:
            keep = torch.rand(b, generator=generator, device=image.device) >= self.opts.condition_dropout
            cond = cond * keep.view(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)
        if self.opts.skip_dropout > 0:
            keep = [(torch.rand(b, generator=generator, device=image.device) >= self.opts.skip_dropout).to(x0.dtype)
                    for _ in range(backbone.num_skips)]
            with backbone.skip_masks(keep):
                pred, _ = backbone(self._join(x_t, cond), t)
        else:
            pred, _ = backbone(self._join(x_t, cond), t)
        target = self.process.target(x0, noise, t)
        per = F.mse_loss(pred.float(), target, reduction="none").flatten(1).mean(1)
        if self.opts.min_snr_gamma > 0:
            loss = (per * self.process.min_snr_weight(t, self.opts.min_snr_gamma)).mean()
        else:
            loss = per.mean()
        metrics: dict[str, Any] = {}
        # loss per t-bucket (quarters of the chain) as device sums and counts (no host
        # synchronisation); the engine averages over the log interval and drops empty buckets
        T = self.process.num_steps
        nb = min(4, T)
        bucket = (t * nb) // T
        per_d = per.detach()
        for k in range(nb):
            m = bucket == k
            lo, hi = (k * T + nb - 1) // nb, ((k + 1) * T + nb - 1) // nb - 1
            metrics[f"loss_t{lo}-{hi}"] = {"sum": torch.where(m, per_d, torch.zeros_like(per_d)).sum(), "count": m.sum()}
        return loss, metrics

    # ------------------------------------------------------------------------------------------
    def feature_noise(self, image: torch.Tensor, voxel_index: torch.Tensor | None = None) -> torch.Tensor:
        if voxel_index is None:
            voxel_index = index_grid(tuple(image.shape[2:]), (0, 0, 0), image.shape[0], image.device)
        return positional_noise(voxel_index.to(image.device), self.opts.noise_seed).to(image.dtype)

    def feature_inputs(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.feature_passes(image)[0]

    def feature_passes(self, image: torch.Tensor, voxel_index: torch.Tensor | None = None,
                       coords: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        image = image.float()
        x0 = to_model_range(image)
        clean = self.opts.feature_input == "clean"
        noise = None if clean else self.feature_noise(image, voxel_index)
        cond = None
        if self.condition != "none":
            # without a precomputed map the image is taken as a whole volume
            cond = coords.float() if coords is not None else self.volume_condition(image)
        out = []
        for t in self.opts.feature_timesteps:
            tt = torch.full((image.shape[0],), int(t), dtype=torch.long, device=image.device)
            out.append((self._join(x0 if clean else self.process.add_noise(x0, noise, tt), cond), tt))
        return out
