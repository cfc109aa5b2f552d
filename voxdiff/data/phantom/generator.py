"""``generate_phantom(seed, cfg) -> Case``: one synthetic abdominal CT with 13-organ BTCV labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from ..labels import ORGAN_IDS
from ..types import Case, CaseMeta
from . import tissues as T
from .anatomy import Subject, build
from .fields import LatticeBasis
from .findings import paint_findings
from .shapes import Canvas

GENERATOR_VERSION = 1

Z_MODES = ("chest", "chest_abdomen", "abdomen", "abdomen_pelvis", "pelvis")
PHASES = ("native", "arterial", "portal_venous", "angiographic")
# the superior vena cava in the angiographic phase: CT number range (HU) and the standard deviation of
# its texture (contrast mixing with unopacified blood)
SVC_CTA_HU = (600.0, 1800.0)
SVC_CTA_MIXING = 120.0


@dataclass
class PhantomConfig:
    """Parameters of the synthetic CT generator (ranges are sampled uniformly per subject).

    Defaults give CPU-friendly volumes (128x128x96 at ~3 mm in-plane, 2.5-5 mm slices). For
    realistic resolution use e.g. ``shape=(384, 384, 160)``, ``spacing_xy=(0.8, 1.2)``,
    ``spacing_z=(1.5, 3.0)``: the in-plane spacing is raised when the body would not fit the field
    of view, and the slice spacing follows the scanned z-range, clipped to ``spacing_z``.

    Args:
        shape: voxels (x, y, z) of every phantom.
        spacing_xy: range of the in-plane spacing (mm); raised when the body would not fit.
        spacing_z: range of the slice spacing (mm); the z field of view follows the z-range mode.
        z_modes: scanned z-ranges of labelled/test cases (chest, chest_abdomen, abdomen, abdomen_pelvis, pelvis).
        z_mode_weights: sampling weights of z_modes.
        unlabelled_z_modes: scanned z-ranges of unlabelled (pretraining) cases, drawn uniformly.
        phases: contrast phases to draw from (native, arterial, portal_venous, angiographic). The
            default draws the first three; ``angiographic`` is a CT angiography bolus: the arterial
            pattern 1.4-2.0x as strong, whatever ``enhancement`` says (left heart and aorta about
            400-580 HU, as in a chest CTA), no portal-venous part, and the superior vena cava
            dense with contrast arriving from the arm (600-1800 HU).
        phase_weights: sampling weights of phases, one per entry of ``phases``; a list of another
            length draws the phases uniformly (so add weights when adding ``angiographic``).
        enhancement: range of the per-subject scale of contrast enhancement.
        organ_hu_sd: scale of the per-subject random HU offset of every tissue.
        noise_hu: range of the quantum noise standard deviation (HU, before body-size scaling).
        blur_mm: range of the Gaussian point-spread sigma (mm).
        texture: scale of the correlated texture inside tissues.
        deformation_mm: standard deviation of the smooth random displacement field (mm).
        deformation_spacing_mm: control-point spacing of the displacement field (mm).
        rotation_deg: standard deviation of the patient's in-plane rotation on the table (degrees).
        body_size: range of the overall body size scale.
        organ_jitter: scale of per-organ position, size and orientation variation.
        oral_contrast_prob: probability of positive oral contrast in the small bowel.
        table: draw the scanner table under the patient.
        fov_circle: set voxels outside the reconstruction circle to -1024 HU.
        lesion_rate: mean number of focal lesions per subject (Poisson): cysts and hypovascular
            metastases in the liver, cysts in the kidneys, lesions in the spleen; each keeps its
            organ's label. 0 (default): none.
        steatosis_prob: chance that a subject's liver is fatty (its CT number lowered by 15-70 HU).
        ascites_prob: chance of free fluid around the liver, spleen, stomach and bowel.
        gallbladder_absent_prob: chance of a removed gallbladder (its label then absent).
        thorax_detail: a more realistic chest: pulmonary vessels as thin blood-filled tubes drawn
            with partial volume (instead of blob-shaped markings at -250 HU) and heart chambers
            holding about half of the heart (instead of a third). Off by default: it did not make
            the body part regressor better on real chest CT (docs/BPR.md, "Phantom thorax").
        upper_chest: the thorax above the aortic arch as in real CT: lung apices ending a little
            above T1 (neck-base soft tissue around them), the arch's branches, the brachiocephalic
            veins, the manubrium and the clavicles, the paraspinal muscles above T1. Off by default,
            so that the default phantoms stay as they were (docs/BPR.md, "The upper chest").
    """

    shape: tuple[int, int, int] = (128, 128, 96)
    spacing_xy: tuple[float, float] = (2.6, 3.4)  # in-plane spacing range (mm)
    spacing_z: tuple[float, float] = (2.5, 5.0)  # slice spacing range (mm)
    z_modes: tuple[str, ...] = ("chest_abdomen", "abdomen", "abdomen_pelvis")  # labelled/test cases
    z_mode_weights: tuple[float, ...] = (0.25, 0.5, 0.25)
    unlabelled_z_modes: tuple[str, ...] = ("chest", "chest_abdomen", "abdomen", "abdomen_pelvis", "pelvis")
    phases: tuple[str, ...] = ("native", "arterial", "portal_venous")
    phase_weights: tuple[float, ...] = (0.2, 0.3, 0.5)
    enhancement: tuple[float, float] = (0.6, 1.3)  # per-subject scale of contrast enhancement
    organ_hu_sd: float = 1.0  # scale of the per-subject random HU offsets of every tissue
    noise_hu: tuple[float, float] = (8.0, 22.0)  # quantum noise std (HU), before body-size scaling
    blur_mm: tuple[float, float] = (0.5, 1.3)  # Gaussian PSF sigma (mm)
    texture: float = 1.0  # scale of the correlated texture inside tissues
    deformation_mm: float = 7.0  # std of the smooth random displacement field
    deformation_spacing_mm: float = 80.0  # control-point spacing of that field
    rotation_deg: float = 3.0  # sd of the patient's rotation about the table axis (yaw in the axial plane)
    body_size: tuple[float, float] = (0.88, 1.12)
    organ_jitter: float = 1.0  # scale of per-organ position/size/orientation variation
    oral_contrast_prob: float = 0.15  # positive oral contrast in the small bowel
    table: bool = True
    fov_circle: bool = True  # set voxels outside the reconstruction circle to -1024
    lesion_rate: float = 0.0  # mean focal lesions per subject (liver, kidneys, spleen)
    steatosis_prob: float = 0.0  # chance of a fatty liver
    ascites_prob: float = 0.0  # chance of free intraperitoneal fluid
    gallbladder_absent_prob: float = 0.0  # chance of a cholecystectomy
    thorax_detail: bool = False  # thin partial-volume pulmonary vessels, larger heart chambers
    upper_chest: bool = False  # apices, arch branches, brachiocephalic veins, manubrium, clavicles

    @property
    def findings(self) -> bool:
        """Whether any finding (lesions, fatty liver, ascites, removed gallbladder) can be drawn."""
        return max(self.lesion_rate, self.steatosis_prob, self.ascites_prob, self.gallbladder_absent_prob) > 0

    def __post_init__(self) -> None:
        from ...core.errors import InputError

        if len(self.shape) != 3 or min(self.shape) < 16:  # (at 8^3 a phantom holds one or two organs)
            raise InputError(None, f"phantom shape must be 3 sizes >= 16, got {list(self.shape)}")
        for name in ("spacing_xy", "spacing_z", "enhancement", "noise_hu", "blur_mm", "body_size"):
            v = tuple(getattr(self, name))
            if len(v) != 2:
                raise InputError(None, f"phantom {name} must be a (min, max) pair, got {v}")
            lo, hi = v
            if name in ("noise_hu", "blur_mm") and not (0 <= lo <= hi):
                raise InputError(None, f"phantom {name} must be 0 <= min <= max, got {(lo, hi)}")
            if name not in ("noise_hu", "blur_mm") and not (0 < lo <= hi):
                raise InputError(None, f"phantom {name} must be 0 < min <= max, got {(lo, hi)}")
        for modes, what in ((self.z_modes, "z_modes"), (self.unlabelled_z_modes, "unlabelled_z_modes")):
            bad = [m for m in modes if m not in Z_MODES]
            if bad or not modes:
                raise InputError(None, f"phantom {what} must be from {Z_MODES}, got {modes}")
        bad = [p for p in self.phases if p not in PHASES]
        if bad or not self.phases:
            raise InputError(None, f"phantom phases must be from {PHASES}, got {self.phases}")
        if self.lesion_rate < 0 or not all(0 <= p <= 1 for p in (self.steatosis_prob, self.ascites_prob, self.gallbladder_absent_prob)):
            raise InputError(None, "phantom lesion_rate must be >= 0 and steatosis_prob, ascites_prob, "
                                   "gallbladder_absent_prob probabilities in [0, 1]")
        if self.organ_jitter < 0 or self.deformation_mm < 0:
            raise InputError(None, f"phantom organ_jitter and deformation_mm must be >= 0, got {self.organ_jitter}, {self.deformation_mm}")
        self.shape = tuple(int(s) for s in self.shape)  # type: ignore[assignment]


# ``voxdiff phantom --variation wide``: subjects and scans that differ as much as clinical CT does where
# the default phantoms vary less (docs/PHANTOMS.md, "Wide variation"). Organ position / size / orientation
# twice the default spread (offsets sd 12 mm, sizes sd 14 %, rotations sd 12 degrees, breathing +-28 mm),
# a stronger smooth deformation, CT numbers per subject 1.5x as spread, contrast from weak (80 kVp
# native-like) to strong, low-dose to high-dose noise, soft to sharp kernels, smaller and larger bodies;
# and the findings of everyday abdominal CT.
WIDE_VARIATION: dict[str, object] = {
    "organ_jitter": 2.0,
    "deformation_mm": 12.0,
    "organ_hu_sd": 1.5,
    "enhancement": (0.4, 1.6),
    "noise_hu": (5.0, 40.0),
    "blur_mm": (0.4, 1.8),
    "body_size": (0.8, 1.25),
    "lesion_rate": 2.0,
    "steatosis_prob": 0.25,
    "ascites_prob": 0.1,
    "gallbladder_absent_prob": 0.1,
}
VARIATIONS = {"default": {}, "wide": WIDE_VARIATION}


def with_variation(cfg: PhantomConfig, variation: str) -> PhantomConfig:
    """``cfg`` with the settings of a named variation (:data:`VARIATIONS`) in place of those left at
    their defaults: a setting given another value keeps it."""
    import dataclasses

    if variation not in VARIATIONS:
        from ...core.errors import InputError

        raise InputError(None, f"unknown phantom variation {variation!r}; choose from {', '.join(sorted(VARIATIONS))}")
    defaults = PhantomConfig()
    changes = {k: v for k, v in VARIATIONS[variation].items() if _tuple_or(getattr(cfg, k)) == _tuple_or(getattr(defaults, k))}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _tuple_or(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _pick(rng: np.random.Generator, items, weights) -> str:
    items = list(items)
    w = np.asarray(weights[: len(items)] if weights and len(weights) >= len(items) else [1.0] * len(items), float)
    return items[int(rng.choice(len(items), p=w / w.sum()))]


def _z_range(S: Subject, mode: str, rng: np.random.Generator) -> tuple[float, float]:
    u = rng.uniform
    if mode == "chest":
        return S.lev("T12", 0.3) + u(-25, 25), S.lev("T1", 0.5) + u(-10, 20)
    if mode == "chest_abdomen":
        return S.lev("L3", 0.5) + u(-30, 30), S.lev("T1", 0.5) + u(-10, 20)
    if mode == "abdomen":
        return S.lev("L5", 0.3) + u(-25, 25), S.dome_r + u(15, 45)
    if mode == "abdomen_pelvis":
        return u(-40, -10), S.dome_r + u(10, 40)
    if mode == "pelvis":
        return u(-50, -20), S.lev("L3") + u(-20, 20)
    raise ValueError(mode)


def generate_phantom(seed: int, cfg: PhantomConfig | None = None, *, unlabelled: bool = False, case_id: str | None = None) -> Case:
    """One synthetic CT: float32 HU image, uint8 BTCV label map, RAS+ affine (deterministic in ``seed``).

    ``unlabelled=True`` draws the scanned z-range from ``cfg.unlabelled_z_modes`` (wider variety,
    e.g. chest or pelvis only) - the label is still returned.
    """
    cfg = cfg or PhantomConfig()
    if int(seed) < 0:
        from ...core.errors import InputError

        raise InputError(None, f"phantom seed must be >= 0, got {seed}")
    ss = np.random.SeedSequence(int(seed))
    r_subj, r_scan, r_field, r_hu, r_noise = (np.random.default_rng(s) for s in ss.spawn(5))
    S = Subject(r_subj, size_range=cfg.body_size, jitter=cfg.organ_jitter)
    S.oral_contrast = bool(r_subj.random() < cfg.oral_contrast_prob)

    # ---- scan geometry --------------------------------------------------------------------------
    nx, ny, nz = cfg.shape
    modes = cfg.unlabelled_z_modes if unlabelled else cfg.z_modes
    weights = () if unlabelled else cfg.z_mode_weights
    mode = _pick(r_scan, modes, weights)
    zlo, zhi = _z_range(S, mode, r_scan)
    dz = float(np.clip((zhi - zlo) / nz, *cfg.spacing_z))
    zc = 0.5 * (zlo + zhi)
    zs = zc + dz * (np.arange(nz) - (nz - 1) / 2)
    zprobe = np.linspace(zs[0], zs[-1], 16)
    half_w = float(np.max(S.a_lean(zprobe))) + S.f_lat + 12
    half_h = float(np.max(S.b_ant(zprobe) + S.visc)) + S.f_ant + 12
    half_p = float(np.max(S.b_post(zprobe))) + S.f_post + S.table_y + 20
    need = max(2 * half_w / nx, (half_h + half_p) / ny) * 1.02
    dxy = max(float(r_scan.uniform(*cfg.spacing_xy)), need)
    cx = float(r_scan.uniform(-12, 12))
    cy = 0.5 * (half_h - half_p) + float(r_scan.uniform(-10, 10))
    xs = cx + dxy * (np.arange(nx) - (nx - 1) / 2)
    ys = cy + dxy * (np.arange(ny) - (ny - 1) / 2)
    offset = np.array([r_scan.uniform(-25, 25), r_scan.uniform(-40, 40), r_scan.uniform(-900, -150)])

    # ---- random fields ----------------------------------------------------------------------------
    axes = (xs, ys, zs)
    dbas = LatticeBasis(axes, cfg.deformation_spacing_mm)
    dstd = cfg.deformation_mm * float(r_field.uniform(0.5, 1.0))
    dcoef = [r_field.standard_normal(dbas.n_nodes).astype(np.float32) for _ in range(3)]
    disp = tuple(dbas.from_coef(c) * np.float32(dstd / dbas.unit_std) for c in dcoef)
    fields = {
        "shape": LatticeBasis(axes, 25.0).draw(r_field),
        "fine": LatticeBasis(axes, 8.0).draw(r_field),
        "bowel1": LatticeBasis(axes, 15.0).draw(r_field),
        "lobule": LatticeBasis(axes, 6.0).draw(r_field),
    }
    fields["bowel2"] = LatticeBasis(axes, 15.0).draw(r_field)
    if cfg.thorax_detail:  # drawn last: the other fields stay those of the default thorax
        vbas = LatticeBasis(axes, 24.0)  # pulmonary vessels: curves where two of these fields vanish
        for key in ("vess1", "vess2", "vess3"):
            fields[key] = vbas.draw(r_field)
    cv = Canvas(xs, ys, zs, disp if cfg.deformation_mm > 0 else None)
    del disp
    yaw = float(np.clip(r_scan.normal(0.0, 1.0), -2.5, 2.5)) * cfg.rotation_deg
    if yaw:
        ca, sa = np.float32(np.cos(np.deg2rad(yaw))), np.float32(np.sin(np.deg2rad(yaw)))
        X, Y = cv.X.copy(), cv.Y
        cv.X = ca * X + sa * Y
        cv.Y = -sa * X + ca * Y
        del X, Y
        cv.margin = (
            float(np.abs(cv.X - cv.xs[:, None, None]).max()) + cv.spacing[0],
            float(np.abs(cv.Y - cv.ys[None, :, None]).max()) + cv.spacing[1],
            cv.margin[2],
        )

    # ---- anatomy -------------------------------------------------------------------------------------
    lm = build(cv, S, fields, thorax_detail=cfg.thorax_detail, upper_chest=cfg.upper_chest)
    if not cfg.table:
        cv.tissue[(cv.tissue == T.TABLE_CORE) | (cv.tissue == T.TABLE_SKIN)] = T.AIR
    tissue = cv.tissue
    findings: dict = {}
    r_find = np.random.default_rng(ss.spawn(1)[0])  # the sixth stream: findings only, drawn whatever is asked for
    steatosis = float(r_find.uniform(15.0, 70.0)) if r_find.random() < cfg.steatosis_prob else 0.0
    if cfg.findings:
        findings = paint_findings(tissue, (dxy, dxy, dz), r_find, lesion_rate=cfg.lesion_rate,
                                  ascites_prob=cfg.ascites_prob, gallbladder_absent_prob=cfg.gallbladder_absent_prob)
        if steatosis:
            findings["steatosis_hu"] = round(-steatosis, 1)
    label = T.LABEL_OF[tissue]

    # ---- intensities --------------------------------------------------------------------------------
    phase = _pick(r_hu, cfg.phases, cfg.phase_weights)
    enh = float(r_hu.uniform(*cfg.enhancement))
    if phase == "native":
        w_art, w_pv = 0.0, 0.0
    elif phase == "angiographic":  # its own draw only here: subjects of the other phases are unchanged
        w_art, w_pv = float(r_hu.uniform(1.4, 2.0)), 0.0
    elif phase == "arterial":
        mix = float(r_hu.uniform(0.0, 0.35))
        w_art, w_pv = enh * (1 - mix), enh * mix
    else:
        mix = float(r_hu.uniform(0.75, 1.0))
        w_art, w_pv = enh * (1 - mix), enh * mix
    base = np.full(256, -1000.0, np.float32)
    tex = np.zeros(256, np.float32)
    offsets: dict[int, float] = {}
    for t, (hu0, art, pv, tx, sd) in sorted(T.HU_TABLE.items()):
        offsets[t] = float(r_hu.normal(0, sd * cfg.organ_hu_sd))
    hu_used = {}

    def set_hu(t: int, row: tuple[float, float, float, float, float], off: float) -> None:
        """Tissue ``t``'s CT number and texture in this subject's phase (left-sided copy included)."""
        hu0, art, pv, tx, _ = row
        v = hu0 + w_art * art + w_pv * pv + off
        base[t] = base[t + T.KID_L_OFFSET] = v
        tex[t] = tex[t + T.KID_L_OFFSET] = tx * cfg.texture
        hu_used[T.TISSUE_NAMES.get(t, str(t))] = round(float(v), 1)

    for t, row in T.HU_TABLE.items():
        set_hu(t, row, offsets[T.SHARED_OFFSET.get(t, t)])
    # the SVC is drawn as the other veins, except in CT angiography: contrast injected into an arm
    # vein reaches the SVC nearly undiluted (about 1,000 HU in the shared chest CTA), mixing with
    # unopacified blood. Drawn after every other number of this stream, so nothing else changes.
    base[T.SVC], tex[T.SVC] = base[T.VEIN], tex[T.VEIN]
    if phase == "angiographic":
        base[T.SVC] = np.float32(r_hu.uniform(*SVC_CTA_HU))
        tex[T.SVC] = np.float32(SVC_CTA_MIXING * cfg.texture)
        hu_used["SVC"] = round(float(base[T.SVC]), 1)
    if cfg.findings:  # the findings' CT numbers, with offsets from their own stream
        for t, row in T.FINDING_HU.items():
            off = float(r_find.normal(0, row[4] * cfg.organ_hu_sd))
            if t == T.LIVER_MET:  # a metastasis in a fatty liver stays darker than the liver around it
                off -= 0.5 * steatosis
            set_hu(t, row, off)
        if steatosis:
            base[T.LIVER] -= np.float32(steatosis)
            hu_used["LIVER"] = round(float(base[T.LIVER]), 1)
    fine = ndi.gaussian_filter(r_noise.standard_normal(cfg.shape).astype(np.float32), 0.8)
    fine *= np.float32(1.0 / max(float(fine.std()), 1e-6))
    texture = 0.75 * fine + 0.6 * fields["fine"] * np.float32(0.8)
    img = base[tissue] + tex[tissue] * texture
    for b, frac, t0, t1 in cv.blends:  # partial volume of structures thinner than a voxel
        tb, ib = tissue[b], img[b]
        m = (tb == t0) | (tb == t1)
        w, tx = frac[m], texture[b][m]
        ib[m] = (1 - w) * (base[t0] + tex[t0] * tx) + w * (base[t1] + tex[t1] * tx)
    if w_art > 0.3:  # arciform ("zebra") splenic enhancement in the arterial phase
        m = tissue == T.SPLEEN
        img[m] += np.float32(28 * w_art) * np.sin(4.0 * fields["bowel1"][m] + 3.0 * fields["fine"][m])
    psf = float(r_noise.uniform(*cfg.blur_mm))
    sig = (psf / dxy, psf / dxy, max(psf, 0.35 * dz) / dz)
    img = ndi.gaussian_filter(img, sig)
    body_factor = float(np.clip((half_w + half_h) / 270.0, 0.7, 1.6))
    noise_sd = float(r_noise.uniform(*cfg.noise_hu)) * body_factor
    nz_ = ndi.gaussian_filter(r_noise.standard_normal(cfg.shape).astype(np.float32), 0.6)
    nz_ *= np.float32(noise_sd / max(float(nz_.std()), 1e-6))
    img += nz_
    if cfg.fov_circle:
        gx = (np.arange(nx) - (nx - 1) / 2)[:, None] / (nx / 2)
        gy = (np.arange(ny) - (ny - 1) / 2)[None, :] / (ny / 2)
        img[(gx**2 + gy**2) > 1.0] = -1024.0
    np.clip(img, -1024, 3071, out=img)
    img = img.astype(np.float32)

    # ---- affine & metadata --------------------------------------------------------------------------
    affine = np.eye(4)
    affine[0, 0], affine[1, 1], affine[2, 2] = dxy, dxy, dz
    affine[:3, 3] = np.array([xs[0], ys[0], zs[0]]) + offset
    # landmark z in world mm (first-order inverse of the displacement at the midline)
    pts = np.array([[0.0, 0.0, z] for z in lm.values()])
    dzs = dbas.at_points(dcoef[2], pts) * (dstd / dbas.unit_std) if cfg.deformation_mm > 0 else np.zeros(len(pts))
    landmarks = {k: round(float(z - d + offset[2]), 1) for (k, z), d in zip(lm.items(), dzs)}
    vox_ml = dxy * dxy * dz / 1000.0
    counts = np.bincount(label.ravel(), minlength=14)
    vols = {int(i): round(float(counts[i] * vox_ml), 1) for i in ORGAN_IDS}
    extra = {
        "source": "voxdiff.phantom",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "z_mode": mode,
        "phase": phase,
        "enhancement": round(enh, 3),
        "phase_weights_art_pv": [round(w_art, 3), round(w_pv, 3)],
        "noise_hu": round(noise_sd, 2),
        "psf_sigma_mm": round(psf, 3),
        "deformation_std_mm": round(dstd, 2),
        "rotation_deg": round(yaw, 2),
        "oral_contrast": S.oral_contrast,
        "body": {
            "height_scale": round(S.hs, 3),
            "width_scale": round(S.sw, 3),
            "depth_scale": round(S.sd, 3),
            "adiposity": round(S.adip, 3),
            "subcutaneous_fat_mm": {"anterior": round(S.f_ant, 1), "lateral": round(S.f_lat, 1), "posterior": round(S.f_post, 1)},
            "breathing_shift_mm": round(S.breath, 1),
        },
        "scan_z_mm": [round(float(zs[0] + offset[2]), 1), round(float(zs[-1] + offset[2]), 1)],
        "subject_to_world_mm": [round(float(v), 2) for v in offset],
        "landmarks_z_mm": landmarks,
        "organ_volumes_ml": vols,
        "tissue_hu": hu_used,
    }
    if cfg.thorax_detail:
        extra["thorax_detail"] = True
    if cfg.upper_chest:
        extra["upper_chest"] = True
    if cfg.findings:
        extra["findings"] = findings
    cid = case_id or f"phantom_{seed}"
    meta = CaseMeta(
        case_id=cid,
        image_path=None,
        label_path=None,
        original_shape=tuple(cfg.shape),
        original_affine=affine.copy(),
        affine=affine,
        spacing=(dxy, dxy, dz),
        extra=extra,
    )
    return Case(image=img, label=label.astype(np.uint8), meta=meta)


__all__ = ["PhantomConfig", "generate_phantom", "Z_MODES", "PHASES", "GENERATOR_VERSION", "VARIATIONS", "WIDE_VARIATION", "with_variation", "field"]
