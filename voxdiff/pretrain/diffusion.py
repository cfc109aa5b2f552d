"""DDPM forward process, training targets, and DDPM/DDIM samplers.

Data live in [-1, 1] inside the diffusion process (``to_model_range`` maps the [0, 1] model inputs).
Timesteps are integers ``0 .. T-1``; ``alpha_bar[t]`` is the signal fraction after noising to ``t``:

    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps

Schedules:

* ``linear``: betas linear from ``1e-4 * 1000/T`` to ``0.02 * 1000/T`` (the DDPM endpoints, scaled
  by 1000/T so that a short chain, e.g. T = 10 for the timestep ablation, still ends near pure
  noise; identical to DDPM for T = 1000).
* ``cosine``: Nichol & Dhariwal (2021), ``alpha_bar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2)``,
  betas clipped at 0.999.

Prediction targets: ``epsilon`` (the noise), ``v`` (``sqrt(ab) eps - sqrt(1-ab) x0``), ``sample``
(x0). The same implementation serves training (``add_noise``/``target``) and sampling
(``ddpm_sample``/``ddim_sample``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

PREDICTIONS = ("epsilon", "v", "sample")
SCHEDULES = ("linear", "cosine")


def to_model_range(x_unit: torch.Tensor) -> torch.Tensor:
    return x_unit * 2.0 - 1.0


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def make_betas(num_steps: int, schedule: str = "linear") -> torch.Tensor:
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if schedule == "linear":
        scale = 1000.0 / num_steps
        return torch.linspace(1e-4 * scale, min(0.02 * scale, 0.999), num_steps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        ab = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        ab = ab / ab[0]
        return (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose from {SCHEDULES}")


@dataclass
class GaussianDiffusion:
    """The process for ``num_steps`` T, a beta ``schedule`` and a ``prediction`` type."""

    num_steps: int = 1000
    schedule: str = "linear"
    prediction: str = "epsilon"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {self.prediction!r}; choose from {PREDICTIONS}")
        self.betas = make_betas(self.num_steps, self.schedule)
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)  # float64

    # ------------------------------------------------------------------------- forward process
    def _ab(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar.to(like.device)[t.long().to(like.device)].to(torch.float32)
        return ab.view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """t uniform in {0, ..., T-1}."""
        return torch.randint(0, self.num_steps, (batch,), generator=generator, device=device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample of q(x_t | x0) for the given noise: sqrt(ab) x0 + sqrt(1-ab) noise."""
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "sample":
            return x0
        ab = self._ab(t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at timesteps ``t`` (float32, shape of t)."""
        ab = self.alpha_bar.to(t.device)[t.long()]
        return (ab / (1 - ab).clamp_min(1e-12)).to(torch.float32)

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Per-sample loss weight of Min-SNR-gamma (Hang et al. 2023): the x0-loss weight
        min(SNR, gamma) expressed for this process's target (epsilon: / SNR; v: / (SNR + 1))."""
        snr = self.snr(t)
        w = snr.clamp(max=float(gamma))
        if self.prediction == "epsilon":
            return w / snr.clamp_min(1e-12)
        if self.prediction == "v":
            return w / (snr + 1)
        return w

    def split(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output -> (predicted x0, predicted eps)."""
        ab = self._ab(t, x_t)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        if self.prediction == "epsilon":
            eps = model_out
            x0 = (x_t - s * eps) / a
        elif self.prediction == "sample":
            x0 = model_out
            eps = (x_t - a * x0) / s.clamp(min=1e-8)
        else:
            x0 = a * x_t - s * model_out
            eps = s * x_t + a * model_out
        return x0, eps

    # ------------------------------------------------------------------------- samplers
    @torch.no_grad()
    def ddpm_sample(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...],
                    generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                    steps: int | None = None, progress: Callable | None = None) -> torch.Tensor:
        """Ancestral sampling. ``model(x_t, t) -> output``; ``steps`` < T skips steps (respaced
        DDPM: the posterior between the kept timesteps). Returns x0 in [-1, 1]."""
        x = torch.randn(shape, generator=generator, device=device)
        for t, ab_t, ab_prev, last in self._reverse_schedule(steps, x.device, progress):
            x0 = self._predict_x0(model, x, t)
            beta = 1 - ab_t / ab_prev
            # posterior q(x_prev | x_t, x0)
            coef0 = ab_prev.sqrt() * beta / (1 - ab_t)
            coeft = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t)
            mean = coef0 * x0 + coeft * x
            if not last:
                var = beta * (1 - ab_prev) / (1 - ab_t)
                x = mean + var.clamp(min=1e-20).sqrt() * torch.randn(shape, generator=generator, device=device)
            else:
                x = mean
        return x.clamp(-1, 1)

    @torch.no_grad()
    def ddim_sample(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...],
                    generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                    steps: int | None = 50, eta: float = 0.0, progress: Callable | None = None) -> torch.Tensor:
        """DDIM (Song et al. 2021) over ``steps`` evenly spaced timesteps; eta = 0 is deterministic."""
        x = torch.randn(shape, generator=generator, device=device)
        for t, ab_t, ab_prev, last in self._reverse_schedule(steps, x.device, progress):
            x0 = self._predict_x0(model, x, t)
            # recompute eps from the clamped x0 for consistency
            eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
            sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp(min=0).sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
            if eta > 0 and not last:
                x = x + sigma * torch.randn(shape, generator=generator, device=device)
        return x.clamp(-1, 1)

    def _reverse_schedule(self, steps: int | None, device: torch.device, progress: Callable | None):
        """The samplers' loop: ``(t, alpha_bar_t, alpha_bar_prev, last)`` for each kept timestep,
        decreasing (``alpha_bar_prev`` = 1 after the last one)."""
        ts = self._timesteps(steps)
        ab_all = self.alpha_bar.to(device)
        one = torch.tensor(1.0, device=device)
        it = progress(range(len(ts))) if progress else range(len(ts))
        for i in it:
            last = i + 1 == len(ts)
            yield ts[i], ab_all[ts[i]].float(), (one if last else ab_all[ts[i + 1]].float()), last

    def _predict_x0(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                    t: int) -> torch.Tensor:
        """The model's x0 estimate from ``x`` at timestep ``t``, clamped to the data range."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, _ = self.split(model(x, tt).float(), x, tt)
        return x0.clamp(-1, 1)

    def _timesteps(self, steps: int | None) -> list[int]:
        n = self.num_steps if steps is None else max(1, min(int(steps), self.num_steps))
        ts = torch.linspace(self.num_steps - 1, 0, n).round().long().tolist()
        out: list[int] = []
        for t in ts:  # unique, decreasing
            if not out or t < out[-1]:
                out.append(int(t))
        return out


# --------------------------------------------------------------------------------- fixed noise


_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return x


def positional_noise(voxel_index: torch.Tensor, seed: int = 0, channels: int = 1) -> torch.Tensor:
    """Standard normal noise that is a pure function of (seed, absolute voxel index).

    ``voxel_index``: (B, 3, X, Y, Z) integer voxel indices in the whole volume. Returns
    (B, channels, X, Y, Z) float32. Overlapping sliding windows therefore see exactly the same noise
    at the same voxel, whatever the window size or order (the DDPM-seg "fixed noise" extended to
    volumes of any size without storing a noise volume).
    """
    idx = voxel_index.long()
    outs = []
    for c in range(channels):
        h = _hash32(torch.full_like(idx[:, 0], (seed * 0x9E3779B1 + c * 0x85EBCA77) & _M32))
        for k in range(3):
            h = _hash32(h ^ (idx[:, k] & _M32))
        u1 = (_hash32(h ^ 0x68E31DA4).double() + 0.5) / 4294967296.0
        u2 = (_hash32(h ^ 0x1B56C4E9).double() + 0.5) / 4294967296.0
        outs.append((torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).float())
    return torch.stack(outs, 1)


def index_grid(shape: tuple[int, int, int], origin: tuple[int, int, int] | torch.Tensor = (0, 0, 0),
               batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 3, X, Y, Z) int64 absolute voxel indices of a window at ``origin`` ((3,) or (B, 3))."""
    axes = [torch.arange(s, device=device) for s in shape]
    g = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0)[None].expand(batch, -1, -1, -1, -1)
    o = torch.as_tensor(origin, device=device, dtype=torch.long).reshape(-1, 3)
    return g + o[:, :, None, None, None]
