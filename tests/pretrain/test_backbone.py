"""Backbone: pyramid contract, timestep embedding, coordinate concatenation."""

import pytest
import torch

from voxdiff.pretrain.backbone import Backbone, LevelInfo, count_parameters


@pytest.mark.device
@pytest.mark.parametrize("levels,base", [(3, 8), (4, 8), (2, 4)])
def test_pyramid_shapes_and_strides(levels, base, test_device):
    net = Backbone(in_channels=2, out_channels=1, base_channels=base, num_levels=levels).to(test_device)
    x = torch.randn(2, 2, 16, 24, 32, device=test_device)
    pred, pyr = net(x, torch.tensor([0, 999], device=test_device))
    assert pred.shape == (2, 1, 16, 24, 32) and pred.device.type == test_device.type
    assert len(pyr) == len(net.levels) == levels
    for i, (f, lv) in enumerate(zip(pyr, net.levels)):
        assert isinstance(lv, LevelInfo) and lv.stride == 2 ** i and lv.name == f"level{i}"
        assert f.shape == (2, lv.channels, 16 // lv.stride, 24 // lv.stride, 32 // lv.stride)
    assert [lv.channels for lv in net.levels] == [base * 2 ** i for i in range(levels)]


@pytest.mark.device
def test_timestep_changes_features_and_null_embedding(test_device):
    torch.manual_seed(0)
    net = Backbone(1, 1, 8, 3)
    with torch.no_grad():  # make the FiLM layers matter
        for m in net.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, 0, 0.3)
        net.null_embedding.normal_()
    net.to(test_device)
    x = torch.randn(2, 1, 16, 16, 16).to(test_device)
    with torch.no_grad():
        a = net.features(x, t=5)[0]
        b = net.features(x, t=torch.tensor([500, 500], device=test_device))[0]
        c = net.features(x, t=None)[0]
        a2 = net.features(x, t=torch.tensor([5, 5], device=test_device))[0]
    assert torch.allclose(a, a2)
    assert not torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, c, atol=1e-4)


def test_without_time_embedding_t_is_ignored():
    net = Backbone(1, 1, 8, 2, time_embedding=False)
    assert not any("time" in n or "temb" in n for n, _ in net.named_parameters())
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(net.features(x, t=3)[0], net.features(x)[0])


def test_features_concatenates_coordinates():
    net = Backbone(in_channels=4, base_channels=4, num_levels=2)
    img, coords = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 3, 8, 8, 8)
    with torch.no_grad():
        f = net.features(img, coords, t=1)
        g = net(torch.cat([img, coords], 1), 1)[1]
    assert all(torch.equal(a, b) for a, b in zip(f, g))
    with pytest.raises(ValueError, match="input channels"):
        net.features(img)


def test_bad_sizes_are_refused():
    net = Backbone(1, 1, 4, 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        net(torch.randn(2, 1, 10, 8, 8), 1)


def test_config_rebuilds_the_same_network():
    net = Backbone(in_channels=2, out_channels=3, base_channels=4, num_levels=3, blocks_per_level=2)
    twin = Backbone(**net.config())
    twin.load_state_dict(net.state_dict())
    assert count_parameters(twin) == count_parameters(net)
    x = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x, 3)[0], twin(x, 3)[0])


@pytest.mark.device
def test_gradients_reach_every_level(test_device):
    net = Backbone(1, 1, 4, 3).to(test_device)
    pred, pyr = net(torch.randn(2, 1, 8, 8, 8, device=test_device), torch.tensor([1, 2], device=test_device))
    pred.pow(2).mean().backward()
    assert net.stem.weight.grad is not None and net.stem.weight.grad.abs().sum() > 0
    assert net.enc[2][0].conv1.weight.grad.abs().sum() > 0
    assert net.time_mlp[0].weight.grad.abs().sum() > 0
