"""The subject model: anatomy of the trunk in physical millimetres, painted as tissues.

Subject frame (mm): x toward the patient's right, y anterior, z superior; z = 0 at the top of the
pubic symphysis, x = 0 on the midline, y = 0 at the centre of the lean (fat-free) torso. Every
structure is placed relative to skeletal landmarks (vertebral levels, diaphragm domes) that are
scaled per subject, then jittered, then bent by the canvas' smooth displacement field.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import tissues as T
from .shapes import Canvas, rot, smooth_union

L = T.KID_L_OFFSET

# vertebral levels: name and lower boundary (mm above the symphysis, average adult); the last
# entry is the upper boundary of C6.
LEVELS = ["S", "L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7", "T6", "T5", "T4", "T3", "T2", "T1", "C7", "C6"]
LEVEL_Z = [30, 150, 185, 220, 255, 289, 322, 352, 380, 407, 433, 458, 482, 505, 528, 550, 572, 594, 616, 636, 655]

# torso profile (lean = outer muscle surface), by z
PROF_Z = np.array([-80, 0, 80, 160, 220, 300, 380, 450, 520, 600, 680], float)
A_LEAN = np.array([150, 158, 160, 148, 135, 132, 140, 143, 146, 146, 140], float)
B_ANT = np.array([92, 95, 95, 92, 96, 100, 106, 110, 106, 98, 92], float)
B_POST = np.array([85, 88, 86, 82, 82, 84, 90, 92, 92, 90, 88], float)
# depth of the vertebral body centre anterior to the posterior lean surface
SPINE_Z = np.array([-80, 40, 100, 150, 220, 300, 380, 450, 550, 680], float)
SPINE_D = np.array([20, 28, 40, 55, 63, 61, 58, 55, 55, 55], float)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


class Subject:
    """All random parameters of one synthetic patient (drawn in a fixed order from ``rng``)."""

    def __init__(self, rng: np.random.Generator, size_range: tuple[float, float] = (0.88, 1.12), jitter: float = 1.0):
        self.rng = rng
        j = jitter
        self.hs = _u(rng, 0.92, 1.08)  # height scale
        size = _u(*((rng,) + tuple(size_range)))
        self.sw = size * _u(rng, 0.95, 1.05)  # width scale
        self.sd = size * _u(rng, 0.93, 1.07)  # depth scale
        self.adip = float(rng.beta(2.0, 2.5))  # adiposity 0..1
        self.f_ant = 6 + 42 * self.adip * _u(rng, 0.7, 1.2)
        self.f_lat = 5 + 30 * self.adip * _u(rng, 0.7, 1.2)
        self.f_post = 5 + 22 * self.adip * _u(rng, 0.7, 1.2)
        self.visc = 25 * self.adip * _u(rng, 0.5, 1.3)  # visceral fat: belly grows anteriorly
        self.n_sup = _u(rng, 2.0, 2.5)
        self.m_wall = _u(rng, 8, 15)  # abdominal wall muscle thickness
        self.breath = _u(rng, -14, 14) * j  # diaphragm shift (+ = expiration, up)
        self.levels = np.array(LEVEL_Z, float) * self.hs
        self.scol = _u(rng, -6, 6)
        self.dome_r = float(np.interp(0.5, [0, 1], [self.lev("T10", 0.5), self.lev("T9", 0.6)])) + self.breath
        self.dome_l = self.dome_r - _u(rng, 6, 22)
        self.organ: dict[str, dict[str, Any]] = {}
        for name in ("liver", "spleen", "kid_r", "kid_l", "stomach", "pancreas", "gb", "heart", "adr_r", "adr_l", "bladder", "colon"):
            self.organ[name] = {
                "d": rng.normal(0, 6 * j, 3),
                "s": float(np.clip(rng.normal(1.0, 0.07 * j), 1.0 - 0.15 * j, 1.0 + 0.18 * j)),
                "rz": float(rng.normal(0, 6 * j)),
            }
        self.stomach_fill = _u(rng, 0.75, 1.25)
        self.stomach_air = _u(rng, 0.0, 1.0)
        self.gb_fill = _u(rng, 0.75, 1.2)
        self.bladder_fill = _u(rng, 0.4, 1.2)
        self.bowel_density = _u(rng, 1.0, 2.0)
        self.bowel_air = _u(rng, 0.0, 1.0)
        self.oral_contrast = False
        self.eso_air = bool(rng.random() < 0.5)
        self.colon_sag = _u(rng, 0, 60)
        self.liver_left = _u(rng, 0.7, 1.3)  # size of the left lobe relative to the right
        self.liver_tip = _u(rng, 0.0, 1.0)  # how far the right lobe reaches down (Riedel-like tongue)
        self.shape_amp = _u(rng, 2.0, 5.0)  # amplitude (mm) of organ surface irregularity
        self.vessel_dirs = rng.normal(0, 1, (12, 3))  # directions of random intrahepatic branches
        self.female = bool(rng.random() < 0.5)
        self.table_y = _u(rng, 0.5, 4)
        self.aorta_r = float(np.clip(rng.normal(1.0, 0.08), 0.8, 1.25))

    # -- skeleton ---------------------------------------------------------------------------------
    def lev(self, name: str, frac: float = 0.5) -> float:
        """z (mm) at fraction ``frac`` of vertebral level ``name`` (0 = lower boundary)."""
        i = LEVELS.index(name)
        return float(self.levels[i] + frac * (self.levels[i + 1] - self.levels[i]))

    def a_lean(self, z):
        return np.interp(z, PROF_Z * self.hs, A_LEAN) * self.sw

    def b_ant(self, z):
        return np.interp(z, PROF_Z * self.hs, B_ANT) * self.sd

    def b_post(self, z):
        return np.interp(z, PROF_Z * self.hs, B_POST) * self.sd

    def spine_y(self, z):
        # lumbar lordosis (forward) and thoracic kyphosis (backward) included in SPINE_D
        return -self.b_post(z) + np.interp(z, SPINE_Z * self.hs, SPINE_D) * self.sd

    def spine_x(self, z):
        zz = (np.asarray(z, float) - self.lev("L1")) / 250.0
        return self.scol * np.sin(np.pi * zz)

    def body_rx(self, z):  # vertebral body half width
        zz = SPINE_Z * self.hs
        return np.interp(z, zz, [10, 30, 45, 26, 25, 23, 19, 17, 16, 15]) * self.sw

    def body_ry(self, z):
        zz = SPINE_Z * self.hs
        return np.interp(z, zz, [8, 12, 17, 17, 17, 16, 14, 13, 12, 11]) * self.sd

    def ys(self, z):
        """Anterior surface of the vertebral body."""
        return self.spine_y(z) + self.body_ry(z)

    def front(self, z: float, dx: float = 0.0, dy: float = 0.0) -> tuple[float, float, float]:
        """A point ``dx`` mm lateral of the spine's axis and ``dy`` mm in front of the vertebral body at height ``z``."""
        return (float(self.spine_x(z)) + dx, float(self.ys(z)) + dy, z)


def _jit(S: Subject, name: str, c) -> np.ndarray:
    o = S.organ[name]
    return np.asarray(c, float) + o["d"]


# ================================================================================================
def build(cv: Canvas, S: Subject, fields: dict[str, np.ndarray], thorax_detail: bool = False,
          upper_chest: bool = False) -> dict[str, float]:
    """Paint the whole trunk into ``cv.tissue``; returns landmark z positions (subject frame).
    ``thorax_detail``, ``upper_chest``: see :class:`PhantomConfig` (``thorax_detail`` needs the
    ``vess*`` fields)."""
    lm: dict[str, float] = {}
    _torso(cv, S)
    _diaphragm_regions(cv, S)
    _table(cv, S)
    _thorax(cv, S, fields, lm, thorax_detail)
    _muscles(cv, S)
    _bowel(cv, S, fields, lm)
    _organs(cv, S, fields, lm)
    _vessels(cv, S, lm)
    _skeleton(cv, S, lm)
    if upper_chest:  # painted last and without random draws: the rest of the subject stays as it was
        _upper_chest(cv, S, lm)
    for i, n in enumerate(LEVELS):
        lm[f"{n}_bottom"] = float(S.levels[i])
    lm["pubic_symphysis"] = 0.0
    lm["dome_right"] = S.dome_r
    lm["dome_left"] = S.dome_l
    return lm


# ------------------------------------------------------------------------------------------------
def _torso(cv: Canvas, S: Subject) -> None:
    X, Y, Z = cv.X, cv.Y, cv.Z
    a0 = S.a_lean(Z)
    fat_scale = np.interp(Z, [S.lev("T10"), S.lev("T8")], [1.0, 0.55]).astype(np.float32)
    f_ant = S.f_ant * fat_scale
    f_lat = S.f_lat * fat_scale
    f_post = S.f_post * np.float32(1.0)
    belly = S.visc * np.interp(Z, [S.lev("S", 0.5), S.lev("L4"), S.lev("L1"), S.lev("T11")], [0.3, 1, 1, 0.2]).astype(np.float32)
    a = a0 + f_lat
    b = np.where(Y > 0, S.b_ant(Z) + belly + f_ant, S.b_post(Z) + f_post)
    n = np.where(Y > 0, S.n_sup, S.n_sup + 0.6)  # flatter back (supine on the table)
    xa = np.abs(X) / a
    yb = np.abs(Y) / b
    rho = (xa**n + yb**n) ** (1.0 / n)
    r = np.sqrt(X * X + Y * Y)
    depth = r * (1.0 / np.maximum(rho, 1e-3) - 1.0)  # distance to the skin along the ray
    s = Y / np.maximum(r, 1e-3)  # sin of the angle (+1 anterior, -1 posterior)
    fat = f_lat + (f_ant - f_lat) * np.clip(s, 0, 1) ** 2 + (f_post - f_lat) * np.clip(-s, 0, 1) ** 2
    thor = np.interp(Z, [S.lev("T11"), S.lev("T9")], [0.0, 1.0]).astype(np.float32)
    pelv = np.interp(Z, [S.lev("S", 0.1), S.lev("S", 0.7), S.lev("L5")], [1.0, 1.0, 0.0]).astype(np.float32)
    m = S.m_wall + thor * 6 + 10 * np.clip(-s, 0, 1) ** 2
    # gluteal muscles: thick posterolateral wall in the pelvis
    glut = pelv * 45 * np.exp(-(((s + 0.55) / 0.45) ** 2))
    m = m + glut
    body = rho <= 1.0
    tis = cv.tissue
    tis[body] = T.FAT_SC
    tis[body & (depth < 2.0)] = T.SKIN
    wall = body & (depth >= fat) & (depth < fat + m)
    tis[wall] = T.MUSCLE
    # linea alba: a thin fatty seam between the two rectus muscles
    tis[wall & (np.abs(X) < 3.0) & (s > 0.85) & (Z < S.lev("T9"))] = T.FAT_SC
    cav = body & (depth >= fat + m)
    tis[cav] = T.FAT_VISC
    cv.region[body] = 1
    cv.region[cav] = 2
    # upper thighs / perineum below the symphysis: muscle rather than pelvic fat
    low = cav & (Z < S.lev("S", 0.0) - 25)
    tis[low] = T.MUSCLE
    cv.region[low] = 1
    cv._depth = depth  # used by the ribs
    cv._fat = fat


def dome_z(S: Subject, x, y):
    """z of the diaphragm surface above (x, y)."""
    out = None
    for xc, yc, p in ((65 * S.sw, 5.0, S.dome_r), (-70 * S.sw, 0.0, S.dome_l)):
        dy = y - yc
        cy = np.where(dy > 0, 0.0035, 0.009)
        v = p - 0.0042 * (x - xc) ** 2 - cy * dy * dy
        out = v if out is None else np.maximum(out, v)
    return out


def _diaphragm_regions(cv: Canvas, S: Subject) -> None:
    X, Y, Z = cv.X, cv.Y, cv.Z
    zd = dome_z(S, X, Y)
    cav = cv.region == 2
    thor = cav & (Z > zd)
    cv.region[thor] = 3
    cv.tissue[thor] = T.LUNG
    # diaphragm muscle sheet just above the surface
    dia = thor & (Z < zd + 5.0)
    cv.tissue[dia] = T.DIAPHRAGM


def _table(cv: Canvas, S: Subject) -> None:
    # the table is rigid: undeformed grid coordinates, flat along z
    X = cv.xs[:, None, None]
    Y = cv.ys[None, :, None]
    yb = -float(np.max(S.b_post(cv.zs))) - S.f_post - S.table_y - 2.0
    curve = yb + 0.0006 * X * X
    d = Y - curve  # positive above the table top
    outside = cv.region == 0
    core = outside & ((d < -3.5) & (d > -16) & (np.abs(X) < 230))
    skin = outside & ((((d <= 0.0) & (d >= -3.5)) | ((d <= -16) & (d >= -19))) & (np.abs(X) < 232))
    cv.tissue[core] = T.TABLE_CORE
    cv.tissue[skin] = T.TABLE_SKIN


# ------------------------------------------------------------------------------------------------
def _thorax(cv: Canvas, S: Subject, f: dict[str, np.ndarray], lm: dict[str, float], detail: bool = False) -> None:
    zt = S.lev("T12")
    b = cv.box((-250, -200, zt - 80), (250, 250, 2000))
    if b is None:
        return
    X, Y, Z = cv.coords(b)
    reg = cv.region[b]
    ys = S.ys(Z)
    # mediastinum: central band in front of the spine, wider in the upper chest
    w = np.interp(Z, [S.lev("T9"), S.lev("T6"), S.lev("T3"), S.lev("T1")], [18, 22, 30, 26]) * S.sw
    xm = -5.0
    taper = 1.0 - 0.75 * np.clip((Y - ys) / (110.0 * S.sd), 0, 1)
    med = (reg == 3) & (np.abs(X - xm) < w * taper) & (Y > ys - 12)
    # lung apex: taper above T2
    cv.paint(b, med, T.FAT_VISC)
    # heart: tilted ellipsoid resting on the diaphragm, anterior-left
    o = S.organ["heart"]
    sc = o["s"] * 0.95
    zc = S.dome_r + 24 * S.hs
    c = _jit(S, "heart", (-22 * S.sw, 38 * S.sd, zc))
    R = rot(0, 20, -35 + o["rz"])
    hb, hs_, q = cv.ellipsoid(c, np.array([64, 50, 54]) * sc, R, pad=6)
    if hb is not None:
        r3 = cv.region[hb]
        allowed = (r3 == 3)
        cv.paint(hb, (hs_ < 4) & allowed, T.FAT_VISC)  # pericardial fat
        cv.paint(hb, (hs_ < 0) & allowed, T.MYOCARDIUM)
        inner = (hs_ < -3) & allowed
        X, Y, Z = cv.coords(hb)
        k = sc
        # chambers (world offsets from the heart centre): RV anterior-right, RA right, LA posterior-superior,
        # LV left-inferior toward the apex with a thick wall (the septum separates it from the RV)
        # detail: chambers about 1.25x wider, holding about half of the heart's volume as in a real
        # heart (a third in the default thorax); the left ventricular wall 8 mm instead of 10
        radii = (((47, 26, 43), (31, 31, 35), (38, 24, 26)) if detail else ((38, 20, 34), (24, 24, 28), (30, 18, 20)))
        for off, rad, tid in zip(((14, 26, -4), (42, -6, 12), (2, -32, 24)), radii, (T.BLOOD_R, T.BLOOD_R, T.BLOOD_L)):
            e = _ell(X, Y, Z, c + np.array(off) * k, np.array(rad) * k, None)
            cv.paint(hb, inner & (e < 0), tid)
        lv = _ell(X, Y, Z, c + np.array([-24, 4, -12]) * k, np.array([38, 33, 40] if detail else [34, 30, 36]) * k, rot(0, 20, -35))
        cv.paint(hb, inner & (lv < 0), T.MYOCARDIUM)
        cv.paint(hb, inner & (lv < -(8 if detail else 10) * k), T.BLOOD_L)
    lm["heart_top"] = float(c[2] + 56 * sc)
    lm["heart_bottom"] = float(S.dome_r - 5)
    if detail:
        _lung_vessels(cv, S, f, b)
    else:  # vessel markings: thresholded band-pass noise, denser medially
        lungm = cv.tissue[b] == T.LUNG
        nv = f["fine"][b]
        med_w = np.exp(-np.abs(cv.X[b]) / 90.0)
        cv.paint(b, lungm & (nv > 1.35 - 0.8 * med_w), T.LUNG_VESSEL)
    lm["lung_apex"] = S.lev("T1", 0.8)


def _lung_vessels(cv: Canvas, S: Subject, f: dict[str, np.ndarray], bl) -> None:
    """Pulmonary vessels: thin tubes along the curves where two of three smooth random fields both
    vanish (three families of fairly straight curves), thick near the hila (up to ~4 mm radius) and
    thinning to ~0.6 mm at the periphery.

    The tube is drawn with partial volume: each lung voxel gets the fraction of a voxel-sized,
    point-spread blurred tube it holds (:meth:`Canvas.blend`), so a 1 mm vessel on a 3 mm grid is
    a faint smudge as in real CT rather than a full-intensity voxel; voxels more than half filled
    become the vessel tissue. ``bl``: the chest's box of voxels."""
    lung = cv.tissue[bl] == T.LUNG
    if not lung.any():
        return
    sp = cv.spacing
    q = []  # squared first-order distance (mm^2) to each field's zero surface
    for key in ("vess1", "vess2", "vess3"):
        g = f[key][bl]
        gx, gy, gz = np.gradient(g, *sp)
        q.append(g * g / np.maximum(gx * gx + gy * gy + gz * gz, np.float32(1e-4)))
    d2 = np.minimum(np.minimum(q[0] + q[1], q[0] + q[2]), q[1] + q[2])  # to the nearest curve
    del q
    X, Y, Z = cv.coords(bl)
    car = S.lev("T5", 0.3)
    yh = float(S.ys(car)) + 20.0 * S.sd
    dh = None  # distance (mm) to the nearer hilum
    for side in (1, -1):
        d = np.sqrt((X - np.float32(side * 50 * S.sw)) ** 2 + (Y - np.float32(yh)) ** 2 + (Z - np.float32(car - 35)) ** 2)
        dh = d if dh is None else np.minimum(dh, d)
    r = np.float32(0.6) + np.float32(3.4) * np.exp(-dh / np.float32(70.0))
    s2 = np.float32((0.35 * float(np.cbrt(sp[0] * sp[1] * sp[2]))) ** 2)  # voxel box + PSF, as a Gaussian
    frac = (1.0 - np.exp(-r * r / (2 * s2))) * np.exp(-d2 / (2 * (s2 + 0.5 * r * r)))
    frac = np.where(lung, frac, np.float32(0.0)).astype(np.float32)
    cv.paint(bl, frac >= 0.5, T.PULM_VESSEL)
    cv.blend(bl, frac, T.LUNG, T.PULM_VESSEL)


def _muscles(cv: Canvas, S: Subject) -> None:
    # paraspinal (erector spinae) columns and psoas; painted before organs
    zlo, zhi = -50, S.lev("T1")
    b = cv.box((-90, -220, zlo), (90, 60, zhi))
    if b is None:
        return
    _erector_spinae(cv, S, b)
    # psoas: grows from T12 to L5, moves lateral-anterior into the pelvis
    zz = np.array([S.lev("T12", 0.5), S.lev("L2"), S.lev("L4"), S.lev("S", 0.9), S.lev("S", 0.3), -20.0])
    pr = np.array([4, 12, 20, 22, 18, 16]) * S.sw
    pxo = np.array([22, 28, 38, 55, 75, 80]) * S.sw
    pyo = np.array([0, 2, 5, 20, 55, 70]) * S.sd
    for side in (1, -1):
        pts = [(side * (float(np.interp(z, zz, pxo)) + float(S.spine_x(z))), float(S.spine_y(z)) + float(np.interp(z, zz, pyo)), z) for z in zz]
        tb, sdf, _ = cv.tube(pts, pr, scale=(1.0, 0.85, 1.0))
        if tb is not None:
            cv.paint(tb, sdf < 0, T.MUSCLE, region=(2,))
        # quadratus lumborum
        zq = np.array([S.lev("T12"), S.lev("L2"), S.lev("L4", 0.8)])
        pts = [(side * (65 * S.sw + float(S.spine_x(z))), float(S.spine_y(z)) - 22 * S.sd, z) for z in zq]
        tb, sdf, _ = cv.tube(pts, [6, 13, 9], scale=(1.0, 0.6, 1.0))
        if tb is not None:
            cv.paint(tb, sdf < 0, T.MUSCLE, region=(2,))


def _erector_spinae(cv: Canvas, S: Subject, b) -> None:
    """The paraspinal columns in box ``b``: from the laminae back to the posterior wall."""
    X, Y, Z = cv.coords(b)
    u = X - S.spine_x(Z)
    cy = S.spine_y(Z) - S.body_ry(Z) - 45 * S.sd
    es = ((np.abs(u) - 28 * S.sw) / (24 * S.sw)) ** 2 + ((Y - cy) / (30 * S.sd)) ** 2 < 1
    cv.paint(b, es, T.MUSCLE, onto=(T.MUSCLE, T.FAT_VISC, T.LUNG), region=(1, 2, 3))


# ------------------------------------------------------------------------------------------------
def _bowel(cv: Canvas, S: Subject, f: dict[str, np.ndarray], lm: dict[str, float]) -> None:
    ys = float(S.ys(S.lev("L2")))
    # colon frame: caecum -> ascending -> hepatic flexure -> transverse -> splenic flexure -> descending -> sigmoid -> rectum
    sag = S.colon_sag
    sw, sd = S.sw, S.sd
    zl = S.lev
    pts = [
        (72 * sw, ys + 55 * sd, zl("S", 0.75)),
        (88 * sw, ys + 35 * sd, zl("L4")),
        (88 * sw, ys + 30 * sd, zl("L2")),
        (75 * sw, ys + 55 * sd, zl("L1", 0.2)),
        (40 * sw, ys + 95 * sd, zl("L2") - sag * 0.5),
        (0, ys + 105 * sd, zl("L3") - sag),
        (-45 * sw, ys + 95 * sd, zl("L2") - sag * 0.5),
        (-82 * sw, ys + 45 * sd, zl("L1", 0.6)),
        (-92 * sw, ys + 15 * sd, zl("L2")),
        (-90 * sw, ys + 20 * sd, zl("L4")),
        (-70 * sw, ys + 40 * sd, zl("S", 0.75)),
        (-35 * sw, ys + 60 * sd, zl("S", 0.45)),
        (5 * sw, ys + 45 * sd, zl("S", 0.45)),
        (0, float(S.spine_y(zl("S", 0.3))) + 35 * sd, zl("S", 0.25)),
        (0, float(S.spine_y(zl("S", 0.0))) + 35 * sd, zl("S", 0.0) - 15),
    ]
    rad = np.array([28, 24, 24, 24, 22, 22, 22, 20, 18, 18, 17, 17, 18, 22, 18], float) * S.organ["colon"]["s"]
    tb, sdf, par = cv.tube(pts, rad, scale=(1, 1, 1), n_per_seg=5)
    if tb is not None:
        # haustra: radius modulation along the arclength
        sdf = sdf + 3.0 * np.sin(par * 2 * np.pi * 28)
        onto = (T.FAT_VISC, T.MUSCLE)
        reg = (2,)
        cv.paint(tb, sdf < 0, T.BOWEL_WALL, onto=onto, region=reg)
        inner = sdf < -3
        st = f["fine"][tb]
        cv.paint(tb, inner, T.STOOL, onto=(T.BOWEL_WALL,))
        cv.paint(tb, inner & ((st > 0.8) | (cv.Y[tb] > ys + 88 * sd)), T.BOWEL_AIR, onto=(T.STOOL,))
    # small bowel: tangle of tubes from the zero sets of two smooth fields
    zb = zl("L1", 0.3)
    b = cv.box((-110 * sw, ys - 5, zl("S", 0.2)), (110 * sw, ys + 200, zb))
    if b is not None:
        X, Y, Z = cv.coords(b)
        n1, n2 = f["bowel1"][b], f["bowel2"][b]
        rr = n1 * n1 + n2 * n2
        dens = S.bowel_density
        inside = (cv.region[b] == 2) & (Z < zb - 10) & (Z > -10)
        # mesenteric root: fewer loops right at the back
        inside &= Y > S.ys(Z) + 8
        wall = inside & (rr < dens)
        lumen = inside & (rr < dens * 0.5)
        cv.paint(b, wall, T.BOWEL_WALL, onto=(T.FAT_VISC,))
        content = T.BOWEL_CONTRAST if S.oral_contrast else T.BOWEL_FLUID
        cv.paint(b, lumen, content, onto=(T.BOWEL_WALL,))
        air = lumen & (f["fine"][b] > 2.2 - S.bowel_air)
        cv.paint(b, air, T.BOWEL_AIR, onto=(content,))
        # mesenteric vessels: small dots in the fat between the loops (unlabelled, blood HU)
        mes = inside & (f["lobule"][b] > 2.1)
        cv.paint(b, mes & (f["fine"][b] > 0), T.VEIN, onto=(T.FAT_VISC,))
        cv.paint(b, mes & (f["fine"][b] <= 0), T.ARTERY, onto=(T.FAT_VISC,))
    lm["colon_transverse"] = float(zl("L3") - sag)


# ------------------------------------------------------------------------------------------------
def _organs(cv: Canvas, S: Subject, f: dict[str, np.ndarray], lm: dict[str, float]) -> None:
    sw, sd, hs = S.sw, S.sd, S.hs
    ysL1 = float(S.ys(S.lev("L1")))
    spy = float(S.spine_y(S.lev("L1")))
    abd = (2,)
    soft = (T.FAT_VISC, T.MUSCLE, T.BOWEL_WALL, T.BOWEL_FLUID, T.BOWEL_AIR, T.STOOL, T.BOWEL_CONTRAST)

    # ---- stomach (before the liver so that the left lobe lies over it) -------------------------
    o = S.organ["stomach"]
    zL = S.dome_l
    fs = S.stomach_fill * o["s"]
    d = o["d"]
    pts = np.array([
        (-38 * sw, ysL1 + 40 * sd, zL - 32),  # cardia
        (-62 * sw, ysL1 + 25 * sd, zL - 30),  # fundus
        (-72 * sw, ysL1 + 55 * sd, zL - 65 * hs),
        (-55 * sw, ysL1 + 85 * sd, zL - 105 * hs),
        (-15 * sw, ysL1 + 92 * sd, zL - 122 * hs),
        (20 * sw, ysL1 + 78 * sd, zL - 118 * hs),
        (38 * sw, ysL1 + 62 * sd, zL - 112 * hs),  # pylorus
    ]) + d
    rad = np.array([14, 34, 33, 28, 22, 16, 9]) * fs
    tb, sdf, par = cv.tube(pts, rad, scale=(1, 0.85, 1), n_per_seg=5)
    if tb is not None:
        ok = cv.region[tb] == 2
        sdf = sdf + 2.0 * f["fine"][tb]  # rugae
        cv.paint(tb, (sdf < 0) & ok, T.STOM_WALL, onto=soft)
        inner = (sdf < -4.5) & ok
        cv.paint(tb, inner, T.STOM_FLUID, onto=(T.STOM_WALL,))
        yair = ysL1 + (130 - 80 * S.stomach_air) * sd
        cv.paint(tb, inner & (cv.Y[tb] > yair), T.STOM_AIR, onto=(T.STOM_FLUID,))
    # duodenum: C-loop around the pancreatic head
    ysL3 = float(S.ys(S.lev("L3")))
    dpts = np.array([
        pts[-1],
        (55 * sw, ysL1 + 45 * sd, pts[-1][2] - 5),
        (62 * sw, ysL1 + 30 * sd, S.lev("L1", 0.3)),
        (64 * sw, ysL3 + 30 * sd, S.lev("L3", 0.6)),
        (35 * sw, ysL3 + 22 * sd, S.lev("L3", 0.2)),
        (-5 * sw, ysL3 + 18 * sd, S.lev("L3", 0.3)),
        (-30 * sw, ysL3 + 30 * sd, S.lev("L2", 0.5)),
        (-45 * sw, ysL1 + 45 * sd, S.lev("L2", 0.9)),
    ])
    tb, sdf, _ = cv.tube(dpts, [9, 12, 13, 13, 12, 11, 12, 12], scale=(1, 0.85, 1))
    if tb is not None:
        cv.paint(tb, sdf < 0, T.BOWEL_WALL, onto=soft, region=abd)
        cv.paint(tb, sdf < -3, T.BOWEL_FLUID, onto=(T.BOWEL_WALL,))
        cv.paint(tb, (sdf < -3) & (f["fine"][tb] > 1.6), T.BOWEL_AIR, onto=(T.BOWEL_FLUID,))

    # ---- liver ----------------------------------------------------------------------------------
    o = S.organ["liver"]
    s = 0.94 * float(np.clip(o["s"], 0.88, 1.12)) * (0.5 * sw + 0.5 * sd) ** 0.3
    zR = S.dome_r
    Rl = rot(0, -12, o["rz"])
    cR = _jit(S, "liver", (68 * sw, 2 * sd, zR - 68 * hs * s))
    ll = S.liver_left
    cL = cR + np.array([-(75 + 20 * ll) * sw, 40 * sd, 22 * hs])
    cC = cR + np.array([-45 * sw, -20 * sd, -5])
    lo = np.minimum(cR, cL) - 120
    hi = np.maximum(cR, cL) + 120
    b = cv.box(lo, hi)
    if b is not None:
        X, Y, Z = cv.coords(b)
        d1 = _ell(X, Y, Z, cR, np.array([70, 88, 90]) * s, Rl)
        d2 = _ell(X, Y, Z, cL, np.array([62 * ll, 40 * ll**0.5, 42]) * s, rot(0, 0, -15 + o["rz"]))
        # inferior tongue of the right lobe (variable)
        tip = cR + np.array([18 * sw, -5 * sd, -(60 + 40 * S.liver_tip) * hs * s])
        d4 = _ell(X, Y, Z, tip, np.array([26, 34, 30 + 15 * S.liver_tip]) * s, None)
        d3 = _ell(X, Y, Z, cC, np.array([24, 22, 40]) * s, None)
        sdf = smooth_union(smooth_union(d1, d2, 25.0), d3, 12.0)
        # inferior surface: flatten the anterior-inferior edge (plane rising anteriorly)
        plane = (cR[2] - 58 * hs * s) + 0.35 * (Y - cR[1]) - 0.25 * (X - cR[0])
        sdf = np.maximum(sdf, (plane - Z) * 0.7)
        sdf = smooth_union(sdf, d4, 15.0)
        sdf = sdf + S.shape_amp * f["shape"][b]
        cv.paint(b, sdf < 0, T.LIVER, onto=soft + (T.STOM_WALL, T.STOM_FLUID, T.STOM_AIR), region=abd)
        lm["liver_bottom"] = float(min(cR[2] - 90 * s, tip[2] - (30 + 15 * S.liver_tip) * s))
        lm["liver_top"] = float(zR)

    # ---- gallbladder under the liver ------------------------------------------------------------
    o = S.organ["gb"]
    g = S.gb_fill * o["s"]
    cg = _jit(S, "gb", (48 * sw, ysL1 + 78 * sd, S.lev("L1", 0.7)))
    gb, gsdf, q = cv.ellipsoid(cg, np.array([16, 17, 36]) * g, rot(-55, 10, 20 + o["rz"]))
    if gb is not None:
        m = (gsdf < 0) & (cv.region[gb] == 2)
        cv.paint(gb, m, T.GB_WALL)
        cv.paint(gb, m & (gsdf < -2.0), T.BILE)
        lm["gallbladder"] = float(cg[2])

    # ---- spleen ---------------------------------------------------------------------------------
    o = S.organ["spleen"]
    s = o["s"]
    c = _jit(S, "spleen", (-92 * sw, spy - 10 * sd, S.dome_l - 62 * hs))
    Rs = rot(-25, 20, 35 + o["rz"])
    sb, ssdf, q = cv.ellipsoid(c, np.array([24, 50, 56]) * s, Rs, pad=5)
    if sb is not None:
        X, Y, Z = cv.coords(sb)
        # concave hilum: remove a sphere on the anteromedial side
        hc = c + np.array([45 * s, 35 * s, 0])
        cut = 38 * s - np.sqrt((X - hc[0]) ** 2 + (Y - hc[1]) ** 2 + (Z - hc[2]) ** 2)
        sdf = np.maximum(ssdf, cut) + 0.8 * S.shape_amp * f["shape"][sb]
        cv.paint(sb, sdf < 0, T.SPLEEN, onto=soft + (T.STOM_WALL, T.STOM_FLUID, T.STOM_AIR), region=abd)
        lm["spleen_center"] = float(c[2])

    # ---- kidneys --------------------------------------------------------------------------------
    for side, key, off in ((1, "kid_r", 0), (-1, "kid_l", L)):
        o = S.organ[key]
        s = o["s"]
        zc = S.lev("L1", 0.05) if side < 0 else S.lev("L2", 0.6)
        zc += 0.5 * S.breath
        c = _jit(S, key, (side * 75 * sw, spy - 8 * sd, zc))
        R = rot(-18, side * -14, side * 35 + o["rz"])  # upper pole posterior+medial, hilum anteromedial
        kb, ksdf, q = cv.ellipsoid(c, np.array([28, 24, 56]) * s, R, pad=3)
        if kb is None:
            continue
        # hilum / renal sinus: local -x points medially for both sides after the side-aware rotation
        hx = -side * 1.0
        sinus = np.sqrt(((q[0] - hx * 20 * s) / 16) ** 2 + (q[1] / 10) ** 2 + (q[2] / 26) ** 2) - 1
        ang = np.arctan2(q[1], q[0])
        m_kid = (ksdf < 0) & (cv.region[kb] == 2)
        cv.paint(kb, m_kid, T.KID_CORTEX + off, onto=soft + (T.LIVER, T.SPLEEN))
        med = m_kid & (ksdf < -7) & (np.cos(5 * ang + 0.15 * q[2]) > -0.35)
        cv.paint(kb, med, T.KID_MEDULLA + off, onto=(T.KID_CORTEX + off,))
        cv.paint(kb, m_kid & (sinus < 0), T.FAT_VISC, onto=(T.KID_CORTEX + off, T.KID_MEDULLA + off))
        cv.paint(kb, m_kid & (sinus < -0.45), T.KID_PELVIS + off, onto=(T.FAT_VISC,))
        lm[f"kidney_{'right' if side > 0 else 'left'}_center"] = float(c[2])
        lm[f"kidney_{'right' if side > 0 else 'left'}_top"] = float(c[2] + 52 * s)
        lm[f"kidney_{'right' if side > 0 else 'left'}_bottom"] = float(c[2] - 52 * s)
        # adrenal: thin inverted-Y above the upper pole, medial
        ak = "adr_r" if side > 0 else "adr_l"
        oa = S.organ[ak]
        top = c + R @ np.array([0, 0, 52 * s])
        ca = _jit(S, ak, (side * 38 * sw, spy + (8 if side > 0 else 14) * sd, top[2] + (12 if side > 0 else 2)))
        ca[2] = ca[2] * 0 + (top[2] + (12 if side > 0 else 2)) + oa["d"][2] * 0.3
        limbs = [(rot(10, 0, side * 25), (0, 0, 0)), (rot(10, 0, side * 70), (side * 6, -6, -6)), (rot(-20, 0, side * -10), (-side * 4, -8, -4))]
        ab = cv.box(ca - 30, ca + 30)
        if ab is not None:
            X, Y, Z = cv.coords(ab)
            sd_ = None
            for Rr, dd in limbs:
                e = _ell(X, Y, Z, ca + np.array(dd), np.array([3.2, 13, 17]) * oa["s"], Rr)
                sd_ = e if sd_ is None else np.minimum(sd_, e)
            cv.paint(ab, (sd_ < 0) & (cv.region[ab] == 2), T.ADRENAL + off, onto=soft + (T.LIVER,))
            lm[f"adrenal_{'right' if side > 0 else 'left'}"] = float(ca[2])

    # ---- pancreas ---------------------------------------------------------------------------------
    o = S.organ["pancreas"]
    s = o["s"]
    zp = S.lev("L1", 0.3) + 0.4 * S.breath
    d = o["d"] * 0.6
    ppts = np.array([
        (40 * sw, ysL1 + 30 * sd, zp - 42),  # uncinate / lower head
        (40 * sw, ysL1 + 42 * sd, zp - 22),  # head
        (14 * sw, ysL1 + 58 * sd, zp - 4),  # neck
        (-22 * sw, ysL1 + 55 * sd, zp + 4),  # body
        (-55 * sw, ysL1 + 38 * sd, zp + 12),
        (-80 * sw, ysL1 + 10 * sd, zp + 22),  # tail toward the splenic hilum
    ]) + d
    prad = np.array([15, 19, 13, 14, 13, 11]) * s
    tb, sdf, _ = cv.tube(ppts, prad, scale=(1.0, 0.75, 1.0), n_per_seg=5)
    if tb is not None:
        sdf = sdf + 2.5 * f["lobule"][tb]
        m = (sdf < 0) & (cv.region[tb] == 2)
        cv.paint(tb, m, T.PANCREAS, onto=soft + (T.STOM_WALL,))
        cv.paint(tb, m & (f["lobule"][tb] > 1.3), T.FAT_VISC, onto=(T.PANCREAS,))  # fatty clefts
        lm["pancreas"] = float(zp)
    S._panc = ppts

    # ---- bladder ----------------------------------------------------------------------------------
    o = S.organ["bladder"]
    bf = S.bladder_fill * o["s"]
    cb = _jit(S, "bladder", (0, 45 * sd, 38 * hs * bf ** 0.5))
    bb, bsdf, _ = cv.ellipsoid(cb, np.array([48, 38, 38]) * bf, None)
    if bb is not None:
        m = (bsdf < 0) & (cv.region[bb] == 2)
        cv.paint(bb, m, T.BOWEL_WALL, onto=soft)
        cv.paint(bb, m & (bsdf < -3), T.BLADDER)
    lm["bladder"] = float(cb[2])
    # uterus (above and behind the bladder) or prostate (below it)
    if S.female:
        cu = cb + np.array([0, -35 * sd, 40 * bf ** 0.5 + 10])
        ub, usdf, _ = cv.ellipsoid(cu, np.array([32, 22, 38]) * o["s"], rot(-35, 0, 0))
    else:
        cu = np.array([0, 40 * sd, -8.0]) + o["d"] * 0.3
        ub, usdf, _ = cv.ellipsoid(cu, np.array([21, 16, 17]) * o["s"], None)
    if ub is not None:
        cv.paint(ub, usdf < 0, T.PELVIC_ORGAN, onto=soft, region=(1, 2))


def _ell(X, Y, Z, c, r, R):
    dx, dy, dz = X - np.float32(c[0]), Y - np.float32(c[1]), Z - np.float32(c[2])
    if R is None:  # no rotation: 1 * d + 0 * e + 0 * f is d itself, so skip the products
        q = [dx, dy, dz]
    else:
        q = [np.float32(R[0, i]) * dx + np.float32(R[1, i]) * dy + np.float32(R[2, i]) * dz for i in range(3)]
    k0 = np.sqrt((q[0] / r[0]) ** 2 + (q[1] / r[1]) ** 2 + (q[2] / r[2]) ** 2)
    k1 = np.sqrt((q[0] / r[0] ** 2) ** 2 + (q[1] / r[1] ** 2) ** 2 + (q[2] / r[2] ** 2) ** 2)
    return (k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
def _vessels(cv: Canvas, S: Subject, lm: dict[str, float]) -> None:
    sw, sd = S.sw, S.sd
    lv = S.lev
    sy = S.spine_y
    abd_soft = (T.FAT_VISC, T.MUSCLE, T.BOWEL_WALL, T.BOWEL_FLUID, T.BOWEL_AIR, T.STOOL, T.PANCREAS, T.LUNG,
                T.LUNG_VESSEL, T.PULM_VESSEL, T.DIAPHRAGM, T.BOWEL_CONTRAST)

    front = S.front
    # aorta: ascending -> arch -> descending (left of the spine) -> abdominal -> bifurcation at L4
    zb = lv("L4", 0.4)
    ra = S.aorta_r
    zarch = lv("T4", 0.2)
    apts = [
        front(S.dome_r + 60, 22 * sw, 62 * sd),
        front(zarch - 5, 22 * sw, 62 * sd),
        front(zarch + 22, 5 * sw, 42 * sd),
        front(zarch + 5, -18 * sw, 14 * sd),
        front(lv("T6"), -24 * sw, 6 * sd),
        front(lv("T9"), -20 * sw, 10 * sd),
        front(lv("T12"), -12 * sw, 13 * sd),
        front(lv("L2"), -14 * sw, 12 * sd),
        front(zb, -10 * sw, 10 * sd),
    ]
    arad = np.array([15, 14, 13, 12, 12, 11.5, 11, 9.5, 8.5]) * ra * sw ** 0.5
    tb, sdf, _ = cv.tube(apts, arad, n_per_seg=5)
    if tb is not None:
        cv.paint(tb, sdf < 0, T.AORTA, onto=abd_soft + (T.FAT_SC, T.MYOCARDIUM, T.BLOOD_L, T.BLOOD_R))
    lm["aortic_arch"] = float(zarch + 22)
    lm["aortic_bifurcation"] = float(zb)
    # iliac arteries
    for side in (1, -1):
        pts = [front(zb, -10 * sw, 10 * sd), front(lv("S", 0.8), side * 40 * sw, 18 * sd), (side * 70 * sw, 10 * sd, lv("S", 0.2)), (side * 85 * sw, 25 * sd, -10)]
        tb, sdf, _ = cv.tube(pts, [6, 5.5, 5, 5])
        if tb is not None:
            cv.paint(tb, sdf < 0, T.ARTERY, onto=abd_soft)
    # IVC: from the iliac confluence, right of the aorta, into the liver and the right atrium
    zc = lv("L5", 0.5)
    ivc = [
        front(zc, 18 * sw, 8 * sd),
        front(lv("L3"), 24 * sw, 10 * sd),
        front(lv("L1"), 25 * sw, 14 * sd),
        front(lv("T12", 0.6), 24 * sw, 26 * sd),
        front(S.dome_r - 18, 20 * sw, 38 * sd),
        front(S.dome_r + 25, 12 * sw, 50 * sd),
    ]
    tb, sdf, _ = cv.tube(ivc, np.array([11, 11.5, 12, 12.5, 13, 14]) * sw ** 0.5, scale=(1.0, 0.72, 1.0))
    if tb is not None:
        cv.paint(tb, sdf < 0, T.IVC, onto=abd_soft + (T.LIVER, T.ADRENAL, T.MYOCARDIUM, T.BLOOD_R, T.BLOOD_L))
    for side in (1, -1):
        pts = [front(zc, 18 * sw, 8 * sd), front(lv("S", 0.7), side * 45 * sw, 5 * sd), (side * 72 * sw, 0, lv("S", 0.2)), (side * 82 * sw, 15 * sd, -10)]
        tb, sdf, _ = cv.tube(pts, [8, 7, 6.5, 6])
        if tb is not None:
            cv.paint(tb, sdf < 0, T.VEIN, onto=abd_soft)
    # hepatic veins (liver label): converge on the IVC below the diaphragm
    hv0 = np.array(front(S.dome_r - 22, 20 * sw, 40 * sd))
    for tip, r in (((95 * sw, -10 * sd, -55), 5.0), ((45 * sw, 75 * sd, -60), 4.5), ((-30 * sw, 70 * sd, -40), 4.5)):
        p1 = hv0 + np.array([tip[0] - hv0[0], tip[1] + 0, tip[2]]) * np.array([1, 0, 1])
        p1[1] = tip[1]
        tb, sdf, _ = cv.tube([hv0, (hv0 + p1) / 2 + np.array([0, 0, 8]), p1], [r, r * 0.8, 2.2])
        if tb is not None:
            cv.paint(tb, sdf < 0, T.HEP_VEIN, onto=(T.LIVER,))
    # portal venous system
    pp = S._panc
    conf = np.array([pp[2][0] - 2, pp[2][1] - 16 * sd, pp[2][2] - 2])  # behind the pancreatic neck
    hil = np.array([48 * sw, conf[1] + 12 * sd, conf[2] + 38 * S.hs])
    tb, sdf, _ = cv.tube([conf, (conf + hil) / 2 + np.array([5, 3, 0]), hil], [7, 7, 6.5])
    if tb is not None:
        cv.paint(tb, sdf < 0, T.PORTAL, onto=abd_soft + (T.LIVER,))
    for tip, r in (((85 * sw, hil[1] - 15, hil[2] + 15), 5.0), ((5 * sw, hil[1] + 35, hil[2] + 18), 4.5)):
        tb, sdf, _ = cv.tube([hil, tip], [r, r * 0.8])
        if tb is not None:
            cv.paint(tb, sdf < 0, T.PORTAL, onto=(T.LIVER,))
        t2 = np.array(tip) + np.array([np.sign(tip[0] - hil[0]) * 25, 10, 20])
        tb, sdf, _ = cv.tube([tip, t2], [r * 0.7, 2.0])
        if tb is not None:
            cv.paint(tb, sdf < 0, T.HEP_PORTAL, onto=(T.LIVER,))
    # splenic vein along the posterior pancreas
    sv = [conf] + [np.array([p[0], p[1] - 13 * sd, p[2] + 1]) for p in pp[3:]] + [pp[-1] + np.array([-22 * sw, -12 * sd, 10])]
    tb, sdf, _ = cv.tube(sv, [6, 5, 4.8, 4.5, 4.5])
    if tb is not None:
        cv.paint(tb, sdf < 0, T.PORTAL, onto=abd_soft + (T.SPLEEN,))
    # random peripheral intrahepatic branches (liver label): portal from the hilum, hepatic toward the IVC
    for n, dvec in enumerate(S.vessel_dirs):
        base = hil if n < 6 else hv0
        dvec = dvec / max(np.linalg.norm(dvec), 1e-6)
        if n < 6:
            dvec[0] = abs(dvec[0]) if n % 2 == 0 else dvec[0]
        else:
            dvec[2] = -abs(dvec[2])
            dvec[1] = abs(dvec[1]) * 0.7 if n % 2 else dvec[1]
        length = 55 + 8 * (n % 4)
        mid = base + dvec * length * 0.5 + np.array([0, 0, 4])
        tb, sdf, _ = cv.tube([base + dvec * 12, mid, base + dvec * length], [3.2, 2.4, 1.4])
        if tb is not None:
            cv.paint(tb, sdf < 0, T.HEP_PORTAL if n < 6 else T.HEP_VEIN, onto=(T.LIVER,))
    # SMV (unlabelled) and SMA, celiac + splenic artery, renal vessels
    tb, sdf, _ = cv.tube([conf, conf + np.array([6, 8, -35]), conf + np.array([8, 15, -85])], [6, 5.5, 5])
    if tb is not None:
        cv.paint(tb, sdf < 0, T.PORTAL_UNL, onto=abd_soft)
    a_l1 = np.array(front(lv("L1", 0.4), -12 * sw, 13 * sd))
    sma = [a_l1, a_l1 + np.array([2, 22, -10]), conf + np.array([-14, 10, -35]), conf + np.array([-10, 20, -90])]
    tb, sdf, _ = cv.tube(sma, [4.5, 4, 3.5, 3])
    if tb is not None:
        cv.paint(tb, sdf < 0, T.ARTERY, onto=abd_soft)
    a_t12 = np.array(front(lv("T12", 0.8), -11 * sw, 14 * sd))
    cel = a_t12 + np.array([0, 22, 2])
    spl = [a_t12, cel, cel + np.array([-25, -5, 8]), cel + np.array([-50, -12, 2]), cel + np.array([-75, -25, 12]), cel + np.array([-92, -35, 6])]
    tb, sdf, _ = cv.tube(spl, [4, 3.5, 3, 3, 3, 2.8])
    if tb is not None:
        cv.paint(tb, sdf < 0, T.ARTERY, onto=abd_soft)
    tb, sdf, _ = cv.tube([cel, cel + np.array([30, 5, 5]), hil + np.array([-8, 8, -4])], [3, 2.8, 2.5])
    if tb is not None:
        cv.paint(tb, sdf < 0, T.ARTERY, onto=abd_soft)
    for side in (1, -1):
        kz = lm.get(f"kidney_{'right' if side > 0 else 'left'}_center")
        if kz is None:
            continue
        kx = side * 48 * sw
        a0 = np.array(front(kz + 12, -12 * sw, 8 * sd))
        tb, sdf, _ = cv.tube([a0, (kx * 0.6, a0[1] - 8, kz + 6), (kx, a0[1] - 15, kz)], [3.5, 3, 3])
        if tb is not None:
            cv.paint(tb, sdf < 0, T.ARTERY, onto=abd_soft)
        v0 = np.array(front(kz + 5, 24 * sw, 12 * sd))
        if side < 0:  # left renal vein crosses in front of the aorta, below the SMA
            pts = [v0, front(kz + 8, -12 * sw, 30 * sd), (kx * 0.8, float(sy(kz)) + 5, kz), (kx, float(sy(kz)) - 2, kz - 3)]
        else:
            pts = [v0, (kx, float(sy(kz)) + 2, kz - 3)]
        tb, sdf, _ = cv.tube(pts, [5.5] * len(pts))
        if tb is not None:
            cv.paint(tb, sdf < 0, T.VEIN, onto=abd_soft)
    # esophagus: behind the heart, through the hiatus, into the cardia
    zL = S.dome_l
    card = np.array([-38 * sw, float(S.ys(S.lev("L1"))) + 40 * sd, zL - 32]) + S.organ["stomach"]["d"]
    epts = [
        front(lv("T1", 0.8), 2 * sw, 2 * sd),
        front(lv("T4"), 0, 6 * sd),
        front(lv("T8"), -2 * sw, 12 * sd),
        front(S.dome_r + 10, -8 * sw, 22 * sd),
        front(zL - 12, -22 * sw, 32 * sd),
        tuple(card),
    ]
    tb, sdf, _ = cv.tube(epts, [8, 8, 8.5, 9, 9, 10], scale=(1.0, 0.75, 1.0))
    if tb is not None:
        cv.paint(tb, sdf < 0, T.ESO_WALL, onto=abd_soft + (T.LIVER, T.STOM_WALL, T.STOM_FLUID, T.MYOCARDIUM, T.BLOOD_L))
        if S.eso_air:
            cv.paint(tb, sdf < -6.5, T.ESO_AIR, onto=(T.ESO_WALL,))
    lm["esophageal_hiatus"] = float(zL - 12)
    # trachea and main bronchi, pulmonary arteries, SVC (chest scans)
    car = lv("T5", 0.3)
    tr = [front(lv("C7"), 0, 32 * sd), front(lv("T3"), 0, 30 * sd), front(car, 0, 26 * sd)]
    tb, sdf, _ = cv.tube(tr, [9, 9, 9])
    if tb is not None:
        cv.paint(tb, sdf < 0, T.CARTILAGE, onto=abd_soft + (T.LUNG,))
        cv.paint(tb, sdf < -2, T.AIRWAY)
    for side in (1, -1):
        br = [tr[-1], (side * 28 * sw, tr[-1][1] - 5, car - 20), (side * 55 * sw, tr[-1][1] - 10, car - 45)]
        tb, sdf, _ = cv.tube(br, [7, 6, 4])
        if tb is not None:
            cv.paint(tb, sdf < 0, T.CARTILAGE, onto=abd_soft + (T.LUNG,))
            cv.paint(tb, sdf < -1.5, T.AIRWAY)
    pa0 = np.array(front(S.dome_r + 70, -8 * sw, 75 * sd))
    pa1 = np.array(front(car - 5, -15 * sw, 45 * sd))
    tb, sdf, _ = cv.tube([pa0, pa1], [13, 13])
    if tb is not None:
        cv.paint(tb, sdf < 0, T.BLOOD_R, onto=abd_soft + (T.MYOCARDIUM,))
    for side in (1, -1):
        tb, sdf, _ = cv.tube([pa1, (side * 60 * sw, pa1[1] - 18, car - 15)], [10, 6])
        if tb is not None:
            cv.paint(tb, sdf < 0, T.BLOOD_R, onto=abd_soft)
    tb, sdf, _ = cv.tube([front(lv("T1"), 28 * sw, 55 * sd), front(S.dome_r + 70, 28 * sw, 58 * sd)], [10, 10])
    if tb is not None:  # the SVC: its own tissue id, drawn as a vein except in CT angiography
        cv.paint(tb, sdf < 0, T.SVC, onto=abd_soft)


# ------------------------------------------------------------------------------------------------
def _skeleton(cv: Canvas, S: Subject, lm: dict[str, float]) -> None:
    sw, sd = S.sw, S.sd
    # ---- vertebral column + sacrum (vectorised over all levels) -------------------------------
    b = cv.box((-75 * sw, -200, -60), (75 * sw, 80, S.levels[-1]))
    if b is not None:
        X, Y, Z = cv.coords(b)
        sx, sy = S.spine_x(Z), S.spine_y(Z)
        rx, ry = S.body_rx(Z), S.body_ry(Z)
        u, v = X - sx, Y - sy
        tlev = np.interp(Z, S.levels, np.arange(len(S.levels))).astype(np.float32)
        k = np.floor(tlev)
        frac = tlev - k
        pitch = np.interp(Z, S.levels[:-1] + np.diff(S.levels) / 2, np.diff(S.levels)).astype(np.float32)
        sacral = k < 1
        disc_h = np.interp(Z, [S.lev("L5"), S.lev("L1"), S.lev("T1")], [10, 9, 5]).astype(np.float32)
        in_disc = (~sacral) & (frac * pitch < disc_h)
        rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
        # slight waist of the vertebral body and bulging disc
        body = (rho < 1.0) & (Z > S.lev("S", 0.0) - 12)
        depth_xy = (1 - rho) * np.minimum(rx, ry)
        endplate = np.minimum(frac * pitch - disc_h, (1 - frac) * pitch)
        cortex = body & ~in_disc & ((depth_xy < 2.2) | (endplate < 1.8))
        cv.paint(b, body & in_disc, T.DISC)
        cv.paint(b, body & ~in_disc, T.MARROW)
        cv.paint(b, cortex, T.CORTEX)
        # posterior elements
        rc = np.interp(Z, [S.lev("S"), S.lev("L3"), S.lev("T6")], [6, 10, 8]).astype(np.float32)
        cyc = -ry - rc - 3
        dc = np.sqrt(u**2 + (v - cyc) ** 2)
        canal = (dc < rc) & (Z > S.lev("S", 0.3))
        arch_z = (frac > 0.35) & (frac < 0.95) | sacral
        ring = (dc >= rc) & (dc < rc + 5.5) & arch_z & (Z > S.lev("S", 0.3))
        ring |= (dc >= rc) & (dc < rc + 4.0) & (v > cyc) & (Z > S.lev("S", 0.3))  # posterior wall of the body
        pedicle = (np.abs(np.abs(u) - rc - 2) < 4) & (v < -ry + 2) & (v > cyc) & arch_z
        lumbar = Z < S.lev("T12", 0.5)
        lsp = np.where(lumbar, 32.0, 24.0) * sd
        sp_back = cyc - rc - (v - (cyc - rc))  # distance behind the lamina (positive backwards)
        back = (cyc - rc) - v
        slope = np.where(lumbar, 0.004, 0.012)
        spin = (np.abs(u) < 4) & (back > 0) & (back < lsp) & (np.abs(frac - 0.65 + slope * back) < 0.28) & (Z > S.lev("S", 0.5))
        tp_len = np.where(lumbar, 40.0, 30.0) * sw
        tp_y = cyc + np.where(lumbar, 2.0, -6.0) - np.where(lumbar, 0.0, 0.25) * (np.abs(u) - rc)
        tproc = (np.abs(u) < tp_len) & (np.abs(v - tp_y) < 4.5) & (np.abs(frac - 0.62) < 0.16) & (Z > S.lev("L5"))
        post = (ring | pedicle | spin | tproc) & ~canal
        cv.paint(b, post, T.BONE_POST, onto=[t for t in range(256) if t not in (T.SKIN, T.FAT_SC, T.AIR)])
        cv.paint(b, canal, T.CSF)
        del sp_back
    # ---- sacral alae + iliac wings ----------------------------------------------------------
    zcrest = S.lev("L5", 0.6)
    zac = S.lev("S", 0.0) + 30 * S.hs  # acetabular roof
    # Only voxels of one side can be painted per side: the wing lies within 6.5 mm of a curve whose
    # x stays between its control points' (40..130 sw), the ala within 14..46 sw; one more mm of slack.
    # (A box over both sides, as before, computed twice as many voxels to paint the same ones.)
    x_in, x_out = min(14 * sw, 40 * sw - 6.5) - 1.0, 130 * sw + 7.5
    for side in (1, -1):
        x_lo, x_hi = (x_in, x_out) if side == 1 else (-x_out, -x_in)
        b = cv.box((max(x_lo, -150 * sw), -150, zac - 50), (min(x_hi, 150 * sw), 120, zcrest + 10))
        if b is None:
            continue
        X, Y, Z = cv.coords(b)
        t = np.clip((Z - zac) / (zcrest - zac), 0, 1)
        sy_ = S.spine_y(Z)
        # wing curve in the axial plane: from the SI joint (posterior-medial) to the ASIS (anterior-lateral)
        p0x, p0y = 40 * sw + 0 * t, sy_ - 8
        p1x, p1y = (85 + 25 * t) * sw, sy_ - 8 + 6 * (1 - t)
        p2x, p2y = (92 + 38 * t) * sw, sy_ + 55 * sd + 10 * t
        best = np.full(X.shape, np.inf, np.float32)
        xs_ = side * X
        prev = None
        for tt in np.linspace(0, 1, 13):
            qx = (1 - tt) ** 2 * p0x + 2 * (1 - tt) * tt * p1x + tt**2 * p2x
            qy = (1 - tt) ** 2 * p0y + 2 * (1 - tt) * tt * p1y + tt**2 * p2y
            if prev is not None:  # distance to the segment prev -> q (per voxel, since the curve moves with z)
                ax_, ay_ = prev
                ex, ey = qx - ax_, qy - ay_
                tseg = np.clip(((xs_ - ax_) * ex + (Y - ay_) * ey) / np.maximum(ex * ex + ey * ey, 1e-6), 0, 1)
                best = np.minimum(best, np.sqrt((xs_ - ax_ - tseg * ex) ** 2 + (Y - ay_ - tseg * ey) ** 2))
            prev = (qx, qy)
        top = zcrest - 25 * ((xs_ - 95 * sw) / (60 * sw)) ** 2
        wing = (best < 6.5 - 2.5 * (t < 0.2)) & (Z < top) & (Z > zac - 5)
        cv.paint(b, wing, T.MARROW)
        cv.paint(b, wing & (best > 3.0), T.CORTEX)
        # sacral ala joining the wing to the sacrum
        ala = (np.abs(xs_ - 30 * sw) < 16 * sw) & (np.abs(Y - (sy_ - 2)) < 12) & (Z < S.lev("L5") - 3) & (Z > S.lev("S", 0.45))
        cv.paint(b, ala, T.MARROW)
    lm["iliac_crest"] = float(zcrest)
    # ---- hips: femoral heads, acetabula, necks, pubic rami, ischia --------------------------
    zf = 22 * S.hs
    for side in (1, -1):
        fc = np.array([side * 88 * sw, 8 * sd, zf])
        hb, hsdf, _ = cv.ellipsoid(fc, (36, 36, 36), None)
        if hb is not None:
            cup = (hsdf < 0) & (hsdf > -10) & (cv.Z[hb] > zf - 12) & (side * cv.X[hb] < side * fc[0] + 12)
            cv.paint(hb, cup, T.CORTEX)
        hb, hsdf, _ = cv.ellipsoid(fc, (24, 24, 24), None)
        if hb is not None:
            cv.paint(hb, hsdf < 0, T.CORTEX)
            cv.paint(hb, hsdf < -2.5, T.MARROW)
        neck = [fc, fc + np.array([side * 35 * sw, 0, -25]), fc + np.array([side * 38 * sw, -5, -140])]
        tb, sdf, _ = cv.tube(neck, [15, 16, 13], smooth=False)
        if tb is not None:
            cv.paint(tb, sdf < 0, T.CORTEX)
            cv.paint(tb, sdf < -4, T.FEMUR_MARROW)
        ram = [fc + np.array([-side * 15, 20, 8]), (side * 14, 72 * sd, 5), (side * 4, 75 * sd, 0)]
        tb, sdf, _ = cv.tube(ram, [10, 8, 9])
        if tb is not None:
            cv.paint(tb, sdf < 0, T.CORTEX)
            cv.paint(tb, sdf < -3, T.MARROW)
        isc = [fc + np.array([-side * 10, -20, 0]), fc + np.array([-side * 25, -30, -45])]
        tb, sdf, _ = cv.tube(isc, [11, 12])
        if tb is not None:
            cv.paint(tb, sdf < 0, T.CORTEX)
            cv.paint(tb, sdf < -3, T.MARROW)
    # ---- ribs, costal cartilage, sternum -----------------------------------------------------
    _ribs(cv, S)


def _ribs(cv: Canvas, S: Subject) -> None:
    sw = S.sw
    zlo = S.lev("T12") - 120
    b = cv.box((-260, -220, zlo), (260, 260, S.levels[-1]))
    if b is None:
        return
    depth = cv._depth[b]
    fat = cv._fat[b]
    X, Y, Z = cv.coords(b)
    wall_d = depth - fat  # depth inside the fat layer (0 at the muscle surface)
    shell = (wall_d > 0) & (wall_d < 30) & (cv.region[b] >= 1)
    idx = np.nonzero(shell)
    if idx[0].size == 0:
        return
    x, y, z, wd = X[idx], Y[idx], Z[idx], wall_d[idx]
    # angle from the posterior midline (0) to the anterior midline (pi), per side
    ps = np.arctan2(np.abs(x), -y)
    out = np.zeros(x.shape, np.uint8)
    for i, name in enumerate(["T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12"]):
        z0 = S.lev(name, 0.6)
        n = i + 1
        drop = (55 + 5 * min(n, 8)) * S.hs
        end = {11: 1.9, 12: 1.5}.get(n, 2.95 - 0.08 * max(0, n - 7))
        cart = 2.45 if n <= 7 else 2.3
        zr = z0 - drop * (ps / np.pi) ** 1.4 + 12 * np.sin(ps)
        rd = 9.0 + 3.0 * np.sin(ps)  # depth of the rib centre below the muscle surface
        e = ((z - zr) / 5.5) ** 2 + ((wd - rd) / 4.0) ** 2 < 1
        e &= (ps > 0.35) & (ps < end)
        out[e & (ps < cart)] = T.CORTEX
        out[e & (ps >= cart)] = T.CARTILAGE
        inner = ((z - zr) / 3.5) ** 2 + ((wd - rd) / 2.0) ** 2 < 1
        out[e & inner & (ps < cart)] = T.MARROW
    # scapulae: thin triangular blades on the posterolateral chest wall, outside the ribs
    z_top = S.lev("T1", 0.5)
    z_bot = S.lev("T7", 0.5) + 90.0 * np.clip((ps - 0.55) / 0.7, 0, 1)
    blade = (ps > 0.55) & (ps < 1.3) & (z < z_top) & (z > z_bot) & (wd > 1.5) & (wd < 5.0)
    rim = blade & ((ps < 0.62) | (ps > 1.22) | (z > z_top - 6))
    out[blade & (out == 0)] = T.BONE_POST
    out[rim & (out == T.BONE_POST)] = T.CORTEX
    t = cv.tissue[b]
    sel = out > 0
    t[idx[0][sel], idx[1][sel], idx[2][sel]] = out[sel]
    # sternum
    zs0, zs1 = S.lev("T9", 0.3), S.lev("T3")
    st = shell & (np.abs(X) < 16 * sw) & (wall_d > 4) & (wall_d < 15) & (Y > 0) & (Z > zs0) & (Z < zs1)
    cv.paint(b, st, T.MARROW)
    cv.paint(b, st & ((wall_d < 6) | (wall_d > 13) | (np.abs(X) > 13 * sw)), T.CORTEX)


# ------------------------------------------------------------------------------------------------
def _upper_chest(cv: Canvas, S: Subject, lm: dict[str, float]) -> None:
    """The thorax above the aortic arch (``PhantomConfig.upper_chest``): lung apices that narrow to
    domes ending a little above T1 (soft tissue of the neck base above and between them), the
    paraspinal muscles continued above T1, the arch's three branches (brachiocephalic trunk dividing
    into the right subclavian and common carotid arteries, left common carotid, left subclavian),
    the brachiocephalic veins (the left one crossing in front of the arch branches into the SVC; the
    right one drawn as the SVC, the arm injection side of a CT angiogram), the manubrium and the
    clavicles. Without it, the cavity above T2 is lung up to the top of the scan and the slices
    above the arch barely change with z (docs/BPR.md, "The upper chest")."""
    sw, sd, lv = S.sw, S.sd, S.lev
    top = float(S.levels[-1])
    z3, apex = lv("T3"), lv("T1", 0.8) + 12.0
    lm["lung_apex"] = apex
    front = S.front

    # ---- lung apices: each lung inside a dome over a posterolateral centre above T3 ----------------
    b = cv.box((-260, -220, z3), (260, 260, top))
    if b is not None:
        X, Y, Z = cv.coords(b)
        t = np.clip((Z - z3) / (apex - z3), 0.0, 1.0)
        radius = 130.0 * np.sqrt(np.clip(1.0 - t, 0.0, 1.0)) * sw  # a dome: most of the width until near the top
        ys = S.ys(Z)
        inside = np.zeros(X.shape, bool)
        for side in (1, -1):
            inside |= (X - side * 60 * sw) ** 2 + ((Y - ys - 15 * sd) / 1.1) ** 2 < radius**2
        lung = np.isin(cv.tissue[b], (T.LUNG, T.LUNG_VESSEL, T.PULM_VESSEL)) & ~inside & (Z > z3)
        # scalene and prevertebral muscles beside and in front of the spine, fat elsewhere
        mus = (Y < ys + 25 * sd) & (np.abs(X - S.spine_x(Z)) < 75 * sw)
        cv.paint(b, lung & mus, T.MUSCLE)
        cv.paint(b, lung & ~mus, T.FAT_VISC)
    # paraspinal muscles above T1 (the default trunk stops them at T1)
    b = cv.box((-90, -220, lv("T1")), (90, 60, top))
    if b is not None:
        _erector_spinae(cv, S, b)
    soft = (T.FAT_VISC, T.MUSCLE, T.LUNG, T.LUNG_VESSEL, T.PULM_VESSEL)
    # ---- the arch's branches --------------------------------------------------------------------
    za = lm["aortic_arch"]  # top of the arch, as _vessels drew it
    bif = front(za + 32, 20 * sw, 44 * sd)
    branches = [
        ([front(za - 2, 10 * sw, 40 * sd), front(za + 14, 15 * sw, 43 * sd), bif], [7.5, 7.0, 6.5]),  # brachiocephalic trunk
        ([bif, front(za + 48, 42 * sw, 36 * sd), front(za + 56, 75 * sw, 30 * sd), front(za + 50, 110 * sw, 30 * sd)], [5.5, 5, 4.5, 4.5]),  # right subclavian
        ([bif, front(za + 70, 24 * sw, 46 * sd), (*front(top, 26 * sw, 42 * sd)[:2], top + 10)], [4.5, 4.2, 4.0]),  # right carotid
        ([front(za - 2, -2 * sw, 34 * sd), front(za + 30, -12 * sw, 40 * sd), (*front(top, -26 * sw, 40 * sd)[:2], top + 10)], [4.8, 4.4, 4.0]),  # left carotid
        ([front(za - 4, -12 * sw, 26 * sd), front(za + 28, -28 * sw, 24 * sd), front(za + 50, -60 * sw, 26 * sd), front(za + 46, -110 * sw, 30 * sd)], [5.5, 5, 4.5, 4.5]),  # left subclavian
    ]
    for pts, rad in branches:
        tb, sdf, _ = cv.tube(pts, np.array(rad) * sw**0.5)
        if tb is not None:
            cv.paint(tb, sdf < 0, T.ARTERY, onto=soft + (T.FAT_SC,))
    # ---- brachiocephalic veins into the SVC (whose top is at T1, 28 mm right, 55 mm anterior) --------
    svc_top = front(lv("T1"), 28 * sw, 55 * sd)
    junction = front(lv("T2", 0.3), 27 * sw, 56 * sd)
    left = [front(lv("T1", 0.7), -95 * sw, 38 * sd), front(lv("T1", 0.2), -50 * sw, 52 * sd), front(lv("T2", 0.6), -5 * sw, 62 * sd), junction]
    right = [front(lv("T1", 0.9), 95 * sw, 36 * sd), front(lv("T1", 0.5), 55 * sw, 48 * sd), svc_top]
    for pts, rad, tid in ((left, [6.0, 6.5, 7.0, 8.0], T.VEIN), (right, [6.5, 7.0, 9.0], T.SVC)):
        tb, sdf, _ = cv.tube(pts, np.array(rad) * sw**0.5, scale=(1.0, 0.8, 1.0))
        if tb is not None:
            cv.paint(tb, sdf < 0, tid, onto=soft + (T.FAT_SC,))
    # ---- manubrium and clavicles in the anterior chest wall ---------------------------------------
    b = cv.box((-220, -50, lv("T3") - 10), (220, 260, lv("C7")))
    if b is None:
        return
    X, Y, Z = cv.coords(b)
    wall_d = cv._depth[b] - cv._fat[b]  # depth below the muscle surface (negative: in the fat)
    body = cv.region[b] >= 1
    # manubrium: wider than the sternal body, from T3 up to the jugular notch near T2
    zm0, zm1 = lv("T3"), lv("T2", 0.7)
    man = body & (np.abs(X) < 26 * sw) & (wall_d > 3) & (wall_d < 16) & (Y > 0) & (Z > zm0 - 2) & (Z < zm1)
    cv.paint(b, man, T.MARROW)
    cv.paint(b, man & ((wall_d < 5) | (wall_d > 14) | (np.abs(X) > 23 * sw) | (Z > zm1 - 2.5)), T.CORTEX)
    # clavicles: from the manubrium's upper corners out along the chest wall, rising laterally
    ang = np.arctan2(np.abs(X), -Y)  # 0 posterior midline, pi anterior midline
    reach = np.clip((np.pi - ang) / 1.45, 0.0, 1.0)  # 0 at the sternoclavicular joint, 1 at the acromion
    zc = zm1 - 4 + 26 * reach ** 0.8
    rod = body & (((Z - zc) / 7.5) ** 2 + ((wall_d - 2.0) / 7.5) ** 2 < 1) & (np.abs(X) > 18 * sw) & (ang > np.pi - 1.45) & (Y > -20)
    core = rod & (((Z - zc) / 4.5) ** 2 + ((wall_d - 2.0) / 4.5) ** 2 < 1)
    rod &= np.isin(cv.tissue[b], (T.FAT_SC, T.MUSCLE, T.FAT_VISC))
    cv.paint(b, rod, T.CORTEX)
    cv.paint(b, rod & core, T.MARROW)
