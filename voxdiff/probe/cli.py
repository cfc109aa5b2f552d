"""``voxdiff probe PRETRAINED DATA -o OUT``: train heads (or fine-tune / from scratch), write segmenters."""

from __future__ import annotations

from voxdiff.core.cli import CommandGroup, add_config
from voxdiff.core.config import from_namespace


def register(root: CommandGroup) -> None:
    p = root.command(
        "probe", run_probe,
        help="Train segmentation heads on frozen pretrained features (linear, nonlinear, mix) or fine-tune / train from scratch",
    )
    p.add_argument("pretrained", type=str, help="voxdiff pretrain output folder (or its backbone/)")
    p.add_argument("data", type=str, help="labelled data set folder")
    p.add_argument("-o", "--out", type=str, required=True, help="output folder: one segmenter per head + probe.json")
    p.add_argument("--fold", type=int, default=0, help="fold of the splits file to train on (-1: all labelled cases)")
    p.add_argument("--splits", type=str, default=None, help="nnU-Net splits_final.json (default: DATA/splits_final.json or 5-fold)")
    p.add_argument("--cache_dir", type=str, default=None, help="preprocessing cache folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    add_config(p, "voxdiff.probe.train:ProbeConfig")  # by name: imported when the options are built


def run_probe(ns) -> None:
    from .train import ProbeConfig, train_probe

    cfg = from_namespace(ProbeConfig, ns)
    fold = None if ns.fold is not None and ns.fold < 0 else ns.fold
    out = train_probe(cfg, ns.pretrained, ns.data, ns.out, fold=fold, splits=ns.splits, cache_dir=ns.cache_dir,
                      force=ns.force)
    import json

    s = json.loads((out / "probe.json").read_text())
    print(f"backbone: {s['backbone_parameters']:,} parameters ({s['method']})")
    for n, h in s["heads"].items():
        v = h["best_val_dice"]
        print(f"{n:>10}: {h['parameters']:,} parameters, best validation Dice {'n/a' if v is None else f'{v:.3f}'}"
              f" -> {out / n}")
