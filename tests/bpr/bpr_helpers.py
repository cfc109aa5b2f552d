import numpy as np

from voxdiff.data.types import Case, CaseMeta

REAL_CT = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "data" / "real_ct"


def z_textured_case(seed: int, shape=(40, 32, 48), spacing=3.0, case_id=None) -> Case:
    """A synthetic 'CT' (HU) whose content changes with z: an elliptic body, a blob that grows and
    brightens toward the head, a 'bone' that shrinks, and noise."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y, z = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    cx, cy = nx / 2 + rng.uniform(-2, 2), ny / 2 + rng.uniform(-2, 2)
    body = ((x - cx) / (nx * 0.42)) ** 2 + ((y - cy) / (ny * 0.42)) ** 2 <= 1
    img = np.full(shape, -1000.0, np.float32)
    img[body] = 40.0
    zz = z / nz
    organ = ((x - (cx - 8 + 16 * zz)) ** 2 + (y - cy) ** 2) <= (3 + 6 * zz) ** 2
    img[organ & body] = (120.0 + 60 * zz)[organ & body]
    bone = ((x - cx) ** 2 + (y - (cy + ny * 0.3)) ** 2) <= (1.5 + 2 * (1 - zz)) ** 2
    img[bone & body] = 700.0
    img += rng.normal(0, 15, shape).astype(np.float32)
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = rng.uniform(-30, 30, 3)
    meta = CaseMeta(case_id or f"syn{seed}", None, None, shape, aff, aff, (spacing,) * 3)
    return Case(img, None, meta)
