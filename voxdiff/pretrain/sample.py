"""``voxdiff sample``: draw patches from a trained diffusion backbone and write a PNG grid.

A visible check that the model learned the data: the samples should look like CT patches (body
outline, soft tissue, bright bone/contrast) rather than noise. Conditioned models (``slice``/``ape``)
need BPR maps: they are computed from real patches of ``--data`` (shown in the last row), so each
sample is "a patch at the same anatomical position".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import InputError, ModelError
from ..core.outputs import atomic_path, check_output_path
from ..core.runtime import num_threads, resolve_device
from .diffusion import to_unit_range
from .load import load_backbone, resolve_backbone_dir

SAMPLERS = ("ddpm", "ddim")


@dataclass
class SampleConfig:
    """Sampling from a diffusion backbone.

    Args:
        n: number of patches.
        sampler: ddpm (ancestral) | ddim (deterministic with eta 0).
        steps: denoising steps (at most the model's T; fewer = faster).
        eta: DDIM noise (0 = deterministic).
        data: data folder whose real patches give the BPR conditions (conditioned models only).
        data_kind: layout of the data folder (auto, btcv, nnunet, folder, ...).
        patch_size: patch size (default: the training patch size).
        seed: seed of the noise and of the real patches.
        threads: intra-op CPU threads (0 = torch's default).
        device: auto | cpu | cuda | cuda:N (auto: CUDA when available).
    """

    n: int = 4
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    data: str | None = None
    data_kind: str = "auto"
    patch_size: tuple[int, int, int] | None = None
    seed: int = 0
    threads: int = 0
    device: str = "auto"


def sample_patches(model_path: str | os.PathLike, cfg: SampleConfig, progress: bool = True,
                   cases: list | None = None, device: str | torch.device | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(samples, reals)``: (n, 1, X, Y, Z) in [0, 1] on the CPU; ``reals`` are the patches whose BPR
    maps conditioned the samples (None for unconditioned models). ``device``: where to sample
    (default ``cfg.device``)."""
    if cfg.sampler not in SAMPLERS:
        raise InputError(None, f"unknown sampler {cfg.sampler!r}; choose from {', '.join(SAMPLERS)}")
    if cfg.n < 1 or cfg.steps < 1:
        raise InputError(None, "--n and --steps must be >= 1")
    device = resolve_device(device if device is not None else cfg.device)
    backbone, task, info = load_backbone(model_path, device=device)
    mcfg = info["config"]
    if mcfg["method"] != "diffusion" or not hasattr(task, "process"):
        raise ModelError(resolve_backbone_dir(model_path), f"sampling needs a diffusion model (this one is '{mcfg['method']}')")
    size = tuple(int(s) for s in (cfg.patch_size or mcfg.get("patch_size") or (32, 32, 32)))
    if any(s % backbone.divisor for s in size):
        raise InputError(None, f"patch_size {size} must be a multiple of {backbone.divisor}")
    cond = reals = None
    if task.condition != "none":
        if cases is None:
            if not cfg.data:
                raise InputError(None, f"this model is conditioned on '{task.condition}' coordinates: "
                                       "give --data FOLDER to take the conditions from real patches")
            if not Path(cfg.data).exists():
                raise InputError(cfg.data, "data folder not found")
            from ..core.config import from_dict
            from ..data.cache import load_preprocessed
            from ..data.preprocess import PreprocessConfig

            pre = from_dict(PreprocessConfig, mcfg["preprocess"], strict=False)
            cases = load_preprocessed(cfg.data, pre, kind=cfg.data_kind, progress=progress)
        if not cases:
            raise InputError(cfg.data, "no cases found")
        batch = task.sample_batch(cases, cfg.n, size, np.random.default_rng(cfg.seed))
        reals = batch["image"].to(device)
        # the crop of each real patch's whole-volume map when the model was pretrained on those
        given = task.batch_condition(batch) if hasattr(task, "batch_condition") else batch.get("cond")
        cond = given.to(device) if given is not None else task.condition_map(reals)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return backbone(task._join(x, cond), t)[0]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = lambda it: tqdm(it, desc=f"sample {cfg.sampler}", unit="step")  # noqa: E731
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    shape = (cfg.n, 1, *size)
    with torch.no_grad():
        if cfg.sampler == "ddpm":
            x = task.process.ddpm_sample(model, shape, generator=g, device=device, steps=cfg.steps, progress=bar)
        else:
            x = task.process.ddim_sample(model, shape, generator=g, device=device, steps=cfg.steps, eta=cfg.eta,
                                         progress=bar)
    return to_unit_range(x).cpu(), None if reals is None else reals.cpu()


def write_grid(path: str | os.PathLike, samples: torch.Tensor, reals: torch.Tensor | None = None,
               title: str = "", force: bool = True) -> Path:
    """PNG: per sample its central axial and coronal slices (and the real patch's axial slice)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = samples.shape[0]
    rows = [("sample axial", samples, "axial"), ("sample coronal", samples, "coronal")]
    if reals is not None:
        rows.append(("real (condition) axial", reals, "axial"))
    fig, axes = plt.subplots(len(rows), n, figsize=(2.2 * n, 2.3 * len(rows)), squeeze=False)
    for r, (name, arr, view) in enumerate(rows):
        for i in range(n):
            v = arr[i, 0].numpy()
            sl = v[:, :, v.shape[2] // 2] if view == "axial" else v[:, v.shape[1] // 2, :]
            ax = axes[r, i]
            ax.imshow(sl.T, cmap="gray", vmin=0, vmax=1, origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    p = Path(path)
    if not force:
        check_output_path(p, force=False)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return p


def sample_to_png(model_path: str | os.PathLike, out_png: str | os.PathLike, cfg: SampleConfig,
                  progress: bool = True, force: bool = False) -> Path:
    out = Path(out_png)
    if out.suffix.lower() != ".png":
        raise InputError(out, "the output must be a .png file")
    check_output_path(out, force=force)
    with num_threads(cfg.threads):
        samples, reals = sample_patches(model_path, cfg, progress=progress)
    title = f"{Path(model_path).name}: {cfg.n} samples, {cfg.sampler} {cfg.steps} steps"
    return write_grid(out, samples, reals, title=title)
