"""Frozen feature pyramids of whole volumes by sliding windows.

:func:`extract_volume` runs a :class:`~voxdiff.pretrain.load.FeatureExtractor` (or any callable with
the same contract) over a volume with ``monai.inferers.sliding_window_inference``: windows of
``roi`` voxels overlapping by ``overlap``, Gaussian blending, every pyramid level stitched at its own
stride. What makes the stitched result agree with a single pass over the volume:

* **Alignment.** The volume is padded at its far end (value 0 = the HU window minimum, as training
  patches are) to a multiple of the backbone's largest stride, the window size is rounded to a
  multiple of it, and the step between windows as well. Every window then starts at a multiple of
  every level's stride, so level ``l`` of a window maps onto whole voxels of level ``l`` of the
  volume.
* **Position-consistent inputs.** Each window is passed with its absolute voxel indices
  (``voxel_index``), so the diffusion model's fixed feature noise is a function of the voxel, not of
  the window. With ``condition="volume"`` the body part regressor map is computed once on the whole
  volume (continued over the padding) and cropped with the windows (MONAI's ``condition=``), so it
  does not depend on the window either; ``"window"`` computes it from each window alone. ``"auto"``
  (default) does what the model was pretrained with (its ``condition_source``: volume unless the model
  was trained on per-patch maps).

Output: one tensor per selected level, ``(1, C_l, ceil(X/s_l), ceil(Y/s_l), ceil(Z/s_l))`` in
``out_dtype`` on the CPU (coarse levels stay at their stride: a nearest upsampling to voxel ``v`` is
``level[v // s_l]``); with ``upsample=True`` every level is repeated to ``(1, C_l, X, Y, Z)``.
Memory: see :func:`estimate_memory` and docs/FEATURES.md.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

DEFAULT_ROI = (96, 96, 64)


@dataclass
class ExtractConfig:
    """How whole-volume features are computed (the ``voxdiff features`` options).

    Args:
        t: diffusion feature timestep(s) overriding the model's, e.g. [10] or [10,50] (several:
            concatenated channels); null keeps the model's. Diffusion models only.
        levels: pyramid levels to keep, e.g. [0,1] (0 = finest, stride 1); null = all.
        roi: sliding-window size in voxels (rounded up to a multiple of the backbone's largest stride).
        overlap: fraction of a window shared with its neighbour (0 <= overlap < 1).
        sw_batch_size: windows per forward pass (>= 2 is faster on CPU).
        mode: window blending, gaussian or constant.
        upsample: repeat coarse levels to full resolution (much more memory, see docs/FEATURES.md).
        condition: auto, volume or window: where the body part regressor map is computed (auto: as
            the model was pretrained).
        bf16: bf16 autocast for the backbone (faster on CPUs with bf16, slightly different features).
        dtype: float16, float32 or bfloat16: the stored feature type.
        device: cpu, cuda or auto: where the backbone runs (features are gathered on the CPU).
    """

    t: tuple[int, ...] | None = None
    levels: tuple[int, ...] | None = None
    roi: tuple[int, int, int] = DEFAULT_ROI
    overlap: float = 0.5
    sw_batch_size: int = 2
    mode: str = "gaussian"
    upsample: bool = False
    condition: str = "auto"
    bf16: bool = False
    dtype: str = "float16"
    device: str = "cpu"


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


def _strides(extractor: Any) -> list[int]:
    return [int(lv.stride) for lv in extractor.levels]


def _divisor(extractor: Any) -> int:
    d = getattr(extractor, "divisor", None)
    return int(d) if d else max(_strides(extractor))


def _round_up(v: int, m: int) -> int:
    return int(math.ceil(v / m) * m)


def plan_windows(shape: Sequence[int], roi: Sequence[int], overlap: float, divisor: int
                 ) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]:
    """``(padded_shape, roi, step)`` with every number a multiple of ``divisor``.

    The volume is padded at its end to a multiple of ``divisor`` (and at least one window); the window
    is ``roi`` rounded up to a multiple of ``divisor`` but no larger than the padded volume; the step
    is ``roi * (1 - overlap)`` rounded down to a multiple of ``divisor`` (at least ``divisor``).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    padded, win, step = [], [], []
    for n, r in zip(shape, roi):
        p = _round_up(int(n), divisor)
        w = min(_round_up(max(int(r), 1), divisor), p)
        s = max(divisor, int(math.floor(w * (1 - overlap) / divisor)) * divisor)
        padded.append(p)
        win.append(w)
        step.append(min(s, w))
    return tuple(padded), tuple(win), tuple(step)  # type: ignore[return-value]


def _monai_overlap(win: int, step: int) -> float:
    # MONAI's step is int(roi * (1 - overlap)); aim half a voxel above the wanted step so round-off
    # can never give step - 1
    if step >= win:
        return 0.0
    return 1.0 - (step + 0.5) / win


def estimate_memory(shape: Sequence[int], level_channels: Sequence[int], level_strides: Sequence[int],
                    upsample: bool = False, out_bytes: int = 2, window: Sequence[int] = DEFAULT_ROI,
                    sw_batch_size: int = 2, width: int = 16) -> dict[str, float]:
    """Rough peak memory in bytes of :func:`extract_volume` (the formula of docs/FEATURES.md).

    * stitching buffers (float32, one per level, plus a one-channel weight map per level):
      ``sum_l (C_l + 1) * V / s_l^3 * 4``,
    * the result: ``sum_l C_l * V / s_l^3 * out_bytes`` (``upsample``: ``sum_l C_l * V * out_bytes``),
    * the input, padded, and the voxel index of one window batch: ``V * 4 + ...`` (small),
    * the network on one window batch: about ``12 * width * prod(window) * sw_batch_size * 4``.
    """
    v = float(np.prod([int(s) for s in shape]))
    stitch = sum((c + 1) * v / s**3 * 4 for c, s in zip(level_channels, level_strides))
    result = sum(c * v * (1 if upsample else 1 / s**3) * out_bytes for c, s in zip(level_channels, level_strides))
    inp = v * 4 * 2
    net = 12 * width * float(np.prod(window)) * sw_batch_size * 4
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


# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_volume(extractor: Any, image_unit: Any, roi: Sequence[int] = DEFAULT_ROI, overlap: float = 0.5,
                   levels: Sequence[int] | None = None, sw_batch_size: int = 2,
                   out_dtype: torch.dtype = torch.float16, upsample: bool = False, progress: bool = True,
                   mode: str = "gaussian", condition: str = "auto", bf16: bool = False) -> list[torch.Tensor]:
    """Feature pyramid of a whole volume by sliding windows.

    Args:
        extractor: ``load_pretrained(...)`` result, or any callable ``f(x (B,1,...), voxel_index=...,
            coords=...) -> list[Tensor]`` with ``levels`` (``.stride``) metadata.
        image_unit: the volume in [0, 1] (``hu_to_unit`` with ``extractor.preprocess.hu_window``),
            ``(X, Y, Z)`` or ``(B, 1, X, Y, Z)``, numpy or torch.
        roi, overlap: window size and overlap (see :func:`plan_windows`).
        levels: indices of the pyramid levels to return (default all).
        out_dtype: dtype of the returned tensors (float16 halves the memory of float32).
        upsample: repeat coarse levels to full resolution (nearest).
        condition: ``volume`` (BPR map once per volume, cropped per window), ``window`` (BPR map of
            each window alone) or ``auto`` (what the model was pretrained with, see :func:`condition_mode`).
        bf16: bf16 autocast for the backbone.

    Returns: one tensor per selected level, ``(B, C_l, ceil(X/s_l), ceil(Y/s_l), ceil(Z/s_l))`` on the
    CPU (``(B, C_l, X, Y, Z)`` with ``upsample``).
    """
    if mode not in ("gaussian", "constant"):
        raise ValueError(f"mode must be gaussian or constant, got {mode!r}")
    if condition not in CONDITION_MODES:
        raise ValueError(f"condition must be one of {', '.join(CONDITION_MODES)}, got {condition!r}")
    condition = condition_mode(extractor, condition)
    x = _as_volume(image_unit)
    bsz, _, *shape = x.shape
    strides = _strides(extractor)
    n_levels = len(strides)
    sel = list(range(n_levels)) if levels is None else [int(i) for i in levels]
    for i in sel:
        if not -n_levels <= i < n_levels:
            raise ValueError(f"level {i} does not exist (the model has levels 0..{n_levels - 1})")
    sel = [i % n_levels for i in sel]
    # MONAI resizes the blending weights from one output to the next and only resets them for outputs
    # at the window's size: hand it the levels finest first, reorder afterwards
    order = sorted(set(sel), key=lambda i: strides[i])
    div = _divisor(extractor)
    padded, win, step = plan_windows(shape, roi, overlap, div)
    pad = [p - n for p, n in zip(padded, shape)]
    dev = _device_of(extractor)

    cond = None
    if condition == "volume":  # the map of the volume itself, continued over the padding
        fn = getattr(extractor, "condition_map", None)
        cond = fn(x.to(dev), tuple(padded)) if fn is not None else None
        if cond is not None:
            cond = cond.float().cpu()
    if any(pad):
        x = torch.nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), value=0.0)

    def predictor(window: torch.Tensor, slices: list, condition: torch.Tensor | None = None) -> tuple:
        origins = torch.tensor([[int(s.start) for s in sl[2:]] for sl in slices], dtype=torch.long)
        b = window.shape[0]
        axes = [torch.arange(n) for n in window.shape[2:]]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0)[None].expand(b, -1, -1, -1, -1)
        voxel_index = (grid + origins[:, :, None, None, None]).to(dev)
        kwargs: dict[str, Any] = {"voxel_index": voxel_index}
        if condition is not None:
            kwargs["coords"] = condition.to(dev)
        pyr = extractor(window.to(dev), **kwargs)
        return tuple(pyr[i].float() for i in order)

    with _bf16(extractor, bf16):
        out = sliding_window_inference(
            x, win, sw_batch_size, predictor,
            overlap=[_monai_overlap(w, s) for w, s in zip(win, step)], mode=mode,
            sw_device=dev, device=torch.device("cpu"), progress=progress, with_coord=True,
            condition=cond,
        )
    if isinstance(out, torch.Tensor):
        out = (out,)
    del x, cond
    stitched = dict(zip(order, out))
    del out
    result = []
    for i in sel:
        s = strides[i]
        f = stitched[i]
        want = [int(math.ceil(n / s)) for n in shape]
        f = f[:, :, : want[0], : want[1], : want[2]].to(out_dtype)
        if upsample and s > 1:
            f = f.repeat_interleave(s, 2).repeat_interleave(s, 3).repeat_interleave(s, 4)
            f = f[:, :, : shape[0], : shape[1], : shape[2]]
        result.append(f.contiguous())
        if i not in sel[len(result):]:
            stitched.pop(i, None)  # free the float32 buffer as we go
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
    from ..pretrain.backbone import LevelInfo

    extractor.passes = len(ts)
    extractor.levels = [LevelInfo(lv.name, lv.channels * len(ts), lv.stride) for lv in extractor.backbone.levels]
    return extractor
