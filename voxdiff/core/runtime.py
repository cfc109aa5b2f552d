"""Process-level runtime settings shared by every stage: allocator, device, threads.

* :func:`tune_allocator` stops glibc from handing every large buffer back to the kernel (the CLI
  calls it first thing; library users call it once at start-up, before big tensors exist).
* :func:`resolve_device` turns ``"auto"``/``"cpu"``/``"cuda"``/``"cuda:1"`` into a ``torch.device``
  (``auto``: CUDA when available).
* :func:`num_threads` sets torch's intra-op thread count for a block and restores it afterwards.
* :func:`prefer_channels_last` stores a module's 3D convolution weights channels-last (NDHWC) where
  that is faster: on the CPU, oneDNN then runs 3D convolutions without reordering their operands
  (training steps 1.45-1.7x faster here, forward passes about 1.2x; benchmarks/bench_pretrain.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # torch is imported on use: tune_allocator() should run before torch loads
    import torch

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
OPT_OUT_ENV = "VOXDIFF_NO_MALLOPT"
CHANNELS_LAST_ENV = "VOXDIFF_CHANNELS_LAST"  # 1 / 0: force channels-last weights on / off (default: CPU only)

_allocator_tuned = False


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (Linux with GNU libc), else ``None`` (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (ValueError, OSError, AttributeError):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator(force: bool = False) -> bool:
    """Keep freed large buffers in the process instead of returning them to the kernel (glibc only).

    glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap``
    and unmaps it on free, so each training step or feature window that allocates big activations
    touches its pages anew: millions of minor page faults per step. This sets what
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`` would: no mmap'd chunks, and the top
    of the heap is not trimmed. Freed memory stays reusable by the process;
    resident memory stays near the peak of what was in use (which is what training needs anyway).

    Call it once, as early as possible (before large tensors are allocated). Returns ``True`` when
    the setting is in effect, ``False`` when it does not apply: not glibc, or turned off with the
    environment variable ``VOXDIFF_NO_MALLOPT=1``. Idempotent.
    """
    global _allocator_tuned
    if os.environ.get(OPT_OUT_ENV, "").strip() not in ("", "0"):
        return False
    if _allocator_tuned and not force:
        return True
    libc = _glibc()
    if libc is None:
        return False
    # mallopt(3): 0 disables mmap for large requests; a trim threshold of -1 disables trimming
    # (mallopt takes an int, so the 64 GiB of the environment variable cannot be passed here).
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1 and ok
    _allocator_tuned = ok
    return ok


def resolve_device(name: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """The one place a device setting (``device`` of every config) becomes a ``torch.device``.

    ``"auto"`` (or ``None``): CUDA when it is available, else the CPU. ``"cuda"`` and ``"auto"`` on a
    CUDA machine give ``cuda:<local_rank>`` (one GPU per DDP rank) or, without a rank, the current
    CUDA device. ``"cpu"``, ``"cuda:N"`` and any other name torch accepts are taken as given. Asking
    for CUDA on a machine without it, or for an unknown name, raises :class:`InputError`.
    """
    import torch

    if isinstance(name, torch.device):
        dev = name
    else:
        pref = (name or "auto").strip().lower()
        if pref == "auto":
            pref = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(pref)
        except RuntimeError:
            raise InputError(None, f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, f"device {str(name)!r} was requested but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    return dev


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[int]:
    """Run a block with ``torch.set_num_threads(n)`` and restore the previous count afterwards.

    ``n`` of ``None`` or ``0`` leaves the count as it is. Yields the count in effect inside the block.
    """
    import torch

    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        if n:
            torch.set_num_threads(prev)


def channels_last_wanted(device: torch.device | str, bf16: bool = False) -> bool:
    """Whether :func:`prefer_channels_last` stores 3D convolution weights channels-last on ``device``:
    on the CPU in fp32 only. Measured (training step of the ``unet`` backbone, patch 32, batch 4):
    fp32 base 8 1.42x (1 thread) / 1.61x (2 threads) faster, base 16 0.99x / 1.14x; under bf16
    autocast 0.70-0.92x, i.e. slower, so ``bf16`` (autocast in effect) keeps the default layout; CUDA
    is not measured and keeps it too. ``VOXDIFF_CHANNELS_LAST`` (1 / 0) overrides everything."""
    env = os.environ.get(CHANNELS_LAST_ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return str(device).split(":")[0] == "cpu" and not bf16


def prefer_channels_last(module: torch.nn.Module, device: torch.device | str | None = None,
                         bf16: bool = False) -> torch.nn.Module:
    """Store the 5-d parameters and buffers of ``module`` (3D convolution weights) channels-last when
    :func:`channels_last_wanted` says so for ``device`` (default: where the module lives) and
    ``bf16`` (whether bf16 autocast is in effect), else in the default layout; in place, and only
    what is not already in that layout (cheap to call before every use).

    Values are unchanged (only strides), so state dicts, checkpoints and results are the same up to
    floating-point summation order; inputs may stay contiguous (a convolution with channels-last weights
    runs channels-last and hands its layout on). Returns ``module``."""
    import torch

    if device is None:
        first = next(iter(module.parameters()), None)
        device = first.device if first is not None else "cpu"
    fmt = torch.channels_last_3d if channels_last_wanted(device, bf16) else torch.contiguous_format
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.dim() == 5 and not t.is_contiguous(memory_format=fmt):
                t.data = t.data.contiguous(memory_format=fmt)
    return module
