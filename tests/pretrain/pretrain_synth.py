"""Small synthetic volumes and a stand-in body part regressor for the pretraining tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from voxdiff.data.types import Case, CaseMeta


def synthetic_case(seed: int, shape=(40, 40, 24), spacing=(1.0, 1.0, 2.0)) -> Case:
    """A body-like ellipse (soft tissue) with a bright 'organ' and a dark 'lung' blob, in HU."""
    r = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    img = np.where(x ** 2 / 0.8 + y ** 2 / 0.6 < 1, 40.0, -1000.0)
    cx, cy = r.uniform(-0.3, 0.3, 2)
    img = np.where((x - cx) ** 2 + (y - cy) ** 2 + (z * 0.6) ** 2 < 0.12, 180.0, img)
    img = np.where((x + cx) ** 2 + (y + 0.2) ** 2 < 0.05 + 0.03 * z, -800.0, img)
    img = img + r.normal(0, 15, shape)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = (-20.0, -20.0, 100.0 * seed)
    meta = CaseMeta(f"case{seed}", None, None, shape, aff.copy(), aff, tuple(spacing))
    return Case(img.astype(np.float32), None, meta)


def synthetic_cases(n: int = 3, **kw) -> list[Case]:
    return [synthetic_case(i, **kw) for i in range(n)]


def StandInBPR(kind: str = "ape", seed: int = 0, spacing=(1.0, 1.0, 2.0)) -> nn.Module:
    """A real, untrained body part regressor of ``kind`` (small, random weights) at ``spacing``."""
    from voxdiff.bpr.models import build_bpr

    torch.manual_seed(seed)
    pre = {"spacing": list(spacing), "hu_window": [-1350.0, 1000.0], "crop_to_body": False,
           "body_threshold_hu": -500.0, "body_margin_mm": 10.0}
    arch = {"channels": (4, 4, 4), "patch_size": (16, 16, 16)}
    m = build_bpr(kind, arch if kind == "ape" else {"channels": (4, 4), "patch_size": (16, 16, 1)}, pre)
    # BatchNorm statistics of a random model: spread the outputs so they depend on the input
    for mod in m.modules():
        if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm3d)):
            mod.running_mean.uniform_(0.0, 0.5)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def nan_task_class():
    """A diffusion task whose loss turns NaN from its 5th call on (to test the NaN guard)."""
    from voxdiff.pretrain.tasks.diffusion import DiffusionTask

    class NanFromFifthCall(DiffusionTask):
        calls = 0

        def loss(self, backbone, batch, generator):
            type(self).calls += 1
            loss, m = super().loss(backbone, batch, generator)
            return (loss * float("nan") if type(self).calls >= 5 else loss), m

    return NanFromFifthCall
