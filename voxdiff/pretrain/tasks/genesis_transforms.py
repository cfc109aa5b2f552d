"""Models Genesis distortions (Zhou et al. 2019/2021) as pure, seeded numpy functions.

Every function works on one patch ``(X, Y, Z)`` float32 in [0, 1] (the unit intensity scale of
``voxdiff.data.preprocess.hu_to_unit``) and returns a new array; the input is never modified.
Random choices (boxes, curve control points) are drawn by separate ``sample_*`` functions from a
``numpy.random.Generator``, so each distortion can also be applied with known parameters (tests do
this to check what is left unchanged):

* :func:`nonlinear_intensity` - a monotonic cubic Bezier curve through (0, 0) and (1, 1) applied to
  every voxel; ``flip=True`` uses ``1 - curve`` (monotonically decreasing, order reversed).
* :func:`local_shuffle` - voxels permuted inside many small windows, each window a permutation of
  the *original* voxels it covers (a later window overwrites an earlier one where they overlap), as
  Models Genesis does.
* :func:`inpaint` - boxes inside the patch filled with uniform noise (outside untouched).
* :func:`outpaint` - everything outside the union of boxes replaced by noise (inside untouched).

Sizes follow the Models Genesis code (``local_pixel_shuffling``, ``image_in_painting``,
``image_out_painting``; 64 x 64 x 32 patches), scaled to the patch: shuffle windows of 1 .. side // 10
voxels per axis, as many as give each voxel the same expected number of window visits as their
10,000 windows do on 64 x 64 x 32 (:func:`genesis_shuffle_count`); in-painting boxes of 1/6 .. 1/3 of
the side, drawn while a coin with 0.95 says so, at most 5; out-painting keeps 1 + up to 4 such
boxes of 3/7 .. 4/7 of the side; boxes keep 3 voxels from the faces where there is room.

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
    shuffle_blocks: int = 0  # windows per patch; 0 = Models Genesis' coverage (genesis_shuffle_count)
    shuffle_max_size: int = 0  # windows are 1..max_size voxels per axis; 0 = max(1, side // 10) per axis
    nonlinear_prob: float = 0.9
    flip_prob: float = 0.5  # probability that a drawn intensity curve is reversed (1 - curve)
    paint_prob: float = 0.9
    inpaint_prob: float = 0.2  # given painting: in-painting with this probability, else out-painting
    inpaint_boxes: int = 5  # up to this many noise boxes (each drawn with box_continue_prob: 0..5)
    inpaint_min_frac: float = 1 / 6  # box side as a fraction of the patch side
    inpaint_max_frac: float = 1 / 3
    outpaint_boxes: int = 5  # up to this many kept boxes (the first always, then with box_continue_prob)
    outpaint_min_frac: float = 3 / 7
    outpaint_max_frac: float = 4 / 7
    box_continue_prob: float = 0.95  # probability of drawing one more painting box
    box_margin: int = 3  # painting boxes keep this many voxels from the patch faces (where there is room)


# Models Genesis: 10,000 windows of 1..6 x 1..6 x 1..3 voxels on a 64 x 64 x 32 patch
GENESIS_PATCH = (64, 64, 32)
GENESIS_SHUFFLE_BLOCKS = 10000


def shuffle_window_max(shape: tuple[int, ...], max_size: int = 0) -> tuple[int, ...]:
    """Largest shuffle window per axis: ``max_size`` if given, else Models Genesis' ``side // 10``
    (at least 1)."""
    if max_size and max_size > 0:
        return tuple(min(int(max_size), int(n)) for n in shape)
    return tuple(max(1, int(n) // 10) for n in shape)


def _mean_window_voxels(max_sides: tuple[int, ...]) -> float:
    return float(np.prod([(m + 1) / 2.0 for m in max_sides]))


def genesis_shuffle_count(shape: tuple[int, ...], max_size: int = 0) -> int:
    """Shuffle windows per patch of ``shape`` that visit each voxel as often, on average, as Models
    Genesis' 10,000 windows visit a 64 x 64 x 32 patch (about 1.87 times)."""
    ref = GENESIS_SHUFFLE_BLOCKS * _mean_window_voxels(shuffle_window_max(GENESIS_PATCH)) / float(np.prod(GENESIS_PATCH))
    return max(1, int(round(ref * float(np.prod(shape)) / _mean_window_voxels(shuffle_window_max(shape, max_size)))))


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
                fractional: bool, margin: int = 0) -> Box:
    box = []
    for n in shape:
        if fractional:
            a = max(1, int(round(lo * n)))
            b = max(a, int(round(hi * n)))
        else:
            a, b = int(lo), int(hi)
        size = int(rng.integers(a, min(b, n) + 1)) if a <= n else n
        m = max(0, min(int(margin), (n - size) // 2))  # keep off the faces where there is room
        start = int(rng.integers(m, n - size - m + 1))
        box.append((start, start + size))
    return tuple(box)  # type: ignore[return-value]


def _geometric_count(rng: np.random.Generator, first: int, max_boxes: int, p: float) -> int:
    """``first`` boxes, then one more while a coin with probability ``p`` says so, at most ``max_boxes``."""
    n = min(first, max_boxes)
    while n < max_boxes and rng.random() < p:
        n += 1
    return n


def _sl(box: Box) -> tuple[slice, slice, slice]:
    return tuple(slice(a, b) for a, b in box)  # type: ignore[return-value]


def sample_shuffle_windows(shape: tuple[int, int, int], rng: np.random.Generator, n_blocks: int,
                           max_size: int | tuple[int, ...] = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n_blocks`` random windows as ``(starts, sizes)``, both ``(n, 3)`` int64: sizes uniform in
    1..max per axis (``max_size``: one int for all axes, a tuple per axis, or 0 = ``side // 10``),
    starts uniform where the window fits."""
    mx = np.asarray(max_size if isinstance(max_size, tuple) else shuffle_window_max(shape, int(max_size)), dtype=np.int64)
    mx = np.minimum(mx, np.asarray(shape, dtype=np.int64))
    sizes = rng.integers(1, mx + 1, size=(int(n_blocks), 3))
    room = np.asarray(shape, dtype=np.int64) - sizes + 1
    starts = np.floor(rng.random((int(n_blocks), 3)) * room).astype(np.int64)
    return starts, sizes


def sample_shuffle_boxes(shape: tuple[int, int, int], rng: np.random.Generator, n_blocks: int,
                         max_size: int = 0) -> list[Box]:
    """``n_blocks`` random windows of 1..``max_size`` voxels per axis (0: ``side // 10``) as boxes."""
    starts, sizes = sample_shuffle_windows(shape, rng, n_blocks, max_size)
    return [tuple((int(a), int(a + s)) for a, s in zip(st, sz)) for st, sz in zip(starts, sizes)]  # type: ignore[misc]


def sample_inpaint_boxes(shape: tuple[int, int, int], rng: np.random.Generator, max_boxes: int = 5,
                         min_frac: float = 1 / 6, max_frac: float = 1 / 3, continue_prob: float = 0.95,
                         margin: int = 3) -> list[Box]:
    """Models Genesis in-painting boxes: drawn while a coin with ``continue_prob`` says so (0 to
    ``max_boxes``), sides ``min_frac``..``max_frac`` of the patch side, ``margin`` voxels off the faces."""
    n = _geometric_count(rng, 0, max_boxes, continue_prob)
    return [_random_box(shape, rng, min_frac, max_frac, fractional=True, margin=margin) for _ in range(n)]


def sample_outpaint_boxes(shape: tuple[int, int, int], rng: np.random.Generator, max_boxes: int = 5,
                          min_frac: float = 3 / 7, max_frac: float = 4 / 7, continue_prob: float = 0.95,
                          margin: int = 3) -> list[Box]:
    """Models Genesis out-painting boxes (kept regions): one, then more while a coin with
    ``continue_prob`` says so, ``max_boxes`` in all."""
    n = _geometric_count(rng, 1, max_boxes, continue_prob)
    return [_random_box(shape, rng, min_frac, max_frac, fractional=True, margin=margin) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# local shuffling, in-painting, out-painting


def local_shuffle(image: np.ndarray, boxes: list[Box] | tuple[np.ndarray, np.ndarray],
                  rng: np.random.Generator) -> np.ndarray:
    """Permute the voxels inside each window (Models Genesis' ``local_pixel_shuffling``).

    ``boxes``: a list of boxes, or ``(starts, sizes)`` arrays from :func:`sample_shuffle_windows`.
    Each window receives a random permutation of the **original** voxels it covers; where windows
    overlap, the later window's values win. Voxels outside every window are unchanged, and a window
    that no later window overlaps holds exactly its original multiset. Vectorised over windows.
    """
    src = np.asarray(image, dtype=np.float32)
    out = np.array(src, copy=True)
    if isinstance(boxes, tuple) and len(boxes) == 2 and isinstance(boxes[0], np.ndarray):
        starts, sizes = (np.asarray(b, dtype=np.int64) for b in boxes)
    else:
        if not boxes:
            return out
        arr = np.asarray(boxes, dtype=np.int64)  # (n, 3, 2)
        starts, sizes = arr[:, :, 0], arr[:, :, 1] - arr[:, :, 0]
    n = len(starts)
    if n == 0:
        return out
    mx = sizes.max(axis=0)
    grid = np.stack(np.meshgrid(*[np.arange(int(m)) for m in mx], indexing="ij"), -1).reshape(-1, 3)  # (V, 3)
    valid = np.all(grid[None] < sizes[:, None, :], axis=-1)  # (n, V)
    pos = starts[:, None, :] + grid[None]  # (n, V, 3)
    shape = src.shape
    flat = (pos[..., 0] * shape[1] + pos[..., 1]) * shape[2] + pos[..., 2]
    flat = np.where(valid, flat, 0)
    keys = np.where(valid, rng.random(valid.shape), 2.0)  # invalid slots sort last
    perm = np.argsort(keys, axis=1, kind="stable")  # row i: its valid slots in random order first
    fixed = np.argsort(~valid, axis=1, kind="stable")  # row i: its valid slots in grid order first
    sources = np.take_along_axis(flat, perm, axis=1)
    targets = np.take_along_axis(flat, fixed, axis=1)  # voxel targets[i, k] gets the value at sources[i, k]
    used = np.arange(valid.shape[1])[None, :] < valid.sum(axis=1, keepdims=True)
    ids = np.broadcast_to(np.arange(n)[:, None], valid.shape)
    last = np.full(src.size, -1, dtype=np.int64)
    np.maximum.at(last, targets[used], ids[used])  # the last window covering each voxel
    take = used & (last[targets] == ids)
    out.reshape(-1)[targets[take]] = src.reshape(-1)[sources[take]]
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

    ``record`` lists what was applied (``shuffle_boxes``, an ``(n, 3, 2)`` array of [lo, hi) per
    axis, ``curve``/``flip``, ``paint`` in
    ``{"inpaint", "outpaint", None}`` with its ``paint_boxes``) so that a caller can check or log it.
    """
    cfg = cfg or GenesisConfig()
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected one (X, Y, Z) patch, got shape {x.shape}")
    shape = tuple(int(s) for s in x.shape)
    rec: dict[str, Any] = {"shuffle_boxes": [], "shuffle_windows": None, "curve": None, "flip": False, "paint": None, "paint_boxes": []}
    out = np.array(x, copy=True)
    if rng.random() < cfg.shuffle_prob:
        n = int(cfg.shuffle_blocks) or genesis_shuffle_count(shape, cfg.shuffle_max_size)
        windows = sample_shuffle_windows(shape, rng, n, cfg.shuffle_max_size)
        out = local_shuffle(out, windows, rng)
        rec["shuffle_windows"] = windows
        st, sz = (np.asarray(w, dtype=np.int64) for w in windows)
        # (n, 3, 2) [lo, hi) per axis, an array: hundreds of small Python containers per patch
        # would wake the garbage collector (a restorative step 12 % slower)
        rec["shuffle_boxes"] = np.stack([st, st + sz], -1)
    if rng.random() < cfg.nonlinear_prob:
        pts = bezier_control_points(rng)
        flip = bool(rng.random() < cfg.flip_prob)
        out = nonlinear_intensity(out, pts, flip=flip)
        rec["curve"], rec["flip"] = pts, flip
    if rng.random() < cfg.paint_prob:
        if rng.random() < cfg.inpaint_prob:
            boxes = sample_inpaint_boxes(shape, rng, cfg.inpaint_boxes, cfg.inpaint_min_frac, cfg.inpaint_max_frac,
                                         cfg.box_continue_prob, cfg.box_margin)
            out = inpaint(out, boxes, rng)
            rec["paint"] = "inpaint"
        else:
            boxes = sample_outpaint_boxes(shape, rng, cfg.outpaint_boxes, cfg.outpaint_min_frac,
                                          cfg.outpaint_max_frac, cfg.box_continue_prob, cfg.box_margin)
            out = outpaint(out, boxes, rng)
            rec["paint"] = "outpaint"
        rec["paint_boxes"] = boxes
    return out, rec
