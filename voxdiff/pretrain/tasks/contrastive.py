"""Contrastive pretraining (vox2vec): voxel-level InfoNCE between two overlapping crops.

The recipe follows vox2vec (Goncharov et al., MICCAI 2023, and its public code), scaled to our grids:

* **Crops**: an anchor voxel is drawn among the case's body voxels; each of the two crops of
  ``patch_size`` is placed uniformly among the positions that contain the anchor (and lie inside the
  volume), so the crops always overlap; ``max_shift`` < 1 additionally bounds their offset.
* **Positives**: up to ``n_pairs`` voxels of the shared region, drawn only among **body** voxels
  (:func:`body_mask`: not air connected to the in-plane border, air = HU below the body threshold,
  so lungs and bowel gas inside the body count as body, as in vox2vec). The same physical voxel in
  the two views is a positive pair; its index in each view follows from the crop origins.
* **Augmentation of each view, in HU** (:func:`augment_view_hu`): with probability 1/4 each an in-plane
  Gaussian blur or an in-plane sharpening (sigmas in mm), with probability 1/2 Gaussian noise of sd
  up to 30 HU, then with probability 0.8 a random HU window (lower bound in [-1350, -1000] HU, upper
  bound in [300, 1000] HU; otherwise the model's window) mapped to [0, 1].
* **Representation**: the concatenated feature pyramid at the voxel (level ``l`` read at
  ``voxel // stride_l``); **projector** C -> C -> C -> ``proj_dim`` with BatchNorm + ReLU after the
  first two linear layers, output L2-normalised (inside the task, so the engine trains and saves it).
* **Loss**: InfoNCE with ``temperature`` 0.1 where the negatives of a voxel are all other sampled
  voxels of **both** views (``same_view_negatives``), symmetric over the two views.

What is left different from vox2vec, and why, is listed in docs/PRETRAIN.md ("Baselines").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from ...data.preprocess import HU_WINDOW
from ..backbones import PyramidBackbone
from .base import PretextTask, coords_mm_for, crop_or_pad, options_from_config, random_origin, register_task

# the ranges vox2vec draws its HU window from (its MIN_WINDOW_HU / MAX_WINDOW_HU)
VOX2VEC_WINDOW_LOW_HU = (-1350.0, -1000.0)
VOX2VEC_WINDOW_HIGH_HU = (300.0, 1000.0)


@dataclass
class ContrastiveConfig:
    n_pairs: int = 1024  # positive voxel pairs per crop pair, at most (fewer when fewer shared body voxels)
    temperature: float = 0.1
    proj_dim: int = 128
    projector: str = "vox2vec"  # vox2vec: C->C->C->proj_dim, BatchNorm+ReLU; mlp: C->hidden->proj_dim, GELU (before 2026-12)
    proj_hidden: int = 0  # hidden width; 0 = C (vox2vec) or 512 (mlp)
    feature_channels: int = 0  # projector input (sum of pyramid channels); 0 = taken from the backbone
    same_view_negatives: bool = True  # negatives from both views (vox2vec); False: only the other view
    max_shift: float = 1.0  # crop offset bound per axis as a fraction of the side; 1 = any offset keeping the anchor
    body_threshold_hu: float | None = None  # body = not border-connected air below this; None: the model's preprocess value
    window_prob: float = 0.8  # random HU window, else the model's window
    window_low_hu: tuple[float, float] = VOX2VEC_WINDOW_LOW_HU
    window_high_hu: tuple[float, float] = VOX2VEC_WINDOW_HIGH_HU
    blur_prob: float = 0.25  # in-plane Gaussian blur
    blur_sigma_mm: tuple[float, float] = (0.25, 1.5)
    sharpen_prob: float = 0.25  # in-plane sharpening: b = G(x, s1); b + alpha * (b - G(b, s2))
    sharpen_sigma_mm: tuple[float, float] = (0.5, 1.0)
    sharpen_sigma2_mm: float = 0.5
    sharpen_alpha: tuple[float, float] = (10.0, 30.0)
    noise_prob: float = 0.5
    noise_sd_hu: tuple[float, float] = (0.0, 30.0)


# ------------------------------------------------------------------------------------------------
# crops and positives (pure numpy)


def body_mask(hu: np.ndarray, threshold_hu: float = -500.0) -> np.ndarray:
    """Voxels inside the body: everything except the air (HU < ``threshold_hu``) that is connected to
    the in-plane border of the volume (x, y faces). Air inside the body (lungs, bowel gas) is body."""
    air = np.asarray(hu) < threshold_hu
    padded = np.pad(air, ((1, 1), (1, 1), (0, 0)), constant_values=True)
    lab, _ = ndimage.label(padded)
    outside = lab == lab[0, 0, 0]  # the padding ring is one component with all air touching it
    return ~outside[1:-1, 1:-1, :]


def sample_view_pair(shape: tuple[int, int, int], size: tuple[int, int, int], rng: np.random.Generator,
                     max_shift: float = 1.0, anchor: tuple[int, int, int] | None = None
                     ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Origins of two crops of ``size`` in a volume of ``shape``.

    With ``anchor``, each crop is uniform among the positions inside the volume that contain the
    anchor voxel (vox2vec); without it the first crop is uniform. ``max_shift`` < 1 also keeps the
    offset between the crops within ``floor(max_shift * side)`` per axis.
    """
    oa, ob = [], []
    first = random_origin(shape, size, rng) if anchor is None else None
    for d, (s, n) in enumerate(zip(size, shape)):
        lo, hi = min(0, n - s), max(0, n - s)
        if n < s:  # volume smaller than the crop: keep the crop covering it
            lo, hi = n - s, 0
        if anchor is not None:
            lo_a, hi_a = max(lo, int(anchor[d]) - s + 1), min(hi, int(anchor[d]))
            lo_a, hi_a = (lo_a, hi_a) if lo_a <= hi_a else (lo, hi)
            a = int(rng.integers(lo_a, hi_a + 1))
        else:
            lo_a, hi_a = lo, hi
            a = int(first[d])
        m = int(np.floor(max_shift * s))
        lo_b, hi_b = max(lo_a, a - m), min(hi_a, a + m)
        oa.append(a)
        ob.append(int(rng.integers(lo_b, hi_b + 1)))
    return tuple(oa), tuple(ob)  # type: ignore[return-value]


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
                     shape: tuple[int, int, int] | None = None, mask: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` distinct voxels of the shared region as indices ``(k, 3)`` into view A and into view B.

    ``idx_a + origin_a == idx_b + origin_b``: the same voxel of the volume, i.e. the same physical point.
    ``mask`` (the volume's shape, boolean): draw only voxels where it is true (the body).
    """
    lo, hi = shared_voxels(origin_a, origin_b, size, shape)
    ext = hi - lo
    total = int(np.prod(ext))
    if total <= 0:
        raise ValueError("the two crops do not overlap")
    if mask is not None:
        sub = mask[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
        cand = np.flatnonzero(sub)
        if cand.size == 0:
            raise ValueError("no body voxel in the region the two crops share")
        flat = rng.choice(cand, size=min(int(n), cand.size), replace=False)
    else:
        flat = rng.choice(total, size=min(int(n), total), replace=False)
    vol = np.stack(np.unravel_index(flat, tuple(int(e) for e in ext)), axis=1) + lo
    return (vol - np.asarray(origin_a)).astype(np.int64), (vol - np.asarray(origin_b)).astype(np.int64)


def shared_count(origin_a, origin_b, size, shape=None) -> int:
    lo, hi = shared_voxels(origin_a, origin_b, size, shape)
    return int(np.prod(np.maximum(hi - lo, 0)))


def draw_window(rng: np.random.Generator, cfg: ContrastiveConfig, default: tuple[float, float]) -> tuple[float, float]:
    """The HU window of one view: with ``window_prob`` a random one from vox2vec's ranges, else ``default``."""
    if rng.random() < cfg.window_prob:
        return float(rng.uniform(*cfg.window_low_hu)), float(rng.uniform(*cfg.window_high_hu))
    return float(default[0]), float(default[1])


def _inplane(x: np.ndarray, sigma_vox: np.ndarray) -> np.ndarray:
    """Gaussian filter along x and y only (the axial plane), sigmas in voxels."""
    return ndimage.gaussian_filter(x, sigma=(float(sigma_vox[0]), float(sigma_vox[1]), 0.0), mode="nearest")


def augment_view_hu(hu: np.ndarray, rng: np.random.Generator, cfg: ContrastiveConfig,
                    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                    window: tuple[float, float] = HU_WINDOW) -> tuple[np.ndarray, dict[str, Any]]:
    """vox2vec's intensity augmentation of one HU crop, then the (random) window to [0, 1].

    Returns the view in [0, 1] and a record ``{"filter": None|"blur"|"sharpen", "noise_sd": HU,
    "window": (lo, hi)}`` of what was drawn.
    """
    x = np.asarray(hu, dtype=np.float32)
    inplane_mm = np.asarray(spacing[:2], dtype=np.float64)
    rec: dict[str, Any] = {"filter": None, "noise_sd": 0.0, "window": None}
    u = rng.random()
    if u < cfg.blur_prob:
        x = _inplane(x, rng.uniform(*cfg.blur_sigma_mm) / inplane_mm)
        rec["filter"] = "blur"
    elif u < cfg.blur_prob + cfg.sharpen_prob:
        blurred = _inplane(x, rng.uniform(*cfg.sharpen_sigma_mm) / inplane_mm)
        x = blurred + rng.uniform(*cfg.sharpen_alpha) * (blurred - _inplane(blurred, cfg.sharpen_sigma2_mm / inplane_mm))
        rec["filter"] = "sharpen"
    if rng.random() < cfg.noise_prob:
        sd = float(rng.uniform(*cfg.noise_sd_hu))
        x = x + rng.normal(0.0, sd, size=x.shape)
        rec["noise_sd"] = sd
    lo, hi = draw_window(rng, cfg, window)
    rec["window"] = (lo, hi)
    return np.clip((np.asarray(x, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32), rec


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


def info_nce(za: torch.Tensor, zb: torch.Tensor, temperature: float,
             same_view: bool = True, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE: row i of ``za`` and row i of ``zb`` are positives.

    Negatives of ``za[i]`` are every ``zb[j]`` (j != i) and, with ``same_view`` (vox2vec), every
    ``za[j]`` (j != i) too; likewise for ``zb[i]``. ``valid`` (M,) booleans: only valid pairs take
    part, as anchors and as negatives. Returns the loss and the top-1 accuracy of finding the
    positive among all candidates (a 0-d tensor).

    On the CPU the invalid pairs are dropped first and each anchor's loss is ``logsumexp`` over its
    candidate blocks minus its positive, without building the concatenated ``(M, 2M)`` logits (2.7x
    faster forward + backward at M = 2,048 than :func:`_info_nce_masked`, the same value). On CUDA the
    masked form keeps every shape independent of the data (no host synchronisation)."""
    if valid is not None:
        if za.is_cuda:
            return _info_nce_masked(za, zb, temperature, same_view, valid)
        keep = valid.bool()
        za, zb = za[keep], zb[keep]
        if za.shape[0] == 0:  # nothing valid: a zero loss that still reaches the parameters
            zero = (za.sum() + zb.sum()) * 0.0
            return zero, zero.detach()
    l_ab = za @ zb.t() / temperature
    pos = l_ab.diagonal()
    lse_a, lse_b = l_ab.logsumexp(1), l_ab.logsumexp(0)  # rows: anchors of view A; columns: of view B
    if same_view:
        l_aa = za @ za.t() / temperature
        l_bb = zb @ zb.t() / temperature
        l_aa.diagonal().fill_(float("-inf"))  # an anchor is not its own negative
        l_bb.diagonal().fill_(float("-inf"))
        lse_a = torch.logaddexp(lse_a, l_aa.logsumexp(1))
        lse_b = torch.logaddexp(lse_b, l_bb.logsumexp(1))
    loss = (0.5 * ((lse_a - pos) + (lse_b - pos))).mean()
    with torch.no_grad():  # top-1: the positive is the best candidate
        best_a, best_b = l_ab.amax(1), l_ab.amax(0)
        if same_view:
            best_a, best_b = torch.maximum(best_a, l_aa.amax(1)), torch.maximum(best_b, l_bb.amax(1))
        hit = 0.5 * ((pos >= best_a).float() + (pos >= best_b).float())
    return loss, hit.mean()


def _info_nce_masked(za: torch.Tensor, zb: torch.Tensor, temperature: float,
                     same_view: bool = True, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`info_nce` with masks: the same loss as dropping the invalid rows first, computed so that
    no shape depends on the data (invalid anchors get zero weight, invalid candidates -inf)."""
    n = za.shape[0]
    target = torch.arange(n, device=za.device)
    eye = torch.eye(n, dtype=torch.bool, device=za.device)
    # a candidate j is masked for anchor i when it is invalid (an anchor's own positive never is:
    # invalid anchors are given zero weight instead, and their loss must stay finite)
    drop = None if valid is None else (~valid.bool())[None, :] & ~eye
    l_ab = za @ zb.t() / temperature
    l_ba = l_ab.t()
    if drop is not None:
        l_ab, l_ba = l_ab.masked_fill(drop, float("-inf")), l_ba.masked_fill(drop, float("-inf"))
    if not same_view:
        logits_a, logits_b = l_ab, l_ba
    else:
        self_drop = eye if drop is None else eye | drop
        l_aa = (za @ za.t() / temperature).masked_fill(self_drop, float("-inf"))
        l_bb = (zb @ zb.t() / temperature).masked_fill(self_drop, float("-inf"))
        # candidates of a voxel of view A: [view B (positive at i), view A (itself excluded)]
        logits_a = torch.cat([l_ab, l_aa], dim=1)
        logits_b = torch.cat([l_ba, l_bb], dim=1)
    per = 0.5 * (F.cross_entropy(logits_a, target, reduction="none") + F.cross_entropy(logits_b, target, reduction="none"))
    with torch.no_grad():
        hit = 0.5 * ((logits_a.argmax(1) == target).float() + (logits_b.argmax(1) == target).float())
    if valid is None:
        return per.mean(), hit.mean()
    w = valid.to(per.dtype)
    denom = w.sum().clamp_min(1.0)
    return (per * w).sum() / denom, (hit * w).sum() / denom


class _L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


def make_projector(kind: str, channels: int, proj_dim: int, hidden: int = 0) -> nn.Sequential:
    """``vox2vec``: Linear(C, H) BN ReLU Linear(H, H) BN ReLU Linear(H, proj_dim), H = ``hidden`` or C;
    ``mlp``: Linear(C, H) GELU Linear(H, proj_dim), H = ``hidden`` or 512 (the projector before 2026-12).
    Both end with L2 normalisation."""
    if kind == "vox2vec":
        h = int(hidden) or int(channels)
        return nn.Sequential(nn.Linear(channels, h), nn.BatchNorm1d(h), nn.ReLU(),
                             nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(),
                             nn.Linear(h, proj_dim), _L2Normalize())
    if kind == "mlp":
        h = int(hidden) or 512
        return nn.Sequential(nn.Linear(channels, h), nn.GELU(), nn.Linear(h, proj_dim), _L2Normalize())
    raise ValueError(f"unknown projector {kind!r} (vox2vec, mlp)")


@register_task("contrastive")
class ContrastiveTask(PretextTask):
    """vox2vec: InfoNCE between the same physical voxel in two differently augmented crops."""

    Config = ContrastiveConfig

    def __init__(self, config: dict | None = None):
        super().__init__(config if config is not None else {})
        self.opts: ContrastiveConfig = options_from_config(ContrastiveConfig, config, "contrastive")
        make_projector(self.opts.projector, 1, 1)  # refuse an unknown kind early
        self.projector: nn.Module | None = None
        self._body: dict[int, tuple[Any, np.ndarray]] = {}  # id(case) -> (case, body mask), cached
        if int(self.opts.feature_channels) > 0:
            self._make_projector(int(self.opts.feature_channels))

    def _make_projector(self, channels: int, kind: str | None = None, hidden: int | None = None) -> None:
        o = self.opts
        self.projector = make_projector(kind or o.projector, channels, o.proj_dim, o.proj_hidden if hidden is None else hidden)

    def setup(self, backbone: nn.Module) -> None:
        """Create the projector for the backbone's concatenated pyramid (sum of level channels)."""
        net = getattr(backbone, "module", backbone)  # DDP-wrapped or plain
        if not isinstance(net, PyramidBackbone):
            raise ValueError(f"the contrastive task needs a PyramidBackbone (pyramid levels), got {type(net).__name__}")
        channels = int(sum(int(lv.channels) for lv in net.levels))
        if self.projector is None or self.projector[0].in_features != channels:
            self._make_projector(channels)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also loads models saved with the earlier two-layer GELU projector (``mlp``): without
        BatchNorm keys in the saved projector, the projector is rebuilt in that form first."""
        keys = set(state_dict)
        if ("projector.0.weight" in keys and "projector.2.weight" in keys and "projector.1.running_mean" not in keys
                and self.projector is not None and "1.running_mean" in self.projector.state_dict()):
            w0 = state_dict["projector.0.weight"]
            self._make_projector(int(w0.shape[1]), kind="mlp", hidden=int(w0.shape[0]))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- data -------------------------------------------------------------------------------------
    @property
    def body_threshold_hu(self) -> float:
        if self.opts.body_threshold_hu is not None:
            return float(self.opts.body_threshold_hu)
        pre = self.config.get("preprocess") if isinstance(self.config, dict) else None
        v = pre.get("body_threshold_hu") if isinstance(pre, dict) else None
        return -500.0 if v is None else float(v)

    def body(self, case) -> np.ndarray:
        """The case's body mask (:func:`body_mask`), computed once per case; a case without any body
        voxel counts as all body (so that every case still gives positives)."""
        hit = self._body.get(id(case))
        if hit is not None and hit[0] is case:
            return hit[1]
        m = body_mask(np.asarray(case.image), self.body_threshold_hu)
        if not m.any():
            m = np.ones_like(m)
        self._body[id(case)] = (case, m)
        return m

    def sample_batch(self, cases: list, batch_size: int, patch_size: tuple[int, int, int],
                     rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Two augmented views of each of ``batch_size`` crop pairs from HU cases.

        Returns ``image``/``image_b`` (B,1,X,Y,Z) in [0, 1], ``coords_mm``/``coords_mm_b`` (B,3,X,Y,Z),
        positives ``pos_a``/``pos_b`` (B,N,3) voxel indices into each view with ``pos_valid`` (B,N)
        marking the real ones (pairs may share fewer than N body voxels; the rest is padding), crop
        corners ``origin``/``origin_b`` (B,3) in the volume (``pos_a + origin == pos_b + origin_b``)
        and the HU ``window`` (B,2,2) each view was mapped with."""
        if not cases:
            raise ValueError("no cases to draw patches from")
        size = tuple(int(s) for s in patch_size)
        views_a, views_b, ca, cb, pos, origins, windows = [], [], [], [], [], [], []
        for _ in range(batch_size):
            case = cases[int(rng.integers(len(cases)))]
            hu = case.image  # float32 HU or an int16 memory map: only the crops become float32
            shape = tuple(int(s) for s in hu.shape)
            body = self.body(case)
            where = np.flatnonzero(body)
            anchor = np.unravel_index(int(where[int(rng.integers(where.size))]), shape)
            oa, ob = sample_view_pair(shape, size, rng, self.opts.max_shift, anchor=tuple(int(v) for v in anchor))
            ia, ib = sample_positives(oa, ob, size, self.opts.n_pairs, rng, shape, mask=body)
            spacing = tuple(float(v) for v in np.linalg.norm(np.asarray(case.meta.affine)[:3, :3], axis=0))
            va, ra = augment_view_hu(crop_or_pad(hu, oa, size, self.hu_window[0], dtype=np.float32), rng, self.opts,
                                     spacing, self.hu_window)
            vb, rb = augment_view_hu(crop_or_pad(hu, ob, size, self.hu_window[0], dtype=np.float32), rng, self.opts,
                                     spacing, self.hu_window)
            views_a.append(va)
            views_b.append(vb)
            ca.append(coords_mm_for(case.meta.affine, oa, size))
            cb.append(coords_mm_for(case.meta.affine, ob, size))
            pos.append((ia, ib))
            origins.append((oa, ob))
            windows.append((ra["window"], rb["window"]))
        n = max(len(ia) for ia, _ in pos)
        pa = np.zeros((batch_size, n, 3), dtype=np.int64)
        pb = np.zeros((batch_size, n, 3), dtype=np.int64)
        valid = np.zeros((batch_size, n), dtype=bool)
        for i, (ia, ib) in enumerate(pos):
            pa[i, : len(ia)], pb[i, : len(ib)], valid[i, : len(ia)] = ia, ib, True
        return {
            "image": torch.from_numpy(np.stack(views_a))[:, None],
            "image_b": torch.from_numpy(np.stack(views_b))[:, None],
            "coords_mm": torch.from_numpy(np.stack(ca)),
            "coords_mm_b": torch.from_numpy(np.stack(cb)),
            "pos_a": torch.from_numpy(pa),
            "pos_b": torch.from_numpy(pb),
            "pos_valid": torch.from_numpy(valid),
            "origin": torch.tensor([o[0] for o in origins], dtype=torch.int64),
            "origin_b": torch.tensor([o[1] for o in origins], dtype=torch.int64),
            "window": torch.tensor(windows, dtype=torch.float32),
        }

    # -- loss -------------------------------------------------------------------------------------
    def embed(self, pyramid: list[torch.Tensor], idx: torch.Tensor, full_size: tuple[int, int, int],
              valid: torch.Tensor | None = None) -> torch.Tensor:
        """Projected, L2-normalised embeddings of voxels ``idx`` ``(B, N, 3)``: ``(B, N, proj_dim)``,
        or ``(M, proj_dim)`` of the ``valid`` ones (``(B, N)`` boolean) in row-major order."""
        feats = gather_pyramid(pyramid, idx, full_size).float()
        if self.projector is None:  # setup() was not called: size the projector from the pyramid
            self._make_projector(feats.shape[-1])
            self.projector.to(feats.device)
        if valid is not None:  # kept for callers that want the valid rows only (shape depends on data)
            return self.projector(feats[valid])
        b, n = feats.shape[:2]
        return self.projector(feats.reshape(b * n, -1)).reshape(b, n, -1)

    def loss(self, backbone: nn.Module, batch: dict[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        a, b = batch["image"], batch["image_b"]
        bsz = a.shape[0]
        out = backbone(torch.cat([a, b]), t=None)
        pyramid = list(out[1]) if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], (list, tuple)) else list(out)
        size = tuple(int(s) for s in a.shape[2:])
        pos_a = batch["pos_a"].to(a.device)
        pos_b = batch["pos_b"].to(a.device)
        valid = batch.get("pos_valid")
        valid = torch.ones(pos_a.shape[:2], dtype=torch.bool, device=a.device) if valid is None else valid.to(a.device).bool()
        # every pair embedded, the invalid ones masked in the loss: no data-dependent shape, no sync
        za = self.embed([f[:bsz] for f in pyramid], pos_a, size).flatten(0, 1)
        zb = self.embed([f[bsz:] for f in pyramid], pos_b, size).flatten(0, 1)
        flat = valid.flatten()
        loss, acc = info_nce(za, zb, self.opts.temperature, same_view=self.opts.same_view_negatives, valid=flat)
        return loss, {"info_nce": loss.detach(), "pos_acc": acc, "pairs": flat.sum().float()}
