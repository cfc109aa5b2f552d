"""Self-supervised pretraining of a 3D backbone: diffusion (with/without BPR) and baselines.

Public API::

    from voxdiff.pretrain import Backbone, LevelInfo, PretrainConfig, pretrain, load_pretrained
    from voxdiff.pretrain import FPN3d, PyramidBackbone, BACKBONES, build_backbone
    # PretrainConfig's sections (optim and runtime: voxdiff.core.sections.OptimConfig, RuntimeConfig)
    from voxdiff.pretrain import PretrainData, BackboneConfig, TaskOptions, OnlineProbeConfig
"""

from .backbones import BACKBONES, Backbone, FPN3d, LevelInfo, PyramidBackbone, build_backbone  # noqa: F401
from .load import FeatureExtractor, load_backbone, load_pretrained  # noqa: F401
from .train import BackboneConfig, OnlineProbeConfig, PretrainConfig, PretrainData, TaskOptions, pretrain  # noqa: F401
