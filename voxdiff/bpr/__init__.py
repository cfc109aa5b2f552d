"""Body part regressors: self-supervised anatomical coordinates for every voxel of a CT.

* ``slice``: one score per axial slice growing from feet to head (Yan et al. 2018; Schuhegger et
  al. 2021), broadcast over the slice (1 channel).
* ``ape``: three anatomical coordinates per voxel (in the spirit of Goncharov et al. 2024's
  Anatomical Positional Embeddings), trained so that embedding distances match physical distances
  and the same voxel agrees across overlapping crops.

Public API::

    model = load_bpr(path, kind=None)               # frozen, eval mode
    coords = coords_for_patches(model, x, sincos=0, spacing=None)   # (B,1,X,Y,Z) -> (B,C',X,Y,Z)
    train_bpr(BPRTrainConfig(kind="slice", data=BPRData(path=DIR)), out_dir)
    predict_volume(model_path, ct_path, out_path, plot=None)
    field = volume_field(model, hu, spacing)        # whole-volume map as per-axis profiles
    field.crop(origin, size)                        # (C, *size) map of any box of voxels
    case_fields(model, cases, cache_dir)            # one field per preprocessed case, cached
"""

from voxdiff.core.lazy import lazy_exports

# imported on first use (voxdiff.core.lazy): `import voxdiff.bpr.cli` loads neither torch nor the models
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".ensemble": ("BPREnsembleConfig", "ensemble_slice_models", "write_ensemble"),
    ".fields": ("CoordinateField", "FieldCache", "case_fields", "crop_fields", "volume_field"),
    ".models": ("BPR_KINDS", "BPR_VERSION", "APERegressor", "BodyPartRegressor", "SliceRegressor", "build_bpr",
                "coords_channels", "coords_for_patches", "load_bpr", "save_bpr", "sincos_encode"),
    ".predict": ("predict_volume",),
    ".train": ("BPRData", "BPRModel", "BPROptim", "BPRTaskOptions", "BPRTrainConfig", "train_bpr"),
})
