"""Fixtures shared by every test folder."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny nets: one intra-op thread is as fast as two, and far faster on a busy shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
