"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

A train state is a checkpoint folder of kind ``train-state`` (``voxdiff.core.checkpoint``) holding

* ``model.*`` the online weights (backbone + task), ``ema.*`` the EMA of the backbone,
* ``optim.state.<param index>.<key>`` optimiser tensors, the rest of the optimiser state dict
  (param groups, scalar state) in the JSON ``meta.optimizer``,
* ``rng.torch.<rank>`` / ``rng.cuda.<rank>`` / ``rng.gen.<rank>`` torch RNG states, and numpy /
  python RNG states in ``meta.rng`` (one entry per rank),
* ``meta.step`` and the resolved config.

Folders are written atomically: ``train_state/.step_N.partial-*`` is filled, renamed to
``train_state/step_N``, and only then ``train_state/latest`` (a one-line text file, replaced
atomically) points to it; older steps are pruned. A crash at any moment leaves ``latest`` pointing to a
complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import ModelError
from .outputs import atomic_write

KIND = "train-state"
LATEST = "latest"


def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.state.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        if not name.startswith("optim.state."):
            continue
        idx, key = name[len("optim.state."):].split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    for idx, d in (doc.get("scalars") or {}).items():
        state.setdefault(int(idx), {}).update(d)
    return {"state": state, "param_groups": doc["param_groups"]}


def python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def python_rng_from_json(doc: list) -> tuple:
    return (doc[0], tuple(doc[1]), doc[2])


def write_train_state(root: Path, step: int, tensors: dict[str, torch.Tensor], config: Any,
                      meta: dict[str, Any], keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=root))
    try:
        save_checkpoint(tmp, tensors, KIND, config, meta=dict(meta, step=step))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(root / LATEST, name + "\n")
    # prune: older complete steps beyond `keep`, and stale partial folders
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for p in steps[:-max(1, keep)]:
        if p.name != name:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():
        if p.is_dir() and p.name.endswith(".partial"):
            shutil.rmtree(p, ignore_errors=True)
    return final


def latest_train_state(root: Path) -> Path | None:
    f = root / LATEST
    if not f.is_file():
        return None
    p = root / f.read_text().strip()
    return p if p.is_dir() else None


def read_train_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, info = load_checkpoint(path, kind=KIND)
    if "step" not in (info.get("meta") or {}):
        raise ModelError(path, "train state without a step")
    return tensors, info
