"""The segmenter bundle: everything ``voxdiff segment`` needs, in one folder.

::

    model/
      segmenter.json    # {"format": "voxdiff", "kind": "segmenter", "format_version": 1, "mode",
                        #  "method", "preprocess", "labels", "roi", "overlap", "versions", "meta"}
      backbone/         # backbone checkpoint (as written by voxdiff pretrain; tuned weights after
                        # fine-tuning / from-scratch training)
      bpr/              # body part regressor, when the backbone is conditioned on one
      head/             # head checkpoint: model.safetensors + model.json (kind "head")

``save_segmenter`` writes it (into a folder the caller stages), ``load_segmenter`` checks every part
and version and raises :class:`~voxdiff.core.errors.ModelError` with a one-line message otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from voxdiff.core.checkpoint import load_checkpoint, prefixed, read_checkpoint_info, save_checkpoint
from voxdiff.core.config import from_dict, to_dict, versions
from voxdiff.core.errors import InputError, ModelError, VoxdiffError
from voxdiff.core.outputs import atomic_write_json, note_input
from voxdiff.core.runtime import resolve_device
from voxdiff.data.labels import BTCV_LABELS
from voxdiff.data.preprocess import PreprocessConfig
from voxdiff.features.norm import NORM_STATS_FILE  # fixed GroupNorm statistics (bundles with norm_stats: fixed)

from .heads import build_head, count_parameters

SEGMENTER_KIND = "segmenter"
# 2: bundles with fixed normalisation statistics (norm_stats.safetensors), which a reader of version 1
# would load without them; bundles without are still written as version 1. Both are read.
SEGMENTER_FORMAT_VERSION = 2
SEGMENTER_FORMAT_VERSIONS = (1, 2)
HEAD_FORMAT_VERSION = 1


def _source_dirs(pretrained_dir: str | os.PathLike) -> tuple[Path, Path | None]:
    """(backbone folder, bpr folder or None) of a pretrain output folder (or its backbone/)."""
    from voxdiff.pretrain.load import resolve_backbone_dir

    bdir = resolve_backbone_dir(pretrained_dir)
    info = read_checkpoint_info(bdir, kind="backbone")
    ref = (info.get("config") or {}).get("bpr")
    bpr = None
    if ref:
        for cand in ((bdir / ref).resolve(), bdir.parent / "bpr"):
            if (cand / "model.json").is_file():
                bpr = cand
                break
        if bpr is None:
            raise ModelError(bdir, "the body part regressor of this backbone is missing")
    return bdir, bpr


def save_segmenter(
    out_dir: str | os.PathLike,
    pretrained_dir: str | os.PathLike,
    head: nn.Module,
    mode: str,
    preprocess: PreprocessConfig,
    roi: Sequence[int],
    overlap: float,
    tuned_extractor=None,
    meta: dict[str, Any] | None = None,
    inference: str = "window",
    timesteps: Sequence[int] | None = None,
    feature_input: str | None = None,
    feature_side: str = "decoder",
    norm_stats: dict | None = None,
) -> Path:
    """Write a segmenter bundle into ``out_dir`` (an empty / staged folder).

    ``tuned_extractor``: for fine-tuned / from-scratch models, the extractor whose backbone weights
    replace the pretrained ones in ``backbone/``. ``inference``: ``window`` (sliding-window logits,
    heads trained on patches) or ``volume`` (one whole-volume feature pass, heads trained on voxels).
    ``timesteps``: the feature timesteps the head was trained on when they differ from the
    backbone's own (``--t``); the bundle's extractor is set to them when loaded. ``feature_input``:
    likewise, what the diffusion feature passes see (noisy / clean). ``feature_side``: which side of
    the network the head's pyramid comes from (decoder, encoder, both). ``norm_stats``: the fixed
    GroupNorm statistics the head was fitted with (:func:`voxdiff.features.norm.fixed_norm_stats`),
    written to ``norm_stats.safetensors``; None: each window's own.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bdir, bpr = _source_dirs(pretrained_dir)
    if tuned_extractor is None:
        shutil.copytree(bdir, out / "backbone", dirs_exist_ok=True)
    else:
        _, info = load_checkpoint(bdir, kind="backbone")
        tensors = dict(tuned_extractor.backbone.state_dict())
        task = getattr(tuned_extractor, "task", None)
        if isinstance(task, nn.Module):
            tensors.update(prefixed(task.state_dict(), "task."))
        save_checkpoint(out / "backbone", tensors, "backbone", info.get("config") or {},
                        meta=dict(info.get("meta") or {}, tuned=mode), format_version=int(info.get("format_version", 1)))
    if bpr is not None:
        shutil.copytree(bpr, out / "bpr", dirs_exist_ok=True)
    if norm_stats:
        from voxdiff.features.norm import save_norm_stats

        save_norm_stats(out / NORM_STATS_FILE, norm_stats)
    save_checkpoint(out / "head", head.state_dict(), "head", head.config(),
                    meta={"mode": mode, "parameters": count_parameters(head)}, format_version=HEAD_FORMAT_VERSION)
    doc = {
        "format": "voxdiff",
        "kind": SEGMENTER_KIND,
        "format_version": SEGMENTER_FORMAT_VERSION if norm_stats else 1,
        "mode": mode,
        "method": (read_checkpoint_info(bdir, kind="backbone").get("config") or {}).get("method"),
        "bpr": bpr is not None,
        "preprocess": to_dict(preprocess),
        "labels": {str(k): v for k, v in BTCV_LABELS.items()},
        "roi": [int(r) for r in roi],
        "overlap": float(overlap),
        "inference": inference,  # window: sliding-window logits; volume: whole-volume features (voxel probes)
        "timesteps": None if timesteps is None else [int(t) for t in timesteps],  # diffusion: feature passes
        "feature_input": feature_input,  # diffusion: what those passes see (noisy / clean); None: the backbone's
        "feature_side": feature_side,  # the network's decoder, encoder or both (absent in older bundles: decoder)
        "norm_stats": "fixed" if norm_stats else "window",  # fixed: GroupNorm statistics in norm_stats.safetensors
        "versions": versions(),
        "meta": to_dict(meta or {}),
    }
    atomic_write_json(out / "segmenter.json", doc)
    return out


@dataclass
class Segmenter:
    """A loaded bundle: frozen (or tuned) extractor + head + how to preprocess and window."""

    path: Path
    extractor: Any
    head: nn.Module
    preprocess: PreprocessConfig
    roi: tuple[int, int, int]
    overlap: float
    labels: dict[int, str]
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, raw_case, device: str | torch.device | None = None, amp: bool = False, sw_batch_size: int = 2,
                progress: bool = False) -> np.ndarray:
        """uint8 label map of a raw case (file grid) on that same grid; computed on ``device``
        (default: where the model was loaded, see :func:`load_segmenter`)."""
        if self.info.get("inference") == "volume":
            return self._predict_volume(raw_case, amp=amp, progress=progress)
        from .predict import predict_original

        lab, _ = predict_original(self.extractor, self.head, raw_case, self.preprocess, self.roi, self.overlap,
                                  device=device, amp=amp, sw_batch_size=sw_batch_size, progress=progress)
        return lab


    def _predict_volume(self, raw_case, amp: bool = False, progress: bool = False) -> np.ndarray:
        """Heads trained on whole-volume features (voxel probing) predict from one whole-volume
        feature pass, the features they were trained on (see :mod:`voxdiff.probe.voxel`)."""
        from voxdiff.data.preprocess import preprocess, restore_to_original

        from .predict import logits_to_labels, unit_image
        from .train import ProbeConfig, ProbeWindow
        from .voxel import predict_logits_volume

        pre = preprocess(raw_case, self.preprocess)
        cfg = ProbeConfig(inference=ProbeWindow(roi=self.roi, overlap=self.overlap))
        cfg.runtime.bf16 = bool(amp)
        lg = predict_logits_volume(self.extractor, {"h": self.head}, unit_image(pre, self.preprocess.hu_window), cfg)["h"]
        return restore_to_original(logits_to_labels(lg), pre.meta, is_label=True).astype(np.uint8)


def read_segmenter_info(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Validate the bundle's parts and ``segmenter.json``; return the document."""
    p = Path(model_dir)
    if not p.exists():
        raise ModelError(p, "model folder not found")
    if not p.is_dir():
        raise ModelError(p, "not a segmenter model folder (expected a folder with segmenter.json)")
    js = p / "segmenter.json"
    if not js.is_file():
        raise ModelError(p, "not a voxdiff segmenter: segmenter.json is missing")
    try:
        doc = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise ModelError(js, "unreadable segmenter description (invalid JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != "voxdiff" or doc.get("kind") != SEGMENTER_KIND:
        raise ModelError(js, "not a voxdiff segmenter description")
    ver = doc.get("format_version")
    if ver not in SEGMENTER_FORMAT_VERSIONS:
        made = (doc.get("versions") or {}).get("voxdiff", "unknown")
        raise ModelError(p, f"segmenter format version {ver} (made by voxdiff {made}) is not supported by this "
                            f"voxdiff (expects version {' or '.join(map(str, SEGMENTER_FORMAT_VERSIONS))})")
    for part in ("backbone", "head") + (("bpr",) if doc.get("bpr") else ()):
        d = p / part
        if not (d / "model.json").is_file() or not (d / "model.safetensors").is_file():
            raise ModelError(p, f"incomplete segmenter: the {part}/ part is missing or incomplete")
    for k in ("preprocess", "roi", "overlap"):
        if k not in doc:
            raise ModelError(js, f"incomplete segmenter description ('{k}' missing)")
    return doc


def load_segmenter_head(model_dir: str | os.PathLike) -> nn.Module:
    """The head of a segmenter bundle alone (on the CPU), e.g. to start fine-tuning from a probe."""
    p = Path(model_dir)
    tensors, hinfo = load_checkpoint(p / "head", kind="head", max_version=HEAD_FORMAT_VERSION)
    try:
        head = build_head(hinfo.get("config") or {})
        head.load_state_dict(tensors, strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelError(p / "head", f"head weights do not match its configuration ({str(e).splitlines()[0]})") from None
    return head


def _load_norm_stats(p: Path, extractor) -> None:
    """Give the bundle's backbone the fixed GroupNorm statistics of ``norm_stats.safetensors``."""
    from voxdiff.features.norm import fix_group_norms, load_norm_stats

    f = p / NORM_STATS_FILE
    if not f.is_file():
        raise ModelError(p, f"incomplete segmenter: {NORM_STATS_FILE} is missing (the bundle says its "
                            "normalisation statistics are fixed)")
    try:
        stats, _ = load_norm_stats(f)
        fix_group_norms(extractor.backbone, stats)
    except Exception as e:  # a damaged file (safetensors' own error), missing or unknown layers, shapes
        raise ModelError(f, f"unusable normalisation statistics ({str(e).splitlines()[0]})") from None


def load_segmenter(model_dir: str | os.PathLike, device: str | torch.device = "auto") -> Segmenter:
    """Load and check a segmenter bundle (every part present, versions understood) onto ``device``
    (auto: CUDA when available)."""
    p = Path(model_dir)
    note_input(p)
    doc = read_segmenter_info(p)
    from voxdiff.pretrain.load import load_pretrained

    device = resolve_device(device)
    extractor = load_pretrained(p, device=device)
    head = load_segmenter_head(p)
    if doc.get("timesteps"):
        from voxdiff.features.extract import with_timesteps

        try:
            with_timesteps(extractor, doc["timesteps"])
        except VoxdiffError as e:
            raise ModelError(p / "segmenter.json", f"invalid feature timesteps {doc['timesteps']} ({e})") from None
    if doc.get("feature_input"):
        from voxdiff.features.extract import with_feature_input

        try:
            with_feature_input(extractor, doc["feature_input"])
        except VoxdiffError as e:
            raise ModelError(p / "segmenter.json", f"invalid feature_input {doc['feature_input']!r} ({e})") from None
    if doc.get("feature_side", "decoder") != "decoder":
        from voxdiff.features.extract import with_feature_side

        try:
            with_feature_side(extractor, doc["feature_side"])
        except VoxdiffError as e:
            raise ModelError(p / "segmenter.json", f"invalid feature_side {doc['feature_side']!r} ({e})") from None
    if doc.get("norm_stats", "window") == "fixed":
        _load_norm_stats(p, extractor)
    elif doc.get("norm_stats", "window") != "window":
        raise ModelError(p / "segmenter.json", f"invalid norm_stats {doc['norm_stats']!r} (window or fixed)")
    chans = [int(lv.channels) for lv in extractor.levels]
    if list(getattr(head, "level_channels", chans)) != chans:
        raise ModelError(p, f"head expects pyramid channels {head.level_channels}, backbone gives {chans}")
    head.to(device).eval()
    try:
        pre = from_dict(PreprocessConfig, doc["preprocess"], strict=False)
    except InputError as e:  # PreprocessConfig's own checks (a reversed HU window, bad spacing)
        raise ModelError(p / "segmenter.json", f"invalid preprocessing config ({e.problem})") from None
    except (TypeError, ValueError) as e:
        raise ModelError(p / "segmenter.json", f"invalid preprocessing config ({e})") from None
    try:
        labels = {int(k): str(v) for k, v in (doc.get("labels") or {str(k): v for k, v in BTCV_LABELS.items()}).items()}
    except (TypeError, ValueError, AttributeError):
        raise ModelError(p / "segmenter.json", "labels must map integer label ids to organ names") from None
    n_out = getattr(head, "n_classes", None)
    if n_out is not None and sorted(set(labels) - {0}) != list(range(1, int(n_out))):
        raise ModelError(p / "segmenter.json", f"label ids {sorted(labels)} do not match the head's {int(n_out)} classes "
                                               f"(organs 1..{int(n_out) - 1}, background 0)")
    return Segmenter(p, extractor, head, pre, tuple(int(r) for r in doc["roi"]), float(doc["overlap"]), labels, doc)
