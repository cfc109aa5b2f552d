"""Label-efficiency rows inside the seed folders of a ``voxdiff experiment compare --seeds`` run.

``voxdiff experiment label-efficiency`` runs every label count into a folder of its own. The rows of
docs/RESULTS.md ("Label efficiency ...", "One labelled phantom") were instead added to the folders of
the matched-compute benchmark (``runs/bench/seed-S``), so that they reuse its BPR and pretrained
backbones: this script runs, for one label count and some seeds, exactly the steps of
``label-efficiency`` (:func:`voxdiff.experiments.experiments.label_items`: the same step names
``labels/...-n<N>-f0`` and settings, the seed folder's saved config and budget), without touching
the folder's config, results or report.

Several processes may share the work: each step runs under the step lock of ``StepRunner`` and a
process that meets a step another one is running goes on with the next
(:func:`voxdiff.experiments.lanes.work_through`, as ``--jobs`` does); finished steps are skipped, and
an interrupted run is simply started again.

    python benchmarks/label_rows.py runs/bench 1 --seeds 0,1,2 [--threads 1]
    python benchmarks/label_rows.py runs/bench 1,2 --seeds 0,1,2   # both counts in one queue

A fine-tuning variant (``--finetune`` ProbeConfig overrides, e.g. ``'{"fresh_noise": true}'``) runs
into ``--out DIR/seed-S`` instead: a folder whose saved budget carries the overrides in its
``finetune`` settings and which links everything else of the seed folder (BPR, backbones, cache,
the frozen and from-scratch label rows), so only the fine-tuned rows are trained again:

    python benchmarks/label_rows.py runs/bench 1 --seeds 0 --methods diffusion-ape \
        --finetune '{"fresh_noise": true}' --out runs/bench-fresh

A variant folder may itself be the source of another (its overrides merged on top), e.g. fixed
normalisation statistics on top of clean feature passes:

    python benchmarks/label_rows.py runs/bench-clean 1 --seeds 0 --methods diffusion-ape \
        --finetune '{"norm_stats": "fixed"}' --out runs/bench-clean-fixed

LP-FT (the fine-tuned rows start from the frozen probe's head of the same labelled cases; the
``cpu-bench`` preset starts from a random head): ``--budget '{"finetune_init": "probe"}' --out
runs/bench-lpft``.

A longer early-stopping cap for the end-to-end rows, from scratch alone (the from-scratch rows are
then trained again too): ``1 --methods '' --budget '{"early_stopping": {"steps": 2400}}' --out
runs/bench-cap2400``.

Larger training patches and scoring windows for both end-to-end rows (the budget's ``end_to_end``
section; from-scratch rows are trained again too)::

    python benchmarks/label_rows.py runs/bench56 1 --seeds 5,6,7 --methods diffusion-ape \
        --finetune '{"feature_input": "clean"}' \
        --budget '{"end_to_end": {"patch_size": [80, 80, 48], "batch_size": 1, "roi": [96, 96, 96]}}' \
        --out runs/bench56-p80

Then ``python benchmarks/label_curve.py runs/bench --out docs/images --tests 1,2,4`` tabulates and draws them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxdiff.core.runtime import tune_allocator  # noqa: E402
from voxdiff.experiments.base import Experiment  # noqa: E402
from voxdiff.experiments.experiments import label_items  # noqa: E402


def row_items(exp: Experiment, labels: int, methods: list[str]) -> list[tuple[str, Callable[[], Any]]]:
    """The steps ``label-efficiency`` runs for ``labels`` labelled cases and ``methods`` on the open
    experiment ``exp`` (its saved config is left as it is: only this in-memory copy changes)."""
    exp.cfg = dataclasses.replace(exp.cfg, label_counts=(int(labels),), label_methods=tuple(methods))
    return label_items(exp)


def variant_folder(src: Path, dst: Path, finetune: dict[str, Any], budget: dict[str, Any] | None = None) -> Path:
    """``dst``: the seed folder ``src`` with ``finetune`` merged into its budget's fine-tuning
    settings and ``budget`` into the budget itself (e.g. ``{"finetune_init": "probe"}``, sections
    merged key by key); every entry but the label rows the variant trains again (fine-tuned ones, and
    from-scratch ones when ``budget`` changes ``early_stopping``) is a link into ``src``. An existing
    ``dst`` made with other overrides is refused."""
    saved = yaml.safe_load((src / "config.yaml").read_text())
    settings = saved["budget_settings"]
    settings.setdefault("finetune", {}).update(finetune)
    for k, v in (budget or {}).items():  # a section (e.g. early_stopping) is merged, not replaced
        if isinstance(v, dict) and isinstance(settings.get(k), dict):
            settings[k].update(v)
        else:
            settings[k] = v
    # the rows the variant trains again are not linked: fine-tuned ones always, from-scratch ones
    # when the settings they share with fine-tuning (early stopping, the end-to-end section) change
    shared = {"early_stopping", "end_to_end"} & set(budget or {})
    retrained = ("finetune-", "scratch-") if shared else ("finetune-",)
    # the record lives beside config.yaml, which the experiment rewrites when it opens the folder
    variant: dict[str, Any] = {"of": str(src.resolve()), "finetune": finetune}
    if budget:
        variant["budget"] = budget
    if not (dst / "variant.json").is_file():
        if dst.exists() and any(dst.iterdir()):
            raise SystemExit(f"{dst}: exists and is not a variant folder; choose another --out")
        # built aside and renamed into place, so that processes started together make it once
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
        (tmp / "labels").mkdir()
        for e in src.iterdir():  # (a source that is itself a variant keeps its own record: not linked)
            if e.name not in ("config.yaml", "labels", "variant.json") and not e.name.startswith("."):
                (tmp / e.name).symlink_to(e.resolve())
        for e in (src / "labels").iterdir() if (src / "labels").is_dir() else ():
            if not e.name.startswith((*retrained, ".")):  # nor a step another process is writing
                (tmp / "labels" / e.name).symlink_to(e.resolve())
        (tmp / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        (tmp / "variant.json").write_text(json.dumps(variant))
        try:
            tmp.rename(dst)  # replaces an empty dst (POSIX rename)
        except OSError:  # another process got there first
            shutil.rmtree(tmp)
    have = json.loads((dst / "variant.json").read_text())
    if have != variant:
        raise SystemExit(f"{dst}: made as another variant ({have}); choose another --out")
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path, help="folder of a compare --seeds run (with seed-S subfolders)")
    ap.add_argument("labels", help="labelled training phantoms per row; several comma-separated (one queue)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--methods", default="diffusion-ape,contrastive",
                    help="pretrained methods (probe + fine-tune rows); '' for the from-scratch rows alone")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--finetune", default=None, help="JSON ProbeConfig overrides of the fine-tuned rows (needs --out)")
    ap.add_argument("--budget", default=None,
                    help='JSON budget overrides of the end-to-end rows: finetune_init, finetune, early_stopping, end_to_end, '
                         'e.g. \'{"finetune_init": "probe"}\' (needs --out)')
    ap.add_argument("--out", type=Path, default=None, help="folder of the variant's seed folders")
    a = ap.parse_args(argv)
    if (a.finetune is None and a.budget is None) != (a.out is None):
        ap.error("--out goes with --finetune and/or --budget")
    bad = set(json.loads(a.budget or "{}")) - {"finetune_init", "finetune", "early_stopping", "end_to_end"}
    if bad:  # the variant relinks everything else of the seed folder: only the end-to-end rows may differ
        ap.error(f"--budget may set finetune_init, finetune, early_stopping and end_to_end, not {sorted(bad)}")

    import torch

    from voxdiff.experiments.lanes import work_through

    tune_allocator()
    torch.set_num_threads(a.threads)
    items: list[tuple[str, Callable[[], Any]]] = []
    exps = {}
    for s in (int(x) for x in a.seeds.split(",")):
        folder = a.bench / f"seed-{s}"
        if not (folder / "config.yaml").is_file():
            raise SystemExit(f"{folder}: not a seed folder of a compare run (no config.yaml)")
        if a.out is not None:
            folder = variant_folder(folder, a.out / f"seed-{s}", json.loads(a.finetune or "{}"),
                                    json.loads(a.budget or "null"))
        # the saved budget settings: a preset changed since would otherwise refuse the folder
        exp = Experiment.reopen(folder, log=print)
        exp.runner.wait = False  # a step another process runs: do the others first
        exps[s] = exp
    # one queue over all seeds and counts, method by method, then count by count: a process never
    # waits on a step of one seed while another step has work
    groups = [[m] for m in a.methods.split(",") if m] or [[]]  # --methods '': the from-scratch rows alone
    for group in groups:
        for n in (int(x) for x in a.labels.split(",")):
            for s, exp in exps.items():
                items += [(f"seed-{s}: {k}", fn) for k, fn in row_items(exp, n, group)]
    # each method's items repeat the count's from-scratch step: queue every step once
    work_through(list(dict(items).items()), print)


if __name__ == "__main__":
    main()
