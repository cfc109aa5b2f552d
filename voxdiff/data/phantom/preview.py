"""``preview_png(case, path)``: axial, coronal and sagittal views with a label overlay and legend."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...core.outputs import atomic_path
from ..labels import ORGAN_NAMES

# one colour per BTCV organ (1..13)
ORGAN_COLORS = {
    1: (0.55, 0.20, 0.80),  # spleen
    2: (0.95, 0.85, 0.10),  # right kidney
    3: (0.95, 0.60, 0.05),  # left kidney
    4: (0.10, 0.80, 0.30),  # gallbladder
    5: (0.95, 0.50, 0.75),  # esophagus
    6: (0.85, 0.25, 0.20),  # liver
    7: (0.30, 0.65, 0.95),  # stomach
    8: (1.00, 0.10, 0.10),  # aorta
    9: (0.15, 0.30, 0.95),  # IVC
    10: (0.10, 0.85, 0.85),  # portal/splenic vein
    11: (0.95, 0.95, 0.55),  # pancreas
    12: (0.60, 1.00, 0.20),  # right adrenal
    13: (0.20, 0.55, 0.15),  # left adrenal
}


def _views(vol: np.ndarray, i: int, j: int, k: int) -> list[np.ndarray]:
    """Radiological display: axial with the patient's right on the left and anterior up; coronal
    with the head up and the right on the left; sagittal with the head up and anterior on the left."""
    return [vol[:, :, k].T[::-1, ::-1], vol[:, j, :].T[::-1, ::-1], vol[i, :, :].T[::-1, ::-1]]


def pick_slices(label: np.ndarray | None, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Axial slice through the most organs, coronal through the kidneys, sagittal through the aorta."""
    if label is None or not label.any():
        return shape[0] // 2, shape[1] // 2, shape[2] // 2
    def best(axis: int) -> int:
        other = tuple(a for a in range(3) if a != axis)
        n_org = np.zeros(label.shape[axis])
        for o in range(1, 14):
            n_org += (label == o).any(axis=other)
        fg = (label > 0).sum(axis=other)
        score = n_org * 1e6 + fg
        return int(np.argmax(score))
    k = best(2)
    # coronal through the kidneys (shows both kidneys, spleen, liver, spine), else the most organs
    kid = np.nonzero(np.isin(label, (2, 3)))
    j = int(np.median(kid[1])) if kid[1].size else best(1)
    # sagittal through the aorta if present, else through the most organs
    aorta = np.nonzero(label == 8)
    i = int(np.median(aorta[0])) if aorta[0].size else best(0)
    return i, j, k


def preview_png(case, path: str | os.PathLike, window: tuple[float, float] = (-160.0, 240.0), dpi: int = 80,
                title: str | None = None, slices: tuple[int, int, int] | None = None) -> Path:
    """Write a PNG with the three orthogonal views of ``case`` (top: image; bottom: labels)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    img = np.asarray(case.image, dtype=np.float32)
    lab = None if case.label is None else np.asarray(case.label)
    sp = tuple(float(s) for s in case.meta.spacing)
    i, j, k = slices or pick_slices(lab, img.shape)
    ims = _views(img, i, j, k)
    labs = _views(lab, i, j, k) if lab is not None else [None] * 3
    aspects = [sp[1] / sp[0], sp[2] / sp[0], sp[2] / sp[1]]
    names = [f"axial z={k}", f"coronal y={j}", f"sagittal x={i}"]
    colors = np.zeros((14, 4))
    for o, c in ORGAN_COLORS.items():
        colors[o, :3] = c
        colors[o, 3] = 0.55
    cmap = ListedColormap(colors)
    rows = 2 if lab is not None else 1
    widths = [im.shape[1] / 1.0 for im in ims]
    fig = plt.figure(figsize=(12.5, 4.4 * rows + 0.6))
    gs = fig.add_gridspec(rows, 3, width_ratios=widths, wspace=0.04, hspace=0.08)
    for r in range(rows):
        for c in range(3):
            ax = fig.add_subplot(gs[r, c])
            ax.imshow(ims[c], cmap="gray", vmin=window[0], vmax=window[1], aspect=aspects[c], interpolation="nearest")
            if r == 1:
                lv = labs[c].astype(float)
                ax.imshow(np.ma.masked_where(lv == 0, lv), cmap=cmap, vmin=0, vmax=13, aspect=aspects[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(names[c], fontsize=10)
            h, w = ims[c].shape
            if c == 0:
                ax.text(2, h / 2, "R", color="yellow", fontsize=9, va="center")
                ax.text(w - 3, h / 2, "L", color="yellow", fontsize=9, va="center", ha="right")
                ax.text(w / 2, 2, "A", color="yellow", fontsize=9, ha="center", va="top")
            elif c == 1:
                ax.text(2, h / 2, "R", color="yellow", fontsize=9, va="center")
                ax.text(w / 2, 2, "S", color="yellow", fontsize=9, ha="center", va="top")
            else:
                ax.text(2, h / 2, "A", color="yellow", fontsize=9, va="center")
                ax.text(w / 2, 2, "S", color="yellow", fontsize=9, ha="center", va="top")
    if lab is not None:
        present = [o for o in ORGAN_NAMES if (lab == o).any()]
        handles = [Patch(color=ORGAN_COLORS[o], label=f"{o} {ORGAN_NAMES[o]}") for o in present]
        fig.legend(handles=handles, loc="lower center", ncol=min(7, max(1, len(handles))), fontsize=8, frameon=False)
    ex = case.meta.extra or {}
    t = title or f"{case.meta.case_id}  {ex.get('z_mode', '')}  {ex.get('phase', '')}  spacing {sp[0]:.2f}x{sp[1]:.2f}x{sp[2]:.2f} mm  window [{window[0]:.0f},{window[1]:.0f}] HU"
    fig.suptitle(t, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.09 if lab is not None else 0.02)
    p = Path(path)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return p
