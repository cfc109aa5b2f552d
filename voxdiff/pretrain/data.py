"""The data path of pretraining: batches by step number, drawn in worker processes.

A batch is a pure function of ``(seed, rank, step)``: :func:`step_generator` derives the numpy
generator of step ``k`` on rank ``r`` from those three numbers and the task draws the batch with it
(``task.sample_batch(cases, batch_size, patch_size, rng)``). So the batch of step ``k`` is the same
whatever the number of worker processes and whether the run was resumed; nothing about the data
has to be saved in a train state.

:class:`StepBatches` is a map-style ``torch.utils.data.Dataset`` over step numbers and
:class:`StepRange` the sampler that yields the steps ``start .. end - 1`` in order; the
``DataLoader`` (``batch_size=None``: the task already returns whole batches) hands them back in
step order however many workers build them. ``workers=0`` draws each batch in the training process
when it is needed, as before.

Memory: with a preprocessing cache the cases hold int16 memory maps of the cached volumes
(``load_preprocessed(..., mmap=True)``); patches are read from the maps and only the patch is turned
into float32, so a process (and each worker, which shares the maps with the page cache) holds the
pages it touched, not a float32 copy of every volume. Worker processes are forked: the cases (maps or
in-memory arrays), the task and its whole-volume BPR fields are inherited without copying.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.errors import InputError, VoxdiffError

_ERROR = "__voxdiff_error__"

# tag mixed into every step's seed so that these streams differ from any other use of (seed, rank)
_STREAM = 0x5EED


def step_generator(seed: int, rank: int, step: int) -> np.random.Generator:
    """The numpy generator of the batch of ``step`` on ``rank`` (independent of workers and resume)."""
    return np.random.default_rng([int(seed), int(rank), int(step), _STREAM])


class StepBatches(Dataset):
    """Dataset whose item ``k`` is the batch of step ``k``: ``sample(cases, batch_size, patch_size, rng)``
    with ``rng = step_generator(seed, rank, k)``."""

    def __init__(self, sample: Callable[..., dict[str, Any]], cases: list, batch_size: int,
                 patch_size: tuple[int, int, int], seed: int, rank: int = 0):
        self.sample = sample
        self.cases = cases
        self.batch_size = int(batch_size)
        self.patch_size = tuple(int(s) for s in patch_size)
        self.seed = int(seed)
        self.rank = int(rank)

    def __getitem__(self, step: int) -> dict[str, Any]:
        rng = step_generator(self.seed, self.rank, step)
        try:
            return self.sample(self.cases, self.batch_size, self.patch_size, rng)
        except VoxdiffError as e:
            if torch.utils.data.get_worker_info() is None:
                raise
            # a user error in a worker (e.g. an unreadable volume): handed to the training process,
            # which raises it as it is (the DataLoader would turn it into a RuntimeError + traceback)
            return {_ERROR: (type(e), getattr(e, "path", None), getattr(e, "problem", str(e)))}


class StepRange(Sampler[int]):
    """Yields ``start, start + 1, ..., end - 1``."""

    def __init__(self, start: int, end: int):
        self.start, self.end = int(start), int(end)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return max(0, self.end - self.start)


def _worker_init(_: int) -> None:
    # one intra-op thread per worker: the workers run numpy/scipy patch code side by side
    torch.set_num_threads(1)


def _context():
    # fork shares the cases (memory maps or arrays) and the task with the workers without pickling
    try:
        return mp.get_context("fork")
    except ValueError:  # platforms without fork
        return None


def step_batches(batches: StepBatches, start: int, end: int, workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2) -> Iterator[dict[str, Any]]:
    """The batches of steps ``start .. end - 1`` in order.

    ``workers=0``: each batch is drawn in this process when it is asked for (no DataLoader, no
    copies; not pinned either: pinning here would be one more copy on the critical path).
    ``workers > 0``: a ``DataLoader`` with that many forked worker processes, each keeping
    ``prefetch_factor`` batches ready, ``persistent_workers``, and ``pin_memory`` (the loader's
    thread copies each batch into page-locked memory, so the copy to a GPU is asynchronous)."""
    if workers <= 0:
        for k in range(start, end):
            yield batches[k]
        return
    if end <= start:
        return
    loader = DataLoader(batches, batch_size=None, sampler=StepRange(start, end), num_workers=int(workers),
                        pin_memory=pin_memory, prefetch_factor=max(1, int(prefetch_factor)),
                        persistent_workers=True, worker_init_fn=_worker_init, multiprocessing_context=_context())
    it = iter(loader)
    try:
        for batch in it:
            if _ERROR in batch:
                cls, path, problem = batch[_ERROR]
                raise cls(path, problem) if issubclass(cls, InputError) else cls(problem)
            yield batch
    finally:
        # stop the workers now (a NaN stop or an error must not leave them running)
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del it, loader


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of ``batch`` on ``device`` (asynchronous from pinned memory)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
