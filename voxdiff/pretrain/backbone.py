"""Backbone names kept importable from their first home (``voxdiff.pretrain.backbone``).

The backbones live in :mod:`voxdiff.pretrain.backbones`: the interface and the registry there,
the default UNet in ``backbones/unet.py``, vox2vec's FPN3d in ``backbones/fpn3d.py``.
"""

from .backbones import (  # noqa: F401
    BACKBONES,
    Backbone,
    FPN3d,
    LevelInfo,
    PyramidBackbone,
    build_backbone,
    count_parameters,
    timestep_embedding,
)
from .backbones.unet import ResBlock  # noqa: F401
