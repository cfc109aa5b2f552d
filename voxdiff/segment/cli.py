"""``voxdiff segment MODEL_DIR CT -o seg.nii.gz [--preview out.png]``."""

from __future__ import annotations

from voxdiff.core.cli import CommandGroup, add_config
from voxdiff.core.config import from_namespace
from voxdiff.data.ctcheck import ALLOW_HELP


def register(root: CommandGroup) -> None:
    p = root.command("segment", run_segment, help="Segment the 13 BTCV organs of a CT (NIfTI file or DICOM folder)")
    p.add_argument("model", type=str, help="segmenter model folder (from voxdiff probe)")
    p.add_argument("ct", type=str, help="CT: NIfTI file or DICOM series folder")
    p.add_argument("-o", "--out", type=str, required=True, help="output label map (.nii.gz), on the input's grid")
    p.add_argument("--preview", type=str, default=None, help="also write a PNG preview (axial + coronal)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--allow_non_ct", action="store_true", help=ALLOW_HELP)
    add_config(p, "voxdiff.segment.segment:SegmentConfig")  # by name: imported when the options are built


def run_segment(ns) -> None:
    from .segment import SegmentConfig, format_volumes, segment_ct

    cfg = from_namespace(SegmentConfig, ns)
    res = segment_ct(ns.model, ns.ct, ns.out, cfg, preview=ns.preview, force=ns.force, allow_non_ct=bool(ns.allow_non_ct))
    print(f"wrote {res['output']} ({' x '.join(str(s) for s in res['shape'])})")
    print(format_volumes(res["volumes_ml"]))
    if res["preview"]:
        print(f"preview: {res['preview']}")
