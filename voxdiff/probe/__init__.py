"""Probing frozen features: heads, training (frozen / fine-tuned / from scratch), segmenter bundles."""

from voxdiff.core.lazy import lazy_exports

# imported on first use (voxdiff.core.lazy)
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".heads": ("LinearHead", "NonLinearHead", "build_head", "count_parameters", "make_head"),
    ".predict": ("predict_case", "predict_logits", "predict_original"),
    ".train": ("ProbeConfig", "fit_heads", "fit_network", "train_probe"),
})
