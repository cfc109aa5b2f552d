"""Model files: weights in safetensors plus a JSON document (kind, format version, config, versions).

Nothing is ever unpickled. A model is a folder (or a ``.safetensors`` file with a ``.json``
beside it with the same stem)::

    model/
      model.safetensors        # tensors, flat state-dict keys (several groups allowed: "ema.", ...)
      model.json               # {"format": "voxdiff", "kind": "bpr", "format_version": 1,
                               #  "config": {...constructor args...}, "versions": {...}, "meta": {...}}

``kind`` says what the file is (``bpr``, ``backbone``, ``head``, ``train-state``); loaders refuse
another kind or a newer format version with a clear one-line message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import to_dict, versions
from .errors import ModelError
from .outputs import atomic_path, atomic_write_json

FORMAT = "voxdiff"


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    return p / "model.safetensors", p / "model.json"


def save_checkpoint(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    kind: str,
    config: Any,
    meta: dict[str, Any] | None = None,
    format_version: int = 1,
) -> Path:
    """Write weights + JSON atomically (each file via temp + rename; JSON last)."""
    st, js = _paths(path)
    st.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(st) as tmp:
        save_file(flat, str(tmp), metadata={"format": FORMAT, "kind": kind})
    doc = {
        "format": FORMAT,
        "kind": kind,
        "format_version": format_version,
        "config": to_dict(config),
        "versions": versions(),
        "meta": to_dict(meta or {}),
    }
    atomic_write_json(js, doc)
    return st.parent if Path(path).suffix == "" else st


def read_checkpoint_info(path: str | os.PathLike, kind: str | None = None, max_version: int = 1) -> dict[str, Any]:
    """Read and validate the JSON document of a model; raise :class:`ModelError` when it is not ours."""
    st, js = _paths(path)
    if not Path(path).exists():
        raise ModelError(path, "model not found")
    if not js.is_file():
        raise ModelError(path, f"not a voxdiff model: {js.name} is missing")
    if not st.is_file():
        raise ModelError(path, f"incomplete voxdiff model: {st.name} is missing")
    try:
        doc = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(js, "not a voxdiff model description (invalid JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelError(js, "not a voxdiff model description")
    if kind is not None and doc.get("kind") != kind:
        raise ModelError(path, f"this is a voxdiff '{doc.get('kind')}' model, expected '{kind}'")
    if int(doc.get("format_version", 0)) > max_version:
        raise ModelError(
            path, f"model format version {doc.get('format_version')} is newer than this voxdiff supports ({max_version})"
        )
    return doc


def load_checkpoint(
    path: str | os.PathLike, kind: str | None = None, max_version: int = 1
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(tensors, info)`` after validating kind and version."""
    info = read_checkpoint_info(path, kind=kind, max_version=max_version)
    st, _ = _paths(path)
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(st, f"unreadable weights ({e})") from None
    return tensors, info


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items()}


def unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
