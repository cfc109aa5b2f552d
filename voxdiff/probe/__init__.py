"""Probing frozen features: heads, training (frozen / fine-tuned / from scratch), segmenter bundles."""

from .heads import LinearHead, NonLinearHead, build_head, count_parameters, make_head  # noqa: F401
from .predict import predict_case, predict_logits, predict_original  # noqa: F401
from .train import ProbeConfig, fit_heads, fit_network, train_probe  # noqa: F401
