"""Whole-volume coordinate fields: computed once, cached, cropped exactly for every patch."""

import json

import numpy as np
import pytest
import torch
from bpr_helpers import z_textured_case

from voxdiff.bpr.fields import (
    CoordinateField,
    FieldCache,
    case_fields,
    crop_fields,
    crop_profiles,
    expand_profiles,
    model_signature,
    volume_field,
)
from voxdiff.bpr.inference import infer_volume
from voxdiff.bpr.models import build_bpr

PRE = {"spacing": [3.0, 3.0, 3.0], "hu_window": [-1350.0, 1000.0]}


def _model(kind, seed=0):
    torch.manual_seed(seed)
    arch = {"channels": (4, 4, 4), "patch_size": (16, 16, 16)} if kind == "ape" else \
        {"channels": (4, 4), "patch_size": (16, 16, 1)}
    m = build_bpr(kind, arch, PRE)
    for mod in m.modules():  # a random model with outputs that depend on the input
        if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            mod.running_mean.uniform_(0.0, 0.5)
    return m.eval()


@pytest.mark.parametrize("kind", ["ape", "slice"])
def test_field_equals_whole_volume_inference(kind):
    case = z_textured_case(1, shape=(40, 32, 48))
    m = _model(kind)
    f = volume_field(m, case.image, case.meta.spacing)
    from voxdiff.data.preprocess import hu_to_unit

    ref = infer_volume(m, hu_to_unit(case.image, PRE["hu_window"]))
    np.testing.assert_allclose(f.dense(), ref, rtol=1e-5, atol=1e-5)


def test_field_at_another_spacing_is_the_same_physical_map():
    """A volume at 1.5 mm gets (nearly) the map of the same anatomy at the model's 3 mm."""
    m = _model("ape")
    case = z_textured_case(2, shape=(40, 32, 48))  # 3 mm
    fine = torch.nn.functional.interpolate(torch.from_numpy(case.image)[None, None], scale_factor=2,
                                           mode="trilinear", align_corners=False)[0, 0].numpy()
    f3 = volume_field(m, case.image, (3.0, 3.0, 3.0))
    f15 = volume_field(m, fine, (1.5, 1.5, 1.5))
    # voxel i at 3 mm is the centre of voxels 2i, 2i+1 at 1.5 mm
    for c in range(3):
        a = f3.profiles[c]
        b = 0.5 * (f15.profiles[c][0::2] + f15.profiles[c][1::2])
        np.testing.assert_allclose(a, b, atol=1e-4)
    # distances are physical: one 3 mm voxel = 3 / mm_per_unit units
    step = np.diff(f15.profiles[2]).mean()
    assert step == pytest.approx(1.5 / m.mm_per_unit, rel=1e-6)


def test_crop_matches_the_dense_map_and_extends_it_linearly_outside():
    f = CoordinateField((5, 4, 6), (0, 1, 2), (np.arange(5) * 2.0, np.arange(4) * -1.0 + 3, np.linspace(0, 1, 6)))
    d = f.dense()
    assert d.shape == (3, 5, 4, 6)
    np.testing.assert_array_equal(f.crop((1, 2, 3), (3, 2, 3)), d[:, 1:4, 2:4, 3:6])
    out = f.crop((-2, 0, 4), (9, 4, 4))  # beyond both ends of x, past the end of z
    np.testing.assert_allclose(out[0, :, 0, 0], np.arange(-2, 7) * 2.0)
    np.testing.assert_allclose(out[2, 0, 0, :], np.arange(4, 8) * 0.2)
    # a slice-like field: one channel along z
    s = CoordinateField((2, 2, 3), (2,), (np.array([0.0, 1.0, 4.0]),))
    np.testing.assert_allclose(s.crop((0, 0, -1), (1, 1, 5))[0, 0, 0], [-2.0, 0.0, 1.0, 4.0, 6.0])
    with pytest.raises(ValueError):
        CoordinateField((5, 4, 6), (0,), (np.zeros(4),))


def test_cache_returns_the_fresh_field_and_is_invalidated_by_weights_and_preprocessing(tmp_path):
    case = z_textured_case(3)
    m = _model("ape")
    cache = FieldCache(tmp_path, m)
    f1 = cache.get(case.image, case.meta.affine, case.meta.spacing)
    files = list((tmp_path / "conditions").rglob("*.json"))
    assert len(files) == 1
    fresh = volume_field(m, case.image, case.meta.spacing)
    np.testing.assert_array_equal(f1.dense(), fresh.dense())
    # read back from disk: equal, and not recomputed (a marker in the file survives)
    doc = json.loads(files[0].read_text())
    doc["marker"] = 1
    files[0].write_text(json.dumps(doc))
    f2 = FieldCache(tmp_path, m).get(case.image, case.meta.affine, case.meta.spacing)
    np.testing.assert_array_equal(f2.dense(), fresh.dense())
    assert json.loads(files[0].read_text())["marker"] == 1
    # new weights: another signature, another folder
    m2 = _model("ape", seed=1)
    assert model_signature(m2) != model_signature(m)
    FieldCache(tmp_path, m2).get(case.image, case.meta.affine, case.meta.spacing)
    # other preprocessing (spacing / voxels / grid): another entry
    FieldCache(tmp_path, m).get(case.image, case.meta.affine, (2.0, 3.0, 3.0))
    FieldCache(tmp_path, m).get(case.image + 1.0, case.meta.affine, case.meta.spacing)
    shifted = case.meta.affine.copy()
    shifted[0, 3] += 5
    FieldCache(tmp_path, m).get(case.image, shifted, case.meta.spacing)
    assert len(list((tmp_path / "conditions").rglob("*.json"))) == 5
    # a damaged entry is recomputed, never trusted
    files[0].write_text("{not json")
    f3 = FieldCache(tmp_path, m).get(case.image, case.meta.affine, case.meta.spacing)
    np.testing.assert_array_equal(f3.dense(), fresh.dense())
    assert json.loads(files[0].read_text())["format"] == "voxdiff-bpr-field"


def test_case_fields_and_batch_crops():
    cases = [z_textured_case(s, shape=(24, 20, 28)) for s in range(2)]
    m = _model("slice")
    fields = case_fields(m, cases)
    batch = crop_fields(fields, [1, 0], [(0, 0, 0), (-3, 2, 20)], (8, 8, 12), sincos=1)
    assert batch.shape == (2, 3, 8, 8, 12)  # 1 channel + sin + cos
    np.testing.assert_allclose(batch[0, 0].numpy(), fields[1].dense()[0, :8, :8, :12], rtol=1e-6)
    np.testing.assert_allclose(batch[1, 0].numpy(), fields[0].crop((-3, 2, 20), (8, 8, 12))[0], rtol=1e-6)


def test_profiles_expand_to_the_dense_crops():
    """A batch's field crops sent as 1D profiles expand to exactly the dense crops, inside and
    outside the volume, for one-axis (slice) and three-axis (ape) fields, with sin/cos too."""
    rng = np.random.default_rng(0)
    shape = (24, 20, 28)
    three = [CoordinateField(shape, (0, 1, 2), tuple(rng.normal(size=n).cumsum() for n in shape)) for _ in range(2)]
    one = [CoordinateField(shape, (2,), (rng.normal(size=28).cumsum(),)) for _ in range(2)]
    origins = [(0, 0, 0), (-3, 2, 20), (20, -5, -4)]
    for fields in (three, one):
        for sincos in (0, 2):
            dense = crop_fields(fields, [1, 0, 1], origins, (8, 16, 12), sincos=sincos)
            prof, axes = crop_profiles(fields, [1, 0, 1], origins, (8, 16, 12))
            assert prof.shape == (3, len(fields[0].axes), 16) and prof.nbytes < dense.nbytes / 50
            torch.testing.assert_close(expand_profiles(prof, axes, (8, 16, 12), sincos=sincos), dense, rtol=0, atol=0)
    mixed = [three[0], CoordinateField(shape, (2, 1, 0), tuple(rng.normal(size=shape[a]) for a in (2, 1, 0)))]
    with pytest.raises(ValueError, match="axes"):
        crop_profiles(mixed, [0, 1], origins[:2], (8, 8, 8))


def test_dense_head_ape_models_have_no_field():
    from voxdiff.core.errors import ModelError

    m = build_bpr("ape", {"channels": (4, 4, 4), "patch_size": (16, 16, 16), "head": "dense"}, PRE).eval()
    with pytest.raises(ModelError, match="dense head"):
        volume_field(m, z_textured_case(0).image, (3.0, 3.0, 3.0))
