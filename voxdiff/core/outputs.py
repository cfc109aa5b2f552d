"""Outputs that never leave a half-written file or folder behind.

* :func:`atomic_write` writes a file through a temporary sibling and ``os.replace``.
* :func:`staged_dir` builds an output folder under a temporary sibling name and moves it into place
  only when the block succeeds; an existing non-empty folder is refused unless ``force``.
* :func:`run_folder` is for training runs written in place (resumable from their checkpoints): a
  run that fails before its first checkpoint takes back the files it created.
* No output replaces an input: the readers record what they read (:func:`note_input`), and an output
  that is one of those paths, or a folder holding one, is refused, ``force`` or not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import InputError

# Inside protecting_inputs() (a CLI command), every file or folder read as input (CTs, label maps,
# data set roots, models): an output that would replace one of them, or a folder holding one, is
# refused even with --force.
_INPUTS: set[Path] = set()
_protecting = False


@contextlib.contextmanager
def protecting_inputs() -> Iterator[None]:
    """Record the inputs read inside the block (:func:`note_input`) and refuse outputs that would
    replace them; the CLI runs each stage command inside it. Outside it nothing is recorded (a
    long-lived process, such as an experiment or a test session, rewrites its own outputs)."""
    global _protecting
    prev, _protecting = _protecting, True
    try:
        yield
    finally:
        _protecting = prev
        if not prev:
            _INPUTS.clear()


def note_input(path: str | os.PathLike) -> None:
    """Record ``path`` as an input of the running command (the readers of :mod:`voxdiff.data.io`,
    data sets and model loaders call it): inside :func:`protecting_inputs`, :func:`check_output_path`,
    :func:`staged_dir` and :func:`atomic_path` then never replace it or a folder that holds it."""
    if _protecting:
        with contextlib.suppress(OSError, RuntimeError):
            _INPUTS.add(Path(path).resolve())


def replaced_input(path: str | os.PathLike, inputs=()) -> Path | None:
    """The input that writing ``path`` would destroy: an input that is ``path`` or lies inside it
    (``inputs`` besides those recorded by :func:`note_input`); None when there is none."""
    try:
        out = Path(path).resolve()
    except (OSError, RuntimeError):
        return None
    for src in [*_INPUTS, *(Path(i).resolve() for i in inputs if i is not None)]:
        if src == out or out in src.parents:
            return src
    return None


def _refuse_replacing_input(p: Path, inputs=()) -> None:
    src = replaced_input(p, inputs)
    if src is not None:
        what = "is" if src == p.resolve() else "holds"
        raise InputError(p, f"the output {what} an input of this command ({src}); write it elsewhere "
                            f"(--force never replaces inputs)")


def check_output_path(path: str | os.PathLike, force: bool = False, inputs=()) -> Path:
    """Refuse an existing non-empty output folder (or existing file) unless ``force``, and always an
    output that is, or is a folder holding, one of ``inputs`` or of the inputs read so far."""
    p = Path(path)
    _refuse_replacing_input(p, inputs)
    if p.exists():
        if p.is_dir():
            if any(p.iterdir()) and not force:
                raise InputError(p, "output folder exists and is not empty (use --force to replace it)")
        elif not force:
            raise InputError(p, "output file exists (use --force to overwrite it)")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    p = Path(path)
    if not force:
        check_output_path(p, force=False)
    p.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffixes so that writers that look at the extension (nibabel: .nii.gz) still work
    suffix = "".join(p.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=f".tmp{suffix}", dir=p.parent)
    os.close(fd)
    tmp_p = Path(tmp)
    os.chmod(tmp_p, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_p
        _refuse_replacing_input(p)  # an input read while the output was being made
        os.replace(tmp_p, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_p.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def emit_row(row: dict, out: str | os.PathLike | None = None) -> None:
    """Print ``row`` as one JSON line and, with ``out``, append the line to that JSON-lines file (the
    benchmarks' result rows: an interrupted run keeps the rows it finished)."""
    line = json.dumps(row, default=_json_default)
    if out is not None:
        with open(out, "a") as f:
            f.write(line + "\n")
    print(line, flush=True)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, force: bool = False, keep: bool = False) -> Iterator[Path]:
    """Build an output folder atomically.

    Yields a fresh temporary folder next to ``path``. When the block finishes without error the
    folder is moved to ``path`` (an old folder there is removed only then, and only with
    ``force``). On error the temporary folder is removed and ``path`` is untouched.

    ``keep``: for work worth keeping across interruptions (training with checkpoints): the folder
    is ``.NAME.partial`` beside ``path``, left in place on error, and yielded again, with what the
    interrupted attempt wrote, by the next ``staged_dir(path, keep=True)``.
    """
    p = Path(path)
    check_output_path(p, force=force)
    p.parent.mkdir(parents=True, exist_ok=True)
    if keep:
        tmp = kept_work_dir(p)
        tmp.mkdir(exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".partial", dir=p.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        _refuse_replacing_input(p)  # an input read while the folder was being made
    except BaseException:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if p.exists():
        old = p.with_name(f".{p.name}.old-{os.getpid()}")
        os.replace(p, old)
        os.replace(tmp, p)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, p)


def kept_work_dir(path: str | os.PathLike) -> Path:
    """The work folder that ``staged_dir(path, keep=True)`` keeps after an interruption."""
    p = Path(path)
    return p.parent / f".{p.name}.partial"


@contextlib.contextmanager
def run_folder(path: str | os.PathLike, has_checkpoint: Callable[[], bool]) -> Iterator[Path]:
    """Create (if needed) the folder of a training run that writes in place, and take it back on failure.

    A run that raises (an error, a NaN stop, Ctrl-C) while ``has_checkpoint()`` is still false has
    nothing worth resuming: the files and folders it added to ``path`` are removed, and ``path``
    itself if the run created it, so that the next attempt is not refused as a non-empty folder.
    What was in the folder before the block is left alone; once a checkpoint exists nothing is removed
    (``--resume`` continues from it)."""
    p = Path(path)
    before = set(p.iterdir()) if p.is_dir() else None
    p.mkdir(parents=True, exist_ok=True)
    try:
        yield p
    except BaseException:
        if not has_checkpoint():
            if before is None:
                shutil.rmtree(p, ignore_errors=True)
            else:
                for q in set(p.iterdir()) - before:
                    if q.is_dir() and not q.is_symlink():
                        shutil.rmtree(q, ignore_errors=True)
                    else:
                        q.unlink(missing_ok=True)
        raise
