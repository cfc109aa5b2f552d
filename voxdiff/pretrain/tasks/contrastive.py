"""Contrastive pretraining (vox2vec style): voxel-level InfoNCE between two overlapping crops.

For each batch element a case is drawn and two crops of ``patch_size`` are cut from it, the second
shifted by at most ``max_shift`` of the patch side per axis, so they share an anchor region. Each view
gets its own intensity augmentation (random HU window / contrast, blur or sharpen, Gaussian noise).
Up to ``n_pairs`` voxels of the shared region are drawn; the same physical voxel in the two views is
a positive pair (its index in each view follows from the crop origins). A voxel's representation is
the concatenated feature pyramid at that voxel: each level is indexed at ``voxel // stride`` (no
upsampling of whole maps). A projector MLP (inside the task, so the engine trains and saves it) maps
it to ``proj_dim`` values, L2-normalised; the loss is the symmetric InfoNCE with ``temperature``
where every other sampled voxel of the batch is a negative.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from voxdiff.data.preprocess import hu_to_unit

from .base import PretextTask, coords_mm_for, crop_or_pad, options_from_config, random_origin, register_task


@dataclass
class ContrastiveConfig:
    n_pairs: int = 1024  # positive voxel pairs per crop pair (fewer when the shared region is smaller)
    temperature: float = 0.1
    proj_dim: int = 128
    proj_hidden: int = 512
    feature_channels: int = 0  # projector input (sum of pyramid channels); 0 = taken from the backbone
    max_shift: float = 0.5  # second crop shifted by up to this fraction of the patch side per axis
    window_prob: float = 0.8  # random intensity window (in the unit scale) / contrast change
    window_low: tuple[float, float] = (0.0, 0.35)
    window_high: tuple[float, float] = (0.55, 1.0)
    blur_prob: float = 0.3
    sharpen_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    sharpen_amount: tuple[float, float] = (0.3, 1.5)
    noise_prob: float = 0.5
    noise_std: tuple[float, float] = (0.0, 0.03)


# ------------------------------------------------------------------------------------------------
# crops and positives (pure numpy)


def sample_view_pair(shape: tuple[int, int, int], size: tuple[int, int, int], rng: np.random.Generator,
                     max_shift: float = 0.5) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Origins of two crops of ``size`` in a volume of ``shape`` that overlap in at least
    ``(1 - max_shift)`` of the side along each axis."""
    oa = random_origin(shape, size, rng)
    ob = []
    for a, s, n in zip(oa, size, shape):
        m = int(np.floor(max_shift * s))
        b = a + int(rng.integers(-m, m + 1))
        lo, hi = min(0, n - s), max(0, n - s)
        if n < s:  # volume smaller than the crop: keep the crop covering it
            lo, hi = n - s, 0
        ob.append(int(np.clip(b, lo, hi)))
    return oa, tuple(ob)  # type: ignore[return-value]


def shared_voxels(origin_a: tuple[int, int, int], origin_b: tuple[int, int, int], size: tuple[int, int, int],
                  shape: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per axis, the volume index range ``[lo, hi)`` seen by both crops (and inside ``shape`` if given)."""
    lo = np.maximum(np.asarray(origin_a), np.asarray(origin_b))
    hi = np.minimum(np.asarray(origin_a) + np.asarray(size), np.asarray(origin_b) + np.asarray(size))
    if shape is not None:
        lo_in, hi_in = np.maximum(lo, 0), np.minimum(hi, np.asarray(shape))
        if np.all(hi_in > lo_in):  # prefer voxels of the real volume over padding
            lo, hi = lo_in, hi_in
    return lo, hi


def sample_positives(origin_a, origin_b, size, n: int, rng: np.random.Generator,
                     shape: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct voxels of the shared region as indices ``(n, 3)`` into view A and into view B.

    ``idx_a + origin_a == idx_b + origin_b``: the same voxel of the volume, i.e. the same physical point.
    """
    lo, hi = shared_voxels(origin_a, origin_b, size, shape)
    ext = hi - lo
    total = int(np.prod(ext))
    if total <= 0:
        raise ValueError("the two crops do not overlap")
    n = min(int(n), total)
    flat = rng.choice(total, size=n, replace=False)
    vol = np.stack(np.unravel_index(flat, tuple(int(e) for e in ext)), axis=1) + lo
    return (vol - np.asarray(origin_a)).astype(np.int64), (vol - np.asarray(origin_b)).astype(np.int64)


def shared_count(origin_a, origin_b, size, shape=None) -> int:
    lo, hi = shared_voxels(origin_a, origin_b, size, shape)
    return int(np.prod(np.maximum(hi - lo, 0)))


def augment_view(x: np.ndarray, rng: np.random.Generator, cfg: ContrastiveConfig) -> np.ndarray:
    """Intensity augmentation of one view in [0, 1]: random window, blur or sharpen, noise."""
    out = np.asarray(x, dtype=np.float32)
    if rng.random() < cfg.window_prob:
        lo = rng.uniform(*cfg.window_low)
        hi = rng.uniform(max(cfg.window_high[0], lo + 0.05), max(cfg.window_high[1], lo + 0.05))
        out = np.clip((out - lo) / (hi - lo), 0.0, 1.0)
    u = rng.random()
    if u < cfg.blur_prob:
        out = ndimage.gaussian_filter(out, sigma=rng.uniform(*cfg.blur_sigma), mode="nearest")
    elif u < cfg.blur_prob + cfg.sharpen_prob:
        blurred = ndimage.gaussian_filter(out, sigma=rng.uniform(*cfg.blur_sigma), mode="nearest")
        out = out + rng.uniform(*cfg.sharpen_amount) * (out - blurred)
    if rng.random() < cfg.noise_prob:
        out = out + rng.normal(0.0, rng.uniform(*cfg.noise_std), size=out.shape)
    return np.asarray(out, dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# features at voxels


def gather_pyramid(pyramid: list[torch.Tensor], idx: torch.Tensor, full_size: tuple[int, int, int]) -> torch.Tensor:
    """Concatenated pyramid features at voxels: ``idx`` ``(B, N, 3)`` full-resolution indices ->
    ``(B, N, sum C)``. Level ``l`` is read at ``idx // stride_l`` (stride = full size / level size)."""
    out = []
    for f in pyramid:
        b, c = f.shape[:2]
        lvl = f.shape[2:]
        strides = [max(1, int(round(full_size[d] / lvl[d]))) for d in range(3)]
        i = torch.stack([(idx[..., d] // strides[d]).clamp_(max=lvl[d] - 1) for d in range(3)], dim=-1)
        lin = (i[..., 0] * lvl[1] + i[..., 1]) * lvl[2] + i[..., 2]  # (B, N)
        g = f.flatten(2).gather(2, lin[:, None, :].expand(b, c, lin.shape[1]))  # (B, C, N)
        out.append(g.transpose(1, 2))
    return torch.cat(out, dim=-1)


def info_nce(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> tuple[torch.Tensor, float]:
    """Symmetric InfoNCE: row i of ``za`` and ``zb`` are positives, all other rows negatives.
    Returns the loss and the top-1 accuracy of finding the positive."""
    logits = za @ zb.t() / temperature
    target = torch.arange(za.shape[0], device=za.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    with torch.no_grad():
        acc = (logits.argmax(1) == target).float().mean().item()
    return loss, acc


@register_task("contrastive")
class ContrastiveTask(PretextTask):
    """vox2vec: InfoNCE between the same physical voxel in two differently augmented crops."""

    Config = ContrastiveConfig

    def __init__(self, config: dict | None = None):
        super().__init__(config if config is not None else {})
        self.opts: ContrastiveConfig = options_from_config(ContrastiveConfig, config, "contrastive")
        self.projector: nn.Module | None = None
        if int(self.opts.feature_channels) > 0:
            self._make_projector(int(self.opts.feature_channels))

    def _make_projector(self, channels: int) -> None:
        o = self.opts
        self.projector = nn.Sequential(nn.Linear(channels, o.proj_hidden), nn.GELU(), nn.Linear(o.proj_hidden, o.proj_dim))

    def setup(self, backbone: nn.Module) -> None:
        """Create the projector for the backbone's concatenated pyramid (sum of level channels)."""
        levels = getattr(getattr(backbone, "module", backbone), "levels", None)
        if not levels:
            raise ValueError("the contrastive task needs a backbone with 'levels' metadata")
        channels = int(sum(int(lv.channels) for lv in levels))
        if self.projector is None or self.projector[0].in_features != channels:
            self._make_projector(channels)

    # -- data -------------------------------------------------------------------------------------
    def sample_batch(self, cases: list, batch_size: int, patch_size: tuple[int, int, int],
                     rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """HU cases, mapped to [0, 1] with the model's window. Two augmented views per element: ``image``/``image_b`` (B,1,X,Y,Z), ``coords_mm``/
        ``coords_mm_b`` (B,3,X,Y,Z), positives ``pos_a``/``pos_b`` (B,N,3) voxel indices into each view,
        crop corners ``origin``/``origin_b`` (B,3) in the volume (``pos_a + origin == pos_b + origin_b``)."""
        if not cases:
            raise ValueError("no cases to draw patches from")
        size = tuple(int(s) for s in patch_size)
        picks = []
        for _ in range(batch_size):
            case = cases[int(rng.integers(len(cases)))]
            shape = tuple(int(s) for s in case.image.shape)
            oa, ob = sample_view_pair(shape, size, rng, self.opts.max_shift)
            picks.append((case, shape, oa, ob))
        n = min([self.opts.n_pairs] + [shared_count(oa, ob, size, shape) for _, shape, oa, ob in picks])
        views_a, views_b, ca, cb, pa, pb = [], [], [], [], [], []
        for case, shape, oa, ob in picks:
            ia, ib = sample_positives(oa, ob, size, n, rng, shape)
            views_a.append(augment_view(self._unit_crop(case.image, oa, size), rng, self.opts))
            views_b.append(augment_view(self._unit_crop(case.image, ob, size), rng, self.opts))
            ca.append(coords_mm_for(case.meta.affine, oa, size))
            cb.append(coords_mm_for(case.meta.affine, ob, size))
            pa.append(ia)
            pb.append(ib)
        return {
            "image": torch.from_numpy(np.stack(views_a))[:, None],
            "image_b": torch.from_numpy(np.stack(views_b))[:, None],
            "coords_mm": torch.from_numpy(np.stack(ca)),
            "coords_mm_b": torch.from_numpy(np.stack(cb)),
            "pos_a": torch.from_numpy(np.stack(pa)),
            "pos_b": torch.from_numpy(np.stack(pb)),
            "origin": torch.tensor([p[2] for p in picks], dtype=torch.int64),
            "origin_b": torch.tensor([p[3] for p in picks], dtype=torch.int64),
        }

    def _unit_crop(self, hu: np.ndarray, origin, size) -> np.ndarray:
        """HU crop mapped to [0, 1]; outside the volume 0 (the window minimum)."""
        lo = self.hu_window[0]
        return hu_to_unit(crop_or_pad(np.asarray(hu, dtype=np.float32), origin, size, lo), self.hu_window)

    # -- loss -------------------------------------------------------------------------------------
    def embed(self, pyramid: list[torch.Tensor], idx: torch.Tensor, full_size: tuple[int, int, int]) -> torch.Tensor:
        """Projected, L2-normalised embeddings ``(B, N, proj_dim)`` of voxels ``idx`` ``(B, N, 3)``."""
        feats = gather_pyramid(pyramid, idx, full_size).float()
        if self.projector is None:  # setup() was not called: size the projector from the pyramid
            self._make_projector(feats.shape[-1])
            self.projector.to(feats.device)
        return F.normalize(self.projector(feats), dim=-1)

    def loss(self, backbone: nn.Module, batch: dict[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        a, b = batch["image"], batch["image_b"]
        bsz = a.shape[0]
        out = backbone(torch.cat([a, b]), t=None)
        pyramid = list(out[1]) if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], (list, tuple)) else list(out)
        size = tuple(int(s) for s in a.shape[2:])
        pos_a = batch["pos_a"].to(a.device)
        pos_b = batch["pos_b"].to(a.device)
        za = self.embed([f[:bsz] for f in pyramid], pos_a, size)
        zb = self.embed([f[bsz:] for f in pyramid], pos_b, size)
        loss, acc = info_nce(za.reshape(-1, za.shape[-1]), zb.reshape(-1, zb.shape[-1]), self.opts.temperature)
        return loss, {"info_nce": float(loss.detach()), "pos_acc": acc, "pairs": float(za.shape[0] * za.shape[1])}
