"""Self-supervised losses of the body part regressors: pure tensor functions, no modules, no IO.

Slice model (one score per axial slice):

* :func:`slice_heuristic_loss` - Schuhegger et al. 2021: ``MSE(sigmoid(a * ds), sigmoid(b * dz))``
  over every pair of sampled slices; its minimum is ``ds = (b / a) * dz``, so scores both follow the
  slice order and grow linearly with the physical distance (one score unit per ``a / b`` mm).
* :func:`slice_order_loss` - Yan et al. 2018: ``-log sigmoid(s_{j+1} - s_j)`` over slices sorted by z.
* :func:`slice_distance_loss` - equal mm steps give equal score steps: the residual of a straight
  line fitted to score against z (Yan's consecutive-difference idea for unequally spaced slices);
  exactly zero for scores linear in z.

3D anatomical coordinates (APE-style, 3 numbers per voxel):

* :func:`ape_distance_loss` - distances between embeddings match physical distances (mm / scale).
* :func:`ape_displacement_loss` - embedding differences match physical displacement vectors (a
  stronger form that also fixes the axes: channel 0/1/2 follow R/A/S). Zero when the embedding is the
  physical position divided by the scale plus any constant.
* :func:`consistency_loss` - the same voxel (or slice) seen in two crops gets the same output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pairs_upper(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.triu_indices(k, k, offset=1, device=device).unbind(0)


def slice_heuristic_loss(scores: torch.Tensor, z_mm: torch.Tensor, a: float = 1.0, b: float = 0.01) -> torch.Tensor:
    """Schuhegger's heuristic order loss over all slice pairs.

    scores, z_mm: ``(B, K)`` scores and physical z positions (mm) of K slices per sample (any order).
    """
    _check_bk(scores, z_mm)
    i, j = _pairs_upper(scores.shape[1], scores.device)
    ds = scores[:, j] - scores[:, i]
    dz = z_mm[:, j] - z_mm[:, i]
    return F.mse_loss(torch.sigmoid(a * ds), torch.sigmoid(b * dz))


def _sorted_by_z(scores: torch.Tensor, z_mm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(z_mm, dim=1)
    return torch.gather(scores, 1, order), torch.gather(z_mm, 1, order)


def slice_order_loss(scores: torch.Tensor, z_mm: torch.Tensor) -> torch.Tensor:
    """Yan's order loss: consecutive slices (sorted by z) should have increasing scores."""
    _check_bk(scores, z_mm)
    s, _ = _sorted_by_z(scores, z_mm)
    return -F.logsigmoid(s[:, 1:] - s[:, :-1]).mean()


def slice_distance_loss(scores: torch.Tensor, z_mm: torch.Tensor) -> torch.Tensor:
    """Equal physical steps -> equal score steps: mean squared residual of a per-sample
    least-squares line of score against z. Exactly zero when the scores are linear in z (any slope);
    the slope itself is set by the order loss."""
    _check_bk(scores, z_mm)
    if scores.shape[1] < 3:
        return scores.sum() * 0.0
    zc = z_mm - z_mm.mean(1, keepdim=True)
    sc = scores - scores.mean(1, keepdim=True)
    slope = (sc * zc).sum(1, keepdim=True) / zc.pow(2).sum(1, keepdim=True).clamp_min(1e-6)
    return (sc - slope * zc).pow(2).mean()


def consistency_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared disagreement between the outputs for the same voxels/slices in two views.

    a, b: ``(..., C)`` or any equal shapes; for C > 1 the squared distance is summed over the last axis.
    """
    if a.shape != b.shape:
        raise ValueError(f"consistency_loss: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim >= 2:
        return ((a - b) ** 2).sum(-1).mean()
    return ((a - b) ** 2).mean()


def _pairwise_dist(x: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """``(B, N, N)`` Euclidean distances between the N points of each sample (``(B, N, C)``), as
    ``sqrt(|a|^2 + |b|^2 - 2 a.b + eps)`` on points centred per sample (distances do not change; the
    centring keeps the cancellation error of the expansion at float32 rounding of the crop's extent).
    No ``(B, N, N, C)`` difference tensor: 3.3x faster forward + backward than the difference form at
    4 x 1024 points (the ape model's batch), equal to it to float32 precision."""
    with torch.autocast(x.device.type, enabled=False):  # the expansion needs float32 (bf16 would cancel)
        x = x.float()
        x = x - x.mean(1, keepdim=True)
        sq = x.pow(2).sum(-1)
        d2 = (sq[:, :, None] + sq[:, None, :] - 2.0 * (x @ x.transpose(1, 2))).clamp_min(0.0)
        return torch.sqrt(d2 + eps)


def ape_distance_loss(emb: torch.Tensor, pos_mm: torch.Tensor, scale_mm: float = 100.0) -> torch.Tensor:
    """SmoothL1 between embedding distances and physical distances (mm / ``scale_mm``), mean over all
    pairs ``i != j`` (each unordered pair counted twice, which leaves the mean of the pairs unchanged).

    emb: ``(B, N, C)`` embeddings of N sampled voxels; pos_mm: ``(B, N, 3)`` their world positions.
    """
    if emb.ndim != 3 or pos_mm.ndim != 3 or emb.shape[:2] != pos_mm.shape[:2]:
        raise ValueError(f"ape_distance_loss: expected (B,N,C) and (B,N,3), got {tuple(emb.shape)}, {tuple(pos_mm.shape)}")
    b, n = emb.shape[:2]
    if n < 2:
        return emb.sum() * 0.0
    per = F.smooth_l1_loss(_pairwise_dist(emb), _pairwise_dist(pos_mm / scale_mm), beta=0.1,
                           reduction="none")
    off = ~torch.eye(n, dtype=torch.bool, device=emb.device)  # the diagonal (a point with itself) is no pair
    return (per * off).sum() / (b * n * (n - 1))


def ape_displacement_loss(emb: torch.Tensor, pos_mm: torch.Tensor, scale_mm: float = 100.0) -> torch.Tensor:
    """Mean over pairs of ``|(e_i - e_j) - (p_i - p_j) / scale|^2``, computed in O(N).

    For residuals ``r = e - p / scale`` the pair mean equals twice the per-sample variance of r,
    so the loss is zero exactly when the embedding is the scaled position plus a constant.
    """
    if emb.shape != pos_mm.shape or emb.ndim != 3:
        raise ValueError(f"ape_displacement_loss: expected equal (B,N,3) shapes, got {tuple(emb.shape)}, {tuple(pos_mm.shape)}")
    r = emb - pos_mm / scale_mm
    n = r.shape[1]
    var = (r - r.mean(1, keepdim=True)).pow(2).sum(-1).mean(1)  # (B,)
    # mean over ordered pairs i != j of |r_i - r_j|^2 = 2 n / (n - 1) * var
    return (2.0 * n / max(n - 1, 1) * var).mean()


def _check_bk(scores: torch.Tensor, z_mm: torch.Tensor) -> None:
    if scores.ndim != 2 or scores.shape != z_mm.shape or scores.shape[1] < 2:
        raise ValueError(f"expected scores and z of equal shape (B, K>=2), got {tuple(scores.shape)}, {tuple(z_mm.shape)}")
