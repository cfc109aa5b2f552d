"""Segmentation of new CTs with a segmenter bundle (``voxdiff segment``)."""

from .bundle import Segmenter, load_segmenter  # noqa: F401
from .segment import SegmentConfig, organ_volumes_ml, segment_ct  # noqa: F401
