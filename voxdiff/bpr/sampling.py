"""Training views for the body part regressors: crops of a volume at a random zoom, with the
physical position of every sampled point, and intensity augmentation. Pure tensor code, seeded.

A crop is described per axis by ``start`` (source voxel index of its first voxel) and ``step``
(source voxels per crop voxel), so crop voxel ``i`` lies at source index ``start + i * step`` and the
world position follows from the volume's affine. Points outside the volume read 0 (the window
minimum, i.e. air), like padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .models import slice_neighbourhood_outside, slice_neighbourhoods


@dataclass
class Volume:
    """A preprocessed training volume in memory: intensities in [0, 1], RAS affine (mm)."""

    image: torch.Tensor  # (1, 1, X, Y, Z) float32
    affine: np.ndarray  # 4x4
    case_id: str = ""
    group: int = 0  # 0: --data, 1: --data.extra (see BPRData.extra_ratio)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape[2:])  # type: ignore[return-value]


def _norm(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Source voxel index -> grid_sample coordinate (align_corners=True)."""
    return 2.0 * idx / max(n - 1, 1) - 1.0


def _lerp_axis(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` at fractional source indices ``idx``; neighbours
    outside ``[0, n)`` count as 0."""
    n = x.shape[dim]
    idx = idx.to(torch.float32)
    lo = torch.floor(idx)
    w = idx - lo
    i0 = lo.to(torch.long)
    shape = [1] * x.ndim
    shape[dim] = -1
    m = int(i0.numel())
    # unit steps (zoom 1: the ape crops) read consecutive voxels: a narrowed view instead of a gather,
    # the same values (index_select's gather along the last axis cost the ape step 20 ms)
    first = int(i0[0]) if m else 0
    run = m > 0 and first >= 0 and first + m < n and bool((i0 == torch.arange(first, first + m)).all())
    out = None
    for k, (i, wt) in enumerate(((i0, 1.0 - w), (i0 + 1, w))):
        if run:
            v = x.narrow(dim, first + k, m) * wt.view(shape)
        else:
            wt = torch.where((i >= 0) & (i < n), wt, torch.zeros_like(wt)).view(shape)
            v = x.index_select(dim, i.clamp(0, n - 1)) * wt
        out = v if out is None else out.add_(v)
    return out  # type: ignore[return-value]


def sample_axes(vol: Volume, axes: list[torch.Tensor]) -> torch.Tensor:
    """Trilinear samples of the volume on the outer product of per-axis source indices -> (1,1,a,b,c).

    Points outside the volume read 0 (its neighbours outside count as 0), as ``grid_sample`` with zero
    padding and ``align_corners=True`` gives them; computed separably (one linear interpolation per
    axis, the axis that shrinks the volume most first), about 4x faster than ``grid_sample`` on the
    CPU for the training crops (docs/BPR.md, "Faster training crops")."""
    x = vol.image[0, 0]
    idx = []
    for a, ax in enumerate(axes):  # first the box of source voxels the samples touch (a view)
        ax = ax.to(torch.float32)
        lo = min(max(int(torch.floor(ax.min())), 0), x.shape[a] - 1)
        hi = max(min(int(torch.floor(ax.max())) + 2, x.shape[a]), lo + 1)
        x = x.narrow(a, lo, hi - lo)
        idx.append(ax - lo)
    for a in sorted(range(3), key=lambda k: len(idx[k]) / max(x.shape[k], 1)):
        x = _lerp_axis(x, idx[a], a)
    return x[None, None].contiguous()


def sample_points(img: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Sample a map ``(1, C, X, Y, Z)`` at fractional voxel indices ``idx`` ``(N, 3)`` -> ``(N, C)``."""
    n = img.shape[2:]
    g = torch.stack([_norm(idx[:, 2], n[2]), _norm(idx[:, 1], n[1]), _norm(idx[:, 0], n[0])], -1)
    out = F.grid_sample(img, g.view(1, -1, 1, 1, 3).to(img.dtype), mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(img.shape[1], -1).t()


def world(affine: np.ndarray, idx: torch.Tensor) -> torch.Tensor:
    """Source voxel indices (N, 3) -> world mm (N, 3)."""
    a = torch.as_tensor(affine, dtype=torch.float64)
    return (idx.double() @ a[:3, :3].t() + a[:3, 3]).float()


def augment_intensity(x: torch.Tensor, rng: np.random.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random contrast, brightness, gamma and Gaussian noise on [0, 1] intensities (per sample)."""
    if strength <= 0:
        return x
    c = 1.0 + strength * rng.uniform(-0.15, 0.15)
    b = strength * rng.uniform(-0.04, 0.04)
    gamma = float(np.exp(strength * rng.uniform(-0.2, 0.2)))
    sigma = strength * rng.uniform(0.0, 0.02)
    # in place on one copy (the same operations in the same order as ((y - 0.5) * c + 0.5 + b): the
    # same values, without four temporaries of the crop's size)
    y = x.clamp(0, 1).pow_(gamma).sub_(0.5).mul_(c).add_(0.5).add_(b)
    if sigma > 0:
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        y.add_(torch.randn(y.shape, generator=g).mul_(sigma))
    return y.clamp_(0.0, 1.0)


def _gauss_inplane(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``(B, 1, X, Y, Z)`` along x and y (``sigma`` in voxels), edges replicated."""
    r = max(1, int(np.ceil(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    y = torch.nn.functional.pad(x, (0, 0, 0, 0, r, r), mode="replicate")
    y = torch.nn.functional.conv3d(y, k.view(1, 1, -1, 1, 1))
    y = torch.nn.functional.pad(y, (0, 0, r, r, 0, 0), mode="replicate")
    return torch.nn.functional.conv3d(y, k.view(1, 1, 1, -1, 1))


def augment_texture(x: torch.Tensor, rng: np.random.Generator, strength: float = 1.0) -> torch.Tensor:
    """What differs between scanners and phantoms beyond the intensity curve: the reconstruction
    kernel (in-plane Gaussian blur, or sharpening by unsharp masking) and the noise texture
    (Gaussian noise smoothed in-plane, i.e. spatially correlated as in filtered back-projection).
    Each with probability ``0.5 * strength`` (capped at 1); intensities in [0, 1]."""
    if strength <= 0:
        return x
    p = min(1.0, 0.5 * strength)
    y = x
    if rng.random() < p:
        sigma = float(rng.uniform(0.4, 1.2))
        blurred = _gauss_inplane(y, sigma)
        y = blurred if rng.random() < 0.6 else y + float(rng.uniform(0.3, 1.0)) * (y - blurred)
    if rng.random() < p:
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        n = _gauss_inplane(torch.randn(y.shape, generator=g, dtype=y.dtype), float(rng.uniform(0.5, 1.5)))
        n = n / n.std().clamp_min(1e-6)
        y = y + float(rng.uniform(0.005, 0.03)) * n  # 12..70 HU in the [-1350, 1000] window
    return y.clamp(0.0, 1.0)


def _start(n: int, extent: float, rng: np.random.Generator, overhang: float = 0.1) -> float:
    """A random start index so a crop covering ``extent`` source voxels lies mostly inside [0, n-1]."""
    lo = min(0.0, (n - 1) - extent) - overhang * extent
    hi = max(0.0, (n - 1) - extent) + overhang * extent
    return float(rng.uniform(lo, hi))


def _zoom(rng: np.random.Generator, zoom: float) -> float:
    z = max(float(zoom), 1.0)
    return float(np.exp(rng.uniform(-np.log(z), np.log(z))))


# ---------------------------------------------------------------------------------------- slice

def slice_views(
    vol: Volume, size_xy: int, n_slices: int, rng: np.random.Generator, zoom: float = 1.25, aug: float = 1.0,
    texture: float = 0.0, context: int = 0, context_step: int = 1, fov_aug: float = 0.0, fov_min_mm: float = 96.0,
    fov_pair: bool = False, trunc_aug: float = 0.0, trunc_min: float = 0.5, fov_pair_range: str = "wider",
    return_outside: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Two in-plane crops (different position/zoom/intensity) of the same K axial slices.

    Returns ``view_a, view_b`` of shape ``(1, 1, size_xy, size_xy, K)`` and the slices' world z (K,)
    in mm; slices are drawn at random heights (sorted). With ``context`` c > 0 the views hold K
    groups of 2c + 1 slices ``context_step`` voxels apart, each centred on its slice (``(..., K * (2c + 1))``; the
    volume's end slices repeated beyond its edges), for ``SliceRegressor.slice_scores_raw(stacked=True)``.
    With probability ``fov_aug`` (and context) the slices and their neighbours come from a random
    z-range of at least ``fov_min_mm`` instead, its end slices repeated beyond it: the ends of a shorter scan.
    With ``fov_pair`` that shorter scan is view a's only: view b takes the neighbours of the same slices
    from a wider range (from it up to the whole volume), so that the two views' agreement asks for the
    same score whatever part of the body a scan covers; ``fov_pair_range`` "whole": view b's range is the
    whole volume.
    With probability ``trunc_aug`` view a's in-plane field of view is truncated
    (:func:`truncate_inplane`): the window's floor (0) outside a random box keeping ``trunc_min``..1
    of each axis, as a scan reconstructed or cropped to a narrower field of view and padded back to
    the model's tile size; view b keeps the whole crop, so the views' agreement asks for the same score.
    With ``return_outside`` two more tensors follow: for each view, which of its stacked slices stand
    for positions beyond its range (bool ``(K * (2c + 1),)``; the repeated end slices that a slice model
    with ``context_fill`` "mask" masks).
    """
    nx, ny, nz = vol.shape
    lo, hi = 0.0, float(nz - 1)
    shorter = bool(context and fov_aug > 0 and rng.random() < fov_aug)
    if shorter:
        dz = float(np.linalg.norm(vol.affine[:3, 2]))
        span = rng.uniform(min(hi, fov_min_mm / max(dz, 1e-6)), hi)
        lo = float(rng.uniform(0.0, hi - span))
        hi = lo + span
    if shorter and fov_pair and fov_pair_range == "whole":
        lo_b, hi_b = 0.0, float(nz - 1)
    elif shorter and fov_pair:
        lo_b, hi_b = float(rng.uniform(0.0, lo)), float(rng.uniform(hi, nz - 1))
    else:
        lo_b, hi_b = lo, hi
    z_idx = np.sort(rng.uniform(lo, hi, size=n_slices))
    az = torch.as_tensor(z_idx, dtype=torch.float32)
    zs = [az, az]
    outside = [torch.zeros(len(az), dtype=torch.bool)] * 2
    if context:  # neighbours clamped to [lo, hi]: the range's end slices repeated beyond it
        zs = [slice_neighbourhoods(az, context, a, b, context_step) for a, b in ((lo, hi), (lo_b, hi_b))]
        outside = [slice_neighbourhood_outside(az, context, a, b, context_step) for a, b in ((lo, hi), (lo_b, hi_b))]
    views = []
    for az in zs:
        axes = []
        for n in (nx, ny):
            step = _zoom(rng, zoom)
            ext = (size_xy - 1) * step
            axes.append(_start(n, ext, rng) + step * torch.arange(size_xy, dtype=torch.float32))
        v = sample_axes(vol, axes + [az])
        v = augment_intensity(v, rng, aug)
        views.append(augment_texture(v, rng, texture) if texture > 0 else v)
    if trunc_aug > 0 and rng.random() < trunc_aug:  # no draw when off: earlier runs stay reproducible
        views[0] = truncate_inplane(views[0], rng, trunc_min)
    centre = torch.tensor([[(nx - 1) / 2, (ny - 1) / 2, float(k)] for k in z_idx])
    z_mm = world(vol.affine, centre)[:, 2]
    if return_outside:
        return views[0], views[1], z_mm, outside[0], outside[1]
    return views[0], views[1], z_mm


def truncate_inplane(view: torch.Tensor, rng: np.random.Generator, min_frac: float = 0.5) -> torch.Tensor:
    """``view`` ``(1, 1, X, Y, K)`` with everything outside a random in-plane box set to 0 (the
    intensity window's floor, which is also what inference pads a narrow slice with). Per axis the box
    keeps a fraction in [min_frac, 1] of the extent, cut from the start, the end or both sides."""
    out = view.clone()
    for axis in (2, 3):
        n = view.shape[axis]
        keep = int(round(n * rng.uniform(min_frac, 1.0)))
        cut = n - keep
        side = int(rng.integers(3))  # 0: cut the start, 1: the end, 2: both
        a = cut if side == 0 else (0 if side == 1 else int(rng.integers(0, cut + 1)))
        if a > 0:
            out.narrow(axis, 0, a).zero_()
        if a + keep < n:
            out.narrow(axis, a + keep, n - a - keep).zero_()
    return out


# ------------------------------------------------------------------------------------------ ape

@dataclass
class APEViews:
    view_a: torch.Tensor  # (1, 1, P, P, P)
    view_b: torch.Tensor
    pts_a: torch.Tensor  # (N, 3) fractional voxel indices in view a
    pts_b: torch.Tensor  # (N, 3) in view b
    pos_a: torch.Tensor  # (N, 3) world mm
    pos_b: torch.Tensor
    common_a: torch.Tensor  # (M, 3) the same physical points, in view a's and view b's voxel indices
    common_b: torch.Tensor


def ape_views(
    vol: Volume, size: int, n_points: int, rng: np.random.Generator, zoom: float = 1.25, aug: float = 1.0,
    max_shift: float = 0.5,
) -> APEViews:
    """Two overlapping crops of ``size``^3 at independent random zooms, shifted by up to
    ``max_shift`` of the crop extent per axis, plus random points in each and in their overlap."""
    shape = vol.shape
    starts_a, steps_a, starts_b, steps_b = [], [], [], []
    for n in shape:
        sa, sb = _zoom(rng, zoom), _zoom(rng, zoom)
        ea, eb = (size - 1) * sa, (size - 1) * sb
        a0 = _start(n, ea, rng)
        # b starts so that the two extents overlap by at least (1 - max_shift) of the smaller one
        shift = rng.uniform(-max_shift, max_shift) * min(ea, eb)
        b0 = a0 + (ea - eb) / 2 + shift
        starts_a.append(a0)
        steps_a.append(sa)
        starts_b.append(b0)
        steps_b.append(sb)
    ar = torch.arange(size, dtype=torch.float32)
    va = sample_axes(vol, [s + d * ar for s, d in zip(starts_a, steps_a)])
    vb = sample_axes(vol, [s + d * ar for s, d in zip(starts_b, steps_b)])
    va, vb = augment_intensity(va, rng, aug), augment_intensity(vb, rng, aug)

    t = torch.Generator().manual_seed(int(rng.integers(2**31)))
    pa = torch.rand(n_points, 3, generator=t) * (size - 1)
    pb = torch.rand(n_points, 3, generator=t) * (size - 1)
    sa_t, da_t = torch.tensor(starts_a), torch.tensor(steps_a)
    sb_t, db_t = torch.tensor(starts_b), torch.tensor(steps_b)
    src_a = sa_t + pa * da_t
    src_b = sb_t + pb * db_t
    # overlap box in source voxel indices
    lo = torch.maximum(sa_t, sb_t)
    hi = torch.minimum(sa_t + (size - 1) * da_t, sb_t + (size - 1) * db_t)
    hi = torch.maximum(hi, lo)
    src_c = lo + torch.rand(n_points, 3, generator=t) * (hi - lo)
    return APEViews(
        view_a=va, view_b=vb, pts_a=pa, pts_b=pb,
        pos_a=world(vol.affine, src_a), pos_b=world(vol.affine, src_b),
        common_a=(src_c - sa_t) / da_t, common_b=(src_c - sb_t) / db_t,
    )


def random_crop(
    vol: Volume, size: int, n_points: int, rng: np.random.Generator, zoom: float = 1.0, aug: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One crop of ``size``^3 anywhere in the volume (mostly inside it) and ``n_points`` random
    points in it: ``(view (1,1,P,P,P), voxel indices in the view (N,3), world mm (N,3))``.

    Extra crops of the same volume teach the ape model long-range positions: two overlapping views
    (:func:`ape_views`) only relate points a fraction of a crop apart."""
    starts, steps = [], []
    for n in vol.shape:
        st = _zoom(rng, zoom)
        starts.append(_start(n, (size - 1) * st, rng))
        steps.append(st)
    ar = torch.arange(size, dtype=torch.float32)
    v = augment_intensity(sample_axes(vol, [s + d * ar for s, d in zip(starts, steps)]), rng, aug)
    t = torch.Generator().manual_seed(int(rng.integers(2**31)))
    pts = torch.rand(n_points, 3, generator=t) * (size - 1)
    src = torch.tensor(starts) + pts * torch.tensor(steps)
    return v, pts, world(vol.affine, src)
