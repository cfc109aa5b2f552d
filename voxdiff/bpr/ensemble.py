"""``voxdiff bpr ensemble``: one slice model from several trained with different seeds.

Slice models trained on the same data with different seeds order the slices of an unseen scan
differently where the anatomy is ambiguous to them (the heart and diaphragm of a real chest CT, the
pelvis of an abdominal one), and their errors are partly independent. The ensemble scores a slice
with every member and averages the members' *calibrated* scores: each member's calibration maps the
1st..99th percentile of its own training scores to 0..1, so members trained on the same volumes
count on one scale whatever the slope and offset of their raw scores. The result is an ordinary
slice model (``kind`` "slice", ``members`` in its architecture, BPR version 3) that every stage
takes where it takes a slice model: ``voxdiff bpr predict / evaluate``, the ape model's slice anchor
(``--task.slice_model``) and the condition cache, whose signature covers every member's weights.

Its calibration is the identity; one unit is the harmonic mean of the members' ``mm_per_unit``
(the mean of scores rising at 1/m_k units per mm rises at mean(1/m_k)).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..core.config import write_config
from ..core.errors import InputError
from ..core.layers import freeze
from ..core.outputs import check_output_path, staged_dir
from .models import BodyPartRegressor, SliceRegressor, load_bpr, save_bpr

# what every member must share (besides the preprocessing)
_SHARED_ARCH = ("channels", "patch_size", "context", "context_step", "context_fill")


@dataclass
class BPREnsembleConfig:
    """Options of ``voxdiff bpr ensemble``.

    Args:
        models: folders (or ``.safetensors`` files) of trained slice models, at least two, with the
            same architecture and preprocessing (e.g. one ``voxdiff bpr train --kind slice`` command
            run with different ``--seed``).
    """

    models: list[str] = field(default_factory=list)


def ensemble_slice_models(models: Sequence[str | os.PathLike | SliceRegressor], names: Sequence[str] | None = None
                          ) -> SliceRegressor:
    """Combine trained slice models into one ensemble slice model (frozen, eval mode).

    ``models``: paths or loaded single slice models (``names``: how errors call them). Refuses (``InputError`` naming the member) fewer
    than two members, another kind, an ensemble as a member, and members whose architecture or
    preprocessing differ from the first one's.
    """
    if len(models) < 2:
        raise InputError(None, f"an ensemble needs at least two slice models, got {len(models)}")
    names = list(names) if names is not None else [str(m) if not isinstance(m, BodyPartRegressor) else f"<model {k}>"
                                                   for k, m in enumerate(models)]
    loaded: list[SliceRegressor] = []
    for m, name in zip(models, names):
        sm = m if isinstance(m, BodyPartRegressor) else load_bpr(m, kind="slice")
        if not isinstance(sm, SliceRegressor):
            raise InputError(name, f"not a slice body part regressor (kind {sm.kind!r})")
        if sm.n_members > 1:
            raise InputError(name, f"is already an ensemble of {sm.n_members} slice models; give its members instead")
        loaded.append(sm)
    first = loaded[0]
    for sm, name in zip(loaded[1:], names[1:]):
        for k in _SHARED_ARCH:
            if getattr(sm, k) != getattr(first, k):
                raise InputError(name, f"slice model {k} {getattr(sm, k)!r} differs from the first member's {getattr(first, k)!r}")
        if sm.preprocess != first.preprocess:
            keys = sorted(k for k in set(sm.preprocess) | set(first.preprocess) if sm.preprocess.get(k) != first.preprocess.get(k))
            raise InputError(name, f"preprocessing differs from the first member's ({', '.join(keys)})")
    inv = [1.0 / sm.mm_per_unit for sm in loaded]
    unit = len(inv) / sum(inv)
    ens = SliceRegressor(channels=first.channels, unit_mm=unit, context=first.context, context_step=first.context_step,
                         context_fill=first.context_fill, members=len(loaded), preprocess=dict(first.preprocess), patch_size=first.patch_size)
    with torch.no_grad():
        for k, sm in enumerate(loaded):
            ens.members[k].features.load_state_dict(sm.features.state_dict())
            ens.members[k].head.load_state_dict(sm.head.state_dict())
            ens.member_scale[k] = sm.calib_scale[0]
            ens.member_offset[k] = sm.calib_offset[0]
    ens.calibration_info = {
        "method": "ensemble", "mm_per_unit": unit, "scale": 1.0, "offset": 0.0,
        "members": [{"model": name, "calibration": dict(sm.calibration_info)} for name, sm in zip(names, loaded)],
    }
    return freeze(ens)


def write_ensemble(cfg: BPREnsembleConfig, out: str | os.PathLike, force: bool = False) -> Path:
    """``voxdiff bpr ensemble``: build the ensemble of ``cfg.models`` and write it to ``out`` (a model
    folder: ``model.safetensors`` + ``model.json`` + ``config.yaml``), atomically."""
    check_output_path(out, force=force, inputs=cfg.models)
    ens = ensemble_slice_models(cfg.models)
    with staged_dir(out, force=force) as tmp:
        save_bpr(tmp, ens, meta={"members": [str(m) for m in cfg.models]})
        write_config(tmp, cfg)
    return Path(out)


__all__ = ["BPREnsembleConfig", "ensemble_slice_models", "write_ensemble"]
