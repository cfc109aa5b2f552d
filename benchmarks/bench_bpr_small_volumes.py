"""How much does an ape (anchor-head) map move when the volume is smaller than the model input?

For each CT of DATA (preprocessed with the model's own settings): the map of the whole volume, then
the maps of random crops whose extent along z, along x, or along all three axes is a fraction of
the model's patch. The error is the mean distance (mm, body voxels) between a crop's map and the
whole volume's map on the same voxels. The table in docs/BPR.md ("Volumes smaller than the model
input") sets the threshold of the warning in ``voxdiff.bpr.predict``:

    voxdiff phantom /tmp/ph --n_train 10 --n_test 4 --n_unlabelled 0
    voxdiff bpr train --kind ape --data /tmp/ph --steps 300 --out /tmp/ape
    voxdiff phantom /tmp/ev --n_train 3 --n_test 0 --n_unlabelled 0 --seed 777
    .venv/bin/python benchmarks/bench_bpr_small_volumes.py /tmp/ape /tmp/ev --reps 30
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from voxdiff.bpr.inference import ape_volume
from voxdiff.bpr.models import body_threshold, load_bpr
from voxdiff.bpr.predict import model_preprocess_config
from voxdiff.data.adapters import open_dataset
from voxdiff.data.preprocess import hu_to_unit, preprocess

FRACTIONS = (1.0, 0.98, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="ape body part regressor folder")
    ap.add_argument("data", help="data folder (any layout voxdiff.data reads)")
    ap.add_argument("--reps", type=int, default=10, help="random crops per CT and cell")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_bpr(args.model, kind="ape")
    ds = open_dataset(args.data)
    pp = model_preprocess_config(model)
    patch, mm = model.patch_size, model.mm_per_unit
    print(f"patch {patch} at {model.spacing} mm, {model.mm_per_unit:.0f} mm per unit, {len(ds.refs)} CTs")
    modes = {"z": (2,), "x": (0,), "xyz": (0, 1, 2)}
    err: dict[tuple[str, float], list[float]] = {(m, f): [] for m in modes for f in FRACTIONS}
    rng = np.random.default_rng(args.seed)
    for ref in ds.refs:
        unit = hu_to_unit(preprocess(ds.load(ref), pp).image, pp.hu_window)
        full = ape_volume(model, unit)
        body = unit > body_threshold(model)
        for mode, axes in modes.items():
            for f in FRACTIONS:
                for _ in range(args.reps):
                    sl = [slice(None)] * 3
                    for a in axes:
                        n = min(unit.shape[a], max(4, int(round(f * patch[a]))))
                        s = int(rng.integers(0, unit.shape[a] - n + 1))
                        sl[a] = slice(s, s + n)
                    crop = np.ascontiguousarray(unit[tuple(sl)])
                    d = np.linalg.norm(ape_volume(model, crop) - full[(slice(None), *sl)], axis=0) * mm
                    b = body[tuple(sl)]
                    err[(mode, f)].append(float(d[b].mean() if b.any() else d.mean()))
    print("crop/patch | mm: crop along z | along x | along x, y and z")
    for f in FRACTIONS:
        print(f"{f:.2f} | " + " | ".join(f"{np.mean(err[(m, f)]):.0f}" for m in modes))


if __name__ == "__main__":
    main()
