"""The diffusion task: BPR conditioning, ``none`` ignoring coordinates, fixed feature noise."""

import numpy as np
import pytest
import torch
from pretrain_synth import StandInBPR, synthetic_cases

from voxdiff.core.errors import InputError
from voxdiff.pretrain.backbone import Backbone
from voxdiff.pretrain.diffusion import index_grid
from voxdiff.pretrain.tasks import get_task_class
from voxdiff.pretrain.tasks.diffusion import DiffusionTask

PRE = {"preprocess": {"hu_window": [-1350.0, 1000.0], "spacing": [1.0, 1.0, 2.0]}}


def _task(condition="ape", **kw):
    bpr = StandInBPR(condition) if condition != "none" else None
    return DiffusionTask(dict(PRE, condition=condition, diffusion_steps=100, **kw), bpr=bpr)


def test_registered_and_channels():
    assert get_task_class("diffusion") is DiffusionTask
    assert _task("none").in_channels == 1
    assert _task("slice").in_channels == 2
    assert _task("ape").in_channels == 4
    assert _task("ape", bpr_sincos=2).in_channels == 1 + 3 * (1 + 2 * 2)
    assert _task("ape").state_dict() == {}  # the frozen BPR stays out of the weights


def test_condition_needs_a_matching_bpr(tmp_path):
    with pytest.raises(InputError, match="body part regressor"):
        DiffusionTask(dict(PRE, condition="slice"))
    with pytest.raises(InputError, match="not found"):
        DiffusionTask(dict(PRE, condition="slice", bpr_path=str(tmp_path / "nope")))
    with pytest.raises(InputError, match="'ape' body part regressor"):
        DiffusionTask(dict(PRE, condition="slice"), bpr=StandInBPR("ape"))
    with pytest.raises(InputError, match="unknown condition"):
        DiffusionTask(dict(PRE, condition="xyz"))
    with pytest.raises(InputError, match="feature_timesteps"):
        DiffusionTask(dict(PRE, diffusion_steps=10, feature_timesteps=[10]))


def test_conditioning_changes_the_prediction():
    torch.manual_seed(0)
    task = _task("ape")
    net = Backbone(task.in_channels, 1, 8, 3)
    task.setup(net)
    img = torch.rand(2, 1, 16, 16, 16)
    (x, t), = task.feature_passes(img)
    assert x.shape[1] == 4
    cond = task.volume_condition(img)  # an image without coords is taken as a whole volume
    assert torch.equal(x[:, 1:], cond)
    with torch.no_grad():
        p1 = net(x, t)[0]
        p2 = net(torch.cat([x[:, :1], torch.rand_like(cond)], 1), t)[0]
        # passing a precomputed map is the same as computing it on the window
        (x3, _), = task.feature_passes(img, coords=cond)
    assert not torch.allclose(p1, p2, atol=1e-4)
    assert torch.equal(x3, x)


def test_none_ignores_coordinates():
    task = _task("none")
    img = torch.rand(2, 1, 16, 16, 16)
    (a, ta), = task.feature_passes(img)
    (b, tb), = task.feature_passes(img, coords=torch.rand(2, 3, 16, 16, 16))
    assert a.shape[1] == 1 and torch.equal(a, b) and torch.equal(ta, tb)
    # the training path is the same code: a batch with coordinates trains the 1-channel net
    net = Backbone(1, 1, 4, 2)
    batch = {"image": img, "coords_mm": torch.rand(2, 3, 16, 16, 16)}
    loss, _ = task.loss(net, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_feature_noise_is_fixed_and_window_consistent():
    task = _task("none", feature_timesteps=[20])
    img = torch.rand(1, 1, 24, 24, 16)
    (full, t), = task.feature_passes(img)
    (again, _), = task.feature_passes(img)
    assert torch.equal(full, again)
    o = (8, 4, 8)
    win = img[:, :, 8:24, 4:20, 8:16]
    (wx, _), = task.feature_passes(win, voxel_index=index_grid((16, 16, 8), o))
    assert torch.equal(wx, full[:, :, 8:24, 4:20, 8:16])
    # x_t really is noised: it differs from the clean image mapped to [-1, 1]
    assert (full - (img * 2 - 1)).abs().mean() > 0.01
    # other seed, other noise
    (other, _), = _task("none", feature_timesteps=[20], noise_seed=1).feature_passes(img)
    assert not torch.equal(other, full)


def test_several_feature_timesteps_give_several_passes():
    task = _task("slice", feature_timesteps=[5, 50])
    passes = task.feature_passes(torch.rand(2, 1, 8, 8, 8))
    assert [int(t[0]) for _, t in passes] == [5, 50]
    assert torch.equal(passes[0][0][:, 1:], passes[1][0][:, 1:])  # same condition
    assert not torch.equal(passes[0][0][:, :1], passes[1][0][:, :1])


def test_clean_feature_input_gives_every_pass_the_clean_image_with_its_timestep():
    img = torch.rand(1, 1, 16, 16, 8)
    noisy = _task("ape", feature_timesteps=[1, 60]).feature_passes(img)
    clean = _task("ape", feature_timesteps=[1, 60], feature_input="clean").feature_passes(img)
    assert [int(t[0]) for _, t in clean] == [1, 60]  # the timesteps (their embeddings) are kept
    for (x, _), (xn, _) in zip(clean, noisy):
        assert torch.equal(x[:, :1], img * 2 - 1)  # the image channel is x0 in the model's range
        assert torch.equal(x[:, 1:], xn[:, 1:])  # the condition is the same
    assert (noisy[1][0][:, :1] - (img * 2 - 1)).abs().mean() > 0.1  # the default pass at t = 60 of 100 is noised
    with pytest.raises(InputError, match="feature_input"):
        _task("none", feature_input="blurred")


def test_loss_reports_t_buckets_and_uses_the_generator():
    task = _task("ape")
    net = Backbone(task.in_channels, 1, 4, 2)
    batch = task.sample_batch(synthetic_cases(2), 4, (16, 16, 16), np.random.default_rng(0))
    assert batch["image"].shape == (4, 1, 16, 16, 16) and 0 <= float(batch["image"].min()) <= float(batch["image"].max()) <= 1
    l1, m1 = task.loss(net, batch, torch.Generator().manual_seed(3))
    l2, m2 = task.loss(net, batch, torch.Generator().manual_seed(3))
    l3, _ = task.loss(net, batch, torch.Generator().manual_seed(4))
    assert float(l1.detach()) == float(l2.detach()) != float(l3.detach())
    assert m1.keys() == m2.keys() and all(k.startswith("loss_t") for k in m1)
    assert all(torch.equal(m1[k]["sum"], m2[k]["sum"]) and torch.equal(m1[k]["count"], m2[k]["count"]) for k in m1)
    assert sum(int(v["count"]) for v in m1.values()) == 4
    # the bucket sums add up to the batch's loss
    assert float(sum(v["sum"] for v in m1.values())) / 4 == pytest.approx(float(l1.detach()), rel=1e-5)


def test_volume_condition_crops_the_whole_volume_map_at_each_patch(tmp_path):
    """Every training patch gets its volume's map at exactly its own voxels (padding included)."""
    import numpy as np

    from voxdiff.bpr.fields import case_fields
    from voxdiff.data.preprocess import hu_to_unit

    task = _task("ape")
    assert task.uses_volume_fields
    cases = synthetic_cases(2, shape=(24, 20, 12))  # z smaller than the patch: padded
    task.prepare(cases, cache_dir=tmp_path)
    assert len(list((tmp_path / "conditions").rglob("*.json"))) == 2
    fields = case_fields(task.bpr, cases)
    rng = np.random.default_rng(0)
    batch = task.sample_batch(cases, 6, (16, 16, 16), rng)
    assert batch["cond_profiles"].shape == (6, 3, 16) and "coords_mm" not in batch and "cond" not in batch
    cond = task.batch_condition(batch)  # the profiles expanded: each patch's crop of its volume's field
    assert cond.shape == (6, 3, 16, 16, 16)
    for b in range(6):
        ci, o = int(batch["case_index"][b]), [int(v) for v in batch["origin"][b]]
        assert o[2] < 0  # the patch reaches outside the volume along z
        np.testing.assert_array_equal(cond[b].numpy(), fields[ci].crop(o, (16, 16, 16)))
        # the image voxels at the same indices
        inside = tuple(slice(max(0, v), v + 16) for v in o)
        sub = hu_to_unit(cases[ci].image[inside], task.hu_window)
        got = batch["image"][b, 0].numpy()[tuple(slice(max(0, -v), max(0, -v) + n) for v, n in zip(o, sub.shape))]
        np.testing.assert_array_equal(got, sub)
    # the loss uses the cropped maps, not a per-patch BPR pass
    net = Backbone(task.in_channels, 1, 4, 2, time_embedding=True)
    task.setup(net)
    seen = []
    real = net.forward
    net.forward = lambda x, t: (seen.append(x[:, 1:].clone()), real(x, t))[1]
    task.loss(net, batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen[0], cond)


def test_patch_condition_source_is_kept_as_an_option():
    import numpy as np

    task = _task("ape", condition_source="patch")
    assert not task.uses_volume_fields
    batch = task.sample_batch(synthetic_cases(1, shape=(24, 20, 20)), 2, (16, 16, 16), np.random.default_rng(0))
    assert "cond" not in batch and task.batch_condition(batch) is None
    with pytest.raises(InputError, match="condition_source"):
        _task("ape", condition_source="window")


def test_fields_of_other_cases_are_never_used():
    import numpy as np

    task = _task("ape")
    task.prepare(synthetic_cases(2, shape=(24, 20, 20)))
    other = synthetic_cases(2, shape=(28, 20, 20))
    batch = task.sample_batch(other, 3, (16, 16, 16), np.random.default_rng(0))
    assert all(f.shape == (28, 20, 20) for f in task._fields)
    assert task.batch_condition(batch).shape == (3, 3, 16, 16, 16)


class _Recorder(torch.nn.Module):
    """A backbone that records its input and predicts zeros (with a parameter for the loss)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t):
        self.seen.append(x.detach().clone())
        return x[:, :1] * self.w, None


def test_condition_dropout_zeroes_the_condition_of_some_samples_only():
    img = torch.rand(64, 1, 8, 8, 8)
    cond = torch.rand(64, 3, 8, 8, 8) + 0.5
    net = _Recorder()
    _task("ape", condition_dropout=0.5).loss(net, {"image": img, "cond": cond}, torch.Generator().manual_seed(0))
    seen = net.seen[-1][:, 1:]
    dropped = (seen.flatten(1) == 0).all(1)
    kept = torch.isclose(seen, cond).flatten(1).all(1)
    assert bool((dropped | kept).all()) and 16 < int(dropped.sum()) < 48
    # off (the default): the condition reaches the network untouched, and the random stream is unchanged
    net0, net1 = _Recorder(), _Recorder()
    l0, _ = _task("ape").loss(net0, {"image": img, "cond": cond}, torch.Generator().manual_seed(0))
    l1, _ = _task("ape", condition_dropout=0.0).loss(net1, {"image": img, "cond": cond}, torch.Generator().manual_seed(0))
    assert torch.equal(net0.seen[-1][:, 1:], cond) and torch.equal(l0, l1)
    with pytest.raises(InputError, match="condition_dropout"):
        _task("ape", condition_dropout=1.0)


def test_min_snr_gamma_reweights_the_loss_by_timestep():
    img = torch.rand(64, 1, 8, 8, 8)
    plain, _ = _task("none").loss(_Recorder(), {"image": img}, torch.Generator().manual_seed(1))
    task = _task("none", min_snr_gamma=5.0)
    weighted, _ = task.loss(_Recorder(), {"image": img}, torch.Generator().manual_seed(1))
    # the same t and noise were drawn: recompute the weighted mean from the per-sample errors
    g = torch.Generator().manual_seed(1)
    t = task.process.sample_timesteps(64, g)
    noise = torch.randn(img.shape, generator=g)
    per = (noise ** 2).flatten(1).mean(1)  # the recorder predicts 0 for epsilon
    assert torch.allclose(plain, per.mean())
    assert torch.allclose(weighted, (per * task.process.min_snr_weight(t, 5.0)).mean())
    assert (task.process.min_snr_weight(t, 5.0) < 1).any()  # low-noise samples were weighted down
    assert not torch.allclose(plain, weighted)
    with pytest.raises(InputError, match="min_snr_gamma"):
        _task("none", min_snr_gamma=-1)


def test_skip_masks_scale_each_samples_encoder_skips_only_inside_the_block():
    net = Backbone(in_channels=1, out_channels=1, base_channels=8, num_levels=3).eval()
    x, t = torch.randn(2, 1, 16, 16, 16), torch.tensor([3, 3])
    with torch.no_grad():
        ref, _ = net(x, t)
        with net.skip_masks([torch.ones(2), torch.ones(2)]):
            same, _ = net(x, t)
        with net.skip_masks([torch.tensor([1.0, 0.0]), torch.ones(2)]):
            dropped, _ = net(x, t)
        after, _ = net(x, t)
    assert torch.equal(ref, same) and torch.equal(ref, after)
    assert torch.equal(dropped[0], ref[0]) and not torch.allclose(dropped[1], ref[1], atol=1e-3)
    with pytest.raises(ValueError, match="skip masks"):
        with net.skip_masks([torch.ones(2)]):
            pass
    from voxdiff.pretrain import FPN3d

    with pytest.raises(ValueError, match="no skip connections"):
        with FPN3d(in_channels=1, out_channels=1, base_channels=8, num_levels=3).skip_masks([]):
            pass


def test_skip_dropout_drops_skips_of_some_training_samples():
    img = torch.rand(8, 1, 16, 16, 16)
    net = Backbone(in_channels=1, out_channels=1, base_channels=8, num_levels=3)
    seen: list[list[torch.Tensor]] = []
    real = net.skip_masks

    def spy(keep):
        seen.append([k.clone() for k in keep])
        return real(keep)

    net.skip_masks = spy  # type: ignore[method-assign]
    task = _task("none", skip_dropout=0.5)
    task.setup(net)
    loss, _ = task.loss(net, {"image": img}, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and len(seen) == 1 and len(seen[0]) == net.num_skips == 2
    keep = torch.stack(seen[0])
    assert set(keep.unique().tolist()) == {0.0, 1.0}  # some skips dropped, some kept
    plain, _ = _task("none").loss(net, {"image": img}, torch.Generator().manual_seed(0))
    assert not torch.isclose(loss, plain)  # the same noise and t, another network output
    with pytest.raises(InputError, match="skip_dropout"):
        _task("none", skip_dropout=1.0)
    from voxdiff.pretrain import FPN3d

    with pytest.raises(InputError, match="skip connections"):
        _task("none", skip_dropout=0.3).setup(FPN3d(in_channels=1, out_channels=1, base_channels=8, num_levels=3))


def test_position_condition_needs_no_bpr_and_gives_each_patch_its_volumes_position():
    """``position``: two channels, x and y in mm (over POSITION_UNIT_MM) about the volume's centre,
    cropped at each patch's voxels like a BPR field, and the same map for whole-volume features."""
    from voxdiff.pretrain.tasks.diffusion import POSITION_UNIT_MM, position_field

    task = DiffusionTask(dict(PRE, condition="position", diffusion_steps=100))
    assert task.bpr is None and task.in_channels == 3 and task.uses_volume_fields
    assert DiffusionTask(dict(PRE, condition="position", bpr_sincos=1)).in_channels == 1 + 2 * 3
    cases = synthetic_cases(2, shape=(24, 20, 12))
    task.prepare(cases)
    batch = task.sample_batch(cases, 4, (16, 16, 16), np.random.default_rng(0))
    cond = task.batch_condition(batch)
    assert cond.shape == (4, 2, 16, 16, 16)
    for b in range(4):
        c = cases[int(batch["case_index"][b])]
        o = [int(v) for v in batch["origin"][b]]
        sp = c.meta.spacing
        x = (np.arange(o[0], o[0] + 16) - (c.image.shape[0] - 1) / 2.0) * sp[0] / POSITION_UNIT_MM
        y = (np.arange(o[1], o[1] + 16) - (c.image.shape[1] - 1) / 2.0) * sp[1] / POSITION_UNIT_MM
        np.testing.assert_allclose(cond[b, 0, :, 0, 0].numpy(), x, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cond[b, 1, 0, :, 0].numpy(), y, rtol=1e-5, atol=1e-6)
        assert float(cond[b, 0].std(dim=(1, 2)).max()) == 0.0  # channel 0 varies along x only
    # whole-volume features: the map of the unpadded volume, continued over the padding
    img = torch.rand(1, 1, 24, 20, 12)
    vol = task.volume_condition(img, (32, 24, 16))
    np.testing.assert_allclose(vol[0].numpy(), position_field((24, 20, 12), (1.0, 1.0, 2.0)).crop((0, 0, 0), (32, 24, 16)),
                               rtol=1e-6)
    (x_in, _), = task.feature_passes(img)
    assert x_in.shape[1] == 3
    loss, _ = task.loss(Backbone(3, 1, 4, 2, time_embedding=True), batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    with pytest.raises(InputError, match="whole volumes"):
        DiffusionTask(dict(PRE, condition="position", condition_source="patch"))
    with pytest.raises(InputError, match="spacing"):
        DiffusionTask({"condition": "position"}).volume_condition(img)
