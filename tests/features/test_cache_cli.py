"""Feature files, the cache keyed by model and settings, streaming, and ``voxdiff features``."""

from __future__ import annotations

import itertools
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from voxdiff.cli import main
from voxdiff.core.config import from_dict
from voxdiff.core.errors import InputError
from voxdiff.data.types import Case, CaseMeta
from voxdiff.features import ExtractConfig, FeatureCache, case_features, extract_case, load_features, save_features
from voxdiff.features import cache as cache_mod
from voxdiff.pretrain.load import load_pretrained
from voxdiff.pretrain.train import PretrainConfig, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def body_volume(seed: int, shape=(36, 32, 20)) -> np.ndarray:
    r = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    img = np.where(x**2 / 0.8 + y**2 / 0.6 < 1, 40.0, -1000.0)
    img = np.where((x - 0.3) ** 2 + y**2 + (z * 0.6) ** 2 < 0.1, 160.0, img)
    return (img + r.normal(0, 10, shape)).astype(np.float32)


def make_case(seed: int, shape=(36, 32, 20)) -> Case:
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    meta = CaseMeta(f"c{seed}", None, None, shape, aff, aff, (1.0, 1.0, 2.0))
    return Case(body_volume(seed, shape), None, meta)


def small_cfg(**kw) -> PretrainConfig:
    base = dict(method="random", patch_size=(16, 16, 16), batch_size=2, steps=1, base_channels=4, num_levels=3)
    base.update(kw)
    return from_dict(PretrainConfig, base)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "rnd"
    return pretrain(small_cfg(), out, cases=[make_case(0)], progress=False)


@pytest.fixture(scope="module")
def diffusion_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "diff"
    cfg = small_cfg(method="diffusion", steps=2, diffusion_steps=100, feature_timesteps=(10,), bf16=False)
    return pretrain(cfg, out, cases=[make_case(0)], progress=False)


FAST = ExtractConfig(roi=(16, 16, 16), overlap=0.25)


def test_save_and_load_roundtrip(tmp_path):
    pyr = [torch.randn(1, 3, 8, 6, 4), torch.randn(1, 5, 4, 3, 2)]
    meta = {"levels": [{"index": 0}, {"index": 2}], "case_id": "x"}
    save_features(tmp_path / "x.safetensors", [p.half() for p in pyr], meta, [0, 2])
    got, m = load_features(tmp_path / "x.safetensors")
    assert m["case_id"] == "x" and m["format"] == "voxdiff-features"
    assert [g.dtype for g in got] == [torch.float16] * 2
    for g, p in zip(got, pyr):
        torch.testing.assert_close(g.float(), p.half().float())
    (tmp_path / "bad.json").write_text("{}")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a voxdiff feature"):
        load_features(tmp_path / "bad.safetensors")


def test_cache_reuses_and_invalidates(tmp_path, model_dir, monkeypatch):
    ex = load_pretrained(model_dir)
    case = make_case(1)
    cache = FeatureCache(tmp_path / "fc", ex, FAST)
    first = cache.get(case)
    assert [f.dtype for f in first] == [torch.float16] * 3
    assert [tuple(f.shape[2:]) for f in first] == [(36, 32, 20), (18, 16, 10), (9, 8, 5)]
    meta = json.loads(cache.path("c1").with_suffix(".json").read_text())
    assert meta["model"]["method"] == "random" and meta["levels"][2]["stride"] == 4
    assert meta["preprocess"]["hu_window"] == [-1350.0, 1000.0] and meta["shape"] == [36, 32, 20]
    assert meta["settings"]["dtype"] == "float16" and meta["t"] is None

    calls = []
    real = cache_mod.extract_case
    monkeypatch.setattr(cache_mod, "extract_case", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = cache.get(case)  # from disk
    assert calls == []
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # a changed image is recomputed
    changed = make_case(1)
    changed.image[0, 0, 0] += 100
    cache.get(changed)
    assert calls == [1]
    # other settings or other weights: another key
    assert FeatureCache(tmp_path / "fc", ex, ExtractConfig(roi=(16, 16, 16), levels=(0,))).key != cache.key
    # features of an older window scheme are not reused
    monkeypatch.setattr(cache_mod, "EXTRACTION_VERSION", cache_mod.EXTRACTION_VERSION - 1)
    assert FeatureCache(tmp_path / "fc", ex, FAST).key != cache.key
    monkeypatch.undo()
    with torch.no_grad():
        ex.backbone.stem.weight.add_(0.01)
    ex.path = None  # fingerprint from the (changed) parameters
    assert FeatureCache(tmp_path / "fc", ex, FAST).key != cache.key


def test_diffusion_timesteps_change_key_and_channels(tmp_path, diffusion_dir):
    ex = load_pretrained(diffusion_dir)
    c10 = FeatureCache(tmp_path, ex, ExtractConfig(roi=(36, 32, 20), t=(10,)))
    f10 = c10.get(make_case(2))
    c1050 = FeatureCache(tmp_path, ex, ExtractConfig(roi=(36, 32, 20), t=(10, 50)))
    assert c1050.key != c10.key
    f1050 = c1050.get(make_case(2))
    assert f1050[0].shape[1] == 2 * f10[0].shape[1]
    torch.testing.assert_close(f1050[0][:, : f10[0].shape[1]], f10[0])  # the t=10 channels come first
    meta = json.loads(c1050.path("c2").with_suffix(".json").read_text())
    assert meta["t"] == [10, 50]


def test_feature_input_override_changes_key_and_features(tmp_path, diffusion_dir):
    noisy = FeatureCache(tmp_path, load_pretrained(diffusion_dir), ExtractConfig(roi=(36, 32, 20), t=(50,)))
    ex = load_pretrained(diffusion_dir)
    clean = FeatureCache(tmp_path, ex, ExtractConfig(roi=(36, 32, 20), t=(50,), feature_input="clean"))
    assert ex.task.opts.feature_input == "clean" and clean.key != noisy.key
    fn, fc = noisy.get(make_case(2)), clean.get(make_case(2))
    assert fn[0].shape == fc[0].shape and not torch.allclose(fn[0], fc[0])
    with pytest.raises(InputError, match="unknown feature_input"):
        FeatureCache(tmp_path, load_pretrained(diffusion_dir), ExtractConfig(feature_input="blurred"))


def test_feature_side_changes_key_channels_and_keeps_the_decoder_block(tmp_path, diffusion_dir):
    from voxdiff.features.cache import settings_of

    dec = FeatureCache(tmp_path, load_pretrained(diffusion_dir), ExtractConfig(roi=(36, 32, 20), t=(10, 50)))
    assert "feature_side" not in settings_of(ExtractConfig())  # decoder caches keep their old keys
    ex = load_pretrained(diffusion_dir)
    both = FeatureCache(tmp_path, ex, ExtractConfig(roi=(36, 32, 20), t=(10, 50), feature_side="both"))
    assert ex.feature_side == "both" and both.key != dec.key
    fd, fb = dec.get(make_case(2)), both.get(make_case(2))
    c = ex.backbone.levels[0].channels
    assert [lv.channels for lv in ex.levels] == [2 * ch for ch in ex.backbone.side_channels("both")]
    assert fb[0].shape[1] == 4 * c and fd[0].shape[1] == 2 * c and fb[-1].shape == fd[-1].shape
    # per level: one (encoder, decoder) block per pass, in the passes' order
    torch.testing.assert_close(fb[0][:, c:2 * c], fd[0][:, :c])
    torch.testing.assert_close(fb[0][:, 3 * c:], fd[0][:, c:])
    meta = json.loads(both.path("c2").with_suffix(".json").read_text())
    assert meta["settings"]["feature_side"] == "both" and meta["levels"][0]["channels"] == 4 * c
    with pytest.raises(InputError, match="feature_side must be one of"):
        FeatureCache(tmp_path, load_pretrained(diffusion_dir), ExtractConfig(feature_side="middle"))


def test_streaming_without_cache(model_dir):
    ex = load_pretrained(model_dir)
    cases = [make_case(3, (20, 20, 12)), make_case(4, (24, 20, 16))]
    got = list(case_features(ex, cases, ExtractConfig(roi=(16, 16, 16), levels=(1,))))
    assert [c.case_id for c, _ in got] == ["c3", "c4"]
    assert got[1][1][0].shape == (1, 8, 12, 10, 8)
    torch.testing.assert_close(got[0][1][0], extract_case(ex, cases[0], ExtractConfig(roi=(16, 16, 16), levels=(1,)))[0])


def _write_folder(root, n=2):
    root.mkdir()
    for i in range(n):
        nib.save(nib.Nifti1Image(body_volume(10 + i, (40, 36, 20)).astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0])),
                 str(root / f"ct{i}.nii.gz"))
    return root


def test_cli_writes_features_and_refuses_bad_input(tmp_path, model_dir, capsys):
    data = _write_folder(tmp_path / "data")
    out = tmp_path / "feats"
    rc = main(["features", str(model_dir), str(data), "-o", str(out), "--roi", "[32,32,20]", "--levels", "0", "2",
               "--progress", "false"])
    assert rc == 0
    index = json.loads((out / "features.json").read_text())
    assert len(index["cases"]) == 2 and (out / "config.yaml").is_file()
    pyr, meta = load_features(out / f"{index['cases'][0]['case_id']}.safetensors")
    assert [m["index"] for m in meta["levels"]] == [0, 2] and len(pyr) == 2
    assert pyr[0].dtype == torch.float16 and pyr[1].shape[2:] == tuple(-(-n // 4) for n in meta["shape"])
    # the windows used: in the metadata, the index and one printed line per case
    win = meta["windows"]
    assert win["window"] == [32, 32, 20] and win["requested_overlap"] == 0.5 and win["exact"]
    assert win["count"] == len(list(itertools.product(*[range(c) for c in win["counts"]])))
    assert index["cases"][0]["windows"] == win["count"]
    printed = capsys.readouterr().out
    assert printed.count("windows of 32x32x20") == 2 and "requested 0.5" in printed
    # refused: existing output, missing model, bad level, t on a non-diffusion model; no partial output
    assert main(["features", str(model_dir), str(data), "-o", str(out), "--progress", "false"]) == 2
    for args, msg in [([str(tmp_path / "nope"), str(data)], "not found"),
                      ([str(model_dir), str(data), "--levels", "5"], "levels"),
                      ([str(model_dir), str(data), "--t", "10"], "diffusion models only"),
                      ([str(model_dir), str(tmp_path / "nodata")], "")]:
        capsys.readouterr()
        bad = tmp_path / "bad_out"
        assert main(["features", *args, "-o", str(bad), "--progress", "false"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("voxdiff: error:") and msg in err and len(err.strip().splitlines()) == 1
        assert not bad.exists()


def test_cli_diffusion_timesteps(tmp_path, diffusion_dir):
    data = _write_folder(tmp_path / "data", n=1)
    out = tmp_path / "feats"
    assert main(["features", str(diffusion_dir), str(data), "-o", str(out), "--t", "10", "50", "--levels", "1",
                 "--roi", "[40,36,20]", "--progress", "false"]) == 0
    index = json.loads((out / "features.json").read_text())
    pyr, meta = load_features(out / index["cases"][0]["file"])
    assert meta["t"] == [10, 50] and meta["model"]["method"] == "diffusion"
    assert len(pyr) == 1 and pyr[0].shape[1] == 2 * 8  # level 1 of a base-4 net, two timesteps


def test_cli_default_window_is_the_training_patch(tmp_path, model_dir, capsys):
    """Without --roi the windows are the model's training patch (16^3 here, saved in model.json)."""
    data = _write_folder(tmp_path / "data", n=1)
    out = tmp_path / "feats"
    assert main(["features", str(model_dir), str(data), "-o", str(out), "--progress", "false",
                 "--device", "auto"]) == 0
    index = json.loads((out / "features.json").read_text())
    _, meta = load_features(out / index["cases"][0]["file"])
    assert meta["settings"]["roi"] is None and meta["windows"]["window"] == [16, 16, 16]
    assert meta["windows"]["step"] == [8, 8, 8] and meta["windows"]["effective_overlap"] == [0.5, 0.5, 0.5]
    assert meta["device"] in ("cpu", "cuda:0")
    assert "windows of 16x16x16" in capsys.readouterr().out


def test_cli_fixed_norm_stats_written_shared_and_refused(tmp_path, model_dir, capsys):
    """``--norm_stats fixed``: statistics estimated on crops of evenly spaced cases, written beside the
    features and in their key; ``--norm_from`` gives a second data set the same normalisation, so a
    volume both sets hold gets the same features; bad statistics are refused before anything is written."""
    from voxdiff.features.norm import load_norm_stats, save_norm_stats

    data = _write_folder(tmp_path / "data", n=3)
    common = ["--roi", "[16,16,16]", "--levels", "0", "--progress", "false"]
    win, fixed = tmp_path / "win", tmp_path / "fixed"
    assert main(["features", str(model_dir), str(data), "-o", str(win), *common]) == 0
    assert main(["features", str(model_dir), str(data), "-o", str(fixed), *common,
                 "--norm_stats", "fixed", "--norm_cases", "2", "--norm_crops", "4"]) == 0
    assert not (win / "norm_stats.safetensors").exists()
    iw, ix = (json.loads((d / "features.json").read_text()) for d in (win, fixed))
    assert iw["norm_stats"] == {"mode": "window"}
    doc = ix["norm_stats"]
    assert doc["mode"] == "fixed" and doc["cases"] == "ct0,ct2" and doc["crops"] == 4 and doc["digest"]
    stats, meta = load_norm_stats(fixed)
    assert stats and meta["model_sha256"] == ix["model_sha256"] and meta["digest"] == doc["digest"]
    assert ix["key"] != iw["key"]
    fw, _ = load_features(win / "ct1.safetensors")
    fx, _ = load_features(fixed / "ct1.safetensors")
    assert fw[0].shape == fx[0].shape and (fw[0].float() - fx[0].float()).abs().max() > 1e-2

    # a second data set holding ct1 again: with the first run's statistics its features are the same
    other = tmp_path / "other"
    other.mkdir()
    (other / "ct1.nii.gz").write_bytes((data / "ct1.nii.gz").read_bytes())
    nib.save(nib.Nifti1Image(body_volume(99, (40, 36, 20)).astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0])),
             str(other / "zz.nii.gz"))
    shared, own = tmp_path / "shared", tmp_path / "own"
    assert main(["features", str(model_dir), str(other), "-o", str(shared), *common,
                 "--norm_stats", "fixed", "--norm_from", str(fixed)]) == 0
    assert main(["features", str(model_dir), str(other), "-o", str(own), *common,
                 "--norm_stats", "fixed", "--norm_crops", "4"]) == 0
    fs, _ = load_features(shared / "ct1.safetensors")
    fo, _ = load_features(own / "ct1.safetensors")
    torch.testing.assert_close(fs[0], fx[0])
    assert (fo[0].float() - fx[0].float()).abs().max() > 1e-3  # statistics of other crops: other features
    # a case the statistics were estimated on (loaded once, kept for its extraction) gets the features
    # that a run loading it afresh with the same statistics gives
    again = tmp_path / "again"
    assert main(["features", str(model_dir), str(data), "-o", str(again), *common, "--cases", "ct0",
                 "--norm_stats", "fixed", "--norm_from", str(fixed)]) == 0
    torch.testing.assert_close(load_features(again / "ct0.safetensors")[0][0], load_features(fixed / "ct0.safetensors")[0][0])
    js = json.loads((shared / "features.json").read_text())
    assert js["key"] == ix["key"] and js["norm_stats"]["crops"] == 4 and js["norm_stats"]["cases"] == "ct0,ct2"

    # refused, one line, nothing written
    foreign = tmp_path / "foreign.safetensors"
    save_norm_stats(foreign, stats, {"model_sha256": "0" * 64})
    renamed = tmp_path / "renamed.safetensors"
    save_norm_stats(renamed, {f"x{k}": v for k, v in stats.items()})
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    for extra, msg in [(["--norm_from", str(fixed)], "needs norm_stats fixed"),
                       (["--norm_stats", "fixed", "--norm_from", str(tmp_path / "none")], "missing"),
                       (["--norm_stats", "fixed", "--norm_from", str(damaged)], "unreadable"),
                       (["--norm_stats", "fixed", "--norm_from", str(foreign)], "another model"),
                       (["--norm_stats", "fixed", "--norm_from", str(renamed)], "do not fit"),
                       (["--norm_stats", "sometimes"], "norm_stats must be"),
                       (["--norm_stats", "fixed", "--norm_crops", "0"], "at least 1")]:
        capsys.readouterr()
        bad = tmp_path / "bad_out"
        assert main(["features", str(model_dir), str(data), "-o", str(bad), *common, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("voxdiff: error:") and msg in err and len(err.strip().splitlines()) == 1, err
        assert not bad.exists()


def test_cli_fixed_norm_stats_refused_for_a_backbone_without_groupnorm(tmp_path, capsys):
    """vox2vec's FPN with BatchNorm has no per-window statistics to fix: refused in one line, nothing written."""
    fpn = pretrain(small_cfg(backbone="fpn3d"), tmp_path / "fpn", cases=[make_case(0)], progress=False)
    data = _write_folder(tmp_path / "data", n=2)
    common = ["--roi", "[16,16,16]", "--levels", "0", "--progress", "false"]
    capsys.readouterr()
    bad = tmp_path / "bad_out"
    assert main(["features", str(fpn), str(data), "-o", str(bad), *common, "--norm_stats", "fixed", "--norm_crops", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("voxdiff: error:") and "no GroupNorm layers" in err and len(err.strip().splitlines()) == 1, err
    assert not bad.exists()
    assert main(["features", str(fpn), str(data), "-o", str(tmp_path / "ok"), *common]) == 0  # window statistics: fine
