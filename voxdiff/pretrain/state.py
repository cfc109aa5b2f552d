"""The train-state format moved to :mod:`voxdiff.core.trainstate` (one format for every training
loop); this module re-exports it for code that imported it from here."""

from ..core.trainstate import (  # noqa: F401
    KIND,
    LATEST,
    flatten_optimizer,
    latest_train_state,
    python_rng_from_json,
    python_rng_to_json,
    read_train_state,
    unflatten_optimizer,
    write_train_state,
)
