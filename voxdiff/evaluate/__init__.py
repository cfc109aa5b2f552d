"""Evaluation: Dice (NaN/0 semantics), surface metrics, cross-validation reports and figures."""

from voxdiff.probe.predict import predict_case, predict_original  # noqa: F401

from .metrics import aggregate_cases, aggregate_folds, case_metrics, dice_per_class  # noqa: F401
from .report import EvaluateConfig, evaluate_cases, evaluate_models  # noqa: F401
