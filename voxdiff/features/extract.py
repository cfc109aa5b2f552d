"""Frozen feature pyramids of whole volumes by sliding windows.

:func:`extract_volume` runs a :class:`~voxdiff.pretrain.load.FeatureExtractor` (or any callable with
the same contract) over a volume window by window (the windows of :func:`plan_windows`) and blends
every pyramid level of every window into one buffer per level at that level's own stride, on the
extractor's device (GPU when the model is there; on the CPU the same code), with Gaussian or constant
weights. What makes the stitched result agree with a single pass over the volume:

* **Alignment.** The volume is padded at its far end (value 0 = the HU window minimum, as training
  patches are) to a multiple of the backbone's divisor ``D`` (its largest stride); the window size
  and every window start are multiples of ``D``. Level ``l`` of a window then maps onto whole voxels
  of level ``l`` of the volume, for every level.
* **The requested overlap, exactly.** The step between windows is ``window * (1 - overlap)``, itself
  a multiple of ``D``: along each axis the window is the smallest multiple of ``D`` that is at least
  the requested size and makes that step a whole number of ``D`` (with ``D = 32`` and overlap 0.5:
  64, 128, 192, ...), searched up to twice the requested size (at least ``4 D``); an axis the window
  would cover whole gets one window. Only overlaps that no such size can give exactly (e.g. 0.3 with
  ``D = 32``) are approximated: the size in that range whose nearest whole-``D`` step comes closest,
  with a warning. :class:`WindowPlan` reports the window, steps, counts and effective overlap.
* **Position-consistent inputs.** Each window is passed with its absolute voxel indices
  (``voxel_index``), so the diffusion model's fixed feature noise is a function of the voxel, not of
  the window. With ``condition="volume"`` the body part regressor map is computed once on the whole
  volume (continued over the padding) and cropped with the windows, so it does not depend on the
  window either; ``"window"`` computes it from each window alone. ``"auto"`` (default) does what the
  model was pretrained with (its ``condition_source``: volume unless the model was trained on
  per-patch maps).

The default window is the model's training patch size (``extractor.patch_size``, from its
model.json): the context the backbone was trained on. Output: one tensor per selected level,
``(1, C_l, ceil(X/s_l), ceil(Y/s_l), ceil(Z/s_l))`` in ``out_dtype`` on the CPU (coarse levels stay
at their stride: a nearest upsampling to voxel ``v`` is ``level[v // s_l]``); with ``upsample=True``
every level is repeated to ``(1, C_l, X, Y, Z)``. Memory: see :func:`estimate_memory` and
docs/FEATURES.md.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

DEFAULT_ROI = (96, 96, 64)  # window of extractors that do not say what they were trained on


@dataclass
class ExtractConfig:
    """How whole-volume features are computed (the ``voxdiff features`` options).

    Args:
        t: diffusion feature timestep(s) overriding the model's, e.g. [10] or [10,50] (several:
            concatenated channels); null keeps the model's. Diffusion models only.
        feature_input: diffusion models: noisy (x_t at each timestep) or clean (the clean image told
            each timestep) overriding the model's ``task.feature_input``; null keeps the model's.
        feature_side: which outputs of the network form the pyramid: decoder (the FPN pyramid, as
            vox2vec), encoder (the encoder's output at each level) or both (concatenated per level;
            twice the channels except at the coarsest level). Backbones with an encoder and a
            decoder only (unet, fpn3d).
        levels: pyramid levels to keep, e.g. [0,1] (0 = finest, stride 1); null = all.
        roi: sliding-window size in voxels; null (default): the model's training patch size. Rounded
            up to a multiple of the backbone's largest stride, and enlarged along an axis where the
            overlap needs it (see docs/FEATURES.md).
        overlap: fraction of a window shared with its neighbour (0 <= overlap < 1), honoured exactly.
        sw_batch_size: windows per forward pass.
        mode: window blending, gaussian or constant.
        upsample: repeat coarse levels to full resolution (much more memory, see docs/FEATURES.md).
        condition: auto, volume or window: where the body part regressor map is computed (auto: as
            the model was pretrained).
        bf16: bf16 autocast for the backbone (faster on CPUs with bf16, slightly different features).
        dtype: float16, float32 or bfloat16: the stored feature type.
        device: auto (CUDA when available), cpu, cuda or cuda:N: where the backbone runs and the
            windows are stitched (features are gathered on the CPU).
    """

    t: tuple[int, ...] | None = None
    feature_input: str | None = None
    feature_side: str = "decoder"
    levels: tuple[int, ...] | None = None
    roi: tuple[int, int, int] | None = None
    overlap: float = 0.5
    sw_batch_size: int = 2
    mode: str = "gaussian"
    upsample: bool = False
    condition: str = "auto"
    bf16: bool = False
    dtype: str = "float16"
    device: str = "auto"


# ------------------------------------------------------------------------------------------------
# helpers

CONDITION_MODES = ("auto", "volume", "window")


def condition_mode(extractor: Any, condition: str = "auto") -> str:
    """``volume`` or ``window``: ``auto`` follows the ``condition_source`` the model was pretrained with."""
    if condition != "auto":
        return condition
    opts = getattr(getattr(extractor, "task", None), "opts", None)
    return "window" if getattr(opts, "condition_source", "volume") == "patch" else "volume"


def _as_volume(image_unit: Any) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(image_unit) if not isinstance(image_unit, torch.Tensor) else image_unit)
    if x.ndim == 3:
        x = x[None, None]
    elif x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"expected a volume (X, Y, Z) or (B, 1, X, Y, Z), got shape {tuple(x.shape)}")
    return x.float()


def level_strides(extractor: Any) -> list[int]:
    """The stride of each pyramid level of an extractor (anything with ``levels``)."""
    return [int(lv.stride) for lv in extractor.levels]


def largest_stride(extractor: Any) -> int:
    return max(level_strides(extractor))


def _divisor(extractor: Any) -> int:
    """What window sizes must be multiples of: the model's ``divisor`` where it has one, else its
    largest stride (the same for every shipped backbone)."""
    d = getattr(extractor, "divisor", None)
    return int(d) if d else largest_stride(extractor)


def _round_up(v: int, m: int) -> int:
    return int(math.ceil(v / m) * m)


def default_roi(extractor: Any) -> tuple[int, int, int]:
    """The window ``extract_volume`` uses when none is given: the model's training patch size
    (``extractor.patch_size``, saved in its model.json), else :data:`DEFAULT_ROI`."""
    ps = getattr(extractor, "patch_size", None)
    if ps is None or len(tuple(ps)) != 3:
        return DEFAULT_ROI
    return tuple(int(v) for v in ps)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# the window plan

_EXACT = 1e-9


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows of a volume go (all numbers in voxels of the full-resolution grid).

    ``padded`` is the volume padded at its end to a multiple of ``divisor``; ``window`` the window
    size; ``starts[a]`` the window starts along axis ``a`` (every window is one combination of
    them). Every size and start is a multiple of ``divisor``."""

    shape: tuple[int, int, int]
    padded: tuple[int, int, int]
    window: tuple[int, int, int]
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    step: tuple[int, int, int]
    overlap: float  # requested
    divisor: int

    @property
    def counts(self) -> tuple[int, int, int]:
        return tuple(len(s) for s in self.starts)  # type: ignore[return-value]

    @property
    def count(self) -> int:
        """Number of windows."""
        return int(np.prod(self.counts))

    @property
    def effective_overlap(self) -> tuple[float | None, float | None, float | None]:
        """``1 - step / window`` per axis (``None`` where one window spans the axis). ``step`` is the
        step between neighbouring windows; the last window of an axis ends at the padded volume's
        end, so it overlaps its neighbour by at least that much (more when the axis is not a whole
        number of steps, as in MONAI)."""
        return tuple(None if len(s) < 2 else 1.0 - st / w
                     for s, st, w in zip(self.starts, self.step, self.window))  # type: ignore[return-value]

    @property
    def exact(self) -> bool:
        """Whether every axis with several windows steps by exactly ``window * (1 - overlap)``."""
        return all(e is None or abs(e - self.overlap) < _EXACT for e in self.effective_overlap)

    @property
    def voxels(self) -> int:
        """Voxels passed through the network (all windows)."""
        return self.count * int(np.prod(self.window))

    def origins(self) -> list[tuple[int, int, int]]:
        """Every window's start ``(x, y, z)``, x slowest."""
        return [tuple(o) for o in itertools.product(*self.starts)]  # type: ignore[misc]

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (what the feature files' metadata record)."""
        vol = float(np.prod(self.shape))
        return {"window": list(self.window), "step": list(self.step), "counts": list(self.counts),
                "count": self.count, "requested_overlap": self.overlap,
                "effective_overlap": [None if e is None else round(e, 6) for e in self.effective_overlap],
                "exact": self.exact, "divisor": self.divisor, "padded": list(self.padded),
                "coverage": round(self.voxels / vol, 3) if vol else None}

    def summary(self) -> str:
        """One line: ``96 windows of 128x128x64 (6x4x4), step 64x64x32, overlap 0.5/0.5/0.5 ...``."""
        ov = "/".join("-" if e is None else f"{e:.3g}" for e in self.effective_overlap)
        note = "" if self.exact else " (not exactly possible with windows aligned to the divisor)"
        return (f"{self.count} windows of {'x'.join(map(str, self.window))} "
                f"({'x'.join(map(str, self.counts))}), step {'x'.join(map(str, self.step))}, "
                f"overlap {ov} (requested {self.overlap:g}){note}, "
                f"{self.voxels / max(1, int(np.prod(self.shape))):.2f}x the volume")


def _axis_plan(n: int, r: int, overlap: float, d: int) -> tuple[int, int, int, tuple[int, ...]]:
    """``(padded, window, step, starts)`` along one axis (see :func:`plan_windows`)."""
    p = _round_up(max(int(n), 1), d)
    kp = p // d
    k0 = max(1, math.ceil(max(int(r), 1) / d))
    if k0 >= kp:
        return p, p, p, (0,)
    best: tuple[float, int, int] | None = None  # (overlap error, k, m): window k*d, step m*d
    for k in range(k0, max(2 * k0, 4) + 1):
        if k >= kp:  # a window covering the axis: nothing to overlap, exact
            cand = (0.0, kp, kp)
        else:
            m = min(k, max(1, round(k * (1.0 - overlap))))
            err = abs((1.0 - m / k) - overlap)
            cand = (0.0 if err < _EXACT else err, k, m)
        if best is None or cand[0] < best[0]:
            best = cand
        if best[0] == 0.0:
            break
    assert best is not None
    _, k, m = best
    w, step = k * d, m * d
    if w >= p:
        return p, p, p, (0,)
    starts = list(range(0, p - w, step)) + [p - w]
    return p, w, step, tuple(starts)


def plan_windows(shape: Sequence[int], roi: Sequence[int], overlap: float, divisor: int) -> WindowPlan:
    """Windows over a volume of ``shape`` for a requested window ``roi`` and ``overlap``, aligned to
    ``divisor`` (the backbone's largest stride).

    Per axis: the volume is padded at its end to a multiple of ``divisor`` (``P``). The window is the
    smallest multiple of ``divisor`` that is at least ``roi`` and for which the step ``window * (1 -
    overlap)`` is also a multiple of ``divisor``, searched up to twice ``roi`` rounded up (at least
    ``4 * divisor``); once the window reaches ``P`` one window spans the axis. Windows start at ``0,
    step, 2 step, ...`` and the last one ends at ``P``: ``ceil((P - window) / step) + 1`` windows,
    the number the requested overlap implies. Where no size in that range gives the overlap
    exactly (e.g. 0.3 with divisor 32: ``1 - 0.3 = 7/10`` needs windows of 10 divisors), the size
    whose nearest whole-divisor step comes closest to it is used (:attr:`WindowPlan.exact` is False).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    if len(shape) != 3 or len(roi) != 3:
        raise ValueError(f"shape and roi must have 3 sizes, got {tuple(shape)} and {tuple(roi)}")
    d = int(divisor)
    axes = [_axis_plan(int(n), int(r), float(overlap), d) for n, r in zip(shape, roi)]
    return WindowPlan(shape=tuple(int(n) for n in shape),  # type: ignore[arg-type]
                      padded=tuple(a[0] for a in axes),  # type: ignore[arg-type]
                      window=tuple(a[1] for a in axes),  # type: ignore[arg-type]
                      step=tuple(a[2] for a in axes),  # type: ignore[arg-type]
                      starts=tuple(a[3] for a in axes),  # type: ignore[arg-type]
                      overlap=float(overlap), divisor=d)


def window_plan(extractor: Any, shape: Sequence[int], roi: Sequence[int] | None = None,
                overlap: float = 0.5) -> WindowPlan:
    """The :class:`WindowPlan` :func:`extract_volume` uses for ``extractor`` on a volume of ``shape``
    (``roi`` None: the model's training patch size)."""
    return plan_windows(tuple(shape)[-3:], default_roi(extractor) if roi is None else roi, overlap,
                        _divisor(extractor))


def estimate_memory(shape: Sequence[int], level_channels: Sequence[int], level_strides: Sequence[int],
                    upsample: bool = False, out_bytes: int = 2, window: Sequence[int] = DEFAULT_ROI,
                    sw_batch_size: int = 2, width: int = 16) -> dict[str, float]:
    """Rough peak memory in bytes of :func:`extract_volume` (the formula of docs/FEATURES.md).

    * stitching buffers (float32, one per level, plus a one-channel weight map per level), on the
      extractor's device: ``sum_l (C_l + 1) * V / s_l^3 * 4``,
    * the result (CPU): ``sum_l C_l * V / s_l^3 * out_bytes`` (``upsample``: ``sum_l C_l * V * out_bytes``),
    * the input, padded, twice (host copy and the one on the device): ``V * 4 * 2``,
    * the network on one window batch: about ``12 * width * prod(window) * sw_batch_size * 4``, plus
      the windows' voxel indices (``24 * prod(window) * sw_batch_size``).

    On a GPU the stitching buffers, the device input and the network are GPU memory, not host RAM.
    """
    v = float(np.prod([int(s) for s in shape]))
    stitch = sum((c + 1) * v / s**3 * 4 for c, s in zip(level_channels, level_strides))
    result = sum(c * v * (1 if upsample else 1 / s**3) * out_bytes for c, s in zip(level_channels, level_strides))
    inp = v * 4 * 2
    net = (12 * width * 4 + 24) * float(np.prod(window)) * sw_batch_size
    return {"stitch": stitch, "result": result, "input": inp, "network": net,
            "peak": stitch + result + inp + net}


@contextlib.contextmanager
def _bf16(extractor: Any, on: bool):
    if not hasattr(extractor, "bf16"):
        yield
        return
    old = extractor.bf16
    extractor.bf16 = bool(on) or old
    try:
        yield
    finally:
        extractor.bf16 = old


def _device_of(extractor: Any) -> torch.device:
    try:
        return next(extractor.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def blend_weights(window: Sequence[int], stride: int, mode: str = "gaussian",
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Blending weights ``(1, 1, wx/s, wy/s, wz/s)`` of a window at a level of stride ``s``.

    ``gaussian``: a separable Gaussian centred on the window, sigma 1/8 of the window along each axis
    (MONAI's default), averaged over each level voxel's ``s`` full-resolution voxels, so every level
    weighs the window's parts alike; never below ``exp(-8)`` of the centre. ``constant``: ones."""
    size = [int(w) // int(stride) for w in window]
    if mode == "constant":
        return torch.ones(1, 1, *size, device=device)
    vecs = []
    for w, n in zip(window, size):
        i = torch.arange(int(w), dtype=torch.float64)
        g = torch.exp(-0.5 * ((i - (w - 1) / 2) / (0.125 * w)) ** 2)
        vecs.append(g.view(n, int(stride)).mean(1).float())
    wmap = vecs[0][:, None, None] * vecs[1][None, :, None] * vecs[2][None, None, :]
    return wmap[None, None].to(device)


# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_volume(extractor: Any, image_unit: Any, roi: Sequence[int] | None = None, overlap: float = 0.5,
                   levels: Sequence[int] | None = None, sw_batch_size: int = 2,
                   out_dtype: torch.dtype = torch.float16, upsample: bool = False, progress: bool = True,
                   mode: str = "gaussian", condition: str = "auto", bf16: bool = False) -> list[torch.Tensor]:
    """Feature pyramid of a whole volume by sliding windows.

    Args:
        extractor: ``load_pretrained(...)`` result, or any callable ``f(x (B,1,...), voxel_index=...,
            coords=...) -> list[Tensor]`` with ``levels`` (``.stride``) metadata.
        image_unit: the volume in [0, 1] (``hu_to_unit`` with ``extractor.preprocess.hu_window``),
            ``(X, Y, Z)`` or ``(B, 1, X, Y, Z)``, numpy or torch.
        roi, overlap: window size (None: the model's training patch size, :func:`default_roi`) and
            overlap (see :func:`plan_windows`; :func:`window_plan` gives the plan used).
        levels: indices of the pyramid levels to return (default all).
        out_dtype: dtype of the returned tensors (float16 halves the memory of float32).
        upsample: repeat coarse levels to full resolution (nearest).
        mode: ``gaussian`` or ``constant`` blending (:func:`blend_weights`).
        condition: ``volume`` (BPR map once per volume, cropped per window), ``window`` (BPR map of
            each window alone) or ``auto`` (what the model was pretrained with, see :func:`condition_mode`).
        bf16: bf16 autocast for the backbone.

    The windows run and are stitched on the extractor's device; the result is gathered on the CPU.

    Returns: one tensor per selected level, ``(B, C_l, ceil(X/s_l), ceil(Y/s_l), ceil(Z/s_l))`` on the
    CPU (``(B, C_l, X, Y, Z)`` with ``upsample``).
    """
    if mode not in ("gaussian", "constant"):
        raise ValueError(f"mode must be gaussian or constant, got {mode!r}")
    if condition not in CONDITION_MODES:
        raise ValueError(f"condition must be one of {', '.join(CONDITION_MODES)}, got {condition!r}")
    if sw_batch_size < 1:
        raise ValueError("sw_batch_size must be >= 1")
    condition = condition_mode(extractor, condition)
    x = _as_volume(image_unit)
    bsz, _, *shape = x.shape
    strides = level_strides(extractor)
    n_levels = len(strides)
    sel = list(range(n_levels)) if levels is None else [int(i) for i in levels]
    for i in sel:
        if not -n_levels <= i < n_levels:
            raise ValueError(f"level {i} does not exist (the model has levels 0..{n_levels - 1})")
    sel = [i % n_levels for i in sel]
    keep = sorted(set(sel))
    plan = window_plan(extractor, shape, roi, overlap)
    if not plan.exact:
        from ..core.errors import VoxdiffWarning

        warnings.warn(f"overlap {overlap:g} cannot be honoured exactly with windows aligned to "
                      f"{plan.divisor} voxels: {plan.summary()}", VoxdiffWarning, stacklevel=2)
    padded, win = plan.padded, plan.window
    pad = [p - n for p, n in zip(padded, shape)]
    dev = _device_of(extractor)
    if any(pad):
        x = torch.nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), value=0.0)
    x = x.to(dev)

    cond = None
    if condition == "volume":  # the map of the volume itself, continued over the padding
        fn = getattr(extractor, "condition_map", None)
        cond = fn(x[:, :, : shape[0], : shape[1], : shape[2]], tuple(padded)) if fn is not None else None
        if cond is not None:
            cond = cond.float().to(dev)

    kept_strides = sorted({strides[i] for i in keep})
    origins = plan.origins()
    # one window (a whole-volume window, as the frozen probes use): its features are the volume's, with
    # no blending to do (weights divided out again would only cost time and rounding)
    single = len(origins) == 1
    weights = {} if single else {s: blend_weights(win, s, mode, dev) for s in kept_strides}
    wsum = {s: torch.zeros(1, 1, *(p // s for p in padded), device=dev) for s in weights}

    def box(o: tuple[int, int, int], s: int) -> tuple[slice, ...]:
        return (slice(None), slice(None)) + tuple(slice(a // s, (a + w) // s) for a, w in zip(o, win))

    for o in origins if not single else ():
        for s in kept_strides:
            wsum[s][box(o, s)] += weights[s]
    grid = torch.stack(torch.meshgrid(*[torch.arange(w, device=dev) for w in win], indexing="ij"), 0)
    acc: dict[int, torch.Tensor] = {}
    batches = [(b, origins[i:i + sw_batch_size]) for b in range(bsz) for i in range(0, len(origins), sw_batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(batches), desc="windows", unit="batch", leave=False)
    with _bf16(extractor, bf16):
        for b, batch in batches:
            window = torch.cat([x[b:b + 1][box(o, 1)] for o in batch], 0)
            offs = torch.tensor(batch, dtype=torch.long, device=dev)
            kwargs: dict[str, Any] = {"voxel_index": grid[None] + offs[:, :, None, None, None]}
            if cond is not None:
                kwargs["coords"] = torch.cat([cond[b:b + 1][box(o, 1)] for o in batch], 0)
            pyr = extractor(window, **kwargs)
            del window, kwargs
            for i in keep:
                s = strides[i]
                f = pyr[i]
                if i not in acc:
                    acc[i] = torch.zeros(bsz, f.shape[1], *(p // s for p in padded), device=dev)
                for j, o in enumerate(batch):
                    if single:
                        acc[i][b:b + 1][box(o, s)] = f[j:j + 1]
                    else:
                        acc[i][b:b + 1][box(o, s)].addcmul_(f[j:j + 1].to(dev, torch.float32), weights[s])
            del pyr
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    del x, cond, grid

    final: dict[int, torch.Tensor] = {}
    for i in keep:  # normalise, crop, convert and gather one level at a time (frees float32 as it goes)
        s = strides[i]
        f = acc.pop(i) if single else acc.pop(i).div_(wsum[s])
        want = [int(math.ceil(n / s)) for n in shape]
        final[i] = f[:, :, : want[0], : want[1], : want[2]].to(out_dtype).cpu().contiguous()
        del f
    del wsum, weights
    result = []
    for k, i in enumerate(sel):
        f = final[i] if i in sel[k + 1:] else final.pop(i)
        s = strides[i]
        if upsample and s > 1:
            f = f.repeat_interleave(s, 2).repeat_interleave(s, 3).repeat_interleave(s, 4)
            f = f[:, :, : shape[0], : shape[1], : shape[2]].contiguous()
        result.append(f)
    return result


def features_at(pyramid: Sequence[torch.Tensor], strides: Sequence[int], voxels: torch.Tensor) -> torch.Tensor:
    """Concatenated features ``(N, sum C_l)`` at full-resolution voxels ``(N, 3)``: level ``l`` is read
    at ``voxel // s_l`` (for pyramids returned with ``upsample=False``, batch item 0)."""
    v = voxels.long()
    cols = [f[0][:, v[:, 0] // s, v[:, 1] // s, v[:, 2] // s].t() for f, s in zip(pyramid, strides)]
    return torch.cat(cols, 1)


def select_levels(extractor: Any, levels: Sequence[int] | None) -> list[Any]:
    """The ``LevelInfo`` of the selected levels (all when ``levels`` is None)."""
    lv = list(extractor.levels)
    return lv if levels is None else [lv[int(i)] for i in levels]


def feature_timesteps(extractor: Any) -> list[int] | None:
    """The feature timesteps a diffusion extractor uses (None for the other methods)."""
    ts = getattr(getattr(getattr(extractor, "task", None), "opts", None), "feature_timesteps", None)
    return None if ts is None or getattr(extractor, "method", None) != "diffusion" else [int(t) for t in ts]


def feature_input_of(extractor: Any) -> str | None:
    """What a diffusion extractor's feature passes see (noisy / clean; None for the other methods)."""
    if getattr(extractor, "method", None) != "diffusion":
        return None
    return str(getattr(getattr(getattr(extractor, "task", None), "opts", None), "feature_input", "noisy"))


def with_feature_input(extractor: Any, feature_input: str | None) -> Any:
    """Make a diffusion extractor's feature passes see the noisy (x_t) or the clean image (each told
    its timestep); changes it in place and returns it; ``None`` leaves it unchanged."""
    if feature_input is None:
        return extractor
    from ..core.errors import InputError
    from ..pretrain.tasks.diffusion import check_feature_input

    opts = getattr(getattr(extractor, "task", None), "opts", None)
    if getattr(extractor, "method", None) != "diffusion" or opts is None or not hasattr(opts, "feature_input"):
        raise InputError(getattr(extractor, "path", None), "feature_input applies to diffusion models only "
                         f"(this one is {getattr(extractor, 'method', '?')!r})")
    check_feature_input(feature_input, getattr(extractor, "path", None))
    import dataclasses

    extractor.task.opts = dataclasses.replace(opts, feature_input=feature_input)
    return extractor


def feature_side_of(extractor: Any) -> str:
    """Which side of the network an extractor's pyramid is read from (decoder, encoder, both)."""
    return str(getattr(extractor, "feature_side", "decoder"))


def with_feature_side(extractor: Any, side: str | None) -> Any:
    """Read an extractor's pyramid from the network's ``decoder`` (the default), ``encoder`` or
    ``both`` (see :meth:`voxdiff.pretrain.backbones.PyramidBackboneBase.pyramid`); changes it in place
    and returns it; ``None`` leaves it unchanged."""
    if side is None:
        return extractor
    from ..core.errors import InputError
    from ..pretrain.backbones import FEATURE_SIDES

    if side not in FEATURE_SIDES:
        raise InputError(getattr(extractor, "path", None),
                         f"feature_side must be one of {', '.join(FEATURE_SIDES)}, not {side!r}")
    offered = getattr(getattr(extractor, "backbone", None), "feature_sides", ("decoder",))
    if side not in offered:
        raise InputError(getattr(extractor, "path", None),
                         f"feature_side {side!r}: this model's backbone gives {', '.join(offered)} only")
    extractor.feature_side = side
    if hasattr(extractor, "set_levels"):
        extractor.set_levels()
    return extractor


def with_feature_settings(extractor: Any, cfg: Any) -> Any:
    """Apply a config's ``t``, ``feature_input`` and ``feature_side`` overrides (``ExtractConfig``,
    ``ProbeConfig``)."""
    with_timesteps(extractor, getattr(cfg, "t", None))
    with_feature_side(extractor, getattr(cfg, "feature_side", None))
    return with_feature_input(extractor, getattr(cfg, "feature_input", None))


def with_timesteps(extractor: Any, timesteps: Sequence[int] | None) -> Any:
    """Make a diffusion extractor take features at ``timesteps`` (several: concatenated channels).

    Changes the extractor in place and returns it; ``None`` leaves it unchanged."""
    if timesteps is None:
        return extractor
    ts = tuple(int(t) for t in timesteps)
    task = getattr(extractor, "task", None)
    opts = getattr(task, "opts", None)
    if getattr(extractor, "method", None) != "diffusion" or opts is None or not hasattr(opts, "feature_timesteps"):
        from ..core.errors import InputError

        raise InputError(getattr(extractor, "path", None),
                         f"--t applies to diffusion models only (this one is {getattr(extractor, 'method', '?')!r})")
    steps = int(getattr(opts, "diffusion_steps", 10**9))
    if not ts or any(t < 0 or t >= steps for t in ts):
        from ..core.errors import InputError

        raise InputError(getattr(extractor, "path", None), f"timesteps must lie in [0, {steps - 1}], got {list(ts)}")
    import dataclasses

    task.opts = dataclasses.replace(opts, feature_timesteps=ts)
    extractor.passes = len(ts)
    extractor.set_levels()
    return extractor
