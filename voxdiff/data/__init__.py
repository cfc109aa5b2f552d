"""Real CT data: reading NIfTI/DICOM, preprocessing (RAS, spacing, HU window, body crop) and the way
back to the source grid, a preprocessing cache, dataset adapters with one BTCV label schema,
deterministic splits and patch sampling. Phantoms live in :mod:`voxdiff.data.phantom`.

The names below are re-exported for convenience; importing this package does not import torch.
"""

from .adapters import Dataset, open_dataset
from .cache import PreprocessCache, load_preprocessed, prepare_cache
from .io import load_image, load_label, save_nifti
from .labels import BTCV_LABELS, NUM_CLASSES
from .patches import Patch, sample_batch, sample_patch
from .preprocess import PreprocessConfig, hu_to_unit, preprocess, restore_to_original
from .splits import btcv_vox2vec_splits, kfold_splits, make_splits, read_splits, write_splits
from .types import Case, CaseMeta, CaseRef

__all__ = [
    "BTCV_LABELS", "NUM_CLASSES", "Case", "CaseMeta", "CaseRef", "Dataset", "Patch", "PreprocessCache",
    "PreprocessConfig", "btcv_vox2vec_splits", "hu_to_unit", "kfold_splits", "load_image", "load_label",
    "load_preprocessed", "make_splits", "open_dataset", "prepare_cache", "preprocess", "read_splits",
    "restore_to_original", "sample_batch", "sample_patch", "save_nifti", "write_splits",
]
