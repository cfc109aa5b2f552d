"""Do frozen heads and end-to-end networks give the same Dice whatever window grid they are applied on?

A frozen head is fitted on the whole-volume pyramid of :func:`voxdiff.probe.voxel.volume_pyramid`:
features of windows placed on a grid aligned to the model's largest stride, blended, then the head.
Fine-tuning (and from-scratch training) trains on patches at random offsets and is scored with MONAI's
``sliding_window_inference``, whose windows start wherever the volume's size puts them, and which
blends the windows' *logits*. LP-FT (``finetune_init: probe``) starts fine-tuning from the frozen head.
For each method of a ``voxdiff experiment compare`` folder (fold 0, its test cases), this scores:

* heads fitted as the experiment fits its frozen non-linear probe, once on the experiment's feature
  window (``feature_roi``) and once on the fine-tuning window (``roi``), each applied through
  - ``volume``: the pyramid of aligned windows of the size it was fitted on (its own path);
  - ``volume, roi``: the pyramid of aligned ``roi`` windows, then the head;
  - ``aligned logits``: the head on each aligned ``roi`` window, logits blended;
  - ``sliding``: MONAI's sliding windows of ``roi`` (the path fine-tuned networks are scored on);
* with ``--finetune``: the network fine-tuned as the experiment does (LP-FT from the first head, the
  budget's steps), scored on the last three paths;
* the window shift: the relative difference, per pyramid level, between the features of one ``roi``
  window placed at an offset and the aligned pyramid at the same voxels (inner half of the window).

    python benchmarks/window_paths.py /tmp/demo --methods diffusion-ape,contrastive --finetune --threads 1

Prints one JSON line per measurement (mean Dice in %, over the test cases) and writes them to
``--out`` (default ``FOLDER/window_paths.json``). Nothing in the experiment folder is changed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch


class LogitWindows:
    """An extractor-like wrapper whose one stride-1 "level" is a head's logits on each window, so that
    :func:`voxdiff.features.extract.extract_volume` blends logits on its aligned window plan."""

    def __init__(self, extractor, head: torch.nn.Module, n_classes: int):
        from voxdiff.features.extract import largest_stride

        self.extractor, self.head = extractor, head
        self.levels = [SimpleNamespace(name="logits", stride=1, channels=int(n_classes))]
        self.divisor = int(getattr(extractor, "divisor", None) or largest_stride(extractor))
        self.task = getattr(extractor, "task", None)  # extract_volume reads the condition source from it
        fn = getattr(extractor, "condition_map", None)
        if fn is not None:
            self.condition_map = fn

    def __call__(self, window: torch.Tensor, voxel_index=None, coords=None) -> list[torch.Tensor]:
        from voxdiff.probe.predict import features

        pyr = features(self.extractor, window, voxel_index=voxel_index, coords=coords)
        return [self.head(pyr, out_size=tuple(window.shape[2:]))]


@torch.no_grad()
def aligned_logits(extractor, head: torch.nn.Module, image_unit, roi: Sequence[int], overlap: float,
                   n_classes: int) -> torch.Tensor:
    """Logits ``(C, X, Y, Z)`` of ``head`` applied window by window on the aligned window plan of
    :func:`voxdiff.features.extract.extract_volume`, blended with its Gaussian weights."""
    from voxdiff.features.extract import extract_volume

    head.eval()
    out = extract_volume(LogitWindows(extractor, head, n_classes), image_unit, roi=tuple(roi), overlap=overlap,
                         progress=False, out_dtype=torch.float32)
    return out[0][0]


def _full_resolution(level: torch.Tensor, stride: int) -> torch.Tensor:
    """A level ``(C, x, y, z)`` repeated ``stride`` times along each spatial axis (nearest upsampling)."""
    for ax in range(1, 4):
        level = level.repeat_interleave(stride, ax)
    return level


@torch.no_grad()
def window_shift(extractor, image_unit, pyramid: Sequence[torch.Tensor], offsets: Sequence[Sequence[int]],
                 roi: Sequence[int]) -> list[list[float]]:
    """For each offset, per level, ``|f_w - f_v| / |f_v|`` over the inner half of one ``roi`` window
    placed there: ``f_w`` the window's own features, ``f_v`` the aligned whole-volume ``pyramid`` at the
    same voxels (both repeated to full resolution). 0 for every offset when the features do not depend
    on where a window starts. A pyramid that subsamples differs at offsets off its stride grid; one that
    normalises over the window (GroupNorm) differs at any offset whose window holds other voxels."""
    from voxdiff.pretrain.diffusion import index_grid
    from voxdiff.probe.predict import condition_map, features

    x = torch.as_tensor(np.asarray(image_unit, dtype=np.float32))[None, None]
    cond = condition_map(extractor, x)  # the volume's map, cropped for each window
    inner = (slice(None),) + tuple(slice(r // 4, r - r // 4) for r in roi)
    strides = [int(lv.stride) for lv in extractor.levels]
    refs = [_full_resolution(p.float(), s) for p, s in zip(pyramid, strides)]
    out = []
    for offset in offsets:
        box = tuple(slice(o, o + r) for o, r in zip(offset, roi))
        if any(b.stop > n for b, n in zip(box, x.shape[2:])):
            raise ValueError(f"a {tuple(roi)} window at {tuple(offset)} does not fit the volume {tuple(x.shape[2:])}")
        vi = index_grid(tuple(roi), torch.tensor([list(offset)]), batch=1)
        crop = (slice(None), slice(None)) + box
        own = features(extractor, x[crop], voxel_index=vi, coords=None if cond is None else cond[crop])
        diffs = []
        for f, ref, s in zip(own, refs, strides):
            want = ref[(slice(None),) + box][inner]
            mine = _full_resolution(f[0].float(), s)[inner]
            diffs.append(float((mine - want).norm() / want.norm().clamp_min(1e-12)))
        out.append(diffs)
    return out


def mean_dice(logits: Sequence[torch.Tensor], cases: Sequence, n_classes: int) -> float:
    """Mean over cases of each case's mean Dice (:func:`voxdiff.core.metrics.mean_dice`), in %."""
    from voxdiff.core.metrics import mean_dice as case_dice
    from voxdiff.probe.predict import logits_to_labels

    per_case = [case_dice(logits_to_labels(lg), np.asarray(c.label), n_classes) for lg, c in zip(logits, cases)]
    return round(100 * float(np.nanmean(per_case)), 1)


def score_paths(exp, ext, head, cases, pcfg, roi: Sequence[int], own_roi: Sequence[int] | None) -> dict[str, float]:
    """Dice of ``head`` on ``ext`` through each path (see the module docstring)."""
    from voxdiff.probe.predict import predict_logits, unit_image
    from voxdiff.probe.voxel import predict_logits_volume

    n, ov = pcfg.n_classes, pcfg.inference.overlap
    units = [unit_image(c, ext.preprocess.hu_window) for c in cases]
    res = {}
    if own_roi is not None and tuple(own_roi) != tuple(roi):
        own = exp.probe_cfg(feature_roi=tuple(own_roi))
        res["volume"] = mean_dice([predict_logits_volume(ext, {"h": head}, u, own)["h"] for u in units], cases, n)
    at_roi = exp.probe_cfg(feature_roi=tuple(roi))
    res["volume, roi" if own_roi is not None and tuple(own_roi) != tuple(roi) else "volume"] = mean_dice(
        [predict_logits_volume(ext, {"h": head}, u, at_roi)["h"] for u in units], cases, n)
    res["aligned logits"] = mean_dice([aligned_logits(ext, head, u, roi, ov, n) for u in units], cases, n)
    res["sliding"] = mean_dice([predict_logits(ext, head, u, tuple(roi), ov) for u in units], cases, n)
    return res


def run_method(exp, method: str, emit, finetune: bool, offsets: list[tuple[int, int, int]]) -> None:
    import copy

    from voxdiff.features.extract import with_feature_settings
    from voxdiff.pretrain.load import load_pretrained
    from voxdiff.probe.predict import unit_image
    from voxdiff.probe.train import fit_network, volume_roi
    from voxdiff.probe.voxel import fit_heads_voxels, volume_pyramid

    train, val, test = exp.folds()[0]
    pcfg = exp.probe_cfg()
    roi = tuple(int(r) for r in pcfg.inference.roi)
    feat_roi = volume_roi(pcfg)
    ext = with_feature_settings(load_pretrained(exp.out / f"pretrain-{method}" / "model", device="cpu"), pcfg)
    vox = int(exp.budget.get("probe_voxels", 8192))
    heads = {}
    for name, w in (("feature_roi", feat_roi), ("roi", roi)):
        if name == "roi" and w == feat_roi:
            continue
        cfg = exp.probe_cfg(feature_roi=w)
        heads[name] = fit_heads_voxels(ext, train, val, ("nonlinear",), cfg, progress=False, voxels_per_step=vox)["nonlinear"]
        emit(method, f"frozen head fitted on {'x'.join(map(str, w))} windows", score_paths(exp, ext, heads[name], test, pcfg, roi, w))
    if offsets:
        u = unit_image(test[0], ext.preprocess.hu_window)
        pyr = volume_pyramid(ext, u, exp.probe_cfg(feature_roi=roi))
        for o, diffs in zip(offsets, window_shift(ext, u, pyr, offsets, roi)):
            emit(method, f"window shift, window at {tuple(o)}", {"relative difference per level": [round(v, 3) for v in diffs]})
    if finetune:
        tcfg = exp.tuned_cfg("finetune")
        init = copy.deepcopy(heads["feature_roi"]) if exp.budget.get("finetune_init") == "probe" else None
        tuned, head = fit_network(ext, train, val, "finetune", tcfg, progress=False, init_head=init)
        emit(method, f"fine-tuned ({'LP-FT' if init is not None else 'random head'}, {tcfg.optim.steps} steps)",
             score_paths(exp, tuned, head, test, tcfg, roi, None))


def main() -> None:
    from voxdiff.core.runtime import tune_allocator
    from voxdiff.experiments.base import Experiment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a voxdiff experiment compare folder (or a seed-S folder of one)")
    ap.add_argument("--methods", default="diffusion-ape,contrastive")
    ap.add_argument("--finetune", action="store_true", help="also fine-tune each method as the experiment does")
    ap.add_argument("--offsets", default="[[0,0,0],[1,0,0],[4,4,4],[8,8,8]]",
                    help="JSON list of window offsets for the window-shift measure ('[]': none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    exp = Experiment.reopen(Path(args.folder))
    out = Path(args.out) if args.out else Path(args.folder) / "window_paths.json"
    results: list[dict[str, Any]] = []
    t0 = time.time()

    def emit(method: str, what: str, values: dict[str, Any]) -> None:
        r = {"method": method, "what": what, **values, "seconds": round(time.time() - t0)}
        print(json.dumps(r), flush=True)
        results.append(r)
        out.write_text(json.dumps(results, indent=1))

    offsets = [tuple(int(v) for v in o) for o in json.loads(args.offsets)]
    for m in [m for m in args.methods.split(",") if m]:
        run_method(exp, m, emit, args.finetune, offsets)


if __name__ == "__main__":
    main()
