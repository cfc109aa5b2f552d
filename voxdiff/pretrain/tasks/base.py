"""The interface every pretraining method implements.

The training engine (``voxdiff.pretrain.train``) owns the loop: data, optimiser, schedule, EMA,
DDP, checkpoints, logging. A task owns what differs between methods:

* how a training batch is drawn from preprocessed cases (``sample_batch``),
* how many input channels the backbone gets (``in_channels``),
* the loss (``loss``), with any extra trainable modules (e.g. a contrastive projector) held as
  sub-modules of the task so that the engine optimises and checkpoints them too,
* how the frozen backbone is fed at feature-extraction time (``feature_inputs``): for diffusion
  this noises the image to the feature timestep with a fixed noise seed and concatenates the BPR
  map; for the other methods it is the image itself.

Tasks are registered by name (``@register_task("restorative")``) so ``voxdiff pretrain --method
NAME`` and ``load_pretrained`` can find them.

Contract details (engine side, added compatibly; nothing above changed)
-----------------------------------------------------------------------
* ``config`` given to the constructor is a JSON-able ``dict``: ``{"preprocess": {...the model's
  PreprocessConfig as a dict, incl. "hu_window"...}, **method options}``. The method options come
  from ``PretrainConfig.task.options`` (a dict, e.g. ``{"temperature": 0.1}`` or
  ``{"contrastive": {...}}``) plus, when the task class declares a dataclass ``Config``, every
  field of the ``PretrainConfig.task`` section with the same name as a ``Config`` field (e.g. the
  diffusion task's ``condition``/``bpr_path``). The dict is saved in the backbone's ``model.json`` and the task is
  rebuilt from it by ``load_pretrained``. ``self.hu_window`` gives the window.
* Order of calls: ``task = Cls(config)`` -> ``backbone = build_backbone(cfg.backbone.name,
  in_channels=task.in_channels, out_channels=task.out_channels, time_embedding=task.uses_timestep,
  ...)`` (any :class:`voxdiff.pretrain.backbones.PyramidBackbone`: ``unet`` or ``fpn3d``) ->
  ``task.setup(backbone)`` (create modules that depend on ``backbone.levels``, e.g. a projector;
  called before the optimiser is built and before weights are loaded) -> training.
* ``sample_batch(cases, ...)``: ``cases`` are preprocessed :class:`voxdiff.data.types.Case` with
  ``image`` in HU: a float32 array, or the int16 memory map of a preprocessing cache (convert only
  the patches to float, never the whole volume); it may run in a worker process, and must draw every
  random number from ``rng`` (the engine derives it from the seed, rank and step). The task maps
  patches to [0, 1] with ``hu_to_unit(.., self.hu_window)`` (outside the volume: 0.0); ``label``
  may be None. The engine moves every tensor of the returned
  dict to the device. The base class implements random patches (``random_patches``).
* ``loss(backbone, batch, generator)``: ``backbone`` is the plain backbone module (the engine
  wraps task + backbone together for DDP, so calling ``backbone(x, t)`` or
  ``backbone.features(...)`` both work). ``generator`` is a seeded torch.Generator on the batch's
  device: use it for every random draw so runs are reproducible and resumable. Return the scalar
  loss and a dict of metrics to log (averaged over the log interval by the engine): python floats or
  lists of them, tensors (mean of the elements) or ``{"sum": tensor, "count": tensor}``; tensors are
  summed on the device, so returning them avoids a host synchronisation per step.
* ``trains``: ``False`` for methods without training steps (``random``): the engine writes the
  initial weights.
* ``feature_passes(image, voxel_index=None, coords=None)``: a list of ``(input, t)`` pairs, one backbone pass
  each; the pyramids of the passes are concatenated level by level (channels). The default is
  ``[self.feature_inputs(image)]``. ``voxel_index`` (B, 3, X, Y, Z) int64, optional: the absolute
  voxel index of every input voxel in the whole volume, so that position-dependent inputs (the
  diffusion task's fixed noise) are identical for overlapping sliding windows.
* A task holding a frozen helper network (the BPR) must keep it out of ``state_dict`` (it is saved
  separately as ``bpr/`` beside the backbone).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from voxdiff.data.patches import crop_or_pad  # noqa: F401  (also used by the tasks)
from voxdiff.data.preprocess import HU_WINDOW

TASKS: dict[str, type["PretextTask"]] = {}

_TASK_MODULES = ("diffusion", "restorative", "contrastive", "random_init")


def register_task(name: str):
    def deco(cls: type["PretextTask"]) -> type["PretextTask"]:
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


def _import_task_modules() -> None:
    for mod in _TASK_MODULES:
        full = f"{__package__}.{mod}"
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as e:  # a method not present in this build
            if e.name != full:
                raise


def get_task_class(name: str) -> type["PretextTask"]:
    # importing the modules fills the registry
    _import_task_modules()
    if name not in TASKS:
        raise KeyError(f"unknown pretraining method {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


def available_methods() -> list[str]:
    _import_task_modules()
    return sorted(TASKS)


def make_task_config(cls: type["PretextTask"], options: dict[str, Any] | None = None, defaults: Any = None,
                     preprocess: Any = None) -> dict[str, Any]:
    """The task's config dict: ``{"preprocess": preprocess, **fields, **options}`` where ``fields``
    are the attributes of ``defaults`` (e.g. the PretrainConfig's ``task`` section) named like
    ``cls.Config`` fields."""
    from voxdiff.core.config import to_dict

    out: dict[str, Any] = {}
    if preprocess is not None:
        out["preprocess"] = to_dict(preprocess)
    if cls.Config is not None and defaults is not None:
        for f in dataclasses.fields(cls.Config):
            if hasattr(defaults, f.name):
                out[f.name] = to_dict(getattr(defaults, f.name))
    out.update(to_dict(options or {}))
    return out


def options_from_config(cls: type, config: Any, section: str) -> Any:
    """The task's options dataclass ``cls`` from the engine's config dict (see ``base``): fields may
    be given flat (``{"n_pairs": 512}``) or in a section named after the method
    (``{"contrastive": {...}}``); ``preprocess`` is the model's preprocessing. Unknown keys raise."""
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    if not isinstance(config, dict):
        raise TypeError(f"task config must be a dict, got {type(config).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in config.items() if k not in ("preprocess", section)}
    sec = config.get(section) or {}
    values.update(sec if isinstance(sec, dict) else dataclasses.asdict(sec))
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {section} options {unknown}; known: {sorted(names)}")
    from voxdiff.core.config import from_dict

    return from_dict(cls, values)


class PretextTask(nn.Module):
    name: ClassVar[str] = "base"
    Config: ClassVar[type | None] = None
    trains: ClassVar[bool] = True

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    # --- what the backbone sees -------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        """Input channels of the backbone (1 = image only)."""
        return 1

    @property
    def out_channels(self) -> int:
        """Channels of the backbone's 1x1x1 output conv (noise / reconstruction)."""
        return 1

    @property
    def uses_timestep(self) -> bool:
        return False

    @property
    def hu_window(self) -> tuple[float, float]:
        pre = self.config.get("preprocess") if isinstance(self.config, dict) else getattr(self.config, "preprocess", None)
        w = (pre.get("hu_window") if isinstance(pre, dict) else getattr(pre, "hu_window", None)) if pre else None
        return HU_WINDOW if w is None else (float(w[0]), float(w[1]))

    def setup(self, backbone: nn.Module) -> None:
        """Called once after the backbone is built (before the optimiser and before loading weights)."""

    def prepare(self, cases: list, cache_dir: Any = None, progress: bool = False) -> None:
        """Called once with the training cases before the first batch (e.g. to map every volume
        with a frozen helper network); ``cache_dir`` is the preprocessing cache, if any."""

    # --- training -----------------------------------------------------------------------------
    def sample_batch(self, cases: list, batch_size: int, patch_size: tuple[int, int, int],
                     rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Default: independent random patches. Returns at least ``image`` (B,1,X,Y,Z) in [0,1]
        and ``coords_mm`` (B,3,X,Y,Z)."""
        return random_patches(cases, batch_size, patch_size, rng, window=self.hu_window)

    def loss(self, backbone: nn.Module, batch: dict[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss and a dict of extra metrics to log."""
        raise NotImplementedError

    # --- frozen features ------------------------------------------------------------------------
    def feature_inputs(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(backbone input, timestep or None) for extracting features of ``image`` in [0,1]."""
        return image, None

    def feature_passes(self, image: torch.Tensor, voxel_index: torch.Tensor | None = None,
                       coords: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Backbone passes whose pyramids are concatenated into the features (default: one).
        ``coords``: a precomputed condition map (e.g. the BPR of the whole volume, cropped to the
        window) used instead of computing it from ``image``; ignored by unconditioned tasks."""
        return [self.feature_inputs(image)]


# --------------------------------------------------------------------------------- patch sampling


def _unit_patch(hu: np.ndarray, origin, size, window) -> np.ndarray:
    from voxdiff.data.preprocess import hu_to_unit

    src = tuple(slice(max(o, 0), max(max(o, 0), min(o + s, n))) for o, s, n in zip(origin, size, hu.shape))
    sub = hu_to_unit(np.asarray(hu[src], dtype=np.float32), window)
    # the sub-volume starts at max(o, 0); the patch origin relative to it is min(o, 0)
    return crop_or_pad(sub, tuple(min(o, 0) for o in origin), size, 0.0)


def random_origin(shape: tuple[int, ...], size: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    """Uniform patch origin; a volume smaller than the patch is centred (padded on both sides)."""
    o = []
    for n, s in zip(shape, size):
        if n >= s:
            o.append(int(rng.integers(0, n - s + 1)))
        else:
            o.append(-((s - n) // 2))
    return tuple(o)  # type: ignore[return-value]


def coords_mm_for(affine: np.ndarray, origin: tuple[int, int, int], size: tuple[int, int, int]) -> np.ndarray:
    """(3, X, Y, Z) float32 world mm of each voxel of the patch (extrapolated outside the volume)."""
    idx = np.stack(np.meshgrid(*[np.arange(o, o + s, dtype=np.float64) for o, s in zip(origin, size)],
                               indexing="ij"), 0)
    a = np.asarray(affine, dtype=np.float64)
    world = np.einsum("ij,jxyz->ixyz", a[:3, :3], idx) + a[:3, 3, None, None, None]
    return world.astype(np.float32)


def random_patches(cases: list, batch_size: int, patch_size: tuple[int, int, int],
                   rng: np.random.Generator, window: tuple[float, float] = HU_WINDOW,
                   with_labels: bool = False, with_coords: bool = True) -> dict[str, torch.Tensor]:
    """Independent random patches of randomly chosen cases (HU images, mapped to [0, 1] with ``window``).

    Returns ``image`` (B,1,X,Y,Z) float32, ``coords_mm`` (B,3,X,Y,Z), ``origin`` (B,3) int64 voxel
    index of the patch corner, ``case_index`` (B,), and ``label`` (B,1,X,Y,Z) uint8 when
    ``with_labels`` and every case has one. ``with_coords=False`` leaves out ``coords_mm`` (its
    computation costs more than the patches at large patch sizes).
    """
    size = tuple(int(s) for s in patch_size)
    imgs, coords, origins, cids, labels = [], [], [], [], []
    for _ in range(batch_size):
        ci = int(rng.integers(0, len(cases)))
        case = cases[ci]
        o = random_origin(case.image.shape, size, rng)
        imgs.append(_unit_patch(case.image, o, size, window))
        if with_coords:
            coords.append(coords_mm_for(case.meta.affine, o, size))
        origins.append(o)
        cids.append(ci)
        if with_labels and case.label is not None:
            labels.append(crop_or_pad(case.label, o, size, 0))
    out = {
        "image": torch.from_numpy(np.stack(imgs)[:, None]),
        "origin": torch.tensor(origins, dtype=torch.int64),
        "case_index": torch.tensor(cids, dtype=torch.int64),
    }
    if with_coords:
        out["coords_mm"] = torch.from_numpy(np.stack(coords))
    if with_labels and len(labels) == batch_size:
        out["label"] = torch.from_numpy(np.stack(labels)[:, None])
    return out
