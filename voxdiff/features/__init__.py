"""Frozen features of whole volumes: sliding-window extraction, caching, the ``voxdiff features`` command.

Public API::

    from voxdiff.features import extract_volume, extract_case, FeatureCache, case_features
"""

from voxdiff.core.lazy import lazy_exports

# imported on first use (voxdiff.core.lazy)
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".cache": ("FeatureCache", "case_features", "extract_case", "feature_key", "load_features", "model_fingerprint",
               "save_features"),
    ".extract": ("DEFAULT_ROI", "ExtractConfig", "WindowPlan", "blend_weights", "default_roi", "estimate_memory",
                 "extract_volume", "feature_input_of", "feature_timesteps", "features_at", "plan_windows",
                 "select_levels", "window_plan", "with_feature_input", "with_feature_settings", "with_timesteps"),
    ".norm": ("NormStatsConfig", "estimate_norm_stats", "fix_group_norms", "load_norm_stats", "save_norm_stats"),
})
