"""Evaluation: Dice (NaN/0 semantics), surface metrics, cross-validation reports and figures."""

from voxdiff.core.lazy import lazy_exports

# imported on first use (voxdiff.core.lazy)
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "voxdiff.probe.predict": ("predict_case", "predict_original"),
    ".metrics": ("aggregate_cases", "aggregate_folds", "case_metrics", "dice_per_class"),
    ".report": ("EvaluateConfig", "evaluate_cases", "evaluate_models"),
})
