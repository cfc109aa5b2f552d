"""Segmentation of new CTs with a segmenter bundle (``voxdiff segment``)."""

from voxdiff.core.lazy import lazy_exports

# imported on first use (voxdiff.core.lazy)
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".bundle": ("Segmenter", "load_segmenter"),
    ".segment": ("SegmentConfig", "organ_volumes_ml", "segment_ct"),
})
