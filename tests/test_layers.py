"""PointwiseConv3d: a kernel-1 Conv3d computed as a matrix product, same values, gradients and keys; freeze."""

import pytest
import torch
from torch import nn

from voxdiff.core.layers import PointwiseConv3d


def _pair(cin=6, cout=5):
    torch.manual_seed(0)
    ours = PointwiseConv3d(cin, cout)
    plain = nn.Conv3d(cin, cout, 1)
    plain.load_state_dict(ours.state_dict())  # same keys and shapes both ways
    return ours, plain


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "voxels"])
def test_values_and_gradients_equal_the_convolution(layout):
    ours, plain = _pair()
    if layout == "voxels":  # (1, C, N, 1, 1) with channels-last strides, as voxel probing gathers
        x = torch.randn(40, 6).t()[None, :, :, None, None]
    else:
        x = torch.randn(2, 6, 5, 4, 3)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last_3d)
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ya, yb = ours(xa), plain(xb)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(yb)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.bias.grad, plain.bias.grad, atol=1e-5, rtol=1e-5)


def test_channels_last_weights_and_bf16_autocast_still_work():
    ours, plain = _pair()
    ours.weight.data = ours.weight.data.contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 6, 4, 4, 4)
    torch.testing.assert_close(ours(x), plain(x), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # contiguous input under autocast: the conv path
        y = ours(x)
    torch.testing.assert_close(y.float(), plain(x), atol=5e-2, rtol=5e-2)


def test_freeze_stops_gradients_and_keeps_batchnorm_statistics():
    from voxdiff.core.layers import freeze

    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))
    net.train()
    before = net[1].running_mean.clone()
    assert freeze(net) is net
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    net(torch.randn(2, 1, 5, 5, 5) + 3.0)
    assert torch.equal(net[1].running_mean, before)
