"""Outputs that never leave a half-written file or folder behind.

* :func:`atomic_write` writes a file through a temporary sibling and ``os.replace``.
* :func:`staged_dir` builds an output folder under a temporary sibling name and moves it into place
  only when the block succeeds; an existing non-empty folder is refused unless ``force``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError


def check_output_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing non-empty output folder (or existing file) unless ``force``."""
    p = Path(path)
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
