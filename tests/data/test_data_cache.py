"""Preprocessing cache: int16 + JSON, keys follow source files and settings, parallel prepare."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from data_helpers import affine_for, synthetic_ct, write_nifti

from voxdiff.core.errors import InputError
from voxdiff.data.adapters import open_dataset
from voxdiff.data.cache import PreprocessCache, load_preprocessed, prepare_cache
from voxdiff.data.preprocess import PreprocessConfig, restore_to_original

CFG = PreprocessConfig(spacing=(2.0, 2.0, 3.0), body_margin_mm=4.0)


@pytest.fixture
def btcv(tmp_path):
    root = tmp_path / "btcv"
    for i, codes in enumerate(("RAS", "LPS", "LAS"), start=1):
        img, lab = synthetic_ct((32, 28, 12), seed=i)
        aff = affine_for(codes, (1.5, 1.4, 2.5), (i, 2 * i, 3 * i))
        write_nifti(root / "img" / f"img{i:04d}.nii.gz", img.astype(np.int16), aff)
        write_nifti(root / "label" / f"label{i:04d}.nii.gz", lab, aff)
    return root


def test_prepare_then_load_uses_cache(btcv, tmp_path):
    cache = tmp_path / "cache"
    rep = prepare_cache(btcv, cache, CFG, workers=1, progress=False)
    assert sorted(rep.done) == ["0001", "0002", "0003"] and not rep.failed
    assert (cache / "voxdiff-cache.json").is_file()
    metas = sorted(cache.glob("*.json"))
    entries = [m for m in metas if m.name != "voxdiff-cache.json"]
    assert len(entries) == 3
    doc = json.loads(entries[0].read_text())
    key = entries[0].stem
    assert np.load(cache / f"{key}_image.npy").dtype == np.int16
    assert np.load(cache / f"{key}_label.npy").dtype == np.uint8
    assert doc["preprocess"]["spacing"] == [2.0, 2.0, 3.0]
    assert list(cache.glob("prepare-*.yaml"))

    rep2 = prepare_cache(btcv, cache, CFG, workers=1, progress=False)
    assert sorted(rep2.cached) == ["0001", "0002", "0003"] and not rep2.done

    cached = load_preprocessed(btcv, CFG, cache_dir=cache)
    fresh = load_preprocessed(btcv, CFG)
    for a, b in zip(cached, fresh):
        assert a.case_id == b.case_id
        np.testing.assert_allclose(a.image, b.image, atol=0.5)  # int16 rounding
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_allclose(a.meta.affine, b.meta.affine)
        assert a.meta.original_shape == b.meta.original_shape
        # the cached metadata still maps back to the source grid
        back = restore_to_original(a.label, a.meta, is_label=True)
        assert back.shape == a.meta.original_shape
    mm = load_preprocessed(btcv, CFG, cache_dir=cache, mmap=True, case_ids=["0002"])
    assert len(mm) == 1 and mm[0].image.dtype == np.int16 and isinstance(mm[0].image, np.memmap)
    with pytest.raises(InputError, match="9999"):
        load_preprocessed(btcv, CFG, cache_dir=cache, case_ids=["9999"])


def test_key_follows_source_and_settings(btcv, tmp_path):
    ds = open_dataset(btcv)
    ref = ds.refs[0]
    c = PreprocessCache(tmp_path / "c", CFG)
    k1 = c.key(ref, ds)
    assert PreprocessCache(tmp_path / "c", PreprocessConfig(spacing=(1.0, 1.0, 2.0))).key(ref, ds) != k1
    st = os.stat(ref.image_path)
    os.utime(ref.image_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert c.key(ref, ds) != k1
    assert c.get(ref, ds).image.dtype == np.float32
    assert c.has(ref, ds)


def test_failed_cases_are_skipped_and_listed(btcv, tmp_path):
    bad = btcv / "img" / "img0002.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    rep = prepare_cache(btcv, tmp_path / "cache", CFG, workers=2, progress=False)
    assert sorted(rep.done) == ["0001", "0003"]
    assert len(rep.failed) == 1 and rep.failed[0][0] == "0002" and str(bad) in rep.failed[0][1]


def test_non_cache_folder_refused(btcv, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        prepare_cache(btcv, out, CFG, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["something.txt"]
    rep = prepare_cache(btcv, out, CFG, progress=False, force=True)
    assert len(rep.done) == 3
