"""Restorative (Models Genesis) pretext task: the distortions and the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxdiff.pretrain.tasks import genesis_transforms as gt
from voxdiff.pretrain.tasks.restorative import RestorativeConfig, RestorativeTask


def smooth_volume(shape=(24, 24, 16), seed=0) -> np.ndarray:
    """A smooth random volume in [0, 1] with distinct values."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.random(shape), 2.0)
    v = (v - v.min()) / (v.max() - v.min())
    return v.astype(np.float32)


# ------------------------------------------------------------------------------ transforms


@pytest.mark.parametrize("seed", range(5))
def test_bezier_transform_is_monotonic_and_flip_reverses_order(seed):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.random(2000).astype(np.float32))
    pts = gt.bezier_control_points(rng)
    y = gt.nonlinear_intensity(x, pts)
    assert np.all(np.diff(y) >= 0), "curve must be non-decreasing"
    assert y.min() >= 0 and y.max() <= 1
    assert gt.nonlinear_intensity(np.array([0.0, 1.0]), pts).tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    yf = gt.nonlinear_intensity(x, pts, flip=True)
    assert np.all(np.diff(yf) <= 0), "flipped curve must be non-increasing"
    np.testing.assert_allclose(yf, 1.0 - y, atol=1e-6)


def test_bezier_worst_case_control_points_stay_monotonic():
    for inner in ([1, 0], [0, 1]), ([1, 1], [0, 0]), ([0.9, 0.0], [0.1, 1.0]):
        pts = np.array([[0, 0], inner[0], inner[1], [1, 1]], dtype=float)
        xs, ys = gt.bezier_curve(pts)
        assert np.all(np.diff(xs) >= 0) and np.all(np.diff(ys) >= 0)


def test_bezier_is_not_identity():
    pts = np.array([[0, 0], [0.1, 0.8], [0.3, 0.95], [1, 1]])
    x = np.linspace(0, 1, 11, dtype=np.float32)
    y = gt.nonlinear_intensity(x, pts)
    assert np.abs(y - x).max() > 0.1


def test_local_shuffle_keeps_window_multisets_and_outside():
    img = smooth_volume()
    rng = np.random.default_rng(1)
    boxes = [((0, 4), (0, 4), (0, 4)), ((10, 13), (5, 9), (2, 4)), ((20, 24), (20, 24), (12, 16))]
    out = gt.local_shuffle(img, boxes, rng)
    assert out is not img and np.array_equal(img, smooth_volume())  # input untouched
    mask = gt.box_mask(img.shape, boxes)
    np.testing.assert_array_equal(out[~mask], img[~mask])
    for box in boxes:
        sl = tuple(slice(a, b) for a, b in box)
        np.testing.assert_array_equal(np.sort(out[sl], axis=None), np.sort(img[sl], axis=None))
    assert not np.array_equal(out[mask], img[mask]), "windows must actually be permuted"


def test_inpaint_changes_only_the_boxes():
    img = smooth_volume()
    boxes = gt.sample_inpaint_boxes(img.shape, np.random.default_rng(3), max_boxes=3)
    out = gt.inpaint(img, boxes, np.random.default_rng(4))
    mask = gt.box_mask(img.shape, boxes)
    assert 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(out[~mask], img[~mask])
    assert np.mean(out[mask] != img[mask]) > 0.99
    assert out.min() >= 0 and out.max() <= 1


def test_outpaint_keeps_only_the_boxes():
    img = smooth_volume()
    boxes = gt.sample_outpaint_boxes(img.shape, np.random.default_rng(5), max_boxes=2)
    out = gt.outpaint(img, boxes, np.random.default_rng(6))
    mask = gt.box_mask(img.shape, boxes)
    assert 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(out[mask], img[mask])
    assert np.mean(out[~mask] != img[~mask]) > 0.99


def test_boxes_lie_inside_the_patch():
    rng = np.random.default_rng(0)
    shape = (16, 20, 8)
    for boxes in (gt.sample_inpaint_boxes(shape, rng), gt.sample_outpaint_boxes(shape, rng),
                  gt.sample_shuffle_boxes(shape, rng, 50, 6)):
        for box in boxes:
            for (a, b), n in zip(box, shape):
                assert 0 <= a < b <= n


def test_genesis_distort_is_seeded_and_records_what_it_did():
    img = smooth_volume()
    cfg = RestorativeConfig(shuffle_prob=1.0, nonlinear_prob=1.0, paint_prob=1.0, inpaint_prob=1.0)
    a, ra = gt.genesis_distort(img, np.random.default_rng(7), cfg)
    b, rb = gt.genesis_distort(img, np.random.default_rng(7), cfg)
    c, _ = gt.genesis_distort(img, np.random.default_rng(8), cfg)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert ra["paint"] == "inpaint" and ra["curve"] is not None
    assert len(ra["shuffle_boxes"]) == gt.genesis_shuffle_count(img.shape)
    # outside the in-painted boxes the result is the intensity curve of the shuffled image: in
    # particular, voxels outside every box (shuffle or paint) equal curve(original)
    touched = gt.box_mask(img.shape, list(ra["shuffle_boxes"]) + ra["paint_boxes"])
    expect = gt.nonlinear_intensity(img, ra["curve"], flip=ra["flip"])
    assert (~touched).sum() > 0
    np.testing.assert_allclose(a[~touched], expect[~touched], atol=1e-6)
    # nothing applied when all probabilities are 0
    none_cfg = RestorativeConfig(shuffle_prob=0.0, nonlinear_prob=0.0, paint_prob=0.0)
    same, rec = gt.genesis_distort(img, np.random.default_rng(0), none_cfg)
    np.testing.assert_array_equal(same, img)
    assert rec["paint"] is None and rec["curve"] is None


def test_outpaint_branch_probability():
    img = smooth_volume((12, 12, 8))
    cfg = RestorativeConfig(shuffle_prob=0.0, nonlinear_prob=0.0, paint_prob=1.0, inpaint_prob=0.0)
    _, rec = gt.genesis_distort(img, np.random.default_rng(0), cfg)
    assert rec["paint"] == "outpaint"
    mask = gt.box_mask(img.shape, rec["paint_boxes"])
    np.testing.assert_array_equal(_[mask], img[mask])


# ------------------------------------------------------------------------------ task + loss


def tiny_backbone(task):
    from voxdiff.pretrain.backbone import Backbone

    net = Backbone(in_channels=task.in_channels, out_channels=task.out_channels, base_channels=8, num_levels=2,
                   time_embedding=task.uses_timestep)
    task.setup(net)
    return net


UNIT = {"preprocess": {"hu_window": [0.0, 1.0]}}  # test volumes are already in [0, 1]


class FakeMeta:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])


class FakeCase:
    def __init__(self, image):
        self.image = image
        self.label = None
        self.meta = FakeMeta()


def test_sample_batch_shapes_and_seed():
    task = RestorativeTask(UNIT)
    cases = [FakeCase(smooth_volume((30, 28, 20), s)) for s in range(2)]
    b1 = task.sample_batch(cases, 3, (16, 16, 8), np.random.default_rng(0))
    b2 = task.sample_batch(cases, 3, (16, 16, 8), np.random.default_rng(0))
    assert b1["image"].shape == b1["input"].shape == (3, 1, 16, 16, 8)
    assert b1["coords_mm"].shape == (3, 3, 16, 16, 8)
    assert torch.equal(b1["input"], b2["input"]) and torch.equal(b1["image"], b2["image"])
    assert not torch.equal(b1["input"], b1["image"])


def test_restorative_loss_decreases():
    torch.manual_seed(0)
    task = RestorativeTask(UNIT)
    net = tiny_backbone(task)
    cases = [FakeCase(smooth_volume((32, 32, 24), s)) for s in range(3)]
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(list(net.parameters()) + list(task.parameters()), lr=3e-3)
    fixed = task.sample_batch(cases, 4, (16, 16, 16), np.random.default_rng(123))
    with torch.no_grad():
        before = task.loss(net, fixed, gen)[0].item()
    for _ in range(60):
        loss, logs = task.loss(net, task.sample_batch(cases, 2, (16, 16, 16), rng), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert set(logs) >= {"mse", "mse_identity"}
    with torch.no_grad():
        after = task.loss(net, fixed, gen)[0].item()
    assert after < 0.5 * before, (before, after)


def test_loss_distorts_when_batch_has_no_input():
    task = RestorativeTask({"restorative": {"paint_prob": 1.0}})
    assert task.opts.paint_prob == 1.0
    net = tiny_backbone(task)
    batch = {"image": torch.from_numpy(smooth_volume((16, 16, 8)))[None, None]}
    loss, logs = task.loss(net, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and logs["mse_identity"] > 0


def test_config_dict_flat_and_unknown_keys():
    task = RestorativeTask({"preprocess": {"hu_window": [-1000, 400]}, "shuffle_prob": 0.25})
    assert task.opts.shuffle_prob == 0.25 and task.hu_window == (-1000.0, 400.0)
    with pytest.raises(ValueError, match="unknown"):
        RestorativeTask({"shuffle_probability": 0.1})


def test_hu_cases_are_windowed():
    task = RestorativeTask({"preprocess": {"hu_window": [-1000, 1000]}})
    hu = np.full((20, 20, 20), 0.0, dtype=np.float32)
    b = task.sample_batch([FakeCase(hu)], 1, (16, 16, 16), np.random.default_rng(0))
    assert torch.allclose(b["image"], torch.full_like(b["image"], 0.5))


# ------------------------------------------------------------------------------ Models Genesis' sizes


def test_shuffle_windows_follow_models_genesis_and_scale_with_the_patch():
    # their patch: 10,000 windows of 1..6 x 1..6 x 1..3 voxels (side // 10)
    assert gt.genesis_shuffle_count((64, 64, 32)) == 10000
    assert gt.shuffle_window_max((64, 64, 32)) == (6, 6, 3)
    # ours (cpu-small 32^3): windows of 1..3 per axis, as many as visit each voxel as often on average
    assert gt.shuffle_window_max((32, 32, 32)) == (3, 3, 3)
    n = gt.genesis_shuffle_count((32, 32, 32))
    ref = 10000 * 3.5 * 3.5 * 2.0 / (64 * 64 * 32)
    assert n * 2.0 ** 3 / 32 ** 3 == pytest.approx(ref, rel=1e-3)
    rng = np.random.default_rng(0)
    starts, sizes = gt.sample_shuffle_windows((32, 32, 32), rng, n)
    assert starts.shape == sizes.shape == (n, 3)
    assert sizes.min() == 1 and sizes.max() == 3 and set(np.unique(sizes)) == {1, 2, 3}
    assert (starts >= 0).all() and (starts + sizes <= 32).all()
    # a distortion with the defaults uses exactly that many windows
    cfg = RestorativeConfig(shuffle_prob=1.0, nonlinear_prob=0.0, paint_prob=0.0)
    _, rec = gt.genesis_distort(smooth_volume((32, 32, 32)), np.random.default_rng(1), cfg)
    assert len(rec["shuffle_boxes"]) == n
    assert max(b - a for box in rec["shuffle_boxes"] for a, b in box) == 3


def test_overlapping_windows_take_original_values_and_the_last_window_wins():
    img = smooth_volume((20, 20, 12))
    rng = np.random.default_rng(2)
    starts, sizes = gt.sample_shuffle_windows(img.shape, rng, 600, 4)
    out = gt.local_shuffle(img, (starts, sizes), rng)
    boxes = [tuple((int(a), int(a + s)) for a, s in zip(st, sz)) for st, sz in zip(starts, sizes)]
    last = np.full(img.shape, -1)
    for i, box in enumerate(boxes):
        last[tuple(slice(a, b) for a, b in box)] = i
    np.testing.assert_array_equal(out[last < 0], img[last < 0])
    for i in np.unique(last[last >= 0])[::7]:
        box = boxes[i]
        sl = tuple(slice(a, b) for a, b in box)
        won = last[sl] == i
        # every voxel this window won holds an original value of the window, no value twice
        vals = out[sl][won]
        assert np.isin(vals, img[sl]).all()
        assert len(np.unique(vals)) == len(vals)
    # a window that no later one overlaps holds exactly its original multiset
    free = [i for i, box in enumerate(boxes) if (last[tuple(slice(a, b) for a, b in box)] == i).all()]
    assert free
    for i in free[:20]:
        sl = tuple(slice(a, b) for a, b in boxes[i])
        np.testing.assert_array_equal(np.sort(out[sl], axis=None), np.sort(img[sl], axis=None))
    # seeded
    again = gt.local_shuffle(img, (starts, sizes), np.random.default_rng(5))
    assert np.array_equal(again, gt.local_shuffle(img, (starts, sizes), np.random.default_rng(5)))


def test_painting_box_counts_follow_models_genesis():
    shape = (32, 32, 32)
    rng = np.random.default_rng(0)
    n_in = [len(gt.sample_inpaint_boxes(shape, rng)) for _ in range(4000)]
    n_out = [len(gt.sample_outpaint_boxes(shape, rng)) for _ in range(4000)]
    assert min(n_in) == 0 and max(n_in) == 5 and 0.02 < np.mean(np.array(n_in) == 0) < 0.08  # 1 - 0.95
    assert min(n_out) == 1 and max(n_out) == 5
    assert np.mean(np.array(n_out) == 5) == pytest.approx(0.95 ** 4, abs=0.03)
    for box in gt.sample_inpaint_boxes(shape, np.random.default_rng(3), continue_prob=1.0):
        for a, b in box:
            assert 3 <= a and b <= 29 and 5 <= b - a <= 11  # 3 voxels off the faces; 1/6..1/3 of 32
