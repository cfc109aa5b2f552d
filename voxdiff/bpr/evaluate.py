"""``voxdiff bpr evaluate MODEL DATA``: how anatomical a body part regressor's coordinates are.

The main measure is **field-of-view consistency**: a voxel's superior-inferior coordinate must not
depend on how much of the body the scan covers. Every case is cut into ``n_crops`` random z-ranges
(from ``min_crop_mm`` to the whole scan; the whole scan is one of them), each crop is mapped as if it
were a scan of its own (:func:`voxdiff.bpr.fields.volume_field`; each crop also narrows the in-plane
field of view to a random ``inplane_min_frac``..1 of each axis; the ``z_only_*`` entries give the same
z-crops with the whole in-plane field of view, the scan's coverage alone), and for every pair of crops the S
coordinate they give to the same physical slice is compared: ``|dS|`` in mm (median, 95th percentile,
maximum over all pairs and shared slices). For a slice model the score is converted to mm with the
model's ``mm_per_unit``. That unit comes from the training loss, not from anatomy, so a model whose
scores are flatter than the unit says (a slope of S against true z below 1) looks more consistent
than it is. ``|dz|`` is therefore reported beside ``|dS|``: the same differences divided by the
case's slope of S against z over the whole scan (least squares), i.e. in mm of true z (NaN when
that slope is not positive). It is the measure to compare models by.

Also per case: Spearman correlation of the S coordinate (slice score) with physical z over the whole
scan and over its inferior and superior halves separately (a score that reverses above the
diaphragm fails the superior half), and, where a label map exists, the S coordinate (mm) at organ
landmarks, whose spread across subjects is reported (:data:`voxdiff.bpr.quality.LANDMARKS`) in mm
of S and, divided by the cases' median slope, in mm of true z (``std_dz``).

Outputs (folder, atomic): ``summary.json`` (config, per case, overall), ``consistency.png`` (S
against true z, one panel per case, one line per crop), ``config.yaml``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.config import to_dict, write_config
from ..core.errors import InputError
from ..core.outputs import atomic_write_json, staged_dir
from .fields import CoordinateField, volume_field
from .models import BodyPartRegressor, load_bpr
from .quality import landmark_spread, landmark_z, s_slope, slice_z_mm, spearman_by_halves


@dataclass
class BPREvalConfig:
    """Options of ``voxdiff bpr evaluate``.

    Args:
        n_crops: random z-crops per case besides the whole scan.
        min_crop_mm: shortest crop (mm of z); crops are uniform between this and the whole scan.
        inplane_min_frac: each crop keeps a random fraction in [this, 1] of the x and y extent (1 = z-crops
            only; below 1 the ``z_only_*`` entries also give the same z-crops with whole slices).
        seed: seed of the crop draw.
        data_kind: data set layout (auto, btcv, nnunet, flare, amos, folder).
        split: nnU-Net style split to read (all, train, test).
        max_cases: evaluate at most this many cases (0 = all).
    """

    n_crops: int = 8
    min_crop_mm: float = 96.0
    inplane_min_frac: float = 0.7
    seed: int = 0
    data_kind: str = "auto"
    split: str = "all"
    max_cases: int = 0


def s_profile_mm(model: BodyPartRegressor, field: CoordinateField) -> np.ndarray:
    """The superior-inferior coordinate (mm) of every axial slice of a field."""
    ch = field.axes.index(2) if model.kind == "slice" else 2
    if field.axes[ch] != 2:
        raise ValueError("the field has no channel along z")
    return field.profiles[ch] * model.mm_per_unit


def crop_ranges(nz: int, spacing_z: float, n_crops: int, min_mm: float, rng: np.random.Generator) -> list[tuple[int, int]]:
    """The whole scan and ``n_crops`` random z-ranges ``[z0, z1)`` of at least ``min_mm`` (or the scan)."""
    lo = min(nz, max(2, int(round(min_mm / spacing_z))))
    out = [(0, nz)]
    for _ in range(n_crops):
        n = int(rng.integers(lo, nz + 1))
        z0 = int(rng.integers(0, nz - n + 1))
        out.append((z0, z0 + n))
    return out


def inplane_box(n: int, min_frac: float, rng: np.random.Generator) -> tuple[int, int]:
    """A random sub-range of ``[0, n)`` keeping a fraction in [min_frac, 1] of it."""
    k = int(round(n * rng.uniform(min(max(min_frac, 0.0), 1.0), 1.0)))
    k = min(n, max(k, min(n, 8)))
    a = int(rng.integers(0, n - k + 1))
    return a, a + k


def _pair_stats(curves: Sequence[tuple[int, int, np.ndarray]]) -> dict[str, float]:
    """Median / p95 / max of |dS| over every pair of curves ``(z0, z1, S)`` on the slices they share."""
    diffs = []
    for i in range(len(curves)):
        for j in range(i + 1, len(curves)):
            a0, a1, sa = curves[i]
            b0, b1, sb = curves[j]
            lo, hi = max(a0, b0), min(a1, b1)
            if hi > lo:
                diffs.append(np.abs(sa[lo - a0:hi - a0] - sb[lo - b0:hi - b0]))
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    return {"median_abs_ds_mm": float(np.median(d)) if d.size else float("nan"),
            "p95_abs_ds_mm": float(np.percentile(d, 95)) if d.size else float("nan"),
            "max_abs_ds_mm": float(d.max()) if d.size else float("nan")}


def crop_consistency(model: BodyPartRegressor, case: Any, n_crops: int = 8, min_mm: float = 96.0,
                     seed: int = 0, inplane_min_frac: float = 1.0) -> dict[str, Any]:
    """|dS| (mm) between the coordinates that different crops of one scan give to the same slice.

    Besides the crops narrowed in-plane, ``z_only_*`` gives the same z-ranges with whole slices (the
    scan's coverage alone; the same numbers when ``inplane_min_frac`` is 1), NaN for a scan no longer
    than the shortest crop (every crop is then the whole scan)."""
    rng = np.random.default_rng(seed)
    sp = tuple(float(s) for s in case.meta.spacing)
    nx, ny, nz = (int(n) for n in case.image.shape)
    ranges = crop_ranges(nz, sp[2], n_crops, min_mm, rng)
    narrowed = inplane_min_frac < 1.0
    curves, z_curves = [], []
    for k, (z0, z1) in enumerate(ranges):
        (x0, x1), (y0, y1) = ((0, nx), (0, ny)) if k == 0 else \
            (inplane_box(nx, inplane_min_frac, rng), inplane_box(ny, inplane_min_frac, rng))
        curves.append((z0, z1, s_profile_mm(model, volume_field(model, case.image[x0:x1, y0:y1, z0:z1], sp))))
        if narrowed and k > 0:  # the whole scan (k = 0) is the same curve either way
            z_curves.append((z0, z1, s_profile_mm(model, volume_field(model, case.image[:, :, z0:z1], sp))))
        else:
            z_curves.append(curves[-1])
    applicable = nz * sp[2] > min_mm  # a scan no longer than the shortest crop tests in-plane crops only
    z_only = _pair_stats(z_curves if applicable else [])  # no pairs: NaN
    return {
        "applicable": applicable,
        "n_crops": len(ranges), "crops": [[int(a), int(b)] for a, b, _ in curves],
        "crop_mm": [round((b - a) * sp[2], 1) for a, b, _ in curves],
        **_pair_stats(curves),
        **{f"z_only_{k}": v for k, v in z_only.items()},
        "_curves": curves,
    }


CONSISTENCY_KEYS = tuple(f"{k}_abs_{u}_mm" for u in ("ds", "dz") for k in ("median", "p95", "max"))


def case_report(model: BodyPartRegressor, case: Any, cfg: BPREvalConfig, seed: int) -> dict[str, Any]:
    cc = crop_consistency(model, case, cfg.n_crops, cfg.min_crop_mm, seed, cfg.inplane_min_frac)
    s = cc["_curves"][0][2]
    z = slice_z_mm(case.meta.affine, case.image.shape)
    order = np.argsort(z)
    zs, ss = z[order], s[order]
    whole, inferior, superior = spearman_by_halves(s, z)
    rec: dict[str, Any] = {
        "case_id": case.meta.case_id, "shape": list(case.image.shape), "z_extent_mm": float(np.ptp(z)),
        "spearman": whole, "spearman_inferior_half": inferior, "spearman_superior_half": superior,
        "slope_mm_per_mm": s_slope(s, z),
        **{k: v for k, v in cc.items() if not k.startswith("_")},
    }
    # |dS| in mm of true z: divided by how many mm of S the whole scan gives per mm of z
    slope = rec["slope_mm_per_mm"]
    rising = np.isfinite(slope) and slope > 0
    for k in ("median", "p95", "max"):
        rec[f"{k}_abs_dz_mm"] = cc[f"{k}_abs_ds_mm"] / slope if rising else float("nan")
        rec[f"z_only_{k}_abs_dz_mm"] = cc[f"z_only_{k}_abs_ds_mm"] / slope if rising else float("nan")
    if not cc["applicable"] and cfg.inplane_min_frac >= 1.0:  # every crop was the whole scan: nothing compared
        rec.update({k: float("nan") for k in CONSISTENCY_KEYS})
    if case.label is not None:
        rec["landmarks_s_mm"] = {name: float(np.interp(zl, zs, ss))
                                 for name, zl in landmark_z(np.asarray(case.label), case.meta.affine).items()}
    rec["_curves"] = cc["_curves"]
    rec["_z"] = z
    return rec


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def agg(key: str) -> dict[str, float]:
        v = np.array([r[key] for r in records if np.isfinite(r.get(key, np.nan))], dtype=np.float64)
        if not v.size:
            return {}
        return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}

    marks: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        for k, v in (r.get("landmarks_s_mm") or {}).items():
            marks.setdefault(k, []).append((v, r["slope_mm_per_mm"]))
    return {
        "n_cases": len(records),
        "median_abs_ds_mm": agg("median_abs_ds_mm"), "p95_abs_ds_mm": agg("p95_abs_ds_mm"),
        "max_abs_ds_mm": agg("max_abs_ds_mm"),
        "median_abs_dz_mm": agg("median_abs_dz_mm"), "p95_abs_dz_mm": agg("p95_abs_dz_mm"),
        "max_abs_dz_mm": agg("max_abs_dz_mm"), "slope_mm_per_mm": agg("slope_mm_per_mm"),
        # the same z-crops with the whole in-plane field of view (equal to the above when inplane_min_frac is 1)
        **{f"z_only_{k}": agg(f"z_only_{k}") for k in CONSISTENCY_KEYS},
        # cases whose S does not rise with z have no |dz|: counted here, since the means above leave them out
        "n_cases_without_dz": sum(1 for r in records if not (np.isfinite(sl := r.get("slope_mm_per_mm", np.nan)) and sl > 0)),
        "spearman": agg("spearman"),
        "spearman_inferior_half": agg("spearman_inferior_half"), "spearman_superior_half": agg("spearman_superior_half"),
        # std: in mm of S; std_dz: in mm of true z (std over the cases' median slope)
        "landmark_spread_mm": {k: {"n": v["n"], "std": v["std"], "std_dz": v["std_dz_mm"],
                                   "slope_mm_per_mm": v["slope_mm_per_mm"]} for k, v in landmark_spread(marks).items()},
    }


def write_consistency_png(path: Path, model: BodyPartRegressor, records: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(records)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, r in zip(axes.ravel(), records):
        z = r["_z"]
        for k, (z0, z1, s) in enumerate(r["_curves"]):
            ax.plot(z[z0:z1], s, lw=2.2 if k == 0 else 1.0, color="black" if k == 0 else None,
                    alpha=1.0 if k == 0 else 0.7, label="whole scan" if k == 0 else None)
        ax.set_title(f"{r['case_id']}\n|dS| median {r['median_abs_ds_mm']:.1f} mm, p95 {r['p95_abs_ds_mm']:.1f} mm; "
                     f"/ slope {r['slope_mm_per_mm']:.2f}: {r['median_abs_dz_mm']:.1f}, {r['p95_abs_dz_mm']:.1f} mm",
                     fontsize=9)
        ax.set_xlabel("true z (mm, superior +)")
        ax.set_ylabel(f"S coordinate ({model.kind}, mm)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle("S coordinate of the same slices in random z-crops (one line per crop)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)


def evaluate_bpr(model_path: str | os.PathLike | BodyPartRegressor, data: str | os.PathLike | Sequence[Any],
                 out: str | os.PathLike | None = None, cfg: BPREvalConfig | None = None, force: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Evaluate a body part regressor on a data set (folder, single CT, or preprocessed cases).

    Cases are preprocessed with the model's own preprocessing. With ``out`` the report folder is
    written (refused when it exists and is not empty, unless ``force``); returns the summary dict.
    """
    from tqdm import tqdm

    from .predict import model_preprocess_config

    cfg = cfg or BPREvalConfig()
    if cfg.n_crops < 1:
        raise InputError(None, "n_crops must be >= 1")
    if cfg.min_crop_mm <= 0:
        raise InputError(None, "min_crop_mm must be > 0")
    model = model_path if isinstance(model_path, BodyPartRegressor) else load_bpr(model_path)
    if isinstance(data, (str, os.PathLike)):
        from ..data.cache import load_preprocessed

        cases = load_preprocessed(data, model_preprocess_config(model), kind=cfg.data_kind, split=cfg.split)
    else:
        cases = list(data)
    if cfg.max_cases > 0:
        cases = cases[: cfg.max_cases]
    if not cases:
        raise InputError(data if isinstance(data, (str, os.PathLike)) else None, "no cases to evaluate")
    records = [case_report(model, c, cfg, cfg.seed + k)
               for k, c in enumerate(tqdm(cases, desc="bpr evaluate", unit="case", disable=None if progress else True))]
    summary = {"model": str(model_path) if not isinstance(model_path, BodyPartRegressor) else "<in memory>",
               "kind": model.kind, "mm_per_unit": model.mm_per_unit, "config": to_dict(cfg),
               "overall": summarise(records),
               "per_case": [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]}
    if out is not None:
        with staged_dir(out, force=force) as tmp:
            atomic_write_json(tmp / "summary.json", summary)
            write_consistency_png(tmp / "consistency.png", model, records)
            write_config(tmp, cfg, extra={"model": summary["model"], "data": str(data) if isinstance(data, (str, os.PathLike)) else "<cases>"})
    return summary
