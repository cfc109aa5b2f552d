"""Self-supervised pretraining of a 3D backbone: diffusion (with/without BPR) and baselines.

Public API::

    from voxdiff.pretrain import Backbone, LevelInfo, PretrainConfig, pretrain, load_pretrained
    from voxdiff.pretrain import FPN3d, PyramidBackbone, BACKBONES, build_backbone
    # PretrainConfig's sections (optim and runtime: voxdiff.core.sections.OptimConfig, RuntimeConfig)
    from voxdiff.pretrain import PretrainData, BackboneConfig, TaskOptions, OnlineProbeConfig
"""

from voxdiff.core.lazy import lazy_exports

# imported on first use (voxdiff.core.lazy)
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".backbones": ("BACKBONES", "Backbone", "FPN3d", "LevelInfo", "PyramidBackbone", "build_backbone"),
    ".load": ("FeatureExtractor", "load_backbone", "load_pretrained"),
    ".train": ("BackboneConfig", "OnlineProbeConfig", "PretrainConfig", "PretrainData", "TaskOptions", "pretrain"),
})
