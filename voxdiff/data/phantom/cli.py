"""``voxdiff phantom OUT``: write a synthetic CT data set (nnU-Net layout + unlabelled images)."""

from __future__ import annotations

from voxdiff.core.cli import CommandGroup, add_config
from voxdiff.core.config import from_namespace

from .generator import VARIATIONS, PhantomConfig, with_variation


def register(root: CommandGroup) -> None:
    p = root.command(
        "phantom",
        run_phantom,
        help="Generate synthetic abdominal CT phantoms with 13-organ BTCV labels (nnU-Net layout)",
        description=(
            "Generate synthetic abdominal CT phantoms: OUT/imagesTr + labelsTr (training), imagesTs + labelsTs "
            "(held-out test), unlabelled/ (images for pretraining), dataset.json, phantoms.json (subject "
            "parameters, landmarks), config.yaml and, with --preview, preview.png."
        ),
    )
    p.add_argument("out", type=str, help="output folder (refused when it exists and is not empty, unless --force)")
    # (--n_train etc., the hyphenated spellings of before, still work: voxdiff.core.cli.underscore_options)
    p.add_argument("--n_train", type=int, default=10, help="labelled training cases")
    p.add_argument("--n_test", type=int, default=5, help="labelled held-out test cases")
    p.add_argument("--n_unlabelled", type=int, default=20, help="unlabelled cases (pretraining)")
    p.add_argument("--seed", type=int, default=0, help="data set seed (case seeds are derived from it)")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--preview", action="store_true", help="also write OUT/preview.png (3 views + labels)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--train_site", type=str, default="",
                   help='JSON dict of settings for the labelled training cases only (a shifted regime), '
                        'e.g. \'{"phases": ["portal_venous"], "z_modes": ["abdomen"]}\'')
    p.add_argument("--variation", type=str, default="default",
                   help=f"{' | '.join(sorted(VARIATIONS))}. wide: subjects and scans that vary as clinical CT does (organ placement and size, "
                        "CT numbers, contrast, noise, kernels, lesions, fatty liver, ascites, removed "
                        "gallbladder; docs/PHANTOMS.md). Options given explicitly with other values win")
    add_config(p, PhantomConfig)


def run_phantom(ns) -> None:
    import json

    from voxdiff.core.errors import InputError

    from .dataset import make_phantom_dataset

    cfg = with_variation(from_namespace(PhantomConfig, ns), ns.variation)
    site = None
    if ns.train_site:
        try:
            site = json.loads(ns.train_site)
        except json.JSONDecodeError as e:
            raise InputError(None, f"--train_site is not valid JSON ({e.msg})") from None
        if not isinstance(site, dict):
            raise InputError(None, "--train_site must be a JSON object of phantom settings")
    out = make_phantom_dataset(
        ns.out,
        n_train=ns.n_train,
        n_test=ns.n_test,
        n_unlabelled=ns.n_unlabelled,
        seed=ns.seed,
        cfg=cfg,
        force=bool(ns.force),
        workers=ns.workers,
        preview=bool(ns.preview),
        progress=not ns.quiet,
        train_site=site,
    )
    print(f"wrote {ns.n_train} training, {ns.n_test} test and {ns.n_unlabelled} unlabelled phantoms to {out}")
