"""Findings of everyday clinical CT painted into a phantom's tissue map: focal lesions inside the
liver, kidneys and spleen (they keep their organ's label, as in BTCV), free fluid around the upper
abdominal organs, a removed gallbladder. Real abdominal CT is full of them (simple renal and hepatic
cysts are found in a large share of adults, and BTCV's scans come from patients); a phantom without
them lets one labelled case stand for every subject (docs/PHANTOMS.md, "Wide variation").

Everything here is drawn from its own random stream, so phantoms that ask for no findings are those of
before, voxel for voxel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from . import tissues as T

L = T.KID_L_OFFSET
# where a lesion may go (weight, the tissues it replaces, the lesion kinds with their weights and radius range in mm)
_SITES = (
    ("liver", 0.55, (T.LIVER,), ((T.LIVER_CYST, 0.5), (T.LIVER_MET, 0.5)), (4.0, 25.0)),
    ("kidney", 0.30, (T.KID_CORTEX, T.KID_MEDULLA, T.KID_CORTEX + L, T.KID_MEDULLA + L), ((T.KID_CYST, 1.0),), (4.0, 20.0)),
    ("spleen", 0.15, (T.SPLEEN,), ((T.SPLEEN_LESION, 1.0),), (3.0, 14.0)),
)


def paint_findings(tissue: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator, *,
                   lesion_rate: float = 0.0, ascites_prob: float = 0.0, gallbladder_absent_prob: float = 0.0) -> dict[str, Any]:
    """Paint findings into ``tissue`` (in place); returns what was painted, for the case's metadata.

    ``lesion_rate``: mean number of focal lesions per subject (Poisson); ``ascites_prob``: chance of free
    fluid around the liver, spleen, stomach and bowel; ``gallbladder_absent_prob``: chance of a
    cholecystectomy (the gallbladder label is then absent, NaN in Dice)."""
    sp = np.asarray(spacing, float)
    out: dict[str, Any] = {}
    # the draws are made in a fixed order whatever is found, so one option does not reshuffle another
    gb_gone = bool(rng.random() < gallbladder_absent_prob)
    ascites = bool(rng.random() < ascites_prob)
    ascites_mm = float(rng.uniform(4.0, 15.0))
    n = int(rng.poisson(lesion_rate)) if lesion_rate > 0 else 0
    if gb_gone:
        gb = (tissue == T.BILE) | (tissue == T.GB_WALL)
        tissue[gb] = T.FAT_VISC
        out["gallbladder_absent"] = True
    if ascites:
        near = np.isin(tissue, (T.LIVER, T.SPLEEN, T.STOM_WALL, T.BOWEL_WALL))
        if near.any():
            dist = ndi.distance_transform_edt(~near, sampling=sp)
            tissue[(tissue == T.FAT_VISC) & (dist <= ascites_mm)] = T.ASCITES
            out["ascites_mm"] = round(ascites_mm, 1)
    weights = np.array([s[1] for s in _SITES])
    lesions = []
    for _ in range(n):
        name, _, hosts, kinds, (r_lo, r_hi) = _SITES[int(rng.choice(len(_SITES), p=weights / weights.sum()))]
        kind = kinds[int(rng.choice(len(kinds), p=np.array([k[1] for k in kinds])))][0]
        radius = float(np.exp(rng.uniform(np.log(r_lo), np.log(r_hi))))  # more small lesions than large ones
        axes = radius * rng.uniform(0.75, 1.25, 3)
        u = rng.random()
        idx = np.flatnonzero(np.isin(tissue, hosts))
        if not len(idx):
            continue
        c = np.array(np.unravel_index(idx[min(int(u * len(idx)), len(idx) - 1)], tissue.shape))
        side = int(tissue[tuple(c)]) >= L  # a kidney lesion stays in the kidney it starts in
        r_vox = np.ceil(axes / sp).astype(int) + 1
        lo = np.maximum(c - r_vox, 0)
        hi = np.minimum(c + r_vox + 1, tissue.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        g = np.ogrid[box]
        d2 = sum(((gi - ci) * s / a) ** 2 for gi, ci, s, a in zip(g, c, sp, axes))
        inside = (d2 <= 1.0) & np.isin(tissue[box], [h for h in hosts if (h >= L) == side])
        tissue[box][inside] = kind + (L if side else 0)
        lesions.append({"organ": name + (" (left)" if side else ""), "kind": T.TISSUE_NAMES[kind].lower(),
                        "radius_mm": round(radius, 1), "voxels": int(inside.sum())})
    if lesions:
        out["lesions"] = lesions
    return out
