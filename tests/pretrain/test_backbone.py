"""Backbones: the pyramid contract, timestep embedding, coordinate concatenation, the registry
(unet, fpn3d) and vox2vec's FPN3d layout."""

import pytest
import torch

from voxdiff.core.errors import InputError
from voxdiff.pretrain.backbone import Backbone, LevelInfo, count_parameters
from voxdiff.pretrain.backbones import BACKBONES, FPN3d, PyramidBackbone, backbone_name, build_backbone


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


# ---------------------------------------------------------------------------------------------
# the interface and the registry (unet and vox2vec's fpn3d)

@pytest.mark.parametrize("name", ["unet", "fpn3d"])
def test_both_backbones_honour_the_interface(name):
    net = build_backbone(name, in_channels=2, out_channels=3, base_channels=4, num_levels=3, blocks_per_level=2)
    assert isinstance(net, PyramidBackbone) and type(net) is BACKBONES[name] and backbone_name(net) == name
    assert net.in_channels == 2 and net.out_channels == 3
    assert net.strides == [1, 2, 4] and net.divisor == 4
    assert [lv.channels for lv in net.levels] == [4, 8, 16]
    x = torch.randn(2, 2, 16, 8, 12)
    with torch.no_grad():
        pred, pyr = net(x, torch.tensor([3, 40]))
        assert all(torch.equal(a, b) for a, b in zip(pyr, net.pyramid(x, torch.tensor([3, 40]))))
    assert pred.shape == (2, 3, 16, 8, 12)
    assert [tuple(f.shape) for f in pyr] == [(2, 4, 16, 8, 12), (2, 8, 8, 4, 6), (2, 16, 4, 2, 3)]
    with pytest.raises(ValueError, match="multiple of 4"):
        net.pyramid(torch.randn(2, 2, 16, 8, 10))
    with pytest.raises(ValueError, match="expected input"):
        net.pyramid(torch.randn(2, 1, 16, 8, 12))
    # config() + the name rebuild the same network
    twin = build_backbone(name, **net.config())
    twin.load_state_dict(net.state_dict())
    net.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(net(x, 7)[0], twin(x, 7)[0])


def test_plain_objects_are_not_backbones():
    assert not isinstance(torch.nn.Conv3d(1, 1, 1), PyramidBackbone)
    with pytest.raises(TypeError, match="not a registered backbone"):
        backbone_name(torch.nn.Conv3d(1, 1, 1))


def test_unknown_backbone_is_one_line_input_error():
    with pytest.raises(InputError) as e:
        build_backbone("resnet50", in_channels=1)
    msg = str(e.value)
    assert "\n" not in msg and "unknown backbone 'resnet50'" in msg and "fpn3d" in msg and "unet" in msg


def test_fpn3d_has_vox2vec_size_and_layout():
    # vox2vec's FPN3d(in_channels=1, base_channels=16, num_scales=6) has 47,624,448 parameters; ours adds
    # a 49-parameter head (BatchNorm 16 + 1x1x1 conv 16->1) and, optionally, the timestep embedding
    with torch.device("meta"):
        net = FPN3d(time_embedding=False)
        with_t = FPN3d()
    assert net.config()["num_levels"] == 6 and net.config()["blocks_per_level"] == 2
    assert [lv.channels for lv in net.levels] == [16, 32, 64, 128, 256, 512]
    assert sum(lv.channels for lv in net.levels) == 1008
    assert count_parameters(net) == 47_624_448 + 49
    assert 0 < count_parameters(with_t) - count_parameters(net) < 0.01 * count_parameters(net)
    norms = {type(m) for m in net.modules() if "Norm" in type(m).__name__}
    assert norms == {torch.nn.BatchNorm3d}
    assert all(len(stack) == 2 for stack in list(net.encoder) + list(net.decoder))
    # lateral connections are 1x1x1 convs summed with the upsampled coarser level (width kept)
    assert all(c.kernel_size == (1, 1, 1) and c.in_channels == c.out_channels for c in net.lateral)


def test_fpn3d_decoder_sums_upsampled_and_lateral_paths():
    torch.manual_seed(0)
    net = FPN3d(base_channels=4, num_levels=2, blocks_per_level=1, time_embedding=False).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        fine, coarse = net.pyramid(x)
        # rebuild level 0 by hand from the coarse level and the encoder output
        skip = net.encoder[0][0](net.stem(x), None)
        up = torch.repeat_interleave(torch.repeat_interleave(torch.repeat_interleave(
            net.up[0](coarse), 2, 2), 2, 3), 2, 4)
        expect = net.decoder[0][0](up + net.lateral[0](skip), None)
    assert torch.allclose(fine, expect, atol=1e-6)


@pytest.mark.device
def test_fpn3d_timestep_and_group_norm(test_device):
    torch.manual_seed(0)
    net = FPN3d(1, 1, 4, 3, 1, norm="group")
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, 0, 0.3)
        net.null_embedding.normal_()
    net.to(test_device)
    x = torch.randn(2, 1, 8, 8, 8, device=test_device)
    with torch.no_grad():
        a, b, c = (net.features(x, t=t)[0] for t in (5, 500, None))
    assert not torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, c, atol=1e-4)
    plain = FPN3d(1, 1, 4, 3, 1, time_embedding=False)
    assert not any("time" in n or "temb" in n for n, _ in plain.named_parameters())
    with pytest.raises(ValueError, match="norm must be one of"):
        FPN3d(norm="layer")


@pytest.mark.parametrize("name", ["unet", "fpn3d"])
def test_feature_sides_read_the_encoder_and_the_decoder(name):
    """``side`` picks the encoder's outputs, the decoder pyramid (the default) or both per level; the
    encoder side does not depend on the decoder's weights, the decoder side does."""
    net = build_backbone(name, in_channels=2, out_channels=1, base_channels=4, num_levels=3).eval()
    assert net.feature_sides == ("decoder", "encoder", "both")
    assert net.side_channels("decoder") == net.side_channels("encoder") == [4, 8, 16]
    assert net.side_channels("both") == [8, 16, 16]  # the coarsest level is where the two sides meet
    x, t = torch.randn(2, 2, 16, 8, 12), torch.tensor([3, 40])
    with torch.no_grad():
        dec, enc, both = (net.pyramid(x, t, side=s) for s in ("decoder", "encoder", "both"))
        assert all(torch.equal(a, b) for a, b in zip(dec, net.pyramid(x, t)))
        assert [f.shape[1] for f in both] == net.side_channels("both")
        for i in range(2):
            assert torch.equal(both[i], torch.cat([enc[i], dec[i]], 1)) and not torch.equal(enc[i], dec[i])
        assert torch.equal(enc[-1], dec[-1]) and torch.equal(both[-1], dec[-1])
        decoder = net.dec if name == "unet" else net.decoder
        for p in decoder.parameters():
            p.add_(0.1)
        enc2, dec2 = net.pyramid(x, t, side="encoder"), net.pyramid(x, t)
    assert all(torch.equal(a, b) for a, b in zip(enc, enc2))
    assert not torch.equal(dec[0], dec2[0])
    with pytest.raises(ValueError, match="feature side must be one of"):
        net.pyramid(x, t, side="middle")


def test_a_backbone_with_only_a_decoder_pyramid_offers_that_side_only():
    from voxdiff.pretrain.backbones import PyramidBackboneBase

    class DecoderOnly(PyramidBackboneBase):
        def __init__(self):
            super().__init__()
            self._init_common({}, 1, 1, False, 4)
            self.conv = torch.nn.Conv3d(1, 4, 1)
            self.levels = [LevelInfo("level0", 4, 1)]

        def _pyramid(self, x, temb):
            return [self.conv(x)]

    net = DecoderOnly()
    assert net.feature_sides == ("decoder",)
    assert net.pyramid(torch.randn(1, 1, 4, 4, 4))[0].shape == (1, 4, 4, 4, 4)
    with pytest.raises(NotImplementedError, match="decoder pyramid only"):
        net.pyramid(torch.randn(1, 1, 4, 4, 4), side="encoder")
