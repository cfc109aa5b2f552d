"""Fixed normalisation statistics (voxdiff.features.norm): a GroupNorm with its statistics fixed
beforehand, estimated on random crops, and what it buys: features that do not depend on what else
the window holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from voxdiff.features.norm import (
    FixedGroupNorm,
    estimate_norm_stats,
    fix_group_norms,
    fixed_norm_stats,
    measure_group_norms,
    norm_stats_of,
    stats_digest,
    stats_from_tensors,
    stats_tensors,
    unfix_group_norms,
    with_norm_stats,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _gn(groups: int = 4, ch: int = 8) -> nn.GroupNorm:
    torch.manual_seed(0)
    gn = nn.GroupNorm(groups, ch)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    return gn


def test_fixed_group_norm_is_the_group_norm_of_an_input_with_those_statistics():
    gn = _gn()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, 6, 5, 4, generator=g) * 3 + 2
    stats = measure_group_norms(gn, lambda: gn(x))[""]
    fixed = FixedGroupNorm(gn, *stats)
    torch.testing.assert_close(fixed(x), gn(x), atol=1e-5, rtol=1e-5)
    # another input keeps the first one's statistics, where GroupNorm takes its own
    y = torch.randn(1, 8, 6, 5, 4, generator=g) * 0.5 - 1
    want = (y.view(1, 4, -1) - stats[0].view(1, 4, 1)) / torch.sqrt(stats[1].view(1, 4, 1) + gn.eps)
    want = want.view_as(y) * gn.weight.view(1, 8, 1, 1, 1) + gn.bias.view(1, 8, 1, 1, 1)
    torch.testing.assert_close(fixed(y), want, atol=1e-5, rtol=1e-5)
    assert (fixed(y) - gn(y)).abs().max() > 0.5
    # the affine parameters are the GroupNorm's own tensors; the statistics are not in the state dict
    assert fixed.weight is gn.weight and set(fixed.state_dict()) == {"weight", "bias"}
    with pytest.raises(ValueError, match="4 groups"):
        FixedGroupNorm(gn, torch.zeros(8), torch.ones(8))


def test_statistics_average_over_inputs():
    gn = _gn(2, 4)
    a, b = torch.randn(2, 4, 3, 3, 3), torch.randn(1, 4, 3, 3, 3) + 5

    def run():
        gn(a)
        gn(b)

    mean, var = measure_group_norms(gn, run)[""]
    xs = torch.cat([a, b]).view(3, 2, -1)
    torch.testing.assert_close(mean, xs.mean(-1).mean(0))
    torch.testing.assert_close(var, ((xs * xs).mean(-1).mean(0) - xs.mean(-1).mean(0) ** 2), atol=1e-5, rtol=1e-5)


def _net():
    from voxdiff.pretrain.backbone import Backbone

    torch.manual_seed(0)
    return Backbone(in_channels=1, base_channels=8, num_levels=3).eval()


def test_fix_and_unfix_round_trip_and_refuse_other_statistics():
    net = _net()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        ref = net.pyramid(x)[0]
        stats = measure_group_norms(net, lambda: net.pyramid(x))
    n_gn = sum(isinstance(m, nn.GroupNorm) for m in net.modules())
    keys = set(net.state_dict())
    assert "out_norm" not in stats and len(stats) == n_gn - 1  # the denoising head's norm: not on the pyramid's path
    assert fix_group_norms(net, stats) == len(stats)
    assert isinstance(net.out_norm, nn.GroupNorm)
    assert set(net.state_dict()) == keys  # checkpoints keep their keys
    with torch.no_grad():  # on the input they were measured on, the fixed statistics are that input's own
        torch.testing.assert_close(net.pyramid(x)[0], ref, atol=1e-4, rtol=1e-4)
    got = fixed_norm_stats(net)
    assert set(got) == set(stats) and all(torch.equal(got[k][0], stats[k][0]) for k in stats)
    assert unfix_group_norms(net) == len(stats) and fixed_norm_stats(net) is None
    assert all(not isinstance(m, FixedGroupNorm) for m in net.modules())
    first = next(iter(stats))
    with pytest.raises(ValueError, match="does not have"):
        fix_group_norms(net, {**stats, "nowhere.norm": stats[first]})
    with pytest.raises(ValueError, match="groups"):
        fix_group_norms(net, {**stats, first: (torch.zeros(3), torch.ones(3))})
    assert fixed_norm_stats(net) is None  # nothing half-replaced
    torch.testing.assert_close(stats_from_tensors(stats_tensors(stats))[next(iter(stats))][1], stats[next(iter(stats))][1])
    with pytest.raises(ValueError, match="incomplete"):
        stats_from_tensors({"a.mean": torch.zeros(2)})


def test_fixed_statistics_make_a_voxels_features_independent_of_the_rest_of_the_window():
    """Two 64^3 windows that differ only in a bright block in one corner, outside the receptive field
    of the centre (voxels 9..54 along each axis for this network): with each window's own statistics
    the centre's features change with the block; with fixed statistics they are exactly the same."""
    net = _net()
    g = torch.Generator().manual_seed(3)
    plain = torch.rand(1, 1, 64, 64, 64, generator=g) * 0.2 + 0.3
    block = plain.clone()
    block[..., :8, :8, :8] = 1.0
    centre = (slice(None), slice(None)) + (slice(30, 34),) * 3

    def gap() -> float:
        with torch.no_grad():
            a, b = net.pyramid(plain)[0][centre], net.pyramid(block)[0][centre]
        return float((a - b).abs().max() / b.abs().max())

    own = gap()
    with torch.no_grad():
        stats = measure_group_norms(net, lambda: net.pyramid(plain))
    fix_group_norms(net, stats)
    assert own > 0.01 and gap() < 1e-6


class _Ext:
    """A random real Backbone with the extractor call contract, counting its calls."""

    def __init__(self):
        self.backbone = _net()
        self.patch_size = (16, 16, 16)
        self.calls = 0  # crops seen
        self.passes = 0  # forward calls (batches of crops)

    def __call__(self, x, voxel_index=None, coords=None):
        self.calls += x.shape[0]
        self.passes += 1
        assert voxel_index is not None and voxel_index.shape == (x.shape[0], 3, *x.shape[2:])
        with torch.no_grad():
            return self.backbone.pyramid(x)


class _CondExt(_Ext):
    """Its condition map is each voxel's own index (continued over the padding it is asked for), so a
    crop's coordinates must equal the crop's absolute voxel indices."""

    def condition_map(self, x, size=None):
        size = tuple(size or x.shape[2:])
        assert all(s >= d for s, d in zip(size, x.shape[2:]))
        g = torch.stack(torch.meshgrid(*[torch.arange(s) for s in size], indexing="ij"), 0)
        return g[None].float()

    def __call__(self, x, voxel_index=None, coords=None):
        assert coords is not None and torch.equal(coords, voxel_index.float())
        return super().__call__(x, voxel_index, coords)


def test_crops_get_the_volumes_condition_map_at_their_own_voxels():
    ext = _CondExt()
    g = torch.Generator().manual_seed(0)
    vols = [torch.rand(20, 24, 12, generator=g).numpy(), torch.rand(10, 30, 16, generator=g).numpy()]  # shorter than a crop too
    assert estimate_norm_stats(ext, vols, n=6, seed=1) and ext.calls == 6
    assert estimate_norm_stats(ext, vols, n=6, seed=1, batch=1) and ext.calls == 12


def test_crops_in_batches_give_the_statistics_of_crops_one_by_one():
    """Statistics are per crop: how many crops share a forward pass changes only the speed (the crops
    are the same ones, in the same order), and by default a pass takes as many as fit in 2^20 voxels."""
    ext = _CondExt()
    g = torch.Generator().manual_seed(4)
    vols = [torch.rand(20, 24, 12, generator=g).numpy(), torch.rand(30, 18, 20, generator=g).numpy()]
    one = estimate_norm_stats(ext, vols, n=7, seed=5, batch=1)
    assert ext.passes == 7
    for batch, passes in ((3, 3), (None, 1)):  # 7 crops of 16^3 fit in one default pass
        ext.passes = 0
        got = estimate_norm_stats(ext, vols, n=7, seed=5, batch=batch)
        assert ext.passes == passes and set(got) == set(one)
        for k in one:
            torch.testing.assert_close(got[k][0], one[k][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[k][1], one[k][1], atol=1e-5, rtol=1e-5)
    other = estimate_norm_stats(ext, vols, n=7, seed=6, batch=3)  # other crops: other statistics
    assert max(float((other[k][0] - one[k][0]).abs().max()) for k in one) > 1e-3
    with pytest.raises(ValueError, match="batch must be at least 1"):
        estimate_norm_stats(ext, vols, n=2, batch=0)


def test_estimates_are_deterministic_leave_the_random_state_and_are_kept_per_source():
    ext = _Ext()
    g = torch.Generator().manual_seed(0)
    vols = [torch.rand(20, 24, 12, generator=g).numpy(), torch.rand(16, 16, 16, generator=g).numpy()]
    torch.manual_seed(7)
    s1 = estimate_norm_stats(ext, vols, n=6, seed=2)
    after = torch.rand(1)
    torch.manual_seed(7)
    s2 = estimate_norm_stats(ext, vols, n=6, seed=2)
    assert torch.equal(torch.rand(1), after)  # the global random state is as it was
    assert stats_digest(s1) == stats_digest(s2) != stats_digest(estimate_norm_stats(ext, vols, n=6, seed=3))
    assert ext.calls == 18 and stats_digest(None) is None
    # with_norm_stats: fixed once per (cases, crops, seed); window restores GroupNorm
    ext.calls = 0
    with_norm_stats(ext, "fixed", lambda: vols, n=4, seed=0, key="a")
    assert norm_stats_of(ext) == "fixed" and ext.calls == 4
    with_norm_stats(ext, "fixed", lambda: vols, n=4, seed=0, key="a")
    assert ext.calls == 4
    with_norm_stats(ext, "fixed", lambda: vols, n=4, seed=1, key="a")
    assert ext.calls == 8
    with_norm_stats(ext, "window", vols)
    assert norm_stats_of(ext) == "window"
    with pytest.raises(ValueError, match="norm_stats must be one of"):
        with_norm_stats(ext, "batch", vols)
    with pytest.raises(ValueError, match="at least one volume"):
        estimate_norm_stats(ext, [], n=2)
    bare = object()  # an extractor without a backbone: window is a no-op, fixed is refused
    assert with_norm_stats(bare, "window", vols) is bare
    with pytest.raises(ValueError, match="backbone module"):
        with_norm_stats(bare, "fixed", vols)
