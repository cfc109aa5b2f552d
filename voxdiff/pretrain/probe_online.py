"""Online linear probe during pretraining: is the representation getting better?

Every ``probe_every`` steps, rank 0 takes the EMA backbone, extracts frozen features (the method's
own recipe: noise-to-t + BPR for diffusion) of a central crop of a few labelled cases, fits a
linear voxel classifier (softmax over the concatenated, upsampled pyramid) on all but the last case
and reports the mean foreground Dice on the last one (on the single case itself when only one is
given: then it is a fit Dice). Cheap by design (a crop of at most twice the patch size, 100 Adam
steps on at most 8k voxels); it tracks a trend, it is not the evaluation protocol.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.metrics import dice_per_class
from ..core.runtime import num_threads
from .tasks.base import crop_or_pad

_CACHE: dict[Any, list] = {}


def _labelled_cases(cfg) -> list:
    key = (cfg.probe.data, cfg.probe.cases, str(cfg.preprocess))
    if key not in _CACHE:
        from ..core.errors import InputError
        from ..data.cache import load_preprocessed

        cases = [c for c in load_preprocessed(cfg.probe.data, cfg.preprocess, cache_dir=cfg.data.cache_dir)
                 if c.label is not None][: max(1, cfg.probe.cases)]
        if not cases:
            raise InputError(cfg.probe.data, "the online probe needs labelled cases")
        _CACHE[key] = cases
    return _CACHE[key]


def _crop(case, size: tuple[int, int, int], window) -> tuple[torch.Tensor, torch.Tensor]:
    from ..data.preprocess import hu_to_unit

    lab = case.label
    fg = np.argwhere(lab > 0)
    centre = fg.mean(0).round().astype(int) if len(fg) else np.array(lab.shape) // 2
    origin = tuple(int(c - s // 2) for c, s in zip(centre, size))
    img = crop_or_pad(hu_to_unit(case.image, window), origin, size, 0.0)
    y = crop_or_pad(lab.astype(np.int64), origin, size, 0)
    return torch.from_numpy(img)[None, None], torch.from_numpy(y)


def _features(backbone, task, image: torch.Tensor) -> torch.Tensor:
    pyr_all = []
    for x, t in task.feature_passes(image):
        pyr = backbone.pyramid(x, t)
        pyr_all.extend(F.interpolate(f.float(), size=image.shape[2:], mode="nearest") for f in pyr)
    f = torch.cat(pyr_all, 1)[0]  # (C, X, Y, Z)
    return f.flatten(1).T  # (N, C)


@torch.no_grad()
def _extract(cfg, backbone, task, cases, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    d = backbone.divisor
    out = []
    for case in cases:
        size = tuple(min(2 * int(p), max(d, (int(n) // d) * d)) for p, n in zip(cfg.data.patch_size, case.image.shape))
        img, y = _crop(case, size, tuple(cfg.preprocess.hu_window))
        out.append((_features(backbone, task, img.to(device)).cpu(), y.flatten()))
    return out


def online_probe(cfg, joint, ema_state: dict[str, torch.Tensor], device: torch.device,
                 cases: list | None = None, seed: int = 0) -> dict[str, float]:
    """``{"dice": mean foreground Dice, "classes": how many classes scored}``."""
    cases = cases if cases is not None else _labelled_cases(cfg)
    backbone = copy.deepcopy(joint.backbone).to(device)
    backbone.load_state_dict({k: v.to(device) for k, v in ema_state.items()})
    backbone.eval()
    task = joint.task
    data = _extract(cfg, backbone, task, cases, device)
    del backbone
    train = data[:-1] if len(data) > 1 else data
    test = data[-1]
    x = torch.cat([f for f, _ in train])
    y = torch.cat([lab for _, lab in train])
    n_classes = int(max(int(y.max()), int(test[1].max()))) + 1
    g = torch.Generator().manual_seed(seed)
    if len(x) > 8000:
        idx = torch.randperm(len(x), generator=g)[:8000]
        x, y = x[idx], y[idx]
    mu, sd = x.mean(0), x.std(0) + 1e-5
    with torch.random.fork_rng(devices=[]):  # leave the training RNG streams untouched
        torch.manual_seed(seed)
        head = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    counts = torch.bincount(y, minlength=n_classes).float()
    weight = (counts.sum() / (counts + 1)).clamp(max=100.0)
    weight = weight / weight.mean()
    with num_threads(1):  # tiny ops: threads only add synchronisation cost
        _fit(head, opt, x, y, mu, sd, weight)
    with torch.no_grad():
        pred = head((test[0] - mu) / sd).argmax(1)
    scores = [v for v in dice_per_class(pred, test[1], n_classes).values() if not np.isnan(v)]
    return {"dice": float(np.mean(scores)) if scores else float("nan"), "classes": float(len(scores))}


def _fit(head, opt, x, y, mu, sd, weight) -> None:
    with torch.enable_grad():
        for _ in range(100):
            loss = F.cross_entropy(head((x - mu) / sd), y, weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
