"""benchmarks/one_label_views.py: the perturbed copies keep image and label aligned, the crops are
crops, and the table reads the per-run results."""

import numpy as np
from standin import load_benchmark

from voxdiff.data.types import Case, CaseMeta


def _case(shape=(20, 18, 16)):
    img = np.full(shape, -1000.0, np.float32)
    lab = np.zeros(shape, np.uint8)
    img[5:15, 4:14, 3:13] = 40.0  # an organ
    lab[5:15, 4:14, 3:13] = 6
    meta = CaseMeta("p0", None, None, shape, np.eye(4), np.eye(4), (3.0, 3.0, 3.0))
    return Case(img, lab, meta)


def test_perturbed_copies_keep_image_and_label_aligned():
    olv = load_benchmark("one_label_views")
    c = _case()
    vs = {v.case_id.split("-", 1)[1]: v for v in olv.perturbations(c)}
    assert list(vs) == ["same", "hu+30", "z+4", "z+8", "xy*0.9", "xy*1.1"]
    assert np.array_equal(vs["same"].label, c.label) and c.case_id == "p0"  # the original is untouched
    np.testing.assert_allclose(vs["hu+30"].image - c.image, 30.0)
    z4 = vs["z+4"]
    assert np.array_equal(z4.label[:, :, :12], c.label[:, :, 4:]) and not z4.label[:, :, 12:].any()
    assert (z4.image[:, :, 12:] == -1000.0).all()
    for k, f in (("xy*0.9", 0.9), ("xy*1.1", 1.1)):
        v = vs[k]
        assert v.image.shape == v.label.shape == (round(20 * f), round(18 * f), 16)
        organ = v.label == 6  # the organ's voxels carry the organ's intensity
        assert abs(organ.sum() / (c.label == 6).sum() - f * f) < 0.15
        assert (v.image[organ] > -500).mean() > 0.95  # the same voxel grid for both


def test_fov_views_are_crops_of_the_phantom():
    olv = load_benchmark("one_label_views")
    c = _case()
    views = olv.fov_views(c, 6, np.random.default_rng(0), z_min=0.5, xy_min=0.8)
    assert len(views) == 6 and len({v.case_id for v in views}) == 6
    for v in views:
        sx, sy, sz = v.image.shape
        assert 16 <= sx <= 20 and 14 <= sy <= 18 and 8 <= sz <= 16
        # the crop's content is found in the phantom at some offset
        hits = [(i, j, k) for i in range(20 - sx + 1) for j in range(18 - sy + 1) for k in range(16 - sz + 1)
                if np.array_equal(c.label[i:i + sx, j:j + sy, k:k + sz], v.label)
                and np.array_equal(c.image[i:i + sx, j:j + sy, k:k + sz], v.image)]
        assert hits
    assert len({v.image.shape for v in views}) > 1  # not one fixed box
    scaled = olv.fov_views(c, 8, np.random.default_rng(0), z_min=1.0, xy_min=1.0, scale=0.3)
    sizes = {v.image.shape[:2] for v in scaled}
    assert len(sizes) > 2 and all(v.image.shape[2] == 16 and v.label.shape == v.image.shape for v in scaled)
    assert min(s[0] for s in sizes) < 20 < max(s[0] for s in sizes)  # smaller and larger bodies


def test_mean_dice_and_table():
    olv = load_benchmark("one_label_views")
    assert olv.mean_dice({"a": {"1": 0.5, "2": None, "3": float("nan"), "4": 1.0}}) == {"a": 75.0}
    own = {f"p0-{k}": 50.0 for k in ("same", "hu+30", "z+4", "z+8", "xy*0.9", "xy*1.1")}
    own["p0-z+8"] = 12.3
    res = {"seed-0-scratch": {"seed": 0, "row": "scratch", "views": 0, "own": own, "val": {"v": 40.0},
                              "test_mean": 33.3}}
    res["seed-0-c"] = dict(res["seed-0-scratch"], row="contrastive", views=64, scale=0.15, head_steps=2400,
                           probe={"feature_side": "both"})
    res["seed-0-scratch-labels2"] = dict(res["seed-0-scratch"], labels=2, test_mean=44.4)
    res["seed-0-d-mix"] = dict(res["seed-0-scratch"], row="diffusion-ape", head="mix", views=64, test_mean=55.5)
    t = olv.table(res)
    assert "| 0 | 1 | diffusion-ape, mix head | 64 |" in t and t.count("| 55.5 |") == 1
    assert "| 0 | 1 | scratch |  | 50.0 | 50.0 | 50.0 | 12.3 | 50.0 | 50.0 | 40.0 | 33.3 |" in t  # (older files: 1)
    assert "| 0 | 1 | contrastive, scale ±0.15, 2400 head steps, feature_side both | 64 | 50.0 |" in t
    assert "| 0 | 2 | scratch |  | 50.0 |" in t and t.count("| 44.4 |") == 1
    assert t.splitlines()[1].count("|") == t.splitlines()[2].count("|")  # the rule has every column


def test_test_time_crops_are_pasted_where_they_were_cut():
    """With features that depend on each voxel alone, every crop predicts what the whole volume does at
    its voxels, so the averaged softmax gives the same labels and Dice: a crop pasted at the wrong
    offset would not."""
    import torch
    from standin import StandinExtractor, two_organ_case

    from voxdiff.evaluate.metrics import dice_per_class
    from voxdiff.probe.predict import logits_to_labels, unit_image
    from voxdiff.probe.train import ProbeConfig
    from voxdiff.probe.voxel import predict_logits_volume

    olv = load_benchmark("one_label_views")
    class Extractor(StandinExtractor):  # the whole-volume path passes window indices
        def __call__(self, image_unit, voxel_index=None, coords=None):
            return self.backbone(image_unit)

    ext = Extractor(channels=(4, 8), pointwise=True)
    case = two_organ_case(3)
    unit = unit_image(case, ext.preprocess.hu_window)
    f0 = ext(torch.as_tensor(unit)[None, None])[0][0, 0]
    lab = torch.as_tensor(case.label)
    thr = 0.5 * (float(f0[lab == 6].mean()) + float(f0[lab == 0].mean()))
    sign = 1.0 if float(f0[lab == 6].mean()) > thr else -1.0

    class Threshold(torch.nn.Module):  # organ 6 where the first feature passes the threshold
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.tensor(20.0 * sign))

        def forward(self, pyr, out_size=None):
            f = pyr[0][:, :1]
            logits = torch.zeros(f.shape[0], 14, *f.shape[2:])
            logits[:, 6:7] = self.gain * (f - thr)
            return logits

    head = Threshold()
    cfg = ProbeConfig()
    cfg.inference.feature_roi = (64, 64, 64)
    plain = logits_to_labels(predict_logits_volume(ext, {"h": head}, unit, cfg)["h"])
    assert dice_per_class(plain, case.label, 14)[6] > 0.6  # the threshold finds the organ
    whole, crops = olv.tta_scores(ext, head, [case], cfg, 6, seed=0, z_min=0.5, xy_min=0.6)
    expected = {str(c): v for c, v in dice_per_class(plain, case.label, 14).items()}
    np.testing.assert_equal(crops[case.case_id], expected)
    np.testing.assert_equal(whole[case.case_id], expected)  # the plain scores of the same pass


def test_coordinate_jitter_shifts_the_training_crops_maps_only():
    import torch

    from voxdiff.probe.predict import unit_image

    olv = load_benchmark("one_label_views")
    c = _case()
    c.image[2:18, 2:16, 1:15] += np.linspace(0, 50, 16 * 14 * 14, dtype=np.float32).reshape(16, 14, 14)  # distinct crops

    class Ext:
        class bpr:
            mm_per_unit = 100.0

        class preprocess:
            hu_window = (-1350.0, 1000.0)

        def condition_map(self, x, size=None):
            return torch.zeros(1, 3, *x.shape[-3:])

    ext = Ext()
    crops = olv.fov_views(c, 4, np.random.default_rng(0))
    offs = olv.jitter_crop_conditions(ext, crops, (25.0, 10.0), np.random.default_rng(1))
    assert len(offs) == 4
    for v in crops:
        m = ext.condition_map(torch.as_tensor(unit_image(v, Ext.preprocess.hu_window))[None, None])
        shift = m[0, :, 0, 0, 0]
        assert torch.equal(m, shift.view(1, 3, 1, 1, 1).expand_as(m))  # one offset for the whole crop
        assert abs(float(shift[2])) <= 0.25 and max(abs(float(shift[0])), abs(float(shift[1]))) <= 0.1
        assert float(shift.abs().sum()) > 0
    assert len({tuple(ext.condition_map(torch.as_tensor(unit_image(v, (-1350.0, 1000.0)))[None, None])[0, :, 0, 0, 0].tolist())
                 for v in crops}) == 4  # each crop its own draw
    whole = ext.condition_map(torch.as_tensor(unit_image(c, (-1350.0, 1000.0)))[None, None])
    assert float(whole.abs().max()) == 0.0  # the phantom itself (and any other volume) keeps its map
    assert ext.jitter_hits["n"] == 8
