"""Every pretraining test runs on one intra-op thread (the shared ``one_thread`` fixture)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
