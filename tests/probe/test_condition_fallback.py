"""``probe.predict.condition_map``: only an allocation failure falls back to per-window maps; any
other error (a device mismatch, a bug) is raised, not turned into different features."""

import pytest
import torch

from voxdiff.probe.predict import condition_map


class _Ext:
    condition_channels = 3

    def __init__(self, exc):
        self.exc = exc

    def condition_map(self, x):
        if self.exc is not None:
            raise self.exc
        return torch.ones(1, 3, *x.shape[2:])


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. "
                                                                "DefaultCPUAllocator: can't allocate memory"),
                                 RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_out_of_memory_falls_back_to_window_maps(exc):
    assert condition_map(_Ext(exc), torch.zeros(1, 1, 4, 4, 4)) is None


def test_other_errors_are_raised():
    err = RuntimeError("Expected all tensors to be on the same device, but found at least two devices")
    with pytest.raises(RuntimeError, match="same device"):
        condition_map(_Ext(err), torch.zeros(1, 1, 4, 4, 4))
    assert condition_map(_Ext(None), torch.zeros(1, 1, 4, 4, 4)).shape == (1, 3, 4, 4, 4)
