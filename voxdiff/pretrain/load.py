"""Loading a pretrained backbone folder as a frozen feature extractor (every method).

``load_pretrained(path)`` accepts the ``voxdiff pretrain`` output folder or its ``backbone/``
subfolder, checks that it is a voxdiff backbone this version understands (``ModelError``
otherwise), rebuilds the method's task (and its BPR from the ``bpr/`` folder beside ``backbone/``),
the backbone (by its registry name, ``unet`` for checkpoints that predate the name) with its EMA
weights, and returns a :class:`FeatureExtractor` in eval mode with gradients off::

    ex = load_pretrained("runs/diffusion_ape")
    pyramid = ex(image_unit)        # (B, 1, X, Y, Z) in [0, 1] -> list of (B, C_i, X/s_i, Y/s_i, Z/s_i)
    ex.levels                       # [LevelInfo(name, channels, stride)] (channels x number of t)
    ex.feature_side                 # which side of the network the pyramid is read from (decoder by default)
    ex.preprocess                   # PreprocessConfig the model was trained with
    ex.method                       # "diffusion" | "restorative" | "contrastive" | "random"

Sliding windows: pass ``voxel_index`` (B, 3, X, Y, Z), the absolute voxel indices of the window
(``voxdiff.pretrain.diffusion.index_grid(shape, origin)``), so the diffusion model's fixed noise is
the same in overlapping windows, and optionally ``coords`` (the BPR map of the whole volume cropped
to the window, see :meth:`FeatureExtractor.condition_map`) so the condition does not depend on the
window either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.checkpoint import load_checkpoint, unprefixed
from ..core.config import from_dict
from ..core.errors import InputError, ModelError
from ..core.layers import freeze
from ..core.outputs import note_input
from ..core.precision import bf16_autocast, use_bf16
from ..core.runtime import prefer_channels_last, resolve_device
from ..data.preprocess import PreprocessConfig
from .backbones import DEFAULT_BACKBONE, LevelInfo, PyramidBackbone, build_backbone
from .tasks.base import available_methods, get_task_class

BACKBONE_KIND = "backbone"
SUPPORTED_VERSION = 1


def resolve_backbone_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if (p / "backbone" / "model.json").is_file():
        return p / "backbone"
    return p


class FeatureExtractor(nn.Module):
    """Frozen backbone + the method's input recipe; call it on [0, 1] images."""

    def __init__(self, backbone: PyramidBackbone, task: nn.Module, preprocess: PreprocessConfig, method: str,
                 info: dict[str, Any], path: Path | None = None):
        super().__init__()
        self.backbone = backbone
        self.task = task
        self.preprocess = preprocess
        self.method = method
        self.info = info
        self.path = path
        self.bf16 = False  # set True for bf16 autocast on CPU (faster, slightly different features)
        # decoder (the FPN pyramid), encoder or both (voxdiff.features.extract.with_feature_side)
        self.feature_side = "decoder"
        self.passes = len(self.task.feature_passes(torch.zeros(1, 1, *([backbone.divisor] * 3)),
                                                   coords=self._dummy_coords(backbone.divisor)))
        self.set_levels()
        freeze(self)

    def set_levels(self) -> None:
        """``levels`` from the backbone's pyramid of ``feature_side`` and the number of passes (each
        pass's pyramid is concatenated per level)."""
        chans = self.backbone.side_channels(self.feature_side)
        self.levels = [LevelInfo(lv.name, int(c) * self.passes, lv.stride) for lv, c in zip(self.backbone.levels, chans)]

    def backbone_pyramid(self, x: torch.Tensor, t: Any = None) -> list[torch.Tensor]:
        """One pass of the backbone on its input ``x`` (image and condition), the pyramid of
        ``feature_side``; with gradients when the caller allows them (fine-tuning)."""
        return self.backbone.pyramid(x, t, side=self.feature_side)

    def _dummy_coords(self, s: int) -> torch.Tensor | None:
        c = self.backbone.in_channels - 1
        return torch.zeros(1, c, s, s, s) if c > 0 else None

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this."""
        return self.backbone.divisor

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.info.get("config", {}).get("patch_size") or (32, 32, 32))  # type: ignore[return-value]

    @property
    def bpr(self) -> nn.Module | None:
        return getattr(self.task, "bpr", None)

    @property
    def condition_channels(self) -> int:
        return self.backbone.in_channels - 1

    @torch.no_grad()
    def condition_map(self, image_unit: torch.Tensor, size: tuple[int, int, int] | None = None) -> torch.Tensor | None:
        """The BPR map of whole volumes ``image_unit`` (B, 1, X, Y, Z), over voxels ``0..size-1``
        (default the volume; larger sizes continue the map over padding); None for unconditioned
        methods. Crop it with the windows and pass it as ``coords``."""
        fn = getattr(self.task, "volume_condition", None)
        return fn(image_unit, size) if fn is not None else None

    @torch.no_grad()
    def forward(self, image_unit: torch.Tensor, voxel_index: torch.Tensor | None = None,
                coords: torch.Tensor | None = None) -> list[torch.Tensor]:
        if image_unit.ndim != 5 or image_unit.shape[1] != 1:
            raise ValueError(f"expected (B, 1, X, Y, Z) images in [0, 1], got {tuple(image_unit.shape)}")
        dev = next(self.backbone.parameters()).device
        image_unit = image_unit.to(dev)
        passes = self.task.feature_passes(image_unit, voxel_index=voxel_index,
                                          coords=None if coords is None else coords.to(dev))
        prefer_channels_last(self.backbone, dev, use_bf16(dev, self.bf16))  # the faster weight layout (CPU fp32)
        ctx = bf16_autocast(dev, self.bf16)
        outs: list[list[torch.Tensor]] = []
        with ctx:
            for x, t in passes:
                outs.append([f.float() for f in self.backbone_pyramid(x, t)])
        if len(outs) == 1:
            return outs[0]
        return [torch.cat([o[i] for o in outs], 1) for i in range(len(outs[0]))]

    def train(self, mode: bool = True):  # always frozen
        return super().train(False)


def _task_config_for_loading(cfg: dict[str, Any], bdir: Path, bpr: nn.Module | None) -> dict[str, Any]:
    tcfg = dict(cfg.get("task") or {})
    ref = cfg.get("bpr")
    if ref and bpr is None:
        cand = [(bdir / ref).resolve(), bdir / "bpr"]
        found = next((c for c in cand if (c / "model.json").is_file()), None)
        if found is None:
            raise ModelError(bdir, f"the body part regressor this model was trained with is missing (expected {cand[0]})")
        tcfg["bpr_path"] = str(found)
    return tcfg


def load_backbone(path: str | os.PathLike, bpr: nn.Module | None = None, device: str | torch.device = "auto"
                  ) -> tuple[PyramidBackbone, nn.Module, dict[str, Any]]:
    """(backbone with EMA weights, task, model.json document) on ``device`` (auto: CUDA when
    available); refuses what it cannot load."""
    device = resolve_device(device)
    bdir = resolve_backbone_dir(path)
    tensors, info = load_checkpoint(bdir, kind=BACKBONE_KIND, max_version=SUPPORTED_VERSION)
    cfg = info.get("config") or {}
    for k in ("backbone", "method", "task", "preprocess"):
        if k not in cfg:
            raise ModelError(bdir, f"incompatible backbone checkpoint (model.json lacks '{k}')")
    method = cfg["method"]
    try:
        cls = get_task_class(method)
    except KeyError:
        raise ModelError(bdir, f"unknown pretraining method {method!r} (this voxdiff knows {', '.join(available_methods())})") from None
    tcfg = _task_config_for_loading(cfg, bdir, bpr)
    try:
        task = cls(tcfg, bpr=bpr) if bpr is not None else cls(tcfg)
    except InputError as e:
        raise ModelError(bdir, f"cannot rebuild the {method} task: {e}") from None
    name = cfg.get("backbone_name") or DEFAULT_BACKBONE  # written since the registry; older models are UNets
    try:
        backbone = build_backbone(name, **cfg["backbone"])
    except InputError as e:
        raise ModelError(bdir, f"this model needs backbone {name!r}, which this voxdiff does not have "
                               f"({e.problem})") from None
    except (TypeError, ValueError) as e:
        raise ModelError(bdir, f"incompatible {name} backbone configuration ({e})") from None
    if backbone.in_channels != task.in_channels:
        raise ModelError(bdir, f"backbone expects {backbone.in_channels} input channels but the {method} task "
                               f"gives {task.in_channels} (wrong body part regressor?)")
    task.setup(backbone)
    try:
        backbone.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("task.")}, strict=True)
        task.load_state_dict(unprefixed(tensors, "task."), strict=True)
    except RuntimeError as e:
        raise ModelError(bdir, f"weights do not match the backbone configuration ({str(e).splitlines()[0]})") from None
    prefer_channels_last(backbone.to(device), device)
    task.to(device)
    return backbone, task, info


def load_pretrained(path: str | os.PathLike, bpr: nn.Module | None = None,
                    device: str | torch.device = "auto") -> FeatureExtractor:
    """The frozen feature extractor of a pretrained backbone folder (any method), on ``device``
    (auto: CUDA when available)."""
    note_input(path)
    bdir = resolve_backbone_dir(path)
    backbone, task, info = load_backbone(bdir, bpr=bpr, device=device)
    cfg = info["config"]
    try:
        pre = from_dict(PreprocessConfig, cfg["preprocess"], strict=False)
    except InputError as e:  # PreprocessConfig's own checks (a reversed HU window, bad spacing)
        raise ModelError(bdir, f"invalid preprocessing config ({e.problem})") from None
    except (TypeError, ValueError) as e:
        raise ModelError(bdir, f"invalid preprocessing config ({e})") from None
    return FeatureExtractor(backbone, task, pre, cfg["method"], info, path=bdir)
