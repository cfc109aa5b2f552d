"""Heads: the linear probe is linear, parameter counts, config round trip."""

import pytest
import torch

from voxdiff.pretrain.backbone import Backbone
from voxdiff.probe.heads import LinearHead, MixHead, NonLinearHead, build_head, count_parameters, make_head

CH = [4, 8, 16]


def pyramid(seed, b=2, size=(8, 8, 8), ch=CH):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, *(s // 2**i for s in size), generator=g) for i, c in enumerate(ch)]


@pytest.mark.parametrize("upsample", ["nearest", "trilinear"])
def test_linear_head_superposition(upsample):
    torch.manual_seed(0)
    h = LinearHead(CH, 5, upsample=upsample).eval()
    for conv in h.convs:  # weights start at zero: make them random so the check means something
        torch.nn.init.normal_(conv.weight)
    h.set_feature_stats([(torch.randn(c), torch.rand(c) + 0.5) for c in CH])  # fixed standardisation is affine too
    a, b = pyramid(1), pyramid(2)
    zero = [torch.zeros_like(t) for t in a]
    alpha, beta = 0.7, -1.9
    mix = [alpha * x + beta * y for x, y in zip(a, b)]
    with torch.no_grad():
        f0 = h(zero)
        lhs = h(mix)
        rhs = alpha * h(a) + beta * h(b) + (1 - alpha - beta) * f0  # affine: bias enters once
    assert lhs.shape == (2, 5, 8, 8, 8)
    torch.testing.assert_close(lhs, rhs, atol=1e-4, rtol=1e-4)


def test_nonlinear_head_is_not_linear():
    torch.manual_seed(0)
    h = NonLinearHead(CH, 5, hidden=8).eval()
    torch.nn.init.normal_(h.out.weight)
    a, b = pyramid(1), pyramid(2)
    zero = [torch.zeros_like(t) for t in a]
    with torch.no_grad():
        err = (h([x + y for x, y in zip(a, b)]) - h(a) - h(b) + h(zero)).abs().max()
    assert err > 1e-2


def test_parameter_counts():
    lin = LinearHead(CH, 14)
    assert count_parameters(lin) == sum(c * 14 + 14 for c in CH)
    hidden = 32
    nl = NonLinearHead(CH, 14, hidden=hidden, blocks=1)
    proj = sum(c * hidden + hidden for c in CH)
    blocks = len(CH) * (2 * (hidden * hidden + hidden) + 2 * 2 * hidden)  # 2 convs + 2 BatchNorms per block
    out = 2 * hidden + hidden * 14 + 14
    assert count_parameters(nl) == proj + blocks + out
    # far fewer parameters than the backbone it probes (base 16, 4 levels as in the CPU defaults)
    bb = Backbone(in_channels=1, base_channels=16, num_levels=4)
    chans = [lv.channels for lv in bb.levels]
    assert count_parameters(NonLinearHead(chans, 14)) < 0.05 * count_parameters(bb)
    assert count_parameters(LinearHead(chans, 14)) < 0.005 * count_parameters(bb)


def test_build_head_round_trip_and_output_size():
    for h in (LinearHead(CH, 3), NonLinearHead(CH, 3, hidden=8, blocks=2), MixHead(CH, 3, groups=2, hidden=8)):
        for p in h.parameters():
            torch.nn.init.normal_(p)
        h.set_feature_stats([(torch.randn(c), torch.rand(c) + 0.5) for c in CH])
        h2 = build_head(h.config())
        h2.load_state_dict(h.state_dict())
        h.eval(), h2.eval()
        p = pyramid(3)
        with torch.no_grad():
            torch.testing.assert_close(h(p), h2(p))
            assert h(p, out_size=(16, 16, 16)).shape == (2, 3, 16, 16, 16)
    with pytest.raises(ValueError):
        build_head({"type": "mlp"})
    with pytest.raises(ValueError):
        LinearHead(CH, 3)(pyramid(1)[:2])


def test_mix_head_weights_select_level_and_pass_blocks():
    """With the mix logits set to pick one (level, pass) block, the head's output depends on that
    block only: the passes are the level's equal channel chunks, in order."""
    torch.manual_seed(0)
    h = MixHead(CH, 5, groups=2, hidden=8).eval()
    torch.nn.init.normal_(h.out.weight)
    assert [(w["level"], w["pass"]) for w in h.mix_weights()] == [(lv, g) for lv in range(3) for g in range(2)]
    assert all(abs(w["weight"] - 1 / 6) < 1e-4 for w in h.mix_weights())  # starts as the plain mean
    with torch.no_grad():
        h.mix.fill_(-1e4)
        h.mix[3] = 0.0  # level 1, pass 1
    a = pyramid(1)
    b = [x.clone() for x in a]
    b[1][:, :4] += 5.0  # level 1, pass 0: ignored
    b[0] += 1.0  # level 0: ignored
    c = [x.clone() for x in a]
    c[1][:, 4:] += 5.0  # level 1, pass 1: used
    with torch.no_grad():
        torch.testing.assert_close(h(a), h(b))
        assert (h(a) - h(c)).abs().max() > 1e-2
    assert max(h.mix_weights(), key=lambda w: w["weight"]) == {"level": 1, "pass": 1, "weight": 1.0}


def test_mix_head_refuses_levels_that_do_not_split_into_passes():
    with pytest.raises(ValueError, match="passes"):
        MixHead([4, 6, 16], 3, groups=4)
    assert isinstance(make_head("mix", CH, 3, hidden=8, groups=4), MixHead)
