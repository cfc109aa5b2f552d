"""Errors that the command line turns into a one-line message and exit code 2."""

from __future__ import annotations

import os


class VoxdiffWarning(UserWarning):
    """Something a user should know about an input that does not stop the command (a DICOM series
    with missing slices, a case skipped). The message starts with the file it is about; the CLI
    prints it as ``voxdiff: warning: <message>`` on one line, once, and ``--quiet`` silences it."""


class VoxdiffDeprecationWarning(VoxdiffWarning):
    """An old spelling (a renamed config key or option) that still works but will go away; shown
    like every :class:`VoxdiffWarning`."""


class VoxdiffError(Exception):
    """A user-facing problem: bad input, bad config, incompatible model.

    The CLI prints ``voxdiff: error: <message>`` on one line and exits with code 2.
    """

    exit_code = 2


class InputError(VoxdiffError):
    """A problem with a specific file or folder; the message names it."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ModelError(InputError):
    """A model file or folder that is not what the caller expects (kind, version, missing parts)."""


class TrainingError(VoxdiffError):
    """Training cannot continue (e.g. a NaN loss); the last good checkpoint is kept."""
