"""``voxdiff pretrain`` and ``voxdiff sample``: thin layers over :func:`pretrain` / :func:`sample_to_png`."""

from __future__ import annotations

import os

from voxdiff.core.cli import CommandGroup, add_config
from voxdiff.core.config import from_namespace

PRETRAIN_HELP = """Pretrain a backbone by a self-supervised method (diffusion with/without BPR, restorative,
contrastive, random). Multi-process: torchrun --nproc_per_node=N -m voxdiff.cli pretrain ...
(or `torchrun --nproc_per_node=N $(which voxdiff) pretrain ...`)."""


def register(root: CommandGroup) -> None:
    p = root.command("pretrain", run_pretrain, help="Self-supervised pretraining of a 3D backbone",
                     description=PRETRAIN_HELP)
    p.add_argument("out", type=str, help="output folder (backbone/, train_state/, metrics.jsonl, config.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from out/train_state/latest")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    add_config(p, "voxdiff.pretrain.train:PretrainConfig")  # by name, imported when the options are built; sections: --data FOLDER ... (--data.kind, ...), --optim.lr, --backbone NAME, ...

    s = root.command("sample", run_sample, help="Draw patches from a diffusion backbone into a PNG grid")
    s.add_argument("model", type=str, help="pretraining output folder (or its backbone/ folder)")
    s.add_argument("-o", "--out", type=str, required=True, help="output PNG file")
    s.add_argument("--force", action="store_true", help="overwrite an existing PNG")
    add_config(s, "voxdiff.pretrain.sample:SampleConfig")


def run_pretrain(ns) -> None:
    from .train import PretrainConfig, pretrain

    cfg = from_namespace(PretrainConfig, ns)
    out = pretrain(cfg, ns.out, resume=bool(ns.resume), progress=bool(ns.progress), force=bool(ns.force))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pretrained backbone: {out / 'backbone'}")


def run_sample(ns) -> None:
    from .sample import SampleConfig, sample_to_png

    cfg = from_namespace(SampleConfig, ns)
    out = sample_to_png(ns.model, ns.out, cfg, force=bool(ns.force))
    print(f"samples: {out}")
