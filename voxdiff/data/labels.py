"""The one label schema of voxdiff: the 13 BTCV abdominal organs, and maps from other data sets."""

from __future__ import annotations

import re

BTCV_LABELS: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "right_kidney",
    3: "left_kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior_vena_cava",
    10: "portal_and_splenic_vein",
    11: "pancreas",
    12: "right_adrenal_gland",
    13: "left_adrenal_gland",
}
NUM_CLASSES = len(BTCV_LABELS)  # including background
ORGAN_IDS = list(range(1, NUM_CLASSES))
ORGAN_NAMES = {i: BTCV_LABELS[i] for i in ORGAN_IDS}
NAME_TO_ID = {v: k for k, v in BTCV_LABELS.items()}

# Size groups used in reports (the paper's definition is not published; this is ours).
SIZE_GROUPS: dict[str, list[int]] = {
    "Big": [6, 1, 7, 2, 3],  # liver, spleen, stomach, kidneys
    "Medium": [8, 9, 10, 11, 4],  # aorta, IVC, portal/splenic vein, pancreas, gallbladder
    "Small": [5, 12, 13],  # esophagus, adrenals
}


def dataset_json_labels() -> dict[str, int]:
    """nnU-Net v2 ``labels`` entry (name -> id)."""
    return {name: i for i, name in BTCV_LABELS.items()}


# ------------------------------------------------------------------ other data sets -> BTCV ids

# FLARE22 (13 organs): 1 liver, 2 right kidney, 3 spleen, 4 pancreas, 5 aorta, 6 IVC,
# 7 right adrenal, 8 left adrenal, 9 gallbladder, 10 esophagus, 11 stomach, 12 duodenum,
# 13 left kidney. Duodenum has no BTCV class and becomes background. FLARE22 has no portal/splenic vein.
FLARE22_TO_BTCV: dict[int, int] = {
    0: 0, 1: 6, 2: 2, 3: 1, 4: 11, 5: 8, 6: 9, 7: 12, 8: 13, 9: 4, 10: 5, 11: 7, 12: 0, 13: 3,
}

# AMOS 2022 (15 organs): 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus,
# 6 liver, 7 stomach, 8 aorta, 9 postcava (IVC), 10 pancreas, 11 right adrenal, 12 left adrenal,
# 13 duodenum, 14 bladder, 15 prostate/uterus. Duodenum, bladder and prostate/uterus become
# background. AMOS has no portal/splenic vein (BTCV 10 never appears).
AMOS_TO_BTCV: dict[int, int] = {
    0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 9: 9, 10: 11, 11: 12, 12: 13, 13: 0, 14: 0, 15: 0,
}

IDENTITY: dict[int, int] = {i: i for i in BTCV_LABELS}

# Synonyms seen in dataset.json files (MSD, nnU-Net, AMOS, FLARE, TotalSegmentator-style names).
_SYNONYMS: dict[str, int] = {
    "background": 0, "bg": 0, "clear_label": 0,
    "spleen": 1,
    "right_kidney": 2, "kidney_right": 2, "rkid": 2, "r_kidney": 2, "kidney_r": 2,
    "left_kidney": 3, "kidney_left": 3, "lkid": 3, "l_kidney": 3, "kidney_l": 3,
    "gallbladder": 4, "gall_bladder": 4, "gall": 4,
    "esophagus": 5, "oesophagus": 5, "eso": 5,
    "liver": 6,
    "stomach": 7, "sto": 7,
    "aorta": 8, "arota": 8,  # sic, AMOS dataset.json
    "inferior_vena_cava": 9, "ivc": 9, "postcava": 9, "vena_cava_inferior": 9, "inferior_venacava": 9,
    "portal_and_splenic_vein": 10, "portal_vein_and_splenic_vein": 10, "portal_splenic_vein": 10,
    "portal_vein_splenic_vein": 10, "veins": 10, "portal_vein": 10, "psv": 10,
    "pancreas": 11, "pan": 11,
    "right_adrenal_gland": 12, "adrenal_gland_right": 12, "right_adrenal": 12, "rag": 12, "adrenal_right": 12,
    "left_adrenal_gland": 13, "adrenal_gland_left": 13, "left_adrenal": 13, "lag": 13, "adrenal_left": 13,
}


def normalise_name(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")
    return s


def btcv_id_for_name(name: str) -> int | None:
    """BTCV id of an organ name as written in some dataset.json, or None when it has no BTCV class."""
    return _SYNONYMS.get(normalise_name(name))
