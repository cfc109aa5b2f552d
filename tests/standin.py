"""Test helper: a tiny stand-in feature extractor that follows the ``FeatureExtractor`` contract.

Imported by tests as ``from standin import ...`` (``tests/`` is on ``sys.path`` through its conftest).

``StandinExtractor(channels=(4, 8, 16))`` is a small random conv pyramid: called on
``(B, 1, X, Y, Z)`` images in [0, 1] it returns ``[f_1, f_2, f_4, ...]`` (finest first, strides
1, 2, 4, ...). It has ``levels``, ``preprocess``, ``method`` and ``backbone`` like the extractors of
:func:`voxdiff.pretrain.load_pretrained`. Tests use it to exercise heads, probing and prediction
without a pretrained model; ``pointwise=True`` gives kernel-1 convolutions (no spatial context),
for which sliding-window and whole-volume predictions must agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StandinLevel:
    name: str
    channels: int
    stride: int


class _Pyramid(nn.Module):
    def __init__(self, channels: Sequence[int], in_channels: int = 1, pointwise: bool = False):
        super().__init__()
        k = 1 if pointwise else 3
        self.pointwise = pointwise
        self.stem = nn.Conv3d(in_channels, channels[0], k, padding=k // 2)
        self.down = nn.ModuleList(
            nn.Conv3d(channels[i - 1], channels[i], k, padding=k // 2) for i in range(1, len(channels))
        )
        # a norm layer whose running statistics tests can watch (identity statistics, eval mode)
        self.norm = nn.BatchNorm3d(channels[-1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.tanh(self.stem((x - 0.5) * 10.0)) * 2.0
        out = [h]
        for i, conv in enumerate(self.down):
            # pointwise: plain subsampling keeps every output voxel a function of one input voxel
            h = h[:, :, ::2, ::2, ::2] if self.pointwise else F.avg_pool3d(h, 2)
            h = torch.tanh(conv(h)) * 2.0
            if i == len(self.down) - 1:
                h = self.norm(h)
            out.append(h)
        return out


class StandinExtractor:
    """Random conv pyramid with the ``FeatureExtractor`` call contract."""

    method = "standin"

    def __init__(self, channels: Sequence[int] = (4, 8, 16), seed: int = 0, pointwise: bool = False, preprocess=None):
        from voxdiff.data.preprocess import PreprocessConfig

        g = torch.random.fork_rng(devices=[])
        with g:
            torch.manual_seed(seed)
            self.backbone = _Pyramid(list(channels), pointwise=pointwise)
        self.backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.levels = [StandinLevel(f"level{i}", int(c), 2**i) for i, c in enumerate(channels)]
        self.preprocess = preprocess if preprocess is not None else PreprocessConfig()

    @property
    def divisor(self) -> int:
        return self.levels[-1].stride

    def __call__(self, image_unit: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(image_unit)


def tiny_segmenter(out_dir, cases=None, preprocess=None, head: str = "linear", seed: int = 0, roi=(32, 32, 32),
                   meta=None):
    """A small random-backbone segmenter bundle (``method="random"``, base 4, 3 levels, untrained
    head) for tests of ``voxdiff segment`` / ``evaluate``; ``meta``: the bundle's ``meta`` record.
    Returns the bundle path."""
    import tempfile
    from pathlib import Path

    from voxdiff.core.config import from_dict
    from voxdiff.data.preprocess import PreprocessConfig
    from voxdiff.pretrain.train import PretrainConfig, pretrain
    from voxdiff.probe.bundle import save_segmenter
    from voxdiff.probe.heads import make_head

    pre = preprocess or PreprocessConfig(spacing=(4.0, 4.0, 4.0))
    if cases is None:
        from voxdiff.data.phantom import PhantomConfig, generate_phantom
        from voxdiff.data.preprocess import preprocess as prep

        cases = [prep(generate_phantom(seed, PhantomConfig(shape=(48, 48, 32))), pre)]
    with tempfile.TemporaryDirectory() as tmp:
        pt = Path(tmp) / "pretrained"
        pretrain(from_dict(PretrainConfig, dict(method="random", preprocess=pre, steps=1, base_channels=4, num_levels=3,
                                patch_size=(16, 16, 16), bf16=False, device="cpu", seed=seed)),
                 pt, cases=cases, progress=False)
        from voxdiff.pretrain.load import load_pretrained

        ext = load_pretrained(pt)
        torch.manual_seed(seed)
        h = make_head(head, [lv.channels for lv in ext.levels], 14).eval()
        save_segmenter(out_dir, pt, h, head, pre, roi, 0.25, meta=meta)
    return Path(out_dir)


def two_organ_case(seed: int, shape=(24, 24, 16)):
    """A labelled noise volume with two box organs (labels 6 and 2, +200 / -150 HU): heads learn it fast."""
    import numpy as np

    from voxdiff.data.types import Case, CaseMeta

    r = np.random.default_rng(seed)
    img = r.normal(0, 50, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[4:12, 4:12, 4:10] = 6
    lab[14:20, 12:20, 6:12] = 2
    img[lab == 6] += 200
    img[lab == 2] -= 150
    aff = np.eye(4)
    return Case(img, lab, CaseMeta(f"c{seed}", None, None, shape, aff, aff, (1.0, 1.0, 1.0)))


def body_box_case(seed: int, shape=(28, 24, 20)):
    """A labelled 3 mm noise volume with air in its first 3 rows and one box organ (label 6, +80 HU):
    small enough for BPR-conditioned probing and fine-tuning tests."""
    import numpy as np

    from voxdiff.data.types import Case, CaseMeta

    rng = np.random.default_rng(seed)
    img = rng.normal(40, 20, shape).astype(np.float32)
    img[:3] = -1000
    lab = np.zeros(shape, np.uint8)
    lab[8:16, 8:16, 6:14] = 6
    img[lab == 6] += 80
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    return Case(img, lab, CaseMeta(f"c{seed}", None, None, shape, aff, aff, (3.0, 3.0, 3.0)))


def load_benchmark(name: str):
    """The script ``benchmarks/NAME.py`` imported as a module (its functions, without running main)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cube_case(seed: int, shape=(24, 24, 16), z=(4, 10)):
    """A small labelled case: Gaussian noise (SD 50 HU) with a bright cube of label 6 at x, y 4..12 and
    ``z`` (+200 HU), on an identity affine at 1 mm."""
    import numpy as np

    from voxdiff.data.types import Case, CaseMeta

    r = np.random.default_rng(seed)
    img = r.normal(0, 50, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[4:12, 4:12, z[0]:z[1]] = 6
    img[lab == 6] += 200
    aff = np.eye(4)
    return Case(img, lab, CaseMeta(f"c{seed}", None, None, shape, aff, aff, (1.0, 1.0, 1.0)))
