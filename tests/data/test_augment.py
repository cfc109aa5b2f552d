"""Deformed copies of labelled cases (voxdiff.data.augment) and the probe's ``sampling.deformed_copies``."""

import numpy as np
import pytest

from voxdiff.core.errors import InputError
from voxdiff.data.augment import Deformation, deformed_copies, with_deformed_copies
from voxdiff.data.types import Case, CaseMeta


def _case(case_id="a", shape=(40, 36, 24)):
    """Air around a body; two box organs whose HU encode their labels (100 * label), so that image and
    label of a copy can be checked against each other."""
    img = np.full(shape, -1000.0, np.float32)
    img[4:-4, 4:-4, :] = 0.0
    lab = np.zeros(shape, np.uint8)
    lab[10:22, 8:20, 6:16] = 6
    lab[24:32, 18:28, 8:18] = 2
    img[lab > 0] = 100.0 * lab[lab > 0]
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    return Case(img, lab, CaseMeta(case_id, None, None, shape, aff, aff, (3.0, 3.0, 3.0)))


def test_copies_are_deterministic_and_copy_i_does_not_depend_on_the_count():
    c = _case()
    a = deformed_copies(c, 3, seed=7)
    b = deformed_copies(c, 2, seed=7)
    for x, y in zip(a[:2], b):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.label, y.label)
    assert [x.case_id for x in a] == ["a-def0", "a-def1", "a-def2"]
    assert a[0].meta.extra["deformed_from"] == "a"
    # another seed or another case id: other copies
    assert not np.array_equal(deformed_copies(c, 1, seed=8)[0].label, a[0].label)
    assert not np.array_equal(deformed_copies(_case("b"), 1, seed=7)[0].label, a[0].label)


def test_a_copy_is_deformed_and_its_label_moves_with_its_image():
    c = _case()
    for cp in deformed_copies(c, 4, seed=0):
        assert cp.image.shape == c.image.shape and cp.label.shape == c.label.shape
        assert cp.label.dtype == np.uint8 and set(np.unique(cp.label)) <= {0, 2, 6}
        assert not np.array_equal(cp.label, c.label)
        # inside each organ (away from its edge, where linear and nearest resampling differ) the image
        # carries the organ's own value: image and label were deformed by the same transform
        for k in (2, 6):
            inside = cp.label == k
            vals = cp.image[inside]
            assert inside.sum() > 0.5 * (c.label == k).sum()
            assert np.mean(np.abs(vals - 100.0 * k) < 1.0) > 0.5
        # voxels pulled in from outside repeat the border (air), never a water-like 0 HU frame
        assert cp.image[0].max() <= -999.0


def test_no_deformation_returns_the_case_itself():
    c = _case()
    cp = deformed_copies(c, 1, seed=3, deformation=Deformation(rotate_deg=0.0, scale=(0.0, 0.0, 0.0),
                                                                shift=(0.0, 0.0, 0.0)))[0]
    np.testing.assert_allclose(cp.image, c.image, atol=1e-3)
    np.testing.assert_array_equal(cp.label, c.label)


def test_with_deformed_copies_appends_n_per_case_and_refuses_bad_input():
    cases = [_case("a"), _case("b")]
    assert with_deformed_copies(cases, 0, 0) == cases
    out = with_deformed_copies(cases, 2, 0)
    assert [c.case_id for c in out] == ["a", "b", "a-def0", "a-def1", "b-def0", "b-def1"]
    unlabelled = Case(cases[0].image, None, cases[0].meta)
    with pytest.raises(InputError, match="no label"):
        deformed_copies(unlabelled, 1, 0)
    with pytest.raises(InputError):
        deformed_copies(cases[0], -1, 0)


def test_probe_config_adds_the_copies_to_the_training_cases_only():
    from voxdiff.probe.train import ProbeConfig, ProbeSampling, training_cases

    cases = [_case("a"), _case("b")]
    cfg = ProbeConfig(sampling=ProbeSampling(deformed_copies=3), seed=5)
    out = training_cases(cases, cfg)
    assert len(out) == 8 and out[:2] == cases
    np.testing.assert_array_equal(out[2].label, deformed_copies(cases[0], 1, seed=5)[0].label)
    assert training_cases(cases, ProbeConfig()) == cases
    with pytest.raises(InputError, match="deformed_copies"):
        ProbeSampling(deformed_copies=-1)


def test_fov_crops_are_deterministic_crops_with_their_labels():
    from voxdiff.data.augment import fov_crops

    c = _case("a")
    crops = fov_crops(c, 6, seed=1)
    assert [x.case_id for x in crops] == [f"a-fov{i}" for i in range(6)]
    assert [x.image.shape for x in fov_crops(c, 3, seed=1)] == [x.image.shape for x in crops[:3]]  # crop i fixed
    assert [x.image.shape for x in fov_crops(c, 6, seed=2)] != [x.image.shape for x in crops]
    for x in crops:
        sx, sy, sz = x.image.shape
        assert 32 <= sx <= 40 and 29 <= sy <= 36 and 12 <= sz <= 24
        i, j, k = x.meta.extra["crop_start"]
        np.testing.assert_array_equal(x.image, c.image[i:i + sx, j:j + sy, k:k + sz])
        np.testing.assert_array_equal(x.label, c.label[i:i + sx, j:j + sy, k:k + sz])
    assert len({x.image.shape for x in crops}) > 1
    with pytest.raises(InputError, match="no label"):
        fov_crops(Case(c.image, None, c.meta), 1, 0)
    with pytest.raises(InputError, match="fractions"):
        fov_crops(c, 1, 0, z_min=0.0)


def test_probe_config_adds_fov_crops_for_frozen_heads_only():
    from voxdiff.probe.train import ProbeConfig, ProbeSampling, training_cases

    cases = [_case("a"), _case("b")]
    cfg = ProbeConfig(sampling=ProbeSampling(deformed_copies=1, fov_crops=2), seed=5)
    out = training_cases(cases, cfg)
    assert [c.case_id for c in out] == ["a", "b", "a-def0", "b-def0", "a-fov0", "a-fov1", "b-fov0", "b-fov1"]
    assert [c.case_id for c in training_cases(cases, cfg, crops=False)] == ["a", "b", "a-def0", "b-def0"]
    with pytest.raises(InputError, match="fov_crops"):
        ProbeSampling(fov_crops=-2)
