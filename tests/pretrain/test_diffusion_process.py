"""The DDPM forward process against its closed form, targets, samplers and the fixed feature noise."""

import math

import pytest
import torch

from voxdiff.pretrain.diffusion import GaussianDiffusion, index_grid, make_betas, positional_noise, to_model_range, to_unit_range


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_add_noise_exact_for_fixed_noise(schedule):
    proc = GaussianDiffusion(1000, schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 5, 6, 7, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    xt = proc.add_noise(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        ab = float(torch.prod(1 - make_betas(1000, schedule)[: ti + 1]))
        expect = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i]
        assert torch.allclose(xt[i], expect, atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_xt_given_x0_statistics(schedule):
    """Many noise draws at fixed x0: empirical mean/var match sqrt(abar) x0 and 1 - abar."""
    proc = GaussianDiffusion(200, schedule)
    g = torch.Generator().manual_seed(1)
    x0 = torch.linspace(-1, 1, 7)
    n = 40000
    for t in (0, 50, 120, 199):
        eps = torch.randn(n, 7, generator=g)
        xt = proc.add_noise(x0.expand(n, 7), eps, torch.full((n,), t))
        ab = float(proc.alpha_bar[t])
        se = math.sqrt((1 - ab) / n)
        assert torch.allclose(xt.mean(0), math.sqrt(ab) * x0, atol=5 * se + 1e-6)
        assert torch.allclose(xt.var(0), torch.full((7,), 1 - ab), rtol=0.05, atol=1e-6)


def test_linear_schedule_matches_monai_ddpm():
    from monai.networks.schedulers import DDPMScheduler

    ours = GaussianDiffusion(1000, "linear").alpha_bar
    monai = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta").alphas_cumprod.double()
    assert torch.allclose(ours, monai, atol=1e-6)


@pytest.mark.parametrize("T", [10, 100, 1000])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_shape(T, schedule):
    b = make_betas(T, schedule)
    ab = GaussianDiffusion(T, schedule).alpha_bar
    assert b.shape == (T,) and (b > 0).all() and (b < 1).all()
    assert (ab[1:] < ab[:-1]).all()
    assert ab[-1] < 0.01  # the chain ends near pure noise even for short T


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
def test_target_and_split_are_consistent(prediction):
    proc = GaussianDiffusion(100, "cosine", prediction)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 1, 4, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 40, 90])
    xt = proc.add_noise(x0, eps, t)
    x0_hat, eps_hat = proc.split(proc.target(x0, eps, t), xt, t)
    assert torch.allclose(x0_hat, x0, atol=1e-4)
    assert torch.allclose(eps_hat, eps, atol=1e-3)


def _oracle(proc, x0):
    """A perfect epsilon model for a single known x0."""
    def model(xt, t):
        ab = proc.alpha_bar[t].float().view(-1, 1, 1, 1, 1)
        return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
    return model


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_recover_x0_with_an_oracle(sampler):
    proc = GaussianDiffusion(100, "linear")
    x0 = torch.rand(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(3)) * 1.6 - 0.8
    g = torch.Generator().manual_seed(4)
    fn = proc.ddpm_sample if sampler == "ddpm" else proc.ddim_sample
    out = fn(_oracle(proc, x0), tuple(x0.shape), generator=g, steps=20)
    assert torch.allclose(out, x0, atol=1e-3)


def test_ddim_is_deterministic_and_ddpm_uses_the_generator():
    proc = GaussianDiffusion(50)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    a = proc.ddim_sample(model, (1, 1, 4, 4, 4), generator=torch.Generator().manual_seed(0), steps=5)
    b = proc.ddim_sample(model, (1, 1, 4, 4, 4), generator=torch.Generator().manual_seed(0), steps=5)
    c = proc.ddpm_sample(model, (1, 1, 4, 4, 4), generator=torch.Generator().manual_seed(1), steps=5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ranges_roundtrip():
    x = torch.rand(10)
    assert torch.allclose(to_unit_range(to_model_range(x)), x)


def test_positional_noise_is_a_function_of_the_voxel():
    full = positional_noise(index_grid((24, 20, 16)), seed=7)
    win = positional_noise(index_grid((8, 8, 8), origin=(10, 4, 5)), seed=7)
    assert torch.equal(win[0], full[0, :, 10:18, 4:12, 5:13])
    # batch of windows at different origins
    two = positional_noise(index_grid((8, 8, 8), origin=torch.tensor([[0, 0, 0], [10, 4, 5]]), batch=2), seed=7)
    assert torch.equal(two[1], win[0]) and torch.equal(two[0], full[0, :, :8, :8, :8])
    # other seed -> other noise; statistics of a standard normal
    other = positional_noise(index_grid((24, 20, 16)), seed=8)
    assert not torch.allclose(other, full)
    assert abs(float(full.mean())) < 0.05 and abs(float(full.std()) - 1) < 0.05
    # neighbouring voxels are uncorrelated
    n = full[0, 0]
    corr = torch.corrcoef(torch.stack([n[:-1].flatten(), n[1:].flatten()]))[0, 1]
    assert abs(float(corr)) < 0.05


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
def test_min_snr_weight_is_the_clipped_x0_loss_for_every_target(prediction):
    # weight(t) * |output error|^2 == min(SNR, gamma) * |x0 error|^2, whatever the target
    proc = GaussianDiffusion(1000, "linear", prediction)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 1, 4, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 30, 300, 900])
    xt = proc.add_noise(x0, eps, t)
    target = proc.target(x0, eps, t)
    out = target + 0.1 * torch.randn(x0.shape, generator=g)
    x0_hat, _ = proc.split(out, xt, t)
    w = proc.min_snr_weight(t, 5.0)
    lhs = w * ((out - target) ** 2).flatten(1).mean(1)
    rhs = proc.snr(t).clamp(max=5.0) * ((x0_hat - x0) ** 2).flatten(1).mean(1)
    assert torch.allclose(lhs, rhs, rtol=1e-3, atol=1e-7)
    assert proc.snr(t)[0] > 5.0 > proc.snr(t)[-1]  # both sides of the clip are exercised
