"""Atomic outputs: nothing half-written, and the usual file permissions."""

from __future__ import annotations

import os
import stat

import pytest

from voxdiff.core.errors import InputError
from voxdiff.core.outputs import atomic_path, atomic_write, staged_dir


def test_atomic_write_permissions_and_failure(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write(tmp_path / "a.txt", "x")
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        with pytest.raises(RuntimeError):
            with atomic_path(tmp_path / "b.nii.gz") as tmp:
                tmp.write_text("partial")
                raise RuntimeError
        assert sorted(f.name for f in tmp_path.iterdir()) == ["a.txt"]
        with staged_dir(tmp_path / "out") as d:
            (d / "f").write_text("y")
        assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
        with pytest.raises(InputError, match="not empty"):
            with staged_dir(tmp_path / "out"):
                pass
        assert (tmp_path / "out" / "f").read_text() == "y"
    finally:
        os.umask(old)
