"""Backbones by name: the interface (:class:`PyramidBackbone`) and the registry.

``BACKBONES`` maps the names that ``voxdiff pretrain --backbone NAME`` accepts to classes;
``build_backbone(name, **config)`` builds one (``config`` = the class's constructor arguments, as
returned by its ``config()`` and saved in ``model.json``)::

    net = build_backbone("fpn3d", in_channels=1, out_channels=1, base_channels=16, num_levels=6)
    isinstance(net, PyramidBackbone)  # True
    net.name, net.config()            # "fpn3d", {...}: what model.json stores

* ``unet`` (:class:`~voxdiff.pretrain.backbones.unet.Backbone`): GroupNorm/SiLU UNet with
  concatenated skips, 1 block per level by default; voxdiff's CPU-sized default.
* ``fpn3d`` (:class:`~voxdiff.pretrain.backbones.fpn3d.FPN3d`): vox2vec's FPN (BatchNorm, ReLU,
  summed 1x1x1 lateral connections, nearest upsampling, 2 blocks per level).

A new architecture subclasses :class:`PyramidBackboneBase` (or implements the Protocol itself)
and is added with ``register("name")``.
"""

from __future__ import annotations

from typing import Any, Callable

from ...core.errors import InputError
from .base import FEATURE_SIDES, LevelInfo, PyramidBackbone, PyramidBackboneBase, check_side, count_parameters, timestep_embedding
from .fpn3d import FPN3d
from .unet import Backbone

__all__ = ["BACKBONES", "DEFAULT_BACKBONE", "FEATURE_SIDES", "Backbone", "FPN3d", "LevelInfo", "PyramidBackbone",
           "PyramidBackboneBase", "backbone_name", "build_backbone", "check_side", "count_parameters", "register",
           "timestep_embedding"]

BACKBONES: dict[str, type] = {}
DEFAULT_BACKBONE = "unet"  # what checkpoints written before the registry existed hold


def register(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.name = name  # type: ignore[attr-defined]
        BACKBONES[name] = cls
        return cls

    return deco


register("unet")(Backbone)
register("fpn3d")(FPN3d)


def build_backbone(name: str, **kwargs: Any) -> PyramidBackbone:
    """The backbone registered as ``name`` built with ``kwargs``; :class:`InputError` for an unknown
    name, ``TypeError``/``ValueError`` for arguments the class refuses."""
    cls = BACKBONES.get(str(name))
    if cls is None:
        raise InputError(None, f"unknown backbone {name!r}; choose from {', '.join(sorted(BACKBONES))}")
    net = cls(**kwargs)
    if not isinstance(net, PyramidBackbone):  # a registered class must honour the interface
        raise TypeError(f"backbone {name!r} ({cls.__name__}) does not implement PyramidBackbone")
    return net


def backbone_name(net: Any) -> str:
    """The registry name of ``net`` (its class's ``name``); ``TypeError`` for unregistered classes."""
    for name, cls in BACKBONES.items():
        if type(net) is cls:
            return name
    raise TypeError(f"{type(net).__name__} is not a registered backbone ({', '.join(sorted(BACKBONES))})")
