"""The one label schema of voxdiff: the 13 BTCV abdominal organs, and maps from other data sets."""

from __future__ import annotations

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
