"""Fixtures shared by the data-layer tests (helpers live in data_helpers.py)."""

from __future__ import annotations

import pytest
from data_helpers import REAL_CT


@pytest.fixture
def real_ct_dir():
    if not (REAL_CT / "ts_a_abdomen_ct.nii.gz").is_file():
        pytest.skip("real CT samples (../shared/data/real_ct) not available")
    return REAL_CT
