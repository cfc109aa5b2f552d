"""``voxdiff features MODEL DATA -o OUT``: whole-volume frozen features of every case, as files."""

from __future__ import annotations

from voxdiff.core.cli import CommandGroup, add_config
from voxdiff.core.config import from_namespace

from ..data.ctcheck import ALLOW_HELP

HELP = """Extract frozen feature pyramids of every case of a data set with a pretrained backbone
(sliding windows of the model's training patch size unless --roi, the requested overlap honoured
exactly, Gaussian blending, on the GPU when there is one). Prints the windows used per case. Writes OUT/<case_id>.safetensors (float16, one tensor per
level at its own stride unless --upsample) with OUT/<case_id>.json metadata, OUT/features.json and
OUT/config.yaml. --norm_stats fixed normalises every window with one set of GroupNorm statistics
(estimated on crops of up to --norm_cases cases, or --norm_from an earlier run's
norm_stats.safetensors so that training and test features share them), written to
OUT/norm_stats.safetensors."""


def register(root: CommandGroup) -> None:
    p = root.command("features", run_features, help="Extract frozen features of whole volumes", description=HELP)
    p.add_argument("model", type=str, help="pretraining output folder (or its backbone/ folder)")
    p.add_argument("data", type=str, help="data folder (any layout voxdiff.data reads)")
    p.add_argument("-o", "--out", type=str, required=True, help="output folder")
    p.add_argument("--data_kind", type=str, default="auto", help="data layout: auto|btcv|flare|amos|nnunet|folder")
    p.add_argument("--split", type=str, default="all", help="which cases of a labelled data set: all|train|test")
    p.add_argument("--cases", type=str, nargs="+", default=None, help="only these case ids")
    p.add_argument("--cache_dir", type=str, default=None, help="preprocessing cache folder (voxdiff data prepare)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--progress", type=bool, default=True, help="show progress bars")
    p.add_argument("--allow_non_ct", action="store_true", help=ALLOW_HELP)
    p.add_argument("--t", type=int, nargs="+", default=None,
                   help="diffusion feature timestep(s), e.g. --t 10 or --t 10 50 (several: concatenated channels); "
                        "default: the model's. Diffusion models only")
    p.add_argument("--levels", type=int, nargs="+", default=None,
                   help="pyramid levels to keep, e.g. --levels 0 1 2 (0 = finest, stride 1); default: all")
    # the config classes by name: imported when the options are built
    add_config(p, "voxdiff.features.extract:ExtractConfig", skip={"t", "levels"})
    add_config(p, "voxdiff.features.norm:NormStatsConfig")


def run_features(ns) -> None:
    from .extract import ExtractConfig
    from .norm import NormStatsConfig
    from .run import features_command

    cfg = from_namespace(ExtractConfig, ns)
    cfg.t = None if ns.t is None else tuple(int(v) for v in ns.t)
    cfg.levels = None if ns.levels is None else tuple(int(v) for v in ns.levels)
    from tqdm import tqdm

    out = features_command(ns.model, ns.data, ns.out, cfg, data_kind=ns.data_kind, split=ns.split,
                           case_ids=ns.cases, cache_dir=ns.cache_dir, force=bool(ns.force),
                           progress=bool(ns.progress), allow_non_ct=bool(ns.allow_non_ct),
                           log=lambda line: tqdm.write(f"features: {line}"),
                           norm=from_namespace(NormStatsConfig, ns))
    print(f"features: {out}")
