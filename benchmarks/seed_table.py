"""One over-seeds table from several ``voxdiff experiment compare --seeds`` folders.

A compare folder takes a longer seed list (only the new seeds run), but seeds run elsewhere or
earlier may sit in a second folder (``--seeds '[3,4]'`` beside ``'[0,1,2]'``). This script gathers the seeds of all the folders,
checks that they share the data (same budget, phantoms or data folder, same test cases) and prints
the compare report's two tables over all of them: each row's mean ± std over seeds, and the paired
comparisons (``voxdiff.evaluate.stats``: over seeds, and over the test cases averaged over seeds,
Wilcoxon and t-test), the first method against each other one, plus ``--pairs``:

    python benchmarks/seed_table.py runs/bench runs/bench34 \
        --methods diffusion-ape,diffusion-none,contrastive,diffusion-position \
        --pairs diffusion-position:diffusion-none,contrastive:diffusion-position

Reads only ``config.yaml``, ``phantoms/phantoms.json`` (when the folder made phantoms) and each seed's
``seed-S/results.json``; writes nothing unless ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from voxdiff.core.config import from_dict
from voxdiff.evaluate.stats import paired_comparison, verdict
from voxdiff.experiments.base import ExperimentConfig
from voxdiff.experiments.experiments import seeds_summary
from voxdiff.experiments.report import seeds_markdown

SAME = ("budget", "data", "phantom_seed", "regime", "variation", "folds")  # what makes the test cases the same


def folder_seeds(folder: Path) -> tuple[ExperimentConfig, dict[int, list[dict[str, Any]]], str | None]:
    """The folder's config, ``{seed: rows of seed-S/results.json}`` and a digest of its phantoms.json."""
    cfg_file = folder / "config.yaml"
    if not cfg_file.is_file():
        raise SystemExit(f"{folder}: not a compare folder (no config.yaml)")
    cfg = from_dict(ExperimentConfig, yaml.safe_load(cfg_file.read_text())["config"], strict=False)
    rows = {}
    for s in cfg.seeds:
        res = folder / f"seed-{s}" / "results.json"
        if not res.is_file():
            raise SystemExit(f"{res}: missing (seed {s} has not finished)")
        rows[int(s)] = json.loads(res.read_text())["rows"]
    ph = folder / "phantoms" / "phantoms.json"
    digest = hashlib.sha256(ph.read_bytes()).hexdigest() if ph.is_file() else None
    return cfg, rows, digest


def gather(folders: list[Path], methods: list[str] | None, head: str
           ) -> tuple[ExperimentConfig, list[int], list[list[dict[str, Any]]]]:
    """The first folder's config (methods set to ``methods``) and every seed's rows of those methods."""
    first = None
    seeds: list[int] = []
    seed_rows: list[list[dict[str, Any]]] = []
    for folder in folders:
        cfg, rows, digest = folder_seeds(folder)
        if first is None:
            first = (cfg, digest, folder)
        else:
            c0, d0, f0 = first
            bad = [k for k in SAME if getattr(cfg, k) != getattr(c0, k)] + (["phantoms"] if digest != d0 else [])
            if bad:
                raise SystemExit(f"{folder}: not the same benchmark as {f0} ({', '.join(bad)} differ)")
        for s, rs in rows.items():
            if s in seeds:
                raise SystemExit(f"{folder}: seed {s} is also in another folder")
            seeds.append(s)
            seed_rows.append([r for r in rs if r["head"] == head])
    assert first is not None
    cfg = first[0]
    methods = methods or list(cfg.methods)
    kept = []
    for s, rs in zip(seeds, seed_rows):
        have = {r["method"]: r for r in rs}
        missing = [m for m in methods if m not in have]
        if missing:
            raise SystemExit(f"seed {s}: no {head} row for {', '.join(missing)}")
        kept.append([have[m] for m in methods])
    cases = [sorted(r["per_case"]) for rs in kept for r in rs]
    if any(c != cases[0] for c in cases):
        raise SystemExit("the seeds' rows were not scored on the same test cases")
    cfg = dataclasses.replace(cfg, methods=tuple(methods), heads=(head,), scratch=False, finetune=(), seeds=tuple(seeds))
    return cfg, seeds, kept


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="compare folders made with --seeds")
    ap.add_argument("--methods", default="", help="comma-separated, the first compared with each other one "
                                                   "(default: the first folder's methods)")
    ap.add_argument("--head", default="nonlinear")
    ap.add_argument("--pairs", default="", help="more comparisons, A:B[,A:B...]")
    ap.add_argument("--json", type=Path, help="also write rows and tests here")
    a = ap.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m] or None
    cfg, seeds, seed_rows = gather(a.folders, methods, a.head)
    rows, tests = seeds_summary(cfg, seed_rows)
    by = {r["method"]: r for r in rows}
    for pair in (p for p in a.pairs.split(",") if p):
        x, _, y = pair.partition(":")
        if x not in by or y not in by:
            raise SystemExit(f"--pairs {pair}: both methods must be among {', '.join(by)}")
        cmp = paired_comparison(by[x]["seed_means"], by[y]["seed_means"], by[x]["cases"], by[y]["cases"])
        tests.append({"a": [x, a.head], "b": [y, a.head], **cmp, "verdict": verdict(cmp)})
    results = {"config": dataclasses.asdict(cfg), "rows": rows, "tests": tests, "seeds": seeds, "seconds": None}
    text = seeds_markdown(results, [], title=f"# compare over seeds, gathered from {', '.join(map(str, a.folders))}",
                          seed_reports="FOLDER/seed-S/report.md")
    sys.stdout.write(text)
    if a.json:
        a.json.write_text(json.dumps({"seeds": seeds, "rows": rows, "tests": tests}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
