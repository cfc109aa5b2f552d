"""Fixtures shared by every test folder.

``VOXDIFF_TEST_DEVICE=cuda`` (or ``cuda:N``) makes the tests that take the ``test_device`` fixture
(marked ``device``: backbone, pretraining, features) run their models there; the default is the CPU.
``pytest -m device`` runs just those (``benchmarks/gpu_check.sh --tests`` does it on a GPU machine).
"""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core: one intra-op thread each, or the workers'
    # thread pools fight over the same cores.
    torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Tiny nets: one intra-op thread is as fast as two, and far faster on a busy shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def test_device() -> torch.device:
    """The device of the device tests: ``VOXDIFF_TEST_DEVICE`` (default cpu). Asking for CUDA where
    there is none fails these tests rather than quietly testing the CPU again."""
    from voxdiff.core.errors import InputError
    from voxdiff.core.runtime import resolve_device

    name = os.environ.get("VOXDIFF_TEST_DEVICE", "cpu")
    try:
        dev = resolve_device(name)
    except InputError as e:
        pytest.fail(f"VOXDIFF_TEST_DEVICE={name}: {e}", pytrace=False)
    if dev.type == "cuda":  # exact fp32 comparisons: no TF32 in the device tests
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return dev
