"""Deterministic k-fold and vox2vec BTCV splits, nnU-Net splits_final.json round trip."""

from __future__ import annotations

import json

import pytest

from voxdiff.core.errors import InputError
from voxdiff.data.splits import btcv_vox2vec_splits, kfold_splits, make_splits, read_splits, write_splits


def test_kfold_deterministic_partition():
    ids = [f"c{i:03d}" for i in range(23)]
    a = kfold_splits(ids, k=5, seed=7)
    b = kfold_splits(list(reversed(ids)), k=5, seed=7)  # input order does not matter
    assert a == b
    assert len(a) == 5
    vals = [c for f in a for c in f["val"]]
    assert sorted(vals) == sorted(ids)  # every case validated exactly once
    assert [len(f["val"]) for f in a] == [5, 5, 5, 4, 4]
    for f in a:
        assert set(f["train"]) | set(f["val"]) == set(ids)
        assert not set(f["train"]) & set(f["val"])
    assert kfold_splits(ids, k=5, seed=8) != a
    with pytest.raises(ValueError):
        kfold_splits(ids[:3], k=5)


def test_kfold_matches_sklearn_kfold_convention():
    # sklearn KFold(shuffle=True, random_state=s): RandomState(s).shuffle(arange(n)), consecutive folds
    import numpy as np

    ids = [f"x{i}" for i in range(10)]
    idx = np.arange(10)
    np.random.RandomState(12345).shuffle(idx)
    folds = kfold_splits(ids, k=5, seed=12345)
    for i in range(5):
        assert folds[i]["val"] == sorted(ids[j] for j in idx[2 * i: 2 * i + 2])


def test_btcv_vox2vec_protocol():
    ids = [f"{i:04d}" for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30,
                                31, 32, 33, 34, 35, 36, 37, 38, 39, 40)]
    s = btcv_vox2vec_splits(ids)
    assert s == btcv_vox2vec_splits(ids) == make_splits(ids, "btcv-vox2vec")
    assert len(s) == 5
    assert sorted(c for f in s for c in f["test"]) == sorted(ids)
    for f in s:
        assert (len(f["train"]), len(f["val"]), len(f["test"])) == (23, 1, 6)
        assert not (set(f["train"]) & set(f["val"])) and not (set(f["train"]) & set(f["test"]))
        assert not set(f["val"]) & set(f["test"])
    with pytest.raises(ValueError):
        make_splits(ids, "nope")


def test_write_read_splits_final(tmp_path):
    s = kfold_splits([f"c{i}" for i in range(10)], k=2, seed=0)
    p = write_splits(tmp_path, s)
    assert p.name == "splits_final.json"
    assert json.loads(p.read_text()) == s
    assert read_splits(p) == s and read_splits(tmp_path) == s
    (tmp_path / "bad.json").write_text('{"train": []}')
    with pytest.raises(InputError, match="splits"):
        read_splits(tmp_path / "bad.json")
