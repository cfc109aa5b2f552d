"""The segmenters of an experiment folder (``voxdiff demo`` / ``voxdiff experiment compare``) on the
shared real CTs: how far phantom-trained models carry to real CT.

For every method, the frozen probe's segmenter bundle (``probe-METHOD-f0/segmenter-HEAD``) segments
``../shared/data/real_ct`` (an abdominal NIfTI, a 20-slice DICOM series and a thoracic CTA) on each
file's own grid, and Dice is taken against the TotalSegmentator pseudo-labels that come with the
first two: agreement with another model, not a benchmark. Outputs (label maps, previews, JSON) go to
``--out``, never into the experiment folder; a markdown table is printed::

    python benchmarks/real_ct_agreement.py demo_out --out /tmp/real_ct
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_probe import real_ct  # noqa: E402

from voxdiff.core.runtime import tune_allocator  # noqa: E402

LABELLED = ("ts_a_abdomen_ct.nii.gz", "ts_b_upper_abdomen_dicom")


def table(rows: dict[str, dict]) -> str:
    """Markdown: per method and labelled CT, the mean Dice over the organs present and the liver's."""
    head = "| method | " + " | ".join(f"{c.split('_')[0]}_{c.split('_')[1]} mean / liver" for c in LABELLED) + " |"
    lines = [head, "|---|" + "---|" * len(LABELLED)]
    for method, per_ct in rows.items():
        cells = []
        for c in LABELLED:
            r = per_ct.get(c, {})
            liver = (r.get("dice") or {}).get("liver")
            mean = r.get("mean")
            cells.append("-" if mean is None else f"{mean:.3f} / {'-' if liver is None else f'{liver:.2f}'}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", type=Path, help="a demo or compare folder (with probe-METHOD-f0 steps)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the label maps, previews and JSON")
    ap.add_argument("--methods", default="diffusion-ape,diffusion-none,restorative,contrastive,random")
    ap.add_argument("--head", default="nonlinear", help="linear or nonlinear")
    args = ap.parse_args(argv)
    tune_allocator()
    if args.out.resolve() == args.experiment.resolve() or args.experiment.resolve() in args.out.resolve().parents:
        ap.error("--out must lie outside the experiment folder")
    rows = {}
    for m in args.methods.split(","):
        bundle = args.experiment / f"probe-{m}-f0" / f"segmenter-{args.head}"
        if not bundle.is_dir():
            ap.error(f"{bundle}: no segmenter bundle (is the probe step of {m} finished?)")
        got = real_ct(bundle, args.out / m)
        if got is None:
            return
        rows[m] = got
    print(table(rows))


if __name__ == "__main__":
    main()
