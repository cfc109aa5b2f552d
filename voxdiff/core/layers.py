"""Layers shared by the backbones and the heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cpu_autocast_query():
    """``() -> bool``: whether CPU autocast is on, resolved once (``is_autocast_enabled(device_type)``
    is torch >= 2.4; the GPU machine's preinstalled torch may be older)."""
    try:
        torch.is_autocast_enabled("cpu")
        return lambda: torch.is_autocast_enabled("cpu")
    except TypeError:
        return torch.is_autocast_cpu_enabled


_cpu_autocast = _cpu_autocast_query()


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every parameter of ``module`` (a frozen teacher, BPR, feature
    extractor: its normalisation statistics never move); returns ``module``."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class PointwiseConv3d(nn.Conv3d):
    """A kernel-1 :class:`~torch.nn.Conv3d` (same parameters, state-dict keys and values) computed on
    the CPU as one matrix product over the channels of a channels-last view.

    PyTorch's CPU path for kernel-1 3D convolutions unfolds the input (``slow_conv3d``), and for a
    channels-last input first copies it to the contiguous layout; as a GEMM, the probing heads' step
    runs 1.5x faster (``benchmarks/bench_heads.py``) and the backbone's 1x1x1 skip projections stop
    converting layouts. The output is channels-last strided. It stays the plain convolution on CUDA
    (cuDNN's kernel-1 path is a GEMM already) and under CPU autocast for a contiguous input (there the
    permuted copy costs more than it saves: the backbone's bf16 step 7-11 % slower)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or x.dim() != 5 or (x.is_contiguous() and bool(_cpu_autocast())):
            return super().forward(x)
        w = self.weight.reshape(self.out_channels, self.in_channels)
        return F.linear(x.permute(0, 2, 3, 4, 1), w, self.bias).permute(0, 4, 1, 2, 3)
