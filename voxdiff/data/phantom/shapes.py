"""Geometry primitives evaluated on a (deformed) voxel grid inside bounding boxes.

All shapes are defined in the subject's physical frame (mm; x toward the patient's right, y
anterior, z superior). The canvas holds, for every voxel, the *deformed* subject coordinates at
which the anatomy is sampled (voxel centre + a smooth displacement), so one low-frequency
displacement field bends every structure consistently. Shapes are evaluated only inside their
bounding box (expanded by the largest displacement), which keeps a full phantom fast.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

Box = tuple[slice, slice, slice]


def rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation matrix (degrees) about x, then y, then z; columns are the local axes in world."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def catmull_rom(points: Sequence[Sequence[float]], n_per_seg: int = 6) -> np.ndarray:
    """Dense points on a Catmull-Rom spline through ``points`` (N, k) (any trailing columns)."""
    p = np.asarray(points, dtype=np.float64)
    if len(p) < 3:
        t = np.linspace(0, 1, n_per_seg + 1)[:, None]
        return p[0] + t * (p[-1] - p[0]) if len(p) == 2 else p
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        for t in np.linspace(0, 1, n_per_seg, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(
                0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t3)
            )
    out.append(p[-1])
    return np.asarray(out)


class Canvas:
    """The voxel grid, its deformed sampling coordinates, and the tissue map being painted."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray, disp: tuple[np.ndarray, np.ndarray, np.ndarray] | None):
        self.xs, self.ys, self.zs = (np.asarray(a, dtype=np.float32) for a in (xs, ys, zs))
        shape = (len(xs), len(ys), len(zs))
        self.shape = shape
        self.spacing = tuple(float(abs(a[1] - a[0])) if len(a) > 1 else 1.0 for a in (self.xs, self.ys, self.zs))
        X = np.broadcast_to(self.xs[:, None, None], shape)
        Y = np.broadcast_to(self.ys[None, :, None], shape)
        Z = np.broadcast_to(self.zs[None, None, :], shape)
        if disp is None:
            disp = (np.zeros(shape, np.float32),) * 3
        self.X = (X + disp[0]).astype(np.float32)
        self.Y = (Y + disp[1]).astype(np.float32)
        self.Z = (Z + disp[2]).astype(np.float32)
        self.margin = tuple(float(np.abs(d).max()) + s for d, s in zip(disp, self.spacing))
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.region = np.zeros(shape, dtype=np.uint8)
        self.blends: list[tuple[Box, np.ndarray, int, int]] = []

    # -- bounding boxes -------------------------------------------------------------------------
    def box(self, lo: Iterable[float], hi: Iterable[float]) -> Box | None:
        """Index box of the voxels whose deformed coordinates may fall in [lo, hi] (mm)."""
        sl = []
        for a, l, h, m in zip((self.xs, self.ys, self.zs), lo, hi, self.margin):
            i0 = int(np.searchsorted(a, l - m, side="left"))
            i1 = int(np.searchsorted(a, h + m, side="right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)  # type: ignore[return-value]

    def coords(self, b: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.X[b], self.Y[b], self.Z[b]

    # -- painting -------------------------------------------------------------------------------
    def paint(self, b: Box, mask: np.ndarray, tid: int, onto: Iterable[int] | None = None, region: Iterable[int] | None = None) -> None:
        """Set tissue ``tid`` where ``mask`` (in box ``b``), optionally only over tissues ``onto``
        and inside the body regions ``region``."""
        t = self.tissue[b]
        m = mask
        if onto is not None:
            lut = np.zeros(256, dtype=bool)
            lut[list(onto)] = True
            m = m & lut[t]
        if region is not None:
            lut = np.zeros(256, dtype=bool)
            lut[list(region)] = True
            m = m & lut[self.region[b]]
        t[m] = tid

    def blend(self, b: Box, frac: np.ndarray, t0: int, t1: int) -> None:
        """Partial volume: where the voxels of box ``b`` are still tissue ``t0`` or ``t1`` when the
        image is made, their CT number is ``(1 - frac) * HU(t0) + frac * HU(t1)``."""
        self.blends.append((b, frac, int(t0), int(t1)))

    # -- shapes -----------------------------------------------------------------------------------
    def ellipsoid(self, c: Sequence[float], r: Sequence[float], R: np.ndarray | None = None, pad: float = 0.0):
        """(box, signed distance in mm (approximate), local coords) of an ellipsoid."""
        c = np.asarray(c, dtype=np.float64)
        r = np.asarray(r, dtype=np.float64)
        R = np.eye(3) if R is None else np.asarray(R)
        ext = np.sqrt((R**2) @ (r**2)) + pad  # axis-aligned half extent of the rotated ellipsoid
        b = self.box(c - ext, c + ext)
        if b is None:
            return None, None, None
        X, Y, Z = self.coords(b)
        dx, dy, dz = X - np.float32(c[0]), Y - np.float32(c[1]), Z - np.float32(c[2])
        q = [np.float32(R[0, i]) * dx + np.float32(R[1, i]) * dy + np.float32(R[2, i]) * dz for i in range(3)]
        k0 = np.sqrt((q[0] / r[0]) ** 2 + (q[1] / r[1]) ** 2 + (q[2] / r[2]) ** 2)
        k1 = np.sqrt((q[0] / r[0] ** 2) ** 2 + (q[1] / r[1] ** 2) ** 2 + (q[2] / r[2] ** 2) ** 2)
        sdf = k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)
        return b, sdf.astype(np.float32), q

    def tube(self, pts: Sequence[Sequence[float]], radii: Sequence[float] | float, scale: Sequence[float] = (1.0, 1.0, 1.0),
             pad: float = 0.0, n_per_seg: int = 4, smooth: bool = True):
        """(box, signed distance, arclength param in [0,1]) of a tube along a spline through ``pts``.

        ``radii`` per control point; ``scale`` divides world offsets (an anisotropic metric: a
        scale of 0.7 on y makes the cross-section 30% flatter in y)."""
        p = np.asarray(pts, dtype=np.float64)
        rr = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(p),))
        dense = catmull_rom(np.column_stack([p, rr]), n_per_seg) if smooth and len(p) >= 3 else np.column_stack([p, rr])
        P, Rr = dense[:, :3], dense[:, 3]
        sc = np.asarray(scale, dtype=np.float64)
        rmax = float(Rr.max()) * float(sc.max()) + pad
        b = self.box(P.min(0) - rmax, P.max(0) + rmax)
        if b is None:
            return None, None, None
        X, Y, Z = self.coords(b)
        off = np.array([s.start for s in b])
        sdf = np.full(X.shape, np.inf, dtype=np.float32)
        par = np.zeros(X.shape, dtype=np.float32)
        seglen = np.linalg.norm(np.diff(P, axis=0), axis=1)
        cum = np.concatenate([[0], np.cumsum(seglen)])
        total = max(cum[-1], 1e-6)
        for i in range(len(P) - 1):
            a, e = P[i], P[i + 1]
            ra, re = Rr[i], Rr[i + 1]
            rm = max(ra, re) * float(sc.max()) + pad
            sb = self.box(np.minimum(a, e) - rm, np.maximum(a, e) + rm)
            if sb is None:
                continue
            # sub-box relative to the tube box
            lb = tuple(slice(max(s.start, bb.start) - o, min(s.stop, bb.stop) - o) for s, bb, o in zip(sb, b, off))
            if any(s.stop <= s.start for s in lb):
                continue
            x, y, z = X[lb], Y[lb], Z[lb]
            ab = (e - a) / sc
            ab2 = float(ab @ ab) or 1e-6
            px, py, pz = (x - np.float32(a[0])) / np.float32(sc[0]), (y - np.float32(a[1])) / np.float32(sc[1]), (z - np.float32(a[2])) / np.float32(sc[2])
            t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / ab2, 0.0, 1.0).astype(np.float32)
            d = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
            d = d - (ra + t * (re - ra))
            cur = sdf[lb]
            better = d < cur
            cur[better] = d[better]
            par[lb][better] = ((cum[i] + t * seglen[i]) / total)[better]
        return b, sdf, par


def smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum of two signed distances (blend radius ``k`` mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)
