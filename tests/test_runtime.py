"""voxdiff.core.runtime: allocator setting, device resolution, thread context."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from voxdiff.core import runtime
from voxdiff.core.errors import InputError

REPO = Path(__file__).resolve().parents[1]
IS_GLIBC = sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))

# Allocates and frees a 64 MiB tensor 10 times (after 10 warm-up rounds) and reports the minor page faults of the
# loop: first with glibc's defaults, then after tune_allocator() in the same process (one torch import; nothing
# calls mallopt before the first loop).
FAULT_LOOP = """
import json, resource
import torch
from voxdiff.core.runtime import tune_allocator

def loop():
    for i in range(10):  # warm-up: the heap grows to its steady size (faults either way)
        x = torch.ones(16 * 2**20)
        del x
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(10):
        x = torch.ones(16 * 2**20)  # 64 MiB, written
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

off = {"applied": False, "minflt": loop()}
applied = tune_allocator()
print(json.dumps([off, {"applied": applied, "minflt": loop()}]))
"""


def _fault_loops() -> tuple[dict, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != runtime.OPT_OUT_ENV}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", FAULT_LOOP], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    off, on = json.loads(out.stdout.strip().splitlines()[-1])  # [defaults, after tune_allocator()]
    return off, on


@pytest.mark.skipif(not IS_GLIBC, reason="mallopt applies to glibc only")
def test_tune_allocator_applies_on_glibc(monkeypatch):
    monkeypatch.delenv(runtime.OPT_OUT_ENV, raising=False)
    assert runtime.tune_allocator(force=True) is True
    assert runtime.tune_allocator() is True  # idempotent


def test_tune_allocator_opt_out(monkeypatch):
    monkeypatch.setenv(runtime.OPT_OUT_ENV, "1")
    assert runtime.tune_allocator(force=True) is False


@pytest.mark.skipif(not IS_GLIBC, reason="mallopt applies to glibc only")
def test_tune_allocator_removes_page_faults_of_large_buffers():
    off, on = _fault_loops()
    assert on["applied"] is True and off["applied"] is False
    # without it glibc mmaps and unmaps each 64 MiB buffer: 16384 fresh 4 KiB pages per iteration
    assert off["minflt"] > 10 * 8192, off
    assert on["minflt"] * 10 < off["minflt"], (on, off)


def test_resolve_device():
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device(torch.device("cpu")) == torch.device("cpu")
    expect = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.resolve_device("auto").type == expect
    assert runtime.resolve_device(None).type == expect
    assert runtime.resolve_device(" AUTO ").type == expect
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        runtime.resolve_device("gpu0")
    if torch.cuda.is_available():
        assert runtime.resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
        assert runtime.resolve_device("auto").index is not None
    else:
        for name in ("cuda", "cuda:0", "CUDA"):
            with pytest.raises(InputError, match="no CUDA device is available"):
                runtime.resolve_device(name)


def test_num_threads_restores():
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    with runtime.num_threads(want) as n:
        assert n == want == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with runtime.num_threads(want):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with runtime.num_threads(None) as n:
        assert n == before


# ------------------------------------------------------------------------ channels-last weights

def _unet():
    from voxdiff.pretrain.backbones import build_backbone

    torch.manual_seed(0)
    return build_backbone("unet", in_channels=2, out_channels=1, base_channels=4, num_levels=3)


def test_channels_last_converts_only_5d_tensors_and_keeps_values(monkeypatch):
    monkeypatch.delenv(runtime.CHANNELS_LAST_ENV, raising=False)
    ref, net = _unet(), _unet()
    runtime.prefer_channels_last(net, "cpu")
    fmt = torch.channels_last_3d
    five = [p for p in net.parameters() if p.dim() == 5]
    assert five and all(p.is_contiguous(memory_format=fmt) for p in five)
    # a 3x3x3 kernel over several channels is no longer in the default layout (1x1x1 kernels are both)
    assert not any(p.is_contiguous() for p in five if p.shape[1] > 1 and p.shape[2] > 1)
    assert all(p.is_contiguous() for p in net.parameters() if p.dim() != 5)
    for (k, a), b in zip(ref.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), k
    x, t = torch.rand(2, 2, 16, 16, 16), torch.tensor([3, 40])
    with torch.no_grad():
        for a, b in zip(ref.pyramid(x, t), net.pyramid(x, t)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # gradients flow and keep the parameters' layout (what the optimiser steps)
    net.head(net.pyramid(x, t)[0]).square().mean().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in five)


def test_channels_last_switch(monkeypatch):
    monkeypatch.setenv(runtime.CHANNELS_LAST_ENV, "0")
    net = runtime.prefer_channels_last(_unet(), "cpu")
    assert all(p.is_contiguous() for p in net.parameters())
    assert not runtime.channels_last_wanted("cpu")
    monkeypatch.setenv(runtime.CHANNELS_LAST_ENV, "1")
    assert runtime.channels_last_wanted("cuda:0")
    monkeypatch.delenv(runtime.CHANNELS_LAST_ENV)
    assert runtime.channels_last_wanted("cpu") and not runtime.channels_last_wanted("cuda")
    # under bf16 autocast channels-last is slower on the CPU: the default layout is kept, and a
    # channels-last module goes back to it
    assert not runtime.channels_last_wanted("cpu", bf16=True)
    net = runtime.prefer_channels_last(_unet(), "cpu")
    assert not all(p.is_contiguous() for p in net.parameters())
    runtime.prefer_channels_last(net, "cpu", bf16=True)
    assert all(p.is_contiguous() for p in net.parameters())


def test_loaded_backbone_is_channels_last_and_saves_contiguous(tmp_path, monkeypatch):
    """A checkpoint written from channels-last weights reads back equal (safetensors stores contiguous)."""
    from voxdiff.core.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.delenv(runtime.CHANNELS_LAST_ENV, raising=False)
    net = runtime.prefer_channels_last(_unet(), "cpu")
    save_checkpoint(tmp_path / "m", net.state_dict(), "test", {})
    tensors, _ = load_checkpoint(tmp_path / "m", kind="test")
    for k, v in net.state_dict().items():
        assert torch.equal(tensors[k], v), k
