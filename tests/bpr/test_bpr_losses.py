"""Loss functions of the body part regressors on hand-made examples."""

import pytest
import torch

from voxdiff.bpr import losses


def _z(k=8, b=3):
    g = torch.Generator().manual_seed(0)
    return torch.sort(torch.rand(b, k, generator=g) * 300.0, dim=1).values


def test_heuristic_loss_zero_for_exact_scale_and_lower_than_shuffled():
    z = _z()
    exact = 0.01 * z + 5.0  # offset is free
    assert losses.slice_heuristic_loss(exact, z, b=0.01).item() == pytest.approx(0.0, abs=1e-10)
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    shuffled = exact[:, perm]
    reversed_ = exact.flip(1)
    l_sh = losses.slice_heuristic_loss(shuffled, z).item()
    l_rev = losses.slice_heuristic_loss(reversed_, z).item()
    assert l_sh > 1e-3 and l_rev > l_sh
    # ordered but with the wrong scale is still better than shuffled
    assert losses.slice_heuristic_loss(0.003 * z, z).item() < l_sh


def test_yan_order_loss_prefers_ordered():
    z = _z()
    ordered = 0.05 * z
    assert losses.slice_order_loss(ordered, z) < losses.slice_order_loss(ordered.flip(1), z)
    # input order of the slices does not matter, only their z
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(losses.slice_order_loss(ordered[:, perm], z[:, perm]), losses.slice_order_loss(ordered, z))


def test_distance_loss_zero_for_linear_scores_any_slope():
    z = _z()
    for slope in (0.01, -0.02, 0.5):
        assert losses.slice_distance_loss(slope * z - 1.0, z).item() == pytest.approx(0.0, abs=1e-8)
    bent = 0.01 * z + 0.3 * torch.sin(z / 30.0)
    assert losses.slice_distance_loss(bent, z).item() > 1e-3


def test_slice_losses_reject_bad_shapes():
    with pytest.raises(ValueError):
        losses.slice_heuristic_loss(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError):
        losses.slice_order_loss(torch.zeros(4), torch.zeros(4))


def test_ape_losses_zero_for_scaled_positions_plus_constant():
    g = torch.Generator().manual_seed(0)
    pos = torch.rand(2, 64, 3, generator=g) * 200.0
    emb = pos / 100.0 + torch.tensor([0.3, -2.0, 7.0])
    assert losses.ape_displacement_loss(emb, pos, 100.0).item() == pytest.approx(0.0, abs=1e-10)
    assert losses.ape_distance_loss(emb, pos, 100.0).item() == pytest.approx(0.0, abs=1e-6)
    # a rotation keeps distances but not displacements
    rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    emb_r = (pos / 100.0) @ rot.T
    assert losses.ape_distance_loss(emb_r, pos, 100.0).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.ape_displacement_loss(emb_r, pos, 100.0).item() > 0.1
    # shuffled embeddings are worse than the exact ones
    shuf = emb[:, torch.randperm(64, generator=g)]
    assert losses.ape_distance_loss(shuf, pos, 100.0) > 1e-3
    assert losses.ape_displacement_loss(shuf, pos, 100.0) > 1e-2


def test_displacement_loss_equals_pairwise_definition():
    g = torch.Generator().manual_seed(3)
    emb, pos = torch.randn(2, 10, 3, generator=g), torch.randn(2, 10, 3, generator=g) * 50
    r = emb - pos / 100.0
    d = (r[:, :, None] - r[:, None]).pow(2).sum(-1)  # (B, N, N), zero diagonal
    ref = (d.sum((1, 2)) / (10 * 9)).mean()
    assert losses.ape_displacement_loss(emb, pos, 100.0).item() == pytest.approx(ref.item(), rel=1e-5)


def test_consistency_loss():
    a = torch.randn(4, 3)
    assert losses.consistency_loss(a, a.clone()).item() == 0.0
    assert losses.consistency_loss(a, a + 0.5).item() == pytest.approx(3 * 0.25)
    with pytest.raises(ValueError):
        losses.consistency_loss(a, a[:2])


def test_losses_have_gradients():
    z = _z()
    s = torch.zeros_like(z, requires_grad=True)
    (losses.slice_heuristic_loss(s, z) + losses.slice_distance_loss(s, z)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # zero-distance pairs do not produce NaN gradients
    e = torch.zeros(1, 5, 3, requires_grad=True)
    losses.ape_distance_loss(e, torch.zeros(1, 5, 3)).backward()
    assert torch.isfinite(e.grad).all()


def _distance_loss_by_differences(emb, pos, scale=100.0):
    """The definition, written out: all unordered pairs, distances from the (B, N, N, C) differences."""
    i, j = torch.triu_indices(emb.shape[1], emb.shape[1], offset=1).unbind(0)

    def dist(x):
        return torch.sqrt((x[:, :, None] - x[:, None]).pow(2).sum(-1) + 1e-9)[:, i, j]

    return torch.nn.functional.smooth_l1_loss(dist(emb), dist(pos / scale), beta=0.1)


def test_ape_distance_loss_equals_its_definition_far_from_the_origin():
    """The fast form (squared-norm expansion) matches the pairwise-difference definition, value and
    gradient, for points at world positions ~300 mm from the origin (cancellation) and 1 mm apart."""
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(3, 64, 3, generator=g) * 40 + 300.0
    pos[:, 1] = pos[:, 0] + 1.0  # a pair 1.7 mm apart
    emb0 = pos / 100.0 + 0.05 * torch.randn(3, 64, 3, generator=g) + 2.5
    grads = []
    for fn in (losses.ape_distance_loss, _distance_loss_by_differences):
        emb = emb0.clone().requires_grad_(True)
        val = fn(emb, pos)
        val.backward()
        grads.append((float(val.detach()), emb.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-3, atol=1e-6)
