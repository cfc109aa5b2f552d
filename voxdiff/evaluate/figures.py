"""PNG figures: per-organ Dice bar chart, and axial/coronal overlays of prediction vs ground truth.

Volumes are shown in RAS orientation (radiological convention: patient's right on the image's
left, anterior up in axial views, superior up in coronal views), HU window [-160, 240].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from voxdiff.core.outputs import atomic_path
from voxdiff.data.labels import BTCV_LABELS, SIZE_GROUPS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_colors(n: int = 14) -> np.ndarray:
    """RGBA per label id (0 transparent)."""
    plt = _plt()
    cmap = plt.get_cmap("tab20")
    cols = np.array([cmap(i % 20) for i in range(n)], dtype=np.float32)
    cols[0] = (0, 0, 0, 0)
    return cols


def _save(fig, path: str | os.PathLike, title: str | None = None) -> Path:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png", metadata={"Title": title} if title else None)
    plt.close(fig)
    return Path(path)


def organ_bar_chart(per_organ: Mapping[int, float], out_path: str | os.PathLike, std: Mapping[int, float] | None = None,
                    title: str = "Dice per organ", groups: Mapping[str, float] | None = None) -> Path:
    """Bar chart of mean Dice per organ (NaN organs shown empty), optional error bars and group means."""
    plt = _plt()
    ids = sorted(int(k) for k in per_organ)
    vals = np.array([per_organ[i] if per_organ[i] is not None else np.nan for i in ids], dtype=float)
    errs = None if std is None else np.array([std.get(i, np.nan) for i in ids], dtype=float)
    group_of = {o: g for g, os_ in SIZE_GROUPS.items() for o in os_}
    palette = {"Big": "#4477aa", "Medium": "#66ccee", "Small": "#ee6677"}
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(ids) + 2), 4))
    x = np.arange(len(ids))
    ax.bar(x, np.nan_to_num(vals), yerr=None if errs is None else np.nan_to_num(errs),
           color=[palette.get(group_of.get(i, ""), "#999999") for i in ids], capsize=3)
    for xi, v in zip(x, vals):
        ax.text(xi, (0 if np.isnan(v) else v) + 0.01, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([BTCV_LABELS.get(i, str(i)).replace("_", " ") for i in ids], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice")
    t = title
    if groups:
        t += "  (" + ", ".join(f"{g} {v:.2f}" for g, v in groups.items() if v is not None and np.isfinite(v)) + ")"
    ax.set_title(t, fontsize=10)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=g) for g, c in palette.items()], fontsize=7, loc="upper right")
    return _save(fig, out_path)


def _ras(arr: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
    if affine is None:
        return arr
    from voxdiff.data.preprocess import to_ras

    return to_ras(arr, affine)[0]


def _aspect(affine: np.ndarray | None) -> tuple[float, float, float]:
    if affine is None:
        return (1.0, 1.0, 1.0)
    from voxdiff.data.preprocess import spacing_of, to_ras

    _, aff = to_ras(np.zeros((2, 2, 2), np.uint8), affine)
    return spacing_of(aff)


def overlay_figure(image_hu: np.ndarray, pred: np.ndarray, out_path: str | os.PathLike, gt: np.ndarray | None = None,
                   affine: np.ndarray | None = None, n_slices: int = 2, title: str = "",
                   window: Sequence[float] = (-160.0, 240.0), legend: Mapping[int, str] | None = None) -> Path:
    """Axial and coronal slices (through the labelled region) with label overlays.

    Rows: ground truth (when given) and prediction; columns: ``n_slices`` axial then ``n_slices``
    coronal slices at evenly spaced positions through the union of the label maps. ``legend``
    ({label id: name}) adds a colour key of the labels present.
    """
    plt = _plt()
    img = _ras(np.asarray(image_hu, dtype=np.float32), affine)
    pr = _ras(np.asarray(pred), affine)
    g = None if gt is None else _ras(np.asarray(gt), affine)
    sx, sy, sz = _aspect(affine)
    fg = (pr > 0) | (g > 0) if g is not None else pr > 0
    idx = np.argwhere(fg) if fg.any() else np.argwhere(np.ones_like(fg))
    lo, hi = idx.min(0), idx.max(0)
    zs = np.linspace(lo[2], hi[2], n_slices + 2)[1:-1].round().astype(int)
    ys = np.linspace(lo[1], hi[1], n_slices + 2)[1:-1].round().astype(int)
    rows = [("ground truth", g)] if g is not None else []
    rows.append(("prediction", pr))
    cols = label_colors(max(14, int(pr.max()) + 1, 0 if g is None else int(g.max()) + 1))
    fig, axes = plt.subplots(len(rows), 2 * n_slices, figsize=(3 * 2 * n_slices, 3 * len(rows)), squeeze=False)
    for r, (name, lab) in enumerate(rows):
        for c in range(2 * n_slices):
            ax = axes[r, c]
            if c < n_slices:  # axial: x (R->L flipped for radiological view) vs y (anterior up)
                z = zs[c]
                im, lb = img[:, :, z].T[::-1, ::-1], lab[:, :, z].T[::-1, ::-1]
                aspect = sy / sx
                ax.set_title(f"{name}: axial z={z}", fontsize=8)
            else:  # coronal: x vs z (superior up)
                y = ys[c - n_slices]
                im, lb = img[:, y, :].T[::-1, ::-1], lab[:, y, :].T[::-1, ::-1]
                aspect = sz / sx
                ax.set_title(f"{name}: coronal y={y}", fontsize=8)
            ax.imshow(im, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
            ax.imshow(cols[np.clip(lb, 0, len(cols) - 1)], alpha=0.45, aspect=aspect, interpolation="nearest")
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    if legend:
        from matplotlib.patches import Patch

        present = set(np.unique(pr).tolist()) | (set(np.unique(g).tolist()) if g is not None else set())
        items = [Patch(facecolor=cols[i][:3], label=f"{i} {n}") for i, n in sorted(legend.items())
                 if i in present and 0 < i < len(cols)]
        if items:
            fig.legend(handles=items, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False,
                       title="labels", title_fontsize=8)
    return _save(fig, out_path, title=title or None)
