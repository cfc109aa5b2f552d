"""Segmenter bundles (model folders for ``voxdiff segment``); the format lives in
:mod:`voxdiff.probe.bundle` because training writes it."""

from voxdiff.probe.bundle import (  # noqa: F401
    SEGMENTER_FORMAT_VERSION,
    Segmenter,
    load_segmenter,
    read_segmenter_info,
    save_segmenter,
)
