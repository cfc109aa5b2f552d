"""Models Genesis distortions (Zhou et al. 2019/2021) as pure, seeded numpy functions.

Every function works on one patch ``(X, Y, Z)`` float32 in [0, 1] (the unit intensity scale of
``voxdiff.data.preprocess.hu_to_unit``) and returns a new array; the input is never modified.
Random choices (boxes, curve control points) are drawn by separate ``sample_*`` functions from a
``numpy.random.Generator``, so each distortion can also be applied with known parameters (tests do
this to check what is left unchanged):

* :func:`nonlinear_intensity` - a monotonic cubic Bezier curve through (0, 0) and (1, 1) applied to
  every voxel; ``flip=True`` uses ``1 - curve`` (monotonically decreasing, order reversed).
* :func:`local_shuffle` - voxels permuted inside small windows (each window keeps its multiset).
* :func:`inpaint` - boxes inside the patch filled with uniform noise (outside untouched).
* :func:`outpaint` - everything outside the union of boxes replaced by noise (inside untouched).

:func:`genesis_distort` composes them with configurable probabilities like Models Genesis does
(shuffle, then intensity curve, then in- or out-painting) and returns the distorted patch plus a
record of what was applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # ((x0, x1), (y0, y1), (z0, z1)), half-open


@dataclass
class GenesisConfig:
    """Probabilities and sizes of the Models Genesis distortions (defaults follow the paper's code)."""

    shuffle_prob: float = 0.5
    shuffle_blocks: int = 1000  # number of windows shuffled per patch
    shuffle_max_size: int = 6  # windows are 1..max_size voxels per axis
    nonlinear_prob: float = 0.9
    flip_prob: float = 0.5  # probability that a drawn intensity curve is reversed (1 - curve)
    paint_prob: float = 0.9
    inpaint_prob: float = 0.2  # given painting: in-painting with this probability, else out-painting
    inpaint_boxes: int = 5  # up to this many noise boxes
    inpaint_min_frac: float = 1 / 6  # box side as a fraction of the patch side
    inpaint_max_frac: float = 1 / 3
    outpaint_boxes: int = 4  # up to this many kept boxes
    outpaint_min_frac: float = 3 / 7
    outpaint_max_frac: float = 4 / 7


# --------------------------------------------------------------------------------------------
# non-linear intensity transform


def bezier_control_points(rng: np.random.Generator) -> np.ndarray:
    """Four control points ``(4, 2)``: (0,0), two random points in [0,1]^2, (1,1)."""
    inner = rng.random((2, 2))
    return np.array([[0.0, 0.0], inner[0], inner[1], [1.0, 1.0]], dtype=np.float64)


def bezier_curve(points: np.ndarray, n: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """Sample the cubic Bezier curve of ``points`` at ``n`` parameter values; returns ``(xs, ys)``.

    With end points (0,0) and (1,1) and inner control points in [0,1]^2 both coordinates are
    non-decreasing in the curve parameter, so the curve is the graph of a monotonic function.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.shape != (4, 2):
        raise ValueError("a cubic Bezier curve needs 4 control points (4, 2)")
    s = np.linspace(0.0, 1.0, n)[:, None]
    c = (1 - s) ** 3 * p[0] + 3 * (1 - s) ** 2 * s * p[1] + 3 * (1 - s) * s**2 * p[2] + s**3 * p[3]
    xs, ys = c[:, 0], c[:, 1]
    # guard against round-off: enforce exact monotonicity of the sampled curve
    return np.maximum.accumulate(xs), np.maximum.accumulate(ys)


def nonlinear_intensity(image: np.ndarray, points: np.ndarray, flip: bool = False) -> np.ndarray:
    """Map every voxel through the Bezier curve (values clipped to [0, 1] first).

    The map is monotonically non-decreasing; with ``flip`` it is ``1 - curve`` (non-increasing).
    """
    xs, ys = bezier_curve(points)
    x = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    out = np.interp(x, xs, ys).astype(np.float32)
    if flip:
        out = (1.0 - out).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------
# boxes


def _random_box(shape: tuple[int, ...], rng: np.random.Generator, lo: float | int, hi: float | int,
                fractional: bool) -> Box:
    box = []
    for n in shape:
        if fractional:
            a = max(1, int(round(lo * n)))
            b = max(a, int(round(hi * n)))
        else:
            a, b = int(lo), int(hi)
        size = int(rng.integers(a, min(b, n) + 1)) if a <= n else n
        start = int(rng.integers(0, n - size + 1))
        box.append((start, start + size))
    return tuple(box)  # type: ignore[return-value]


def _sl(box: Box) -> tuple[slice, slice, slice]:
    return tuple(slice(a, b) for a, b in box)  # type: ignore[return-value]


def sample_shuffle_boxes(shape: tuple[int, int, int], rng: np.random.Generator, n_blocks: int,
                         max_size: int) -> list[Box]:
    """``n_blocks`` random windows of 1..``max_size`` voxels per axis."""
    return [_random_box(shape, rng, 1, max_size, fractional=False) for _ in range(n_blocks)]


def sample_inpaint_boxes(shape: tuple[int, int, int], rng: np.random.Generator, max_boxes: int = 5,
                         min_frac: float = 1 / 6, max_frac: float = 1 / 3) -> list[Box]:
    n = int(rng.integers(1, max_boxes + 1))
    return [_random_box(shape, rng, min_frac, max_frac, fractional=True) for _ in range(n)]


def sample_outpaint_boxes(shape: tuple[int, int, int], rng: np.random.Generator, max_boxes: int = 4,
                          min_frac: float = 3 / 7, max_frac: float = 4 / 7) -> list[Box]:
    n = int(rng.integers(1, max_boxes + 1))
    return [_random_box(shape, rng, min_frac, max_frac, fractional=True) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# local shuffling, in-painting, out-painting


def local_shuffle(image: np.ndarray, boxes: list[Box], rng: np.random.Generator) -> np.ndarray:
    """Permute the voxels inside each window, one window after the other.

    Voxels outside every window are unchanged; each window's multiset of values is preserved at the
    time it is shuffled (so, for disjoint windows, in the result), and so is the patch's multiset.
    """
    out = np.array(image, dtype=np.float32, copy=True)
    for box in boxes:
        sl = _sl(box)
        block = out[sl]
        flat = block.reshape(-1)
        out[sl] = flat[rng.permutation(flat.size)].reshape(block.shape)
    return out


def inpaint(image: np.ndarray, boxes: list[Box], rng: np.random.Generator) -> np.ndarray:
    """Fill each box with uniform noise in [0, 1]; outside the boxes the patch is unchanged."""
    out = np.array(image, dtype=np.float32, copy=True)
    for box in boxes:
        sl = _sl(box)
        out[sl] = rng.random(out[sl].shape, dtype=np.float32)
    return out


def outpaint(image: np.ndarray, boxes: list[Box], rng: np.random.Generator) -> np.ndarray:
    """Replace everything outside the union of ``boxes`` by uniform noise; inside is unchanged."""
    src = np.asarray(image, dtype=np.float32)
    out = rng.random(src.shape, dtype=np.float32)
    for box in boxes:
        sl = _sl(box)
        out[sl] = src[sl]
    return out


def box_mask(shape: tuple[int, int, int], boxes: list[Box]) -> np.ndarray:
    """Boolean mask of the union of boxes."""
    m = np.zeros(shape, dtype=bool)
    for box in boxes:
        m[_sl(box)] = True
    return m


# --------------------------------------------------------------------------------------------
# composition


def genesis_distort(image: np.ndarray, rng: np.random.Generator,
                    cfg: GenesisConfig | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply the Models Genesis pipeline to one patch; returns ``(distorted, record)``.

    ``record`` lists what was applied (``shuffle_boxes``, ``curve``/``flip``, ``paint`` in
    ``{"inpaint", "outpaint", None}`` with its ``paint_boxes``) so that a caller can check or log it.
    """
    cfg = cfg or GenesisConfig()
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected one (X, Y, Z) patch, got shape {x.shape}")
    shape = tuple(int(s) for s in x.shape)
    rec: dict[str, Any] = {"shuffle_boxes": [], "curve": None, "flip": False, "paint": None, "paint_boxes": []}
    out = np.array(x, copy=True)
    if rng.random() < cfg.shuffle_prob:
        boxes = sample_shuffle_boxes(shape, rng, cfg.shuffle_blocks, cfg.shuffle_max_size)
        out = local_shuffle(out, boxes, rng)
        rec["shuffle_boxes"] = boxes
    if rng.random() < cfg.nonlinear_prob:
        pts = bezier_control_points(rng)
        flip = bool(rng.random() < cfg.flip_prob)
        out = nonlinear_intensity(out, pts, flip=flip)
        rec["curve"], rec["flip"] = pts, flip
    if rng.random() < cfg.paint_prob:
        if rng.random() < cfg.inpaint_prob:
            boxes = sample_inpaint_boxes(shape, rng, cfg.inpaint_boxes, cfg.inpaint_min_frac, cfg.inpaint_max_frac)
            out = inpaint(out, boxes, rng)
            rec["paint"] = "inpaint"
        else:
            boxes = sample_outpaint_boxes(shape, rng, cfg.outpaint_boxes, cfg.outpaint_min_frac,
                                          cfg.outpaint_max_frac)
            out = outpaint(out, boxes, rng)
            rec["paint"] = "outpaint"
        rec["paint_boxes"] = boxes
    return out, rec
