"""Every pretraining test runs on one intra-op thread (the shared ``one_thread`` fixture)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def nan_task():
    """Registers the method "nan_after_3" (loss NaN from the 5th call) for one test; yields its class."""
    from pretrain_synth import nan_task_class

    from voxdiff.pretrain.tasks.base import TASKS

    cls = nan_task_class()
    TASKS["nan_after_3"] = cls
    yield cls
    TASKS.pop("nan_after_3", None)
