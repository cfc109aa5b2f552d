"""Budget presets: one name fixes the size of every stage of an experiment.

* ``tiny``: seconds; for tests of the experiment machinery only (numbers mean nothing).
* ``cpu-small``: runs here (2 CPU cores): what ``voxdiff demo`` uses; minutes per experiment.
* ``cpu-bench``: the matched-compute benchmark (docs/RESULTS.md): ``cpu-small``'s networks, crops
  and heads with 1,000 pretraining steps for every method (5x the demo), 48 unlabelled phantoms for
  pretraining, 8 labelled (one of them the validation case) and 10 test phantoms; fine-tuned and
  from-scratch rows train to convergence (early stopping on the validation case). Its BPR stays the
  one the benchmark was measured with: the window-anchored ape (300 steps) and a 150-step slice
  model, not ``cpu-small``'s slice-anchored ape. About 30 minutes per seed for the frozen rows on
  one CPU core.
* ``paper``: the paper-scale settings for a GPU (vox2vec's 1 x 1 x 2 mm grid, 128 x 128 x 32
  patches, base width 16 with 6 levels, long schedules). Untested at full length on this machine.

A preset is a dict of overrides per stage; anything can still be overridden from the command line
through the experiment config (``--pretrain_steps`` etc.) or a YAML file.
"""

from __future__ import annotations

import copy
from typing import Any

from voxdiff.core.errors import VoxdiffError

BUDGETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "phantoms": {"n_train": 3, "n_test": 1, "n_unlabelled": 2, "shape": (64, 64, 48)},
        "spacing": (6.0, 6.0, 6.0),
        "bpr": {"steps": 6, "batch_size": 2, "channels": (8, 8, 8, 8), "slice_patch": 24, "ape_patch": 16,
                "ape_points": 32, "checkpoint_every": 1000},
        "bpr_kind": {"ape": {"anchor": "slice"}},
        "pretrain": {"steps": 4, "patch_size": (16, 16, 16), "batch_size": 2, "base_channels": 4, "num_levels": 3,
                     "warmup_steps": 1, "checkpoint_every": 1000, "log_every": 2, "ema_decay": 0.5,
                     "diffusion_steps": 100, "feature_timesteps": (1,)},
        "probe": {"steps": 20, "patch_size": (16, 16, 16), "batch_size": 2, "val_every": 1000, "roi": (32, 32, 32),
                  "overlap": 0.25, "hidden": 8, "val_from_train": 1, "lr": 1e-2, "feature_side": "both"},
        "probe_voxels": 1024,
        "scratch_steps": 4,
        "finetune_steps": 4,
        "finetune": {"warmup_steps": 1},
        "finetune_init": "probe",
        # label-efficiency: fine-tuning / from scratch to convergence, best-validation checkpoint
        "early_stopping": {"steps": 8, "val_every": 2, "patience": 1},
        "timesteps": (0, 5, 50),
        "train_T": (10, 100),
        "label_counts": (1, None),
    },
    "cpu-small": {
        "phantoms": {"n_train": 7, "n_test": 3, "n_unlabelled": 12},
        "spacing": (3.0, 3.0, 3.0),
        # threads 0: all of torch's threads (ape model, 100 steps: 1.18x one thread's speed on a quiet
        # 2-core EPYC, 1.63x on a 16-core Xeon, where no smaller count was faster: docs/PRETRAIN.md,
        # benchmarks/bench_bpr_threads.py; BPRTrainConfig's default of one thread is for shared machines)
        "bpr": {"steps": 150, "batch_size": 4, "channels": (8, 16, 24, 32), "checkpoint_every": 1000, "threads": 0},
        # per-kind overrides of "bpr"; ape: 3 levels after 2x pooling (cells of 16 voxels), S anchored
        # on the experiment's slice model (field-of-view consistent: docs/BPR.md); slice: 600 steps
        # (about 30 s), since 150 steps gave too poor an anchor (crop consistency 33 / 103 mm on
        # held-out phantoms, against 12 / 37 mm at 600)
        "bpr_kind": {"ape": {"channels": (8, 16, 32), "steps": 300, "anchor": "slice"}, "slice": {"steps": 600}},
        # contrastive draws two views per item: batch 2 pairs = 4 crops, as many as the others see
        "pretrain_method": {"contrastive": {"batch_size": 2}},
        "pretrain": {"steps": 200, "patch_size": (32, 32, 32), "batch_size": 4, "base_channels": 8,
                     "num_levels": 4, "warmup_steps": 30, "checkpoint_every": 100, "log_every": 25,
                     "ema_decay": 0.99, "lr": 1e-3, "diffusion_steps": 1000,
                     # two passes (nearly clean + SNR ~1), concatenated: +10 Dice over t = 10 alone
                     # on the phantom benchmark (docs/RESULTS.md, "Multi-timestep features")
                     "feature_timesteps": (1, 250),
                     # both passes on the clean image, each told its timestep: diffusion + APE +5.1 ± 3.1
                     # validation Dice over the benchmark's five seeds, better on every seed (test +3.0 ±
                     # 2.2; docs/RESULTS.md, "Clean feature passes")
                     "feature_input": "clean"},
        # frozen heads on whole-volume features, one 160^3 window (every phantom at 3 mm fits; larger
        # volumes are tiled): against 64^3 windows, validation Dice over the benchmark's five seeds
        # diffusion + APE +0.7 ± 9.1, no BPR +4.4 ± 3.1, contrastive -1.2 ± 7.4, restorative +4.6 ± 3.4
        # (test +1.7 / +1.6 / +0.5 / +5.6); on three demo-sized runs -2.0 / -2.3 / +1.3 / -4.2, each within
        # its spread: level quality at about half the extraction time (docs/RESULTS.md, "One feature
        # window per volume"); fine-tuning and its scoring keep the 64^3 windows of "roi"
        # 600 head steps (validated at 300 and 600, the better kept): on 8 held-out phantoms over demo seeds
        # 0-4 the non-linear heads gain +4.1 ± 1.0 (diffusion + APE) and +3.3 ± 1.5 (contrastive) Dice
        # over 300 steps, 10 of 10, for about 12 s more per probe (1,200 steps: +6.2 / +4.9 for +32 s;
        # docs/RESULTS.md, "Longer frozen heads in the demo")
        "probe": {"steps": 600, "patch_size": (48, 48, 32), "batch_size": 2, "val_every": 300, "roi": (64, 64, 64),
                  "feature_roi": (160, 160, 160),
                  # the UNet's encoder and decoder outputs concatenated per level (chosen on the validation
                  # phantoms of the benchmark's five seeds: docs/RESULTS.md, "Encoder and decoder features")
                  "feature_side": "both",
                  # GroupNorm statistics fixed on 48 training-size crops of the labelled phantoms instead
                  # of each window's own: frozen probes and LP-FT see the statistics the network was
                  # trained with whatever the window (docs/RESULTS.md, "Fixed normalisation statistics")
                  "norm_stats": "fixed",
                  "overlap": 0.25, "hidden": 32, "val_from_train": 1, "lr": 1e-2, "scratch_lr": 2e-3, "fg_prob": 0.5},
        "probe_voxels": 8192,
        # compare / demo: the from-scratch and fine-tuned rows train as many steps (the demo stays
        # short; from scratch converges near 1,200 steps: docs/RESULTS.md)
        "scratch_steps": 150,
        "finetune_steps": 30,
        # head alone first, then backbone + head (backbone_lr). With the statistics fixed (norm_stats) the
        # GroupNorms no longer absorb a change of scale of the weights: at 3e-4 the fine-tuned diffusion
        # + APE row fell to 6 validation Dice, at 1e-4 it reached 22 (contrastive 59 against 58; the
        # demo's validation phantom: docs/RESULTS.md, "Fixed normalisation statistics")
        "finetune": {"warmup_steps": 30, "backbone_lr": 1e-4},
        # compare / demo: fine-tuning starts from the frozen row's non-linear head, both at backbone_lr
        # (LP-FT); on the demo's phantoms at 150 steps, diffusion + APE 24.2 and contrastive 40.5 mean
        # Dice against 7.4 and 14.4 from a random head (docs/RESULTS.md, "Demo time")
        "finetune_init": "probe",
        # compare / demo: LP-FT (fixed steps from the probe's head) on whole volumes, as the head was fitted, its
        # BatchNorm statistics kept, the backbone at 1e-5, 30 steps validated every 10: on the validation
        # phantoms of demo seeds 0-2 diffusion + APE 43.5 / 27.9 / 64.0 and contrastive 57.5 / 56.8 / 67.3
        # against 21.7 / 7.5 / 32.1 and 59.2 / 36.4 / 46.4 with 150 steps on 48 x 48 x 32 patches at 1e-4
        # (diffusion fell to ~1 Dice within 15 of them: docs/RESULTS.md, "Fine-tuning on whole volumes")
        # The start (the frozen probe) is validated first and competes as step 0 (`validate_start`): on 8
        # held-out phantoms over demo seeds 0-4 the start was kept in 3 of 5 diffusion + APE runs, lifting
        # its fine-tuned row +6.6 ± 7.6 (contrastive kept none: 0.0); 1e-6 instead of 1e-5 helped diffusion
        # + APE (+7.0 ± 9.1) but cost contrastive 0.8 ± 1.2, so 1e-5 stays (docs/RESULTS.md, "The demo's
        # LP-FT: the start as a candidate")
        # It stops at the first validation without a better Dice (`patience` 1): diffusion + APE's LP-FT
        # fell at its first validation on 4 of demo seeds 0-4 and kept its start on 3 of them anyway. On 8
        # held-out phantoms stopping there changed its row by +0.1 ± 0.8 (-0.7 and +1.3 on the two seeds
        # where it selected another state) and contrastive's not at all, for 48 % and 17 % less time
        # (docs/RESULTS.md, "LP-FT stopped at its first validation without progress")
        "lpft": {"whole_volume": True, "batch_size": 1, "backbone_lr": 1e-5, "val_every": 10, "validate_start": True,
                 "patience": 1},
        # label-efficiency: up to 1,200 steps, validated every 100, stopped after 3 without progress
        "early_stopping": {"steps": 1200, "val_every": 100, "patience": 3},
        "timesteps": (1, 10, 50, 200, 500),
        "train_T": (10, 100, 1000),
        "label_counts": (1, 2, 4, None),
    },
    "paper": {
        "phantoms": {"n_train": 30, "n_test": 10, "n_unlabelled": 200,
                     "shape": (384, 384, 160), "spacing_xy": (0.8, 1.2), "spacing_z": (1.5, 3.0)},
        "spacing": (1.0, 1.0, 2.0),
        "bpr": {"steps": 20000, "batch_size": 16, "channels": (16, 32, 64, 128), "ape_patch": 64,
                "checkpoint_every": 1000},
        "bpr_kind": {"ape": {"channels": (16, 32, 64, 128), "ape_input_pool": 1, "steps": 10000, "anchor": "slice"}},
        "pretrain": {"steps": 100000, "patch_size": (128, 128, 32), "batch_size": 8, "base_channels": 16,
                     "num_levels": 6, "warmup_steps": 1000, "checkpoint_every": 2000, "log_every": 100,
                     "ema_decay": 0.999, "lr": 2e-4, "diffusion_steps": 1000, "feature_timesteps": (10,),
                     "device": "auto"},
        "probe": {"steps": 45000, "patch_size": (128, 128, 32), "batch_size": 7, "val_every": 3000,
                  "roi": (128, 128, 32), "overlap": 0.5, "hidden": 128, "val_from_train": 1, "lr": 3e-4,
                  "device": "auto"},
        "finetune": {"warmup_steps": 1000},
        "early_stopping": {"steps": 45000, "val_every": 3000, "patience": 5},
        "timesteps": (1, 5, 10, 25, 50, 100, 250, 500),
        "train_T": (10, 50, 100, 1000),
        "label_counts": (1, 2, 5, 10, None),
    },
}


def _bench_budget() -> dict[str, Any]:
    """``cpu-bench``: ``cpu-small`` with the pretraining budget, pools and test set of the benchmark."""
    b = copy.deepcopy(BUDGETS["cpu-small"])
    b["phantoms"].update(n_train=8, n_test=10, n_unlabelled=48)
    b["pretrain"].update(steps=1000, checkpoint_every=500, log_every=100)
    # pinned: the benchmark of docs/RESULTS.md was measured with the window-anchored APE (cpu-small's
    # BPR before the slice anchor: ape 300 steps, no slice override); its folders refuse another preset
    b["bpr_kind"] = {"ape": {"channels": (8, 16, 32), "steps": 300}}
    b["bpr"].pop("threads")  # one thread, as measured
    # pinned: the benchmark's tables were measured with noisy feature passes, the task's default (the
    # clean ones were measured on its folders by benchmarks/hypotheses.py --tests passes --only clean);
    # left out rather than spelled, so that its folders' saved settings still match the preset
    b["pretrain"].pop("feature_input")
    # pinned: its frozen probes were measured on 64^3 feature windows (cpu-small's one window per
    # volume was chosen later, on its seeds' validation cases)
    # pinned: its frozen heads trained 300 steps (cpu-small's 600 were chosen later, on held-out phantoms)
    b["probe"]["steps"] = 300
    b["probe"].pop("feature_roi")
    # pinned: and on the decoder pyramid (both sides were measured later, on its seeds' folders)
    b["probe"].pop("feature_side")
    # pinned: and with each window's own GroupNorm statistics (fixed ones were measured later, on its
    # folders), fine-tuned at the default backbone_lr (3e-4) that goes with them
    b["probe"].pop("norm_stats")
    b["finetune"].pop("backbone_lr")
    # compare: fine-tuned and from-scratch rows stop on the validation case, as in label-efficiency,
    # from a random head (as measured; cpu-small's LP-FT start was added later)
    b["tuned_early_stopping"] = True
    b.pop("finetune_init", None)
    # pinned: its fine-tuned rows train on patches (whole-volume LP-FT came later, for cpu-small)
    b.pop("lpft", None)
    b["finetune_steps"] = 150
    return b


BUDGETS["cpu-bench"] = _bench_budget()


def get_budget(name: str) -> dict[str, Any]:
    if name not in BUDGETS:
        raise VoxdiffError(f"unknown budget {name!r}; choose from {', '.join(BUDGETS)}")
    return copy.deepcopy(BUDGETS[name])
