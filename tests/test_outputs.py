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


def test_staged_dir_keep_hands_back_interrupted_work(tmp_path):
    from voxdiff.core.outputs import kept_work_dir

    target = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(target, keep=True) as d:
            (d / "ckpt").write_text("step 3")
            raise KeyboardInterrupt
    assert not target.exists() and (kept_work_dir(target) / "ckpt").read_text() == "step 3"
    with staged_dir(target, keep=True) as d:
        assert (d / "ckpt").read_text() == "step 3"  # the same work folder, with what was written
        (d / "model").write_text("done")
    assert sorted(f.name for f in target.iterdir()) == ["ckpt", "model"]
    assert not kept_work_dir(target).exists()


def test_no_output_replaces_an_input_even_with_force(tmp_path):
    from voxdiff.core.outputs import check_output_path, note_input, protecting_inputs

    data = tmp_path / "data"
    data.mkdir()
    (data / "ct.nii.gz").write_bytes(b"scan")
    # explicit inputs: the output may not be one, nor a folder holding one
    with pytest.raises(InputError, match=r"the output is an input of this command .*--force never replaces inputs"):
        check_output_path(data / "ct.nii.gz", force=True, inputs=(data / "ct.nii.gz",))
    with pytest.raises(InputError, match="the output holds an input of this command"):
        check_output_path(tmp_path, force=True, inputs=(data / "ct.nii.gz",))
    check_output_path(data / "seg.nii.gz", force=True, inputs=(data / "ct.nii.gz",))  # beside it is fine
    # recorded inputs count only inside protecting_inputs (a CLI command), and are forgotten after it
    note_input(data)
    check_output_path(data, force=True)
    with protecting_inputs():
        note_input(data / "ct.nii.gz")
        with pytest.raises(InputError, match="holds an input"):
            check_output_path(data, force=True)
        # an input read while the output was being made: the output is not moved into place
        with pytest.raises(InputError, match="holds an input"):
            with staged_dir(tmp_path / "data2", force=True) as d:
                (d / "f").write_text("new")
                note_input(tmp_path / "data2" / "x.nii.gz")
        with pytest.raises(InputError, match="is an input"):
            with atomic_path(data / "other.nii.gz") as tmp:
                tmp.write_bytes(b"labels")
                note_input(data / "other.nii.gz")
    check_output_path(data, force=True)
    assert (data / "ct.nii.gz").read_bytes() == b"scan" and not (data / "other.nii.gz").exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["data"]  # no partial folders or files left


def test_run_folder_takes_back_only_what_a_run_wrote_before_its_first_checkpoint(tmp_path):
    from voxdiff.core.outputs import run_folder

    new = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with run_folder(new, lambda: False) as d:
            (d / "config.yaml").write_text("c")
            (d / "train_state").mkdir()
            raise RuntimeError
    assert not new.exists()  # created by the failed run: gone

    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        with run_folder(old, lambda: False) as d:
            (d / "metrics.jsonl").write_text("{}")
            (d / "sub").mkdir()
            raise KeyboardInterrupt
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt"]  # the user's file stays

    kept = tmp_path / "kept"
    with pytest.raises(RuntimeError):
        with run_folder(kept, lambda: True) as d:  # a checkpoint exists: the run can be resumed
            (d / "metrics.jsonl").write_text("{}")
            raise RuntimeError
    assert (kept / "metrics.jsonl").is_file()

    with run_folder(tmp_path / "ok", lambda: False) as d:
        (d / "f").write_text("y")
    assert (tmp_path / "ok" / "f").read_text() == "y"


def test_emit_row_prints_and_appends_one_json_line(tmp_path, capsys):
    import json

    from voxdiff.core.outputs import emit_row

    out = tmp_path / "rows.jsonl"
    emit_row({"seed": 5, "dice": 0.5}, out)
    emit_row({"seed": 6, "path": tmp_path}, out)
    emit_row({"seed": 7})  # printed only
    lines = out.read_text().splitlines()
    assert [json.loads(x)["seed"] for x in lines] == [5, 6] and json.loads(lines[1])["path"] == str(tmp_path)
    assert [json.loads(x)["seed"] for x in capsys.readouterr().out.splitlines()] == [5, 6, 7]
