"""Tissue classes of the phantom, their BTCV label and their CT numbers per contrast phase.

The generator paints *tissues* (more classes than the 13 labels: fat, muscle, bone, bowel, unlabelled
vessels ...). Labels and HU values are both derived from the tissue map through lookup tables, so
an organ label can cover several tissues (kidney = cortex + medulla + pelvis) and several tissues
share HU ranges with labelled organs (muscle, bowel wall, unlabelled veins).
"""

from __future__ import annotations

import numpy as np

# tissue ids --------------------------------------------------------------------------------------
AIR, SKIN, FAT_SC, MUSCLE, FAT_VISC, CORTEX, MARROW, BONE_POST, DISC, CSF = range(10)
LUNG, LUNG_VESSEL, MYOCARDIUM, BLOOD_L, BLOOD_R, LIVER, HEP_VEIN, HEP_PORTAL, BILE, SPLEEN = range(10, 20)
KID_CORTEX, KID_MEDULLA, KID_PELVIS, ADRENAL, PANCREAS, STOM_WALL, STOM_FLUID, STOM_AIR, ESO_WALL, ESO_AIR = range(20, 30)
AORTA, ARTERY, IVC, VEIN, PORTAL, PORTAL_UNL, BOWEL_WALL, BOWEL_FLUID, BOWEL_AIR, STOOL = range(30, 40)
BLADDER, CARTILAGE, TABLE_SKIN, TABLE_CORE, AIRWAY, DIAPHRAGM, FEMUR_MARROW, GB_WALL, BOWEL_CONTRAST, PELVIC_ORGAN = range(40, 50)
PULM_VESSEL = 50  # pulmonary vessels as thin blood-filled tubes (PhantomConfig.thorax_detail)
# findings of everyday clinical CT (PhantomConfig.lesion_rate, ascites_prob): painted only when asked for
LIVER_CYST, LIVER_MET, KID_CYST, SPLEEN_LESION, ASCITES = range(51, 56)
# the superior vena cava: a vein like VEIN (same CT number, same offset, no row of its own in HU_TABLE,
# so no draw of its own) except in the angiographic phase, where it carries the undiluted contrast
# arriving from the arm (docs/PHANTOMS.md)
SVC = 56
N_TISSUES = 57

TISSUE_NAMES = {
    v: k
    for k, v in dict(globals()).items()
    if k.isupper() and isinstance(v, int) and k not in ("N_TISSUES",)
}

# tissue -> BTCV label ---------------------------------------------------------------------------
LABEL_OF = np.zeros(256, dtype=np.uint8)
for _t, _l in {
    SPLEEN: 1,
    LIVER: 6,
    HEP_VEIN: 6,
    HEP_PORTAL: 6,
    BILE: 4,
    GB_WALL: 4,
    ESO_WALL: 5,
    ESO_AIR: 5,
    STOM_WALL: 7,
    STOM_FLUID: 7,
    STOM_AIR: 7,
    AORTA: 8,
    IVC: 9,
    PORTAL: 10,
    PANCREAS: 11,
    LIVER_CYST: 6,  # a lesion belongs to its organ's label, as in BTCV and TotalSegmentator
    LIVER_MET: 6,
    SPLEEN_LESION: 1,
}.items():
    LABEL_OF[_t] = _l
# kidneys and adrenals are sided: painted with separate ids below and mapped after painting
KID_L_OFFSET = 100  # tissue ids 100+ = left-sided copies of KID_* / ADRENAL (same HU)
for _t in (KID_CORTEX, KID_MEDULLA, KID_PELVIS, KID_CYST):
    LABEL_OF[_t] = 2  # right kidney
    LABEL_OF[_t + KID_L_OFFSET] = 3  # left kidney
LABEL_OF[ADRENAL] = 12
LABEL_OF[ADRENAL + KID_L_OFFSET] = 13


# CT numbers: native HU, enhancement in the arterial and portal-venous phase (added on top of the
# native value, scaled per subject), texture standard deviation (correlated, inside the tissue) and
# per-subject standard deviation of a random offset.
#                    native  arterial  portal   texture  subject-sd
HU_TABLE: dict[int, tuple[float, float, float, float, float]] = {
    AIR: (-1000, 0, 0, 4, 0),
    SKIN: (25, 10, 20, 10, 8),
    FAT_SC: (-105, 0, 0, 12, 10),
    MUSCLE: (48, 6, 14, 9, 7),
    DIAPHRAGM: (48, 6, 14, 9, 7),
    FAT_VISC: (-95, 0, 0, 16, 10),
    CORTEX: (850, 0, 0, 90, 150),
    MARROW: (210, 10, 20, 45, 50),
    BONE_POST: (480, 0, 0, 80, 90),
    FEMUR_MARROW: (10, 0, 10, 30, 30),
    DISC: (85, 0, 5, 12, 10),
    CSF: (18, 0, 0, 8, 5),
    LUNG: (-865, 0, 0, 30, 25),
    LUNG_VESSEL: (-250, 60, 60, 60, 20),  # vessel markings as blobs (the default thorax)
    PULM_VESSEL: (40, 150, 125, 12, 6),  # blood (pulmonary arteries: right-heart contrast); thin ones by partial volume
    MYOCARDIUM: (45, 55, 60, 9, 6),
    BLOOD_L: (42, 260, 120, 12, 6),
    BLOOD_R: (42, 150, 125, 35, 6),
    LIVER: (56, 14, 55, 8, 8),
    HEP_VEIN: (42, 0, 120, 8, 6),
    HEP_PORTAL: (42, 60, 130, 8, 6),
    BILE: (12, 0, 0, 6, 8),
    GB_WALL: (35, 40, 45, 8, 6),
    SPLEEN: (46, 70, 70, 9, 7),
    KID_CORTEX: (32, 150, 135, 9, 7),
    KID_MEDULLA: (32, 35, 130, 9, 7),
    KID_PELVIS: (12, 0, 5, 8, 6),
    ADRENAL: (25, 45, 45, 9, 8),
    PANCREAS: (40, 75, 55, 12, 8),
    STOM_WALL: (42, 55, 55, 10, 7),
    STOM_FLUID: (18, 0, 0, 18, 12),
    STOM_AIR: (-1000, 0, 0, 10, 0),
    ESO_WALL: (42, 30, 45, 9, 7),
    ESO_AIR: (-1000, 0, 0, 10, 0),
    AORTA: (42, 270, 135, 10, 6),
    ARTERY: (42, 250, 130, 10, 6),
    IVC: (40, 45, 120, 20, 8),
    VEIN: (40, 50, 120, 14, 8),
    PORTAL: (40, 75, 150, 10, 8),
    PORTAL_UNL: (40, 75, 150, 10, 8),
    BOWEL_WALL: (38, 55, 55, 12, 8),
    BOWEL_FLUID: (10, 0, 0, 14, 10),
    BOWEL_AIR: (-1000, 0, 0, 10, 0),
    BOWEL_CONTRAST: (300, 0, 0, 40, 80),
    STOOL: (-60, 0, 0, 90, 30),
    BLADDER: (8, 0, 0, 6, 5),
    PELVIC_ORGAN: (45, 45, 70, 12, 10),  # uterus or prostate
    CARTILAGE: (120, 0, 0, 25, 20),
    TABLE_SKIN: (250, 0, 0, 30, 40),
    TABLE_CORE: (-850, 0, 0, 20, 30),
    AIRWAY: (-1000, 0, 0, 10, 0),
}

# tissues whose offset is shared (one blood pool, one bone type) -> group key
SHARED_OFFSET = {KID_MEDULLA: KID_CORTEX, ARTERY: AORTA, BLOOD_L: AORTA, PORTAL_UNL: PORTAL, HEP_PORTAL: PORTAL, VEIN: IVC, DIAPHRAGM: MUSCLE, ESO_AIR: AIR,
                 PULM_VESSEL: BLOOD_R}

# CT numbers of the findings, the same columns as HU_TABLE; kept apart so that the default phantoms
# (no findings) draw exactly the random numbers they drew before these existed
FINDING_HU: dict[int, tuple[float, float, float, float, float]] = {
    LIVER_CYST: (6, 0, 0, 5, 6),  # simple cyst: water, no enhancement
    LIVER_MET: (38, 25, 30, 14, 10),  # hypovascular metastasis: darker than enhanced liver
    KID_CYST: (8, 0, 0, 5, 6),  # Bosniak I cyst
    SPLEEN_LESION: (30, 20, 25, 10, 8),
    ASCITES: (12, 0, 0, 6, 6),  # free fluid
}
