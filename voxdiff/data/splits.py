"""Deterministic case splits, stored as nnU-Net ``splits_final.json``.

``kfold_splits(ids, k, seed)`` reproduces scikit-learn's ``KFold(k, shuffle=True, random_state=seed)``
on the *sorted* case ids (what nnU-Net does with seed 12345), without needing scikit-learn: the
indices are shuffled with ``numpy.random.RandomState(seed)`` and cut into ``k`` consecutive folds,
the first ``n % k`` of them one case larger.

``btcv_vox2vec_splits(ids)`` is the BTCV protocol of vox2vec: 5 folds (seed 42); in fold ``i`` the
held-out fifth is ``test`` and one of the remaining cases is ``val`` (drawn with
``RandomState(seed + i)``), the rest ``train``. With BTCV's 30 labelled cases: 23 train, 1 val,
6 test per fold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from voxdiff.core.errors import InputError
from voxdiff.core.outputs import atomic_write_json

SCHEMES = ("kfold", "btcv-vox2vec")


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    if n < k:
        raise ValueError(f"cannot make {k} folds from {n} cases")
    idx = np.arange(n)
    np.random.RandomState(seed).shuffle(idx)
    sizes = np.full(k, n // k, dtype=int)
    sizes[: n % k] += 1
    out, start = [], 0
    for s in sizes:
        out.append(idx[start : start + s])
        start += s
    return out


def kfold_splits(case_ids: Sequence[str], k: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """``k`` folds of ``{"train": [...], "val": [...]}`` over the sorted case ids (deterministic)."""
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ValueError("case ids are not unique")
    splits = []
    for held in _folds(len(ids), k, seed):
        held_set = set(held.tolist())
        splits.append(
            {
                "train": [ids[i] for i in range(len(ids)) if i not in held_set],
                "val": sorted(ids[i] for i in held),
            }
        )
    return splits


def btcv_vox2vec_splits(case_ids: Sequence[str], k: int = 5, seed: int = 42, n_val: int = 1) -> list[dict[str, list[str]]]:
    """vox2vec's BTCV protocol: per fold ``{"train", "val", "test"}`` (test = held-out 1/k)."""
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ValueError("case ids are not unique")
    splits = []
    for i, held in enumerate(_folds(len(ids), k, seed)):
        held_set = set(held.tolist())
        rest = [ids[j] for j in range(len(ids)) if j not in held_set]
        if len(rest) <= n_val:
            raise ValueError(f"too few cases ({len(ids)}) for {k} folds with {n_val} validation case(s)")
        pick = np.random.RandomState(seed + i).permutation(len(rest))[:n_val]
        val = sorted(rest[j] for j in pick)
        splits.append(
            {
                "train": [c for c in rest if c not in val],
                "val": val,
                "test": sorted(ids[j] for j in held),
            }
        )
    return splits


def make_splits(case_ids: Sequence[str], scheme: str = "kfold", k: int = 5, seed: int | None = None) -> list[dict[str, list[str]]]:
    """Splits by name: ``kfold`` (default seed 12345, as nnU-Net) or ``btcv-vox2vec`` (seed 42)."""
    if scheme == "kfold":
        return kfold_splits(case_ids, k=k, seed=12345 if seed is None else seed)
    if scheme in ("btcv-vox2vec", "btcv_vox2vec", "vox2vec"):
        return btcv_vox2vec_splits(case_ids, k=k, seed=42 if seed is None else seed)
    raise ValueError(f"unknown split scheme '{scheme}' (expected one of {', '.join(SCHEMES)})")


def write_splits(path: str | os.PathLike, splits: list[dict[str, list[str]]]) -> Path:
    """Write ``splits_final.json`` (a list of folds) atomically."""
    p = Path(path)
    if p.is_dir() or p.suffix == "":
        p = p / "splits_final.json"
    atomic_write_json(p, splits)
    return p


def read_splits(path: str | os.PathLike) -> list[dict[str, list[str]]]:
    p = Path(path)
    if p.is_dir():
        p = p / "splits_final.json"
    if not p.is_file():
        raise InputError(p, "splits file not found")
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(p, f"unreadable splits file ({e.__class__.__name__})") from None
    if not isinstance(doc, list) or not all(isinstance(f, dict) and "train" in f and "val" in f for f in doc):
        raise InputError(p, 'not an nnU-Net splits file (expected a list of {"train": [...], "val": [...]})')
    return [{k: [str(c) for c in v] for k, v in f.items()} for f in doc]
