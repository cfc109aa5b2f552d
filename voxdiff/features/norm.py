"""Fixed normalisation statistics: features that do not depend on the window they are computed in.

The shipped backbones normalise with GroupNorm, whose mean and variance are those of the tensor it
is given: of a 32^3 training crop during pretraining, of a 160^3 window holding a whole phantom (and
its air) when the frozen probe's features are extracted, of a 48 x 48 x 32 patch when fine-tuning.
A voxel's features then depend on everything else in its window, so a head fitted on one kind of
window does not transfer to another, and the whole-volume window is normalised quite unlike the
crops the network was trained on (docs/RESULTS.md, "Fixed normalisation statistics").

``norm_stats: fixed`` (:class:`voxdiff.probe.train.ProbeConfig`) replaces every GroupNorm that the
feature passes use (not, e.g., a denoising output head's) by a :class:`FixedGroupNorm` whose per-group mean and variance are estimated once, over
``n`` random crops of the model's training patch size drawn from the given volumes (the labelled
training cases of the probe; every feature pass of a diffusion model contributes, so the statistics
are those averaged over its timesteps). The affine weights are the GroupNorm's own (trainable when
fine-tuning); the statistics are buffers that are not part of the state dict, so checkpoints keep
their keys. Segmenter bundles store them in ``norm_stats.safetensors`` (format version 2).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

NORM_STATS = ("window", "fixed")
NORM_STATS_FILE = "norm_stats.safetensors"  # beside a features folder's files, or in a segmenter bundle


@dataclass
class NormStatsConfig:
    """How ``voxdiff features`` normalises the backbone's GroupNorms (the ``--norm_*`` options).

    Args:
        norm_stats: window (each window's own statistics, the networks' default) or fixed (one set of
            statistics for every window, so a voxel's features do not depend on the rest of its
            window; see :mod:`voxdiff.features.norm`).
        norm_crops: fixed: random crops of the model's training patch size the statistics are
            estimated on.
        norm_seed: fixed: the seed of those crops.
        norm_cases: fixed: at most this many cases of the data set (evenly spaced over it) give the
            crops; the others are only extracted.
        norm_from: fixed: take the statistics from this file or folder instead of estimating them:
            the ``norm_stats.safetensors`` of an earlier ``voxdiff features`` run (so that the
            features of a training and a test set share one normalisation) or of a segmenter bundle
            fitted with ``--norm_stats fixed``.
    """

    norm_stats: str = "window"
    norm_crops: int = 48
    norm_seed: int = 0
    norm_cases: int = 8
    norm_from: str | None = None


def check_norm_config(cfg: NormStatsConfig) -> None:
    """``ValueError`` with a one-line message for inconsistent settings."""
    if cfg.norm_stats not in NORM_STATS:
        raise ValueError(f"norm_stats must be one of {', '.join(NORM_STATS)}, not {cfg.norm_stats!r}")
    if int(cfg.norm_crops) < 1 or int(cfg.norm_cases) < 1:
        raise ValueError(f"norm_crops and norm_cases must be at least 1, got {cfg.norm_crops} and {cfg.norm_cases}")
    if cfg.norm_from is not None and cfg.norm_stats != "fixed":
        raise ValueError("norm_from gives fixed statistics: it needs norm_stats fixed")


class FixedGroupNorm(nn.Module):
    """GroupNorm with fixed per-group ``mean`` and ``var`` instead of each input's own; the affine
    ``weight`` and ``bias`` are the wrapped GroupNorm's parameters (the same tensors)."""

    def __init__(self, gn: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor):
        super().__init__()
        if mean.shape != (gn.num_groups,) or var.shape != (gn.num_groups,):
            raise ValueError(f"statistics of shape {tuple(mean.shape)} / {tuple(var.shape)} for a GroupNorm "
                             f"of {gn.num_groups} groups")
        self.num_groups, self.num_channels, self.eps, self.affine = gn.num_groups, gn.num_channels, gn.eps, gn.affine
        self.weight, self.bias = gn.weight, gn.bias
        dev = gn.weight.device if gn.weight is not None else mean.device
        self.register_buffer("mean", mean.detach().float().to(dev), persistent=False)
        self.register_buffer("var", var.detach().float().to(dev), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.num_channels // self.num_groups
        scale = torch.rsqrt(self.var + self.eps).repeat_interleave(k)
        shift = -self.mean.repeat_interleave(k) * scale
        if self.weight is not None:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        shape = (1, self.num_channels) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))

    def to_group_norm(self) -> nn.GroupNorm:
        """The plain GroupNorm again (sharing the affine parameters)."""
        gn = nn.GroupNorm(self.num_groups, self.num_channels, eps=self.eps, affine=self.affine)
        if self.affine:
            gn.weight, gn.bias = self.weight, self.bias
        return gn

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, fixed statistics"


def _named_children_of(module: nn.Module, kind: type) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, full name) of every submodule of type ``kind``."""
    out = []
    for pname, parent in module.named_modules():
        for cname, child in parent.named_children():
            if isinstance(child, kind):
                out.append((parent, cname, f"{pname}.{cname}" if pname else cname))
    return out


def measure_group_norms(module: nn.Module, run: Callable[[], None]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-group statistics of the inputs every GroupNorm of ``module`` sees while ``run()`` runs:
    ``{name: (mean, var)}``, the mean over inputs of each input's group mean and mean square."""
    sums: dict[str, list] = {}

    def hook(name: str):
        def f(mod: nn.GroupNorm, inp, out) -> None:
            x = inp[0].detach().float()
            xg = x.reshape(x.shape[0], mod.num_groups, -1)
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0] = s[0] + xg.mean(-1).sum(0).double()
            s[1] = s[1] + (xg * xg).mean(-1).sum(0).double()
            s[2] += x.shape[0]
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if isinstance(m, nn.GroupNorm)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (s1, s2, k) in sums.items():
        mean = s1 / k
        out[name] = (mean.float().cpu(), (s2 / k - mean * mean).clamp_min(0.0).float().cpu())
    return out


def fix_group_norms(module: nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Replace the GroupNorms of ``module`` that ``stats`` names by :class:`FixedGroupNorm` with
    ``stats[name]`` (in place; a module already fixed is unfixed first). GroupNorms it does not name
    (layers the measured passes did not use, such as a denoising output head) stay as they are.
    Raises ``ValueError``, changing nothing, when ``stats`` names a layer the module does not have as a
    GroupNorm or a shape differs. Returns how many were replaced."""
    unfix_group_norms(module)
    found = {n: (p, a) for p, a, n in _named_children_of(module, nn.GroupNorm)}
    unknown = sorted(set(stats) - set(found))
    if unknown:
        raise ValueError(f"normalisation statistics for layers this network does not have: {unknown[:3]}")
    new = {}
    for name, (mean, var) in stats.items():
        parent, attr = found[name]
        new[name] = FixedGroupNorm(getattr(parent, attr), torch.as_tensor(mean), torch.as_tensor(var))
    for name, m in new.items():
        parent, attr = found[name]
        setattr(parent, attr, m)
    return len(new)


def unfix_group_norms(module: nn.Module) -> int:
    """Turn every :class:`FixedGroupNorm` of ``module`` back into a GroupNorm; returns how many."""
    found = _named_children_of(module, FixedGroupNorm)
    for parent, attr, _ in found:
        setattr(parent, attr, getattr(parent, attr).to_group_norm())
    return len(found)


def fixed_norm_stats(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """``{name: (mean, var)}`` of the module's fixed GroupNorms; None when it has none."""
    found = _named_children_of(module, FixedGroupNorm)
    if not found:
        return None
    return {n: (getattr(p, a).mean.detach().cpu(), getattr(p, a).var.detach().cpu()) for p, a, n in found}


def stats_tensors(stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Flat ``{name.mean, name.var}`` tensors (for safetensors)."""
    out = {}
    for n, (m, v) in stats.items():
        out[f"{n}.mean"], out[f"{n}.var"] = m.float().contiguous(), v.float().contiguous()
    return out


def stats_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of :func:`stats_tensors`; ``ValueError`` when a mean or variance lacks its pair."""
    names = {k.rsplit(".", 1)[0] for k in tensors}
    out = {}
    for n in names:
        if f"{n}.mean" not in tensors or f"{n}.var" not in tensors:
            raise ValueError(f"normalisation statistics of {n!r} are incomplete")
        out[n] = (tensors[f"{n}.mean"], tensors[f"{n}.var"])
    return out


def norm_stats_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or the :data:`NORM_STATS_FILE` inside a folder."""
    p = Path(path)
    return p / NORM_STATS_FILE if p.is_dir() else p


def save_norm_stats(path: str | os.PathLike, stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``stats`` (safetensors, atomically) with ``meta`` as string metadata."""
    from safetensors.torch import save_file

    from ..core.outputs import atomic_path

    p = Path(path)
    with atomic_path(p) as tmp:
        save_file(stats_tensors(stats), str(tmp), metadata={str(k): str(v) for k, v in (meta or {}).items()})
    return p


def load_norm_stats(path: str | os.PathLike) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, str]]:
    """``(stats, metadata)`` of a :func:`save_norm_stats` file (or of the one in folder ``path``);
    ``ValueError`` naming the problem when it is missing or unreadable."""
    from safetensors import safe_open

    f = norm_stats_file(path)
    if not f.is_file():
        raise ValueError(f"no normalisation statistics here ({NORM_STATS_FILE} is missing)")
    try:
        with safe_open(str(f), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # safetensors' own errors for a damaged or foreign file
        raise ValueError(f"unreadable normalisation statistics ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not tensors:
        raise ValueError("the normalisation statistics file holds no statistics")
    return stats_from_tensors(tensors), meta


def stats_digest(stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> str | None:
    """A short SHA-256 of the statistics (feature cache keys); None without any."""
    if not stats:
        return None
    h = hashlib.sha256()
    for k, t in sorted(stats_tensors(stats).items()):
        h.update(k.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def norm_stats_of(extractor: Any) -> str:
    """``fixed`` when the extractor's backbone normalises with fixed statistics, else ``window``."""
    bb = getattr(extractor, "backbone", None)
    return "fixed" if isinstance(bb, nn.Module) and fixed_norm_stats(bb) is not None else "window"


@torch.no_grad()
def estimate_norm_stats(extractor: Any, units: Sequence[np.ndarray | torch.Tensor], n: int = 48, seed: int = 0,
                        patch: Sequence[int] | None = None, batch: int | None = None
                        ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GroupNorm statistics of ``extractor``'s backbone over ``n`` random crops of ``patch`` (default:
    the model's training patch size) drawn from the volumes ``units`` ((X, Y, Z) in [0, 1]) in turn,
    each crop at a uniformly random origin, run through every feature pass as extraction runs it
    (absolute voxel indices; the volume's condition map cropped with it for conditioned models).
    Deterministic for a given ``seed``; the global random state is left as it was. ``batch``: crops per
    forward pass (default: as many as fit in about 2^20 voxels); the statistics are per crop, so it
    changes only the speed (and float rounding)."""
    bb = getattr(extractor, "backbone", None)
    if not isinstance(bb, nn.Module):
        raise ValueError("this feature extractor exposes no backbone module")
    if not units:
        raise ValueError("fixed normalisation statistics need at least one volume")
    if n < 1:
        raise ValueError(f"norm_crops must be at least 1, got {n}")
    from ..data.patches import crop_or_pad
    from ..pretrain.diffusion import index_grid
    from .extract import condition_mode

    size = tuple(int(p) for p in (patch or getattr(extractor, "patch_size", (32, 32, 32))))
    dev = next(bb.parameters()).device
    rng = np.random.default_rng(seed)
    vols = [np.asarray(u, dtype=np.float32) for u in units]
    # the volume's condition map, cropped, where extraction does the same (per-window maps otherwise);
    # computed over the volume padded to at least a crop, as extraction continues it over its padding
    fn = getattr(extractor, "condition_map", None) if condition_mode(extractor) == "volume" else None
    conds: dict[int, np.ndarray | None] = {}

    def cond_of(k: int) -> np.ndarray | None:
        if k not in conds:
            v = vols[k]
            c = fn(torch.from_numpy(v)[None, None].to(dev), tuple(max(d, s) for d, s in zip(v.shape, size)))
            conds[k] = None if c is None else c[0].float().cpu().numpy()
        return conds[k]

    # every crop's volume and origin, drawn in turn (the same crops whatever the batch)
    crops = []
    for i in range(n):
        k = i % len(vols)
        crops.append((k, tuple(int(rng.integers(0, max(1, d - s + 1))) for d, s in zip(vols[k].shape, size))))
    # crops go through the network in batches of at most about 2^20 voxels: per-sample GroupNorm
    # statistics do not depend on the batch, and batch-1 3D convolutions are slow on CPUs
    if batch is not None and int(batch) < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    per = int(batch) if batch is not None else max(1, min(n, (1 << 20) // int(np.prod(size))))

    def run() -> None:
        for b0 in range(0, n, per):
            part = crops[b0:b0 + per]
            origins = torch.tensor([o for _, o in part], dtype=torch.long)
            kwargs: dict[str, Any] = {"voxel_index": index_grid(size, origins, batch=len(part), device=dev)}
            if fn is not None:
                cs = [cond_of(k) for k, _ in part]
                if all(c is not None for c in cs):
                    kwargs["coords"] = torch.from_numpy(np.stack([
                        np.stack([crop_or_pad(c[j], o, size, 0.0) for j in range(len(c))])
                        for c, (_, o) in zip(cs, part)])).to(dev)  # type: ignore[arg-type]
            # zero (the HU window's minimum) past the far ends, as extraction pads
            x = np.stack([crop_or_pad(vols[k], o, size, 0.0) for k, o in part])[:, None]
            extractor(torch.from_numpy(x).to(dev), **kwargs)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unfix_group_norms(bb)  # measure the GroupNorms themselves
        return measure_group_norms(bb, run)


def with_norm_stats(extractor: Any, mode: str, units: Callable[[], Sequence[Any]] | Sequence[Any], n: int = 48,
                    seed: int = 0, key: Any = None) -> Any:
    """Set how ``extractor``'s backbone normalises (in place; returns it): ``window`` (each input's own
    GroupNorm statistics, the networks' default) or ``fixed`` (:func:`estimate_norm_stats` on
    ``units``: the volumes, or a function returning them, called only when the statistics must be
    estimated; a backbone without GroupNorm layers is left as it is). ``key`` names the volumes: statistics already estimated for the same ``(key, n,
    seed)`` are kept rather than estimated again."""
    if mode not in NORM_STATS:
        raise ValueError(f"norm_stats must be one of {', '.join(NORM_STATS)}, not {mode!r}")
    bb = getattr(extractor, "backbone", None)
    if not isinstance(bb, nn.Module):  # an extractor without a backbone module has nothing to fix
        if mode == "window":
            return extractor
        raise ValueError("fixed normalisation statistics need an extractor with a backbone module")
    if mode == "window":
        unfix_group_norms(bb)
        extractor.norm_source = None
        return extractor
    source = (key, int(n), int(seed))
    if key is not None and getattr(extractor, "norm_source", None) == source and fixed_norm_stats(bb) is not None:
        return extractor
    vols = units() if callable(units) else units
    stats = estimate_norm_stats(extractor, vols, n=n, seed=seed)
    fix_group_norms(bb, stats)  # (none for a backbone without GroupNorm: BatchNorm in eval mode is fixed already)
    extractor.norm_source = source
    return extractor
