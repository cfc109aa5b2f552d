"""Contrastive (vox2vec) pretext task: crops, positives, pyramid gathering, InfoNCE, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxdiff.pretrain.tasks import contrastive as ct
from voxdiff.pretrain.tasks.contrastive import ContrastiveTask

NO_AUG = {"window_prob": 0.0, "blur_prob": 0.0, "sharpen_prob": 0.0, "noise_prob": 0.0}


class FakeMeta:
    def __init__(self, affine):
        self.affine = affine


class FakeCase:
    def __init__(self, image, affine=None):
        self.image = image
        self.label = None
        self.meta = FakeMeta(np.diag([0.8, 0.8, 2.0, 1.0]) if affine is None else affine)


def index_volume(shape):
    """HU values = linear voxel index, so a crop's values say exactly where it came from."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_positives_of_known_crops_are_the_same_voxel():
    oa, ob, size = (0, 0, 0), (4, 2, -1), (8, 8, 4)
    ia, ib = ct.sample_positives(oa, ob, size, 1000, np.random.default_rng(0))
    assert len(ia) == 4 * 6 * 3  # the whole shared region when fewer voxels than asked
    np.testing.assert_array_equal(ia + np.array(oa), ib + np.array(ob))
    assert ia.min() >= 0 and ib.min() >= 0 and np.all(ia < size) and np.all(ib < size)
    assert len({tuple(v) for v in ia}) == len(ia)  # distinct voxels
    # with the volume shape the positives stay inside the real volume
    ia2, ib2 = ct.sample_positives(oa, ob, size, 1000, np.random.default_rng(0), shape=(20, 20, 20))
    assert (ia2 + np.array(oa))[:, 2].min() >= 0 and len(ia2) == 4 * 6 * 3
    with pytest.raises(ValueError):
        ct.sample_positives((0, 0, 0), (8, 0, 0), size, 10, np.random.default_rng(0))


def test_view_pairs_overlap_and_stay_in_volume():
    rng = np.random.default_rng(1)
    for _ in range(50):
        oa, ob = ct.sample_view_pair((40, 30, 20), (16, 16, 8), rng, max_shift=0.5)
        for a, b, s, n in zip(oa, ob, (16, 16, 8), (40, 30, 20)):
            assert abs(a - b) <= s // 2
            assert 0 <= a <= n - s and 0 <= b <= n - s


def test_batch_positives_are_the_same_physical_voxel():
    shape = (30, 26, 18)
    vol = index_volume(shape)
    affine = np.array([[0.0, -0.7, 0.0, 10.0], [0.9, 0.0, 0.0, -5.0], [0.0, 0.0, 2.5, 30.0], [0, 0, 0, 1]])
    cfg = {"preprocess": {"hu_window": [0.0, float(vol.size)]}, "n_pairs": 64, **NO_AUG}
    task = ContrastiveTask(cfg)
    b = task.sample_batch([FakeCase(vol, affine)], 3, (16, 16, 8), np.random.default_rng(2))
    assert b["image"].shape == b["image_b"].shape == (3, 1, 16, 16, 8)
    assert b["pos_a"].shape == b["pos_b"].shape == (3, 64, 3)
    assert not torch.equal(b["origin"], b["origin_b"])  # shifted crops (with this seed)
    for i in range(3):
        pa, pb = b["pos_a"][i], b["pos_b"][i]
        va = b["image"][i, 0][pa[:, 0], pa[:, 1], pa[:, 2]]
        vb = b["image_b"][i, 0][pb[:, 0], pb[:, 1], pb[:, 2]]
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6)  # same voxel value...
        ca = b["coords_mm"][i][:, pa[:, 0], pa[:, 1], pa[:, 2]]
        cb = b["coords_mm_b"][i][:, pb[:, 0], pb[:, 1], pb[:, 2]]
        torch.testing.assert_close(ca, cb, rtol=0, atol=1e-4)  # ...at the same point in mm
        # and it is the voxel of the volume the origins say
        vox = (pa + b["origin"][i]).numpy()
        expect = vol[vox[:, 0], vox[:, 1], vox[:, 2]] / vol.size
        np.testing.assert_allclose(va.numpy(), expect, atol=1e-6)
        # non-positive pairs (a voxel with another's partner) are different points
        assert not torch.allclose(ca, cb.roll(1, dims=1))


def test_augmentation_changes_views_but_is_seeded():
    vol = np.random.default_rng(0).normal(0, 300, (24, 24, 16)).astype(np.float32)
    task = ContrastiveTask({"n_pairs": 32})
    b1 = task.sample_batch([FakeCase(vol)], 2, (16, 16, 8), np.random.default_rng(5))
    b2 = task.sample_batch([FakeCase(vol)], 2, (16, 16, 8), np.random.default_rng(5))
    for k in b1:
        assert torch.equal(b1[k], b2[k]), k
    pa, pb = b1["pos_a"][0], b1["pos_b"][0]
    va = b1["image"][0, 0][pa[:, 0], pa[:, 1], pa[:, 2]]
    vb = b1["image_b"][0, 0][pb[:, 0], pb[:, 1], pb[:, 2]]
    assert not torch.allclose(va, vb)  # different augmentations of the same voxels


def test_gather_pyramid_reads_each_level_at_voxel_div_stride():
    g = torch.Generator().manual_seed(0)
    full = (8, 8, 4)
    pyr = [torch.randn(2, 3, 8, 8, 4, generator=g), torch.randn(2, 5, 4, 4, 2, generator=g),
           torch.randn(2, 2, 2, 2, 1, generator=g)]
    idx = torch.tensor([[[0, 0, 0], [7, 7, 3], [3, 5, 2]], [[1, 2, 3], [6, 1, 0], [4, 4, 1]]])
    out = ct.gather_pyramid(pyr, idx, full)
    assert out.shape == (2, 3, 10)
    for bi in range(2):
        for n in range(3):
            x, y, z = idx[bi, n].tolist()
            expect = torch.cat([pyr[0][bi, :, x, y, z], pyr[1][bi, :, x // 2, y // 2, z // 2],
                                pyr[2][bi, :, x // 4, y // 4, z // 4]])
            torch.testing.assert_close(out[bi, n], expect)


def test_info_nce_prefers_matching_pairs():
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)
    good, acc = ct.info_nce(z, z, 0.1)
    bad, _ = ct.info_nce(z, z.roll(1, 0), 0.1)
    assert float(acc) == 1.0 and good < bad
    assert good.item() >= 0


def _backbone(task, width=8, levels=2):
    from voxdiff.pretrain.backbone import Backbone

    net = Backbone(in_channels=task.in_channels, out_channels=task.out_channels, base_channels=width,
                   num_levels=levels, time_embedding=task.uses_timestep)
    task.setup(net)
    return net


def test_setup_sizes_projector_from_backbone_levels():
    task = ContrastiveTask({"proj_dim": 32})
    _backbone(task, width=4, levels=3)  # sizes the projector from the backbone's levels
    c = 4 + 8 + 16
    lin = [m for m in task.projector if isinstance(m, torch.nn.Linear)]
    bns = [m for m in task.projector if isinstance(m, torch.nn.BatchNorm1d)]
    # vox2vec's projector: C -> C -> C -> proj_dim, BatchNorm + ReLU after the first two layers
    assert [(m.in_features, m.out_features) for m in lin] == [(c, c), (c, c), (c, 32)]
    assert [m.num_features for m in bns] == [c, c]
    assert sum(isinstance(m, torch.nn.ReLU) for m in task.projector) == 2
    z = task.projector(torch.randn(10, c))
    assert z.shape == (10, 32)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(10))  # L2-normalised
    assert any(k.startswith("projector.") for k in task.state_dict())  # saved with the task


def test_contrastive_loss_decreases():
    from scipy import ndimage

    torch.manual_seed(0)
    rng0 = np.random.default_rng(0)
    cases = [FakeCase((ndimage.gaussian_filter(rng0.random((28, 28, 20)), 1.5) * 2000 - 1000).astype(np.float32))
             for _ in range(2)]
    task = ContrastiveTask({"n_pairs": 128, "preprocess": {"hu_window": [-400.0, 400.0]}})
    net = _backbone(task)
    params = list(net.parameters()) + list(task.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    fixed = task.sample_batch(cases, 2, (16, 16, 8), np.random.default_rng(99))
    with torch.no_grad():
        before, logs0 = task.loss(net, fixed, gen)
    assert 0 <= logs0["pos_acc"] <= 1 and logs0["pairs"] == 2 * 128
    rng = np.random.default_rng(1)
    for _ in range(80):
        loss, _ = task.loss(net, task.sample_batch(cases, 2, (16, 16, 8), rng), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after, logs1 = task.loss(net, fixed, gen)
    # (about 6.1 -> 5.0 here: finding the exact voxel among 256 in thin 16x16x8 crops is a hard task
    # for a tiny net; with identical crops the loss falls to ~0.2 within 40 steps)
    assert after.item() < 0.9 * before.item(), (before.item(), after.item())
    assert logs1["info_nce"] == pytest.approx(after.item())


@pytest.mark.parametrize("method,options", [("contrastive", {"n_pairs": 64}), ("restorative", {"shuffle_blocks": 50})])
def test_engine_trains_saves_and_reloads(tmp_path, method, options):
    """Through the real engine: a few steps, a backbone checkpoint that load_pretrained rebuilds
    (with the contrastive projector saved as part of the task)."""
    import json

    from pretrain_synth import synthetic_cases

    from voxdiff.core.checkpoint import load_checkpoint
    from voxdiff.core.config import from_dict
    from voxdiff.pretrain.load import load_pretrained
    from voxdiff.pretrain.train import PretrainConfig, pretrain

    cfg = from_dict(PretrainConfig, dict(method=method, patch_size=(16, 16, 16), batch_size=2, steps=3, base_channels=4,
                         num_levels=2, log_every=1, checkpoint_every=3, warmup_steps=1, bf16=False,
                         task_options=options))
    out = pretrain(cfg, tmp_path / method, cases=synthetic_cases(2, shape=(24, 24, 16)), progress=False)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logs and all(np.isfinite(r["loss"]) for r in logs if "loss" in r)
    ex = load_pretrained(out)
    assert ex.method == method
    pyr = ex(torch.rand(1, 1, 16, 16, 16))
    assert [tuple(f.shape[1:2]) for f in pyr] == [(4,), (8,)]
    tensors, _ = load_checkpoint(out / "backbone", kind="backbone")
    if method == "contrastive":
        w = tensors["task.projector.0.weight"]
        assert w.shape == (12, 12) and "task.projector.1.running_mean" in tensors
        torch.testing.assert_close(ex.task.projector[0].weight, w)
        assert ex.task.opts.n_pairs == 64
    else:
        assert ex.task.opts.shuffle_blocks == 50


def test_identical_views_are_learned_quickly():
    """Gradient flow through projector and backbone: with identical crops (no shift, no augmentation)
    the positives are trivially matchable and the loss must collapse."""
    torch.manual_seed(0)
    rng0 = np.random.default_rng(0)
    vol = (rng0.random((24, 24, 16)) * 800 - 400).astype(np.float32)
    task = ContrastiveTask({"n_pairs": 128, "max_shift": 0.0, **NO_AUG, "preprocess": {"hu_window": [-400.0, 400.0]}})
    net = _backbone(task)
    opt = torch.optim.Adam(list(net.parameters()) + list(task.parameters()), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    first = None
    for _ in range(30):
        batch = task.sample_batch([FakeCase(vol)], 2, (16, 16, 8), rng)
        assert torch.equal(batch["image"], batch["image_b"])
        loss, _ = task.loss(net, batch, gen)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first, (first, loss.item())


# ------------------------------------------------------------------------------ vox2vec's recipe


def body_phantom(shape=(40, 36, 20)):
    """Air around an elliptic body of soft tissue that holds an air pocket (a 'lung')."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = x ** 2 / 0.5 + y ** 2 / 0.4 < 1
    hu = np.where(inside, 40.0, -1000.0)
    pocket = (x - 0.1) ** 2 + y ** 2 < 0.04
    hu = np.where(pocket, -850.0, hu).astype(np.float32)
    return hu, inside, pocket


def test_body_mask_counts_inner_air_as_body_and_outer_air_not():
    hu, inside, pocket = body_phantom()
    m = ct.body_mask(hu, -500.0)
    np.testing.assert_array_equal(m, inside)
    assert m[pocket].all() and pocket.any()  # the lung-like pocket is body
    assert not m[0].any() and not m[:, 0].any()


@pytest.mark.parametrize("seed", range(4))
def test_positives_are_body_voxels_only(seed):
    hu, inside, _ = body_phantom()
    task = ContrastiveTask({"n_pairs": 256})
    b = task.sample_batch([FakeCase(hu, np.eye(4))], 4, (24, 24, 12), np.random.default_rng(seed))
    assert b["pos_valid"].any(1).all()
    for i in range(4):
        v = b["pos_valid"][i]
        vox = (b["pos_a"][i][v] + b["origin"][i]).numpy()
        assert inside[vox[:, 0], vox[:, 1], vox[:, 2]].all()
        np.testing.assert_array_equal(vox, (b["pos_b"][i][v] + b["origin_b"][i]).numpy())
        assert 0 < v.sum() <= 256
        # the crops overlapped in air too (the body fills about 60 % of each slice), yet no positive is air
    assert (~inside).sum() > 0


def test_crops_contain_the_anchor_and_stay_inside():
    rng = np.random.default_rng(0)
    shape, size = (40, 30, 20), (16, 16, 8)
    for _ in range(200):
        anchor = tuple(int(rng.integers(n)) for n in shape)
        oa, ob = ct.sample_view_pair(shape, size, rng, max_shift=1.0, anchor=anchor)
        for o in (oa, ob):
            for d in range(3):
                assert o[d] <= anchor[d] < o[d] + size[d]
                assert 0 <= o[d] <= shape[d] - size[d]


def test_hu_window_draw_stays_in_vox2vec_ranges():
    cfg = ct.ContrastiveConfig()
    lows, highs, default = [], [], 0
    for seed in range(3000):
        lo, hi = ct.draw_window(np.random.default_rng(seed), cfg, (-1350.0, 1000.0))
        if (lo, hi) == (-1350.0, 1000.0):
            default += 1
            continue
        lows.append(lo)
        highs.append(hi)
    lows, highs = np.array(lows), np.array(highs)
    assert lows.min() >= -1350 and lows.max() <= -1000
    assert highs.min() >= 300 and highs.max() <= 1000  # never down to soft-tissue levels as before
    assert lows.min() < -1330 and lows.max() > -1020 and highs.min() < 330 and highs.max() > 970  # whole range
    assert 0.15 < default / 3000 < 0.25  # random with probability 0.8


def test_augmented_view_uses_the_drawn_window():
    hu = np.full((16, 16, 8), 300.0, dtype=np.float32)
    cfg = ct.ContrastiveConfig(window_prob=1.0, noise_prob=0.0, blur_prob=0.0, sharpen_prob=0.0)
    for seed in range(20):
        v, rec = ct.augment_view_hu(hu, np.random.default_rng(seed), cfg)
        lo, hi = rec["window"]
        np.testing.assert_allclose(v, (300.0 - lo) / (hi - lo), atol=1e-6)


def test_noise_sd_is_at_most_30_hu():
    cfg = ct.ContrastiveConfig(window_prob=0.0, blur_prob=0.0, sharpen_prob=0.0, noise_prob=1.0)
    hu = np.zeros((32, 32, 16), dtype=np.float32)
    sds = []
    for seed in range(60):
        v, rec = ct.augment_view_hu(hu, np.random.default_rng(seed), cfg, window=(-1350.0, 1000.0))
        assert 0.0 <= rec["noise_sd"] <= 30.0
        sds.append(float((v * 2350.0 - 1350.0).std()))
    assert max(sds) < 31.0 and max(sds) > 20.0  # measured in HU on the view itself


def test_blur_and_sharpen_act_in_plane_only():
    z = np.arange(8, dtype=np.float32)
    along_z = np.broadcast_to(z * 100.0, (16, 16, 8)).copy()  # varies only along z
    along_x = np.broadcast_to((np.arange(16) % 2 * 400.0)[:, None, None], (16, 16, 8)).astype(np.float32)
    for kind in ("blur", "sharpen"):
        cfg = ct.ContrastiveConfig(window_prob=0.0, noise_prob=0.0, blur_prob=1.0 if kind == "blur" else 0.0,
                                   sharpen_prob=1.0 if kind == "sharpen" else 0.0)
        w = (-1350.0, 1000.0)
        vz, rz = ct.augment_view_hu(along_z, np.random.default_rng(0), cfg, spacing=(1.0, 1.0, 2.0), window=w)
        vx, _ = ct.augment_view_hu(along_x, np.random.default_rng(0), cfg, spacing=(1.0, 1.0, 2.0), window=w)
        assert rz["filter"] == kind
        np.testing.assert_allclose(vz, (along_z - w[0]) / (w[1] - w[0]), atol=1e-5)  # z untouched
        assert np.abs(vx - (along_x - w[0]) / (w[1] - w[0])).max() > 0.01  # x changed


def test_info_nce_same_view_negatives_match_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    za = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    zb = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    tau = 0.1
    loss, _ = ct.info_nce(za, zb, tau, same_view=True)

    def one_side(x, y):
        total = 0.0
        for i in range(5):
            cands = [float(x[i] @ y[j]) / tau for j in range(5)] + [float(x[i] @ x[j]) / tau for j in range(5) if j != i]
            total += -(float(x[i] @ y[i]) / tau) + float(np.log(np.sum(np.exp(cands))))
        return total / 5

    assert loss.item() == pytest.approx(0.5 * (one_side(za, zb) + one_side(zb, za)), rel=1e-5)
    other, _ = ct.info_nce(za, zb, tau, same_view=False)
    assert loss.item() > other.item()  # more negatives, larger loss


def test_masked_info_nce_equals_dropping_the_invalid_pairs():
    """The CUDA form (masks, data-independent shapes) and the CPU form (invalid pairs dropped, one
    logsumexp per candidate block) give the same loss, accuracy and gradients."""
    g = torch.Generator().manual_seed(2)
    za0 = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    zb0 = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    valid = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    for same_view in (True, False):
        grads = []
        outs = []
        for fn in (ct._info_nce_masked, ct.info_nce):
            za, zb = za0.clone().requires_grad_(), zb0.clone().requires_grad_()
            loss, acc = fn(za, zb, 0.1, same_view=same_view, valid=valid)
            loss.backward()
            outs.append((loss.detach(), acc))
            grads.append((za.grad, zb.grad))
        (masked, acc_m), (dropped, acc_d) = outs
        torch.testing.assert_close(masked, dropped)
        torch.testing.assert_close(acc_m, acc_d)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)
        assert torch.isfinite(masked)
        assert grads[1][0][~valid].abs().max() == 0  # dropped pairs take no part
        torch.testing.assert_close(dropped, ct.info_nce(za0[valid], zb0[valid], 0.1, same_view=same_view)[0])
    everything, _ = ct.info_nce(za0, zb0, 0.1, valid=torch.ones(12, dtype=torch.bool))
    torch.testing.assert_close(everything, ct._info_nce_masked(za0, zb0, 0.1)[0])
    none_valid, acc = ct.info_nce(za0, zb0, 0.1, valid=torch.zeros(12, dtype=torch.bool))
    assert none_valid.item() == 0.0 and acc.item() == 0.0


def test_models_with_the_earlier_projector_still_load():
    old = ContrastiveTask({"projector": "mlp", "feature_channels": 12})
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in old.projector)
    new = ContrastiveTask({"feature_channels": 12})
    new.load_state_dict(old.state_dict())
    torch.testing.assert_close(new.projector[0].weight, old.projector[0].weight)
    with pytest.raises(ValueError, match="projector"):
        ContrastiveTask({"projector": "simclr"})
