"""Smooth random fields on an axis-aligned voxel grid.

A field is a lattice of random coefficients (node spacing ``h`` mm) interpolated with cubic
B-splines. Because the grid is axis-aligned the interpolation is separable: three small matrix
products instead of a per-voxel loop, so a full 128x128x96 field costs a few milliseconds.
"""

from __future__ import annotations

import numpy as np


def _bspline3(t: np.ndarray) -> np.ndarray:
    """Cubic B-spline kernel evaluated at offsets ``t`` (in node units)."""
    a = np.abs(t)
    out = np.zeros_like(a)
    m1 = a < 1
    m2 = (a >= 1) & (a < 2)
    out[m1] = (4 - 6 * a[m1] ** 2 + 3 * a[m1] ** 3) / 6
    out[m2] = (2 - a[m2]) ** 3 / 6
    return out


def spline_matrix(coords: np.ndarray, h: float) -> np.ndarray:
    """Weights (len(coords), n_nodes) interpolating lattice nodes spaced ``h`` mm over ``coords``."""
    lo = float(coords.min()) - 2 * h
    n = int(np.ceil((float(coords.max()) + 2 * h - lo) / h)) + 1
    nodes = lo + h * np.arange(n)
    return _bspline3((coords[:, None] - nodes[None, :]) / h).astype(np.float32)


class LatticeBasis:
    """Interpolation matrices for one grid and one node spacing; draws many fields cheaply."""

    def __init__(self, axes: tuple[np.ndarray, np.ndarray, np.ndarray], h: float):
        self.axes = axes
        self.h = float(h)
        self.mats = [spline_matrix(a, h) for a in axes]
        # standard deviation of a field with unit-variance coefficients (from the squared weights per axis)
        self.unit_std = float(np.prod([np.sqrt(np.mean(np.sum(m**2, axis=1))) for m in self.mats]))

    @property
    def n_nodes(self) -> tuple[int, int, int]:
        return tuple(m.shape[1] for m in self.mats)  # type: ignore[return-value]

    def draw(self, rng: np.random.Generator, std: float = 1.0) -> np.ndarray:
        """A smooth field with (approximately) standard deviation ``std``."""
        coef = rng.standard_normal(self.n_nodes).astype(np.float32)
        return self.from_coef(coef) * np.float32(std / self.unit_std)

    def from_coef(self, coef: np.ndarray) -> np.ndarray:
        mx, my, mz = self.mats
        f = np.tensordot(mx, coef, axes=(1, 0))  # (X, ny, nz)
        f = np.tensordot(f, my, axes=(1, 1))  # (X, nz, Y)
        f = np.tensordot(f, mz, axes=(1, 1))  # (X, Y, Z)
        return np.ascontiguousarray(f, dtype=np.float32)

    def at_points(self, coef: np.ndarray, pts: np.ndarray) -> np.ndarray:
        """Evaluate the field of ``coef`` at arbitrary points (N, 3) in the same frame."""
        out = np.empty(len(pts), dtype=np.float64)
        for i, p in enumerate(np.asarray(pts, dtype=np.float64)):
            w = []
            for ax, a in enumerate(self.axes):
                lo = float(a.min()) - 2 * self.h
                n = self.mats[ax].shape[1]
                nodes = lo + self.h * np.arange(n)
                w.append(_bspline3((p[ax] - nodes) / self.h))
            out[i] = np.einsum("ijk,i,j,k->", coef, w[0], w[1], w[2])
        return out
