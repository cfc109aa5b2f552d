"""``voxdiff data ...``: prepare the preprocessing cache, check a data set, write splits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from voxdiff.core.cli import CommandGroup, add_config
from voxdiff.core.config import from_namespace, write_config
from voxdiff.core.errors import InputError
from voxdiff.core.outputs import atomic_write_json, check_output_path

from .ctcheck import ALLOW_HELP
from .preprocess import PreprocessConfig


@dataclasses.dataclass
class SplitsConfig:
    """Cross-validation splits.

    Args:
        scheme: kfold (nnU-Net style, default seed 12345) or btcv-vox2vec (seed 42, train/val/test).
        k: number of folds.
        seed: shuffle seed (null = the scheme's default).
    """

    scheme: str = "kfold"
    k: int = 5
    seed: int | None = None


def register(root: CommandGroup) -> None:
    g = root.group("data", help="Real CT data: preprocessing cache, integrity check, splits")

    p = g.command("prepare", run_prepare, help="Preprocess a data set into the cache (parallel workers)")
    p.add_argument("data", type=str, help="data set folder (BTCV, FLARE22, AMOS, nnU-Net/MSD, plain CTs) or one CT")
    p.add_argument("--cache", type=str, required=True, help="cache folder (created; reused when it is a voxdiff cache)")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--kind", type=str, default="auto", help="auto|btcv|flare|amos|nnunet|folder")
    p.add_argument("--split", type=str, default="all", help="train|val|test|all (nnU-Net style layouts)")
    p.add_argument("--force", action="store_true", help="use a non-empty folder that is not a voxdiff cache")
    p.add_argument("--allow_non_ct", action="store_true", help=ALLOW_HELP)
    add_config(p, PreprocessConfig)

    c = g.command("check", run_check, help="Integrity report of a data set (exit 2 on problems)")
    c.add_argument("data", type=str, help="data set folder or one CT")
    c.add_argument("--kind", type=str, default="auto", help="auto|btcv|flare|amos|nnunet|folder")
    c.add_argument("--split", type=str, default="all", help="train|val|test|all")
    c.add_argument("--json", type=str, default=None, help="also write the report as JSON to this file")
    c.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    c.add_argument("--allow_non_ct", action="store_true", help=ALLOW_HELP)

    s = g.command("splits", run_splits, help="Write deterministic cross-validation splits (splits_final.json)")
    s.add_argument("data", type=str, help="data set folder (labelled cases are split)")
    s.add_argument("--out", type=str, required=True, help="output file (splits_final.json) or folder")
    s.add_argument("--kind", type=str, default="auto", help="auto|btcv|flare|amos|nnunet|folder")
    s.add_argument("--split", type=str, default="train", help="which part of an nnU-Net layout to split")
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    add_config(s, SplitsConfig)


def run_prepare(ns) -> None:
    from .cache import prepare_cache

    cfg = from_namespace(PreprocessConfig, ns)
    rep = prepare_cache(ns.data, ns.cache, cfg, workers=ns.workers, kind=ns.kind, split=ns.split, force=ns.force,
                        allow_non_ct=bool(ns.allow_non_ct))
    n_ok = len(rep.done) + len(rep.cached)
    if n_ok == 0:
        if len(rep.failed) == 1:
            raise InputError(None, rep.failed[0][1])
        for cid, msg in rep.failed:
            print(f"failed {cid}: {msg}")
        raise InputError(ns.data, f"all {rep.n_cases} cases failed (first: {rep.failed[0][1]})")
    print(f"prepared {len(rep.done)} new, {len(rep.cached)} already cached, {len(rep.failed)} failed -> {rep.cache_dir}")
    for cid, msg in rep.failed:
        print(f"failed (skipped) {cid}: {msg}")


def run_check(ns) -> None:
    from .check import check_dataset

    if ns.json:
        check_output_path(ns.json, force=ns.force)
    rep = check_dataset(ns.data, kind=ns.kind, split=ns.split, allow_non_ct=bool(ns.allow_non_ct))
    print(rep.table())
    if ns.json:
        atomic_write_json(ns.json, rep.to_dict())
    if not rep.ok:
        first = next(c for c in rep.cases if not c.ok)
        n = len(rep.cases)
        verb = "has" if rep.n_problems == 1 else "have"
        raise InputError(None, f"{rep.n_problems} of {n} case{'' if n == 1 else 's'} {verb} problems, "
                               f"first: {first.problems[0]}")


def run_splits(ns) -> None:
    from .adapters import open_dataset
    from .splits import make_splits, write_splits

    cfg = from_namespace(SplitsConfig, ns)
    out = Path(ns.out)
    target = out / "splits_final.json" if (out.is_dir() or out.suffix == "") else out
    check_output_path(target, force=ns.force)
    ds = open_dataset(ns.data, kind=ns.kind, split=ns.split)
    ids = [r.case_id for r in ds.labelled] or ds.case_ids
    try:
        splits = make_splits(ids, scheme=cfg.scheme, k=cfg.k, seed=cfg.seed)
    except ValueError as e:
        raise InputError(ns.data, str(e)) from None
    p = write_splits(target, splits)
    write_config(p.with_name(p.stem + ".config.yaml"), cfg, extra={"data": str(ds.root), "n_cases": len(ids)})
    print(f"wrote {len(splits)} folds over {len(ids)} cases -> {p}")
