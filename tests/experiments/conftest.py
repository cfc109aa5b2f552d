"""Experiment tests run on one intra-op thread (the shared ``one_thread`` fixture): tiny nets are as
fast on one thread, and far faster on a busy shared CPU."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
