"""bf16 autocast only where the hardware computes in bf16 natively.

On CPUs without AVX512-BF16 or AMX (e.g. AVX2-only x86), PyTorch emulates bf16 convolutions and a
3D conv under bf16 autocast runs 20-50x *slower* than in fp32 (measured: 8-channel 3x3x3 conv on
4 x 32^3, 23 ms fp32 against 1.2 s bf16 on an AVX2 EPYC). Asking for bf16 (``--bf16``; ``--amp`` is its deprecated old name)
therefore means "bf16 where it is fast": elsewhere the run stays in fp32 and says so once.
``VOXDIFF_NO_BF16=1`` in the environment turns bf16 off everywhere (fp32 timings on a bf16 CPU, as
with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` to time an AVX2-only machine).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

log = logging.getLogger("voxdiff")


@functools.lru_cache(maxsize=None)
def _cpu_bf16_native() -> bool:
    """AVX512-BF16 or AMX: torch's own CPU checks, else (older torch) the kernel's CPU flags."""
    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(fn is not None for fn in checks):
        try:
            return any(fn is not None and fn() for fn in checks)
        except Exception:  # private API failing: not known to be native
            return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_native(device: torch.device | str) -> bool:
    """True when bf16 autocast on ``device`` is computed natively (fast)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return _cpu_bf16_native()
    return False


_warned: set[str] = set()


def use_bf16(device: torch.device | str, wanted: bool) -> bool:
    """``wanted`` and native on ``device`` (and not ``VOXDIFF_NO_BF16=1``); warns once per device
    type when bf16 is dropped for want of native support."""
    if not wanted or os.environ.get("VOXDIFF_NO_BF16") == "1":
        return False
    device = torch.device(device)
    if bf16_native(device):
        return True
    if device.type not in _warned:
        _warned.add(device.type)
        log.warning("bf16 requested but %s has no native bf16 (emulated bf16 is many times slower): "
                    "running in fp32", device.type)
    return False


def bf16_autocast(device: torch.device | str, wanted: bool):
    """``torch.autocast(bf16)`` when :func:`use_bf16`, else a no-op context."""
    device = torch.device(device)
    if use_bf16(device, wanted):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
