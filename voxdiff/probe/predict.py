"""Whole-volume prediction: sliding windows over a predictor that runs extractor + head(s).

MONAI's ``sliding_window_inference`` cuts the volume into ``roi`` windows overlapping by
``overlap``, runs the frozen extractor and the head(s) on each window, and blends the window logits
with gaussian weights. One pass can serve several heads at once (features are computed once per
window). ``predict_case`` works on a preprocessed case, ``predict_original`` maps the label map back
to the source file's grid with :func:`voxdiff.data.preprocess.restore_to_original`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from voxdiff.core.layers import freeze
from voxdiff.core.precision import bf16_autocast, use_bf16
from voxdiff.core.runtime import prefer_channels_last
from voxdiff.pretrain.backbones import PyramidBackbone
from voxdiff.pretrain.diffusion import index_grid


def extractor_window(extractor) -> int:
    """Largest stride of the pyramid: window sizes must be multiples of it."""
    levels = getattr(extractor, "levels", None)
    if not levels:
        return 1
    return int(max(int(getattr(lv, "stride", 1)) for lv in levels))


def round_roi(roi: Sequence[int], divisor: int) -> tuple[int, int, int]:
    return tuple(max(divisor, int(np.ceil(int(r) / divisor) * divisor)) for r in roi)  # type: ignore[return-value]


def set_frozen(extractor) -> None:
    """Eval mode and no gradients for everything the extractor holds (norm statistics never move)."""
    for obj in (extractor, getattr(extractor, "backbone", None), getattr(extractor, "bpr", None)):
        if isinstance(obj, nn.Module):
            freeze(obj)


def _accepts(fn, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def features(extractor, x: torch.Tensor, amp: bool = False, voxel_index: torch.Tensor | None = None,
             coords: torch.Tensor | None = None, grad: bool = False) -> list[torch.Tensor]:
    """Pyramid of ``x`` in float32 (the extractor may run under bf16 autocast).

    ``voxel_index``/``coords`` (absolute voxel indices and condition map of a window) are passed to
    extractors that take them (diffusion: same fixed noise and BPR map in overlapping windows).
    ``grad=True`` builds the pyramid with gradients to the backbone (fine-tuning): for a
    :class:`voxdiff.pretrain.load.FeatureExtractor` (whose call is always no-grad) the task's
    feature passes are run through ``extractor.backbone.pyramid`` directly.
    """
    kw = {}
    call = extractor.forward if isinstance(extractor, nn.Module) else extractor.__call__
    if voxel_index is not None and _accepts(call, "voxel_index"):
        kw["voxel_index"] = voxel_index
    if coords is not None and _accepts(call, "coords"):
        kw["coords"] = coords
    with bf16_autocast(x.device, amp):
        task = getattr(extractor, "task", None)
        if grad and task is not None and hasattr(task, "feature_passes") \
                and isinstance(getattr(extractor, "backbone", None), PyramidBackbone):
            with torch.no_grad():
                passes = task.feature_passes(x, **kw)
            prefer_channels_last(extractor.backbone, x.device, use_bf16(x.device, amp))
            run = getattr(extractor, "backbone_pyramid", extractor.backbone.pyramid)  # its feature side
            outs = [run(xi, t) for xi, t in passes]
            pyr = outs[0] if len(outs) == 1 else [torch.cat([o[i] for o in outs], 1) for i in range(len(outs[0]))]
        else:
            pyr = extractor(x, **kw)
    return [f.float() for f in pyr]


def condition_map(extractor, x: torch.Tensor, amp: bool = False) -> torch.Tensor | None:
    """Whole-volume condition (BPR) map when the extractor has one, so windows share it."""
    fn = getattr(extractor, "condition_map", None)
    if fn is None or int(getattr(extractor, "condition_channels", 0) or 0) <= 0:
        return None
    try:
        with torch.no_grad(), bf16_autocast(x.device, amp):
            c = fn(x)
    except (RuntimeError, MemoryError) as e:  # too large at once: each window computes its own map
        if not _out_of_memory(e):
            raise  # anything else (a device mismatch, a bug) must not turn into a silent fallback
        return None
    return None if c is None else c.float()


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (CPU allocators raise RuntimeError, CUDA OutOfMemoryError)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg


def model_device(extractor) -> torch.device:
    """Where an extractor's (or module's) weights are; the CPU when it has none."""
    for obj in (getattr(extractor, "backbone", None), extractor):
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                return p.device
    return torch.device("cpu")


def to_unit_tensor(image_unit, device="cpu") -> torch.Tensor:
    """(X,Y,Z) array/tensor in [0,1] -> (1,1,X,Y,Z) float32 tensor."""
    t = torch.as_tensor(np.asarray(image_unit, dtype=np.float32) if not torch.is_tensor(image_unit) else image_unit)
    t = t.float()
    while t.ndim < 5:
        t = t[None]
    return t.to(device)


@torch.no_grad()
def predict_logits(
    extractor,
    heads: nn.Module | Mapping[str, nn.Module],
    image_unit,
    roi: Sequence[int] = (96, 96, 64),
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    mode: str = "gaussian",
    device: str | torch.device | None = None,
    amp: bool = False,
    progress: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Logits ``(C, X, Y, Z)`` (float32, CPU) of a whole volume in [0, 1]; a dict for several heads.

    The extractor and heads must already be in eval mode (heads are switched here). ``device``: where
    the windows are computed (default: where the extractor's weights are).
    """
    from monai.inferers import sliding_window_inference

    single = isinstance(heads, nn.Module)
    head_map = {"_": heads} if single else dict(heads)
    names = list(head_map)
    for h in head_map.values():
        h.eval()
    x = to_unit_tensor(image_unit, device if device is not None else model_device(extractor))
    roi = round_roi(roi, extractor_window(extractor))

    cond = condition_map(extractor, x, amp=amp)

    def predictor(win: torch.Tensor, location, condition: torch.Tensor | None = None):
        origins = torch.tensor([[int(s.start or 0) for s in loc[2:]] for loc in location], dtype=torch.long)
        vi = index_grid(tuple(win.shape[2:]), origins, batch=win.shape[0], device=win.device)
        pyr = features(extractor, win, amp=amp, voxel_index=vi, coords=condition)
        outs = tuple(head_map[n](pyr, out_size=win.shape[2:]).float() for n in names)
        return outs if len(outs) > 1 else outs[0]

    kw = {"condition": cond} if cond is not None else {}
    out = sliding_window_inference(
        x, roi_size=roi, sw_batch_size=sw_batch_size, predictor=predictor, overlap=overlap, mode=mode,
        padding_mode="replicate", progress=progress, with_coord=True, **kw,
    )
    if not isinstance(out, (tuple, list)):
        out = (out,)
    res = {n: o[0].detach().float().cpu() for n, o in zip(names, out)}
    return res["_"] if single else res


def logits_to_labels(logits: torch.Tensor) -> np.ndarray:
    """Label map ``(X, Y, Z)`` uint8 of logits ``(C, X, Y, Z)``: the first class of highest logit, as
    ``argmax(0)`` gives it (a NaN logit never wins here). Taken class by class, running maximum and
    index: ``argmax`` over the leading, strided axis of a whole volume takes about 3x as long on the CPU."""
    if logits.ndim != 4 or not 0 < logits.shape[0] <= 256:
        raise ValueError(f"expected logits (C <= 256, X, Y, Z), got {tuple(logits.shape)}")
    best = logits[0].clone()
    labels = torch.zeros(logits.shape[1:], dtype=torch.uint8, device=logits.device)
    for c in range(1, logits.shape[0]):
        higher = logits[c] > best
        best = torch.where(higher, logits[c], best)
        labels.masked_fill_(higher, c)
    return labels.cpu().numpy()


def unit_image(case, window: Sequence[float]) -> np.ndarray:
    from voxdiff.data.preprocess import hu_to_unit

    return hu_to_unit(case.image, tuple(window))


def predict_case(extractor, head: nn.Module, case, roi: Sequence[int] = (96, 96, 64), overlap: float = 0.5,
                 window: Sequence[float] | None = None, **kw) -> np.ndarray:
    """uint8 label map on the grid of a *preprocessed* case (HU image)."""
    if window is None:
        window = extractor.preprocess.hu_window
    return logits_to_labels(predict_logits(extractor, head, unit_image(case, window), roi, overlap, **kw))


def predict_original(extractor, head: nn.Module, raw_case, preprocess_cfg=None, roi: Sequence[int] = (96, 96, 64),
                     overlap: float = 0.5, **kw) -> tuple[np.ndarray, object]:
    """Preprocess a raw case, predict, and map the labels back to the source grid.

    Returns ``(labels on the original grid, preprocessed case)``.
    """
    from voxdiff.data.preprocess import preprocess, restore_to_original

    cfg = preprocess_cfg if preprocess_cfg is not None else extractor.preprocess
    pre = preprocess(raw_case, cfg)
    lab = predict_case(extractor, head, pre, roi, overlap, window=cfg.hu_window, **kw)
    return restore_to_original(lab, pre.meta, is_label=True).astype(np.uint8), pre
