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


class StandInBPR(nn.Module):
    """Follows the BPR contract (kind, out_channels, forward (B,1,...) -> (B,C,...)), no training."""

    def __init__(self, kind: str = "ape"):
        super().__init__()
        self.kind = kind
        self.out_channels = 3 if kind == "ape" else 1
        self.conv = nn.Conv3d(1, self.out_channels, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, 0, 0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))
