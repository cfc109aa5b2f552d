"""Synthetic abdominal CT phantoms: the embedded default data set of voxdiff.

* :func:`generate_phantom` (seed, :class:`PhantomConfig`) -> :class:`~voxdiff.data.types.Case`
* :func:`make_phantom_dataset` writes an nnU-Net folder (+ ``unlabelled/``)
* :func:`preview_png` draws axial/coronal/sagittal views with a label overlay

See docs/PHANTOMS.md for the anatomy, the sources of variation and the organ volume ranges.
"""

from .dataset import (
    PHANTOM_DATASET_NAME,
    PHANTOM_DESCRIPTION,
    case_plan,
    case_seed,
    fitted_on_phantoms,
    is_phantom_dataset,
    is_phantom_image,
    make_phantom_dataset,
    training_data_record,
)
from .generator import PHASES, VARIATIONS, WIDE_VARIATION, Z_MODES, PhantomConfig, generate_phantom, with_variation
from .preview import preview_png

__all__ = ["PHANTOM_DATASET_NAME", "PHANTOM_DESCRIPTION", "is_phantom_dataset", "is_phantom_image", "fitted_on_phantoms", "training_data_record", "PHASES", "VARIATIONS", "WIDE_VARIATION", "Z_MODES", "PhantomConfig", "with_variation", "case_plan", "case_seed", "generate_phantom", "make_phantom_dataset", "preview_png"]
