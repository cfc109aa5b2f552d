"""The paper's experiments as resumable step sequences over the pipeline's functions.

Every experiment writes one folder::

    OUT/
      config.yaml                resolved ExperimentConfig (+ versions)
      phantoms/                  generated data when no --data was given
      cache/                     preprocessed volumes (int16 + JSON)
      bpr-ape/ bpr-slice/        body part regressors (each with result.json)
      pretrain-<method>/         pretrained backbones (each with result.json)
      probe-<method>-f<k>/...    probing runs: per-case x per-organ Dice of every head
      results.json, report.md, *.png

Each step finishes by writing ``result.json``; a step with one is skipped when the experiment is
run again, so an interrupted run resumes where it stopped. BPR training and pretraining steps
stopped half-way keep their checkpoints in ``OUT/.NAME.partial`` and continue from them.

Protocol: pretraining uses only the unlabelled set; probes train on the labelled training cases
(one of them held out to pick the best checkpoint) and are scored on the test cases. With
``folds=0`` the data set's own train/test split is used (nnU-Net ``imagesTr`` / ``imagesTs``);
with ``folds=k`` a seeded k-fold cross-validation over the labelled training cases is run and
results are given as mean +- std over folds. Dice is computed on the preprocessing grid (labels
resampled with nearest neighbour), per case and organ, NaN where an organ is absent from both.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from voxdiff.core.config import from_dict, to_dict, write_config
from voxdiff.core.errors import InputError
from voxdiff.core.outputs import check_output_path
from voxdiff.pretrain.tasks.diffusion import BPR_CONDITIONS, CONDITIONS

from .budgets import get_budget
from .runner import StepRunner

METHODS = ("diffusion-ape", "diffusion-slice", "diffusion-none", "diffusion-position", "restorative", "contrastive", "random")
HEADS = ("linear", "nonlinear")


@dataclass
class ExperimentConfig:
    """Settings shared by ``voxdiff experiment compare|timesteps|label-efficiency`` and ``voxdiff demo``.

    Args:
        budget: preset sizes of every stage: tiny | cpu-small | cpu-bench | paper.
        data: labelled data set (nnU-Net layout with imagesTr/labelsTr, and imagesTs/labelsTs when
            folds=0; or any layout voxdiff reads). Empty: phantoms are generated into OUT/phantoms.
        pretrain_data: unlabelled data folders for BPR training and pretraining. Empty: DATA/unlabelled
            when it exists (phantoms), else the images of DATA's training cases.
        methods: pretraining methods (diffusion-ape, diffusion-slice, diffusion-none, restorative,
            contrastive, random).
        heads: probing heads trained on the frozen features (linear, nonlinear, mix).
        scratch: also train the same network from scratch on the labelled cases (reference).
        finetune: methods whose pretrained backbone is also fine-tuned end to end with the non-linear
            head (compare: one "fine-tuned" row each; only those also in ``methods``).
        folds: 0 = the data set's train/test split; k > 0 = k-fold cross-validation over DATA's
            training cases.
        seed: seed of the phantoms, splits and every training run.
        seeds: compare: several training seeds (at least two). Each seed runs into OUT/seed-S on the
            same data (phantoms generated once, in OUT/phantoms) and the report gives mean ± std over
            seeds with paired tests between methods; ``seed`` is then unused.
        phantom_seed: seed of the generated phantoms.
        regime: generated phantoms only. iid: labelled, test and unlabelled phantoms from the same
            distribution; shifted: the labelled training phantoms from one acquisition setting (the
            budget's ``train_site``: one contrast phase, noise level, slice spacing and z-range, as
            when a user labels a few scans of one site), test and unlabelled ones across all.
        variation: generated phantoms only: ``default`` or ``wide`` (subjects and scans that vary as
            clinical CT does, with lesions, fatty liver, ascites; ``voxdiff phantom --variation``,
            docs/PHANTOMS.md). Combines with either regime.
        pretrain_steps: override the budget's pretraining steps.
        probe_steps: override the budget's probing steps.
        probe_fov_crops: frozen heads: field-of-view crops of each labelled case added to the cases
            they are fitted on (``voxdiff probe --sampling.fov_crops``; default the budget's, 0 in
            every preset). With 2,400 head steps, 64 crops per phantom at 1 and 2 labelled phantoms
            and 8 at all labels lifted frozen diffusion + APE by 10-16 test Dice on the benchmark
            (docs/RESULTS.md, "Field-of-view crops at 1, 2 and all labelled phantoms"); they cost one
            feature window each. Fine-tuning and from scratch ignore it.
        bpr_steps: override the budget's BPR steps.
        scratch_steps: override the budget's steps of the from-scratch reference.
        finetune_steps: override the budget's fine-tuning steps (compare).
        early_stopping_steps: label-efficiency: the most steps of the end-to-end runs (from scratch and
            fine-tuned alike) that train with early stopping on the validation case; default the
            budget's (``cpu-bench``: 1,200). Raise it where the report marks a kept step at the cap.
        early_stopping_min_steps: label-efficiency: those runs never stop before this many steps
            (default the budget's ``early_stopping`` ``min_steps``, else 0). Set it where a run stopped
            in its first few hundred steps, before the network left the near-zero Dice plateau.
            Equal to ``early_stopping_steps``, every run trains the same number of steps (matched
            compute) and keeps its best-validation state.
        selection: the checkpoint rule of the end-to-end runs (from scratch and fine-tuned): best
            (the best validation Dice), smoothed (the end of the best window of validations, see
            ``voxdiff probe --optim.selection``) or last (the final state).
        compare_selection: other checkpoint rules whose states the end-to-end runs score too, from
            the same training run (result.json ``by_selection``, tabled by
            ``benchmarks/selection_table.py``). Costs one more scoring of the test cases per rule.
        end_to_end: probe settings of the end-to-end rows (fine-tuned and from scratch alike), over
            the budget's ``end_to_end`` section: e.g. ``{"patch_size": [80, 80, 48], "batch_size": 1,
            "roi": [96, 96, 96]}`` trains them on larger patches and validates and scores them with
            larger sliding windows (docs/RESULTS.md, "Larger patches for the end-to-end rows"). The
            frozen heads do not use it.
        timesteps: timesteps experiment: feature timesteps t (default from the budget).
        train_T: timesteps experiment: numbers of diffusion steps T used in training (default from the budget).
        timestep_method: timesteps experiment: the diffusion method whose features are swept.
        label_counts: label-efficiency experiment: numbers of labelled training cases (0 = all).
        label_methods: label-efficiency experiment: the pretrained methods compared with from-scratch
            (each probed frozen with ``heads`` and fine-tuned).
        workers: worker processes for phantom generation / preprocessing.
        progress: show progress bars.
        jobs: compare, label-efficiency and the demo: processes that run independent steps side by side, each with
            cores / jobs torch threads (0 = auto: 2 on a CPU with at least 8 cores, else 1).
            The results do not depend on it. See voxdiff.experiments.lanes.
    """

    budget: str = "cpu-small"
    data: str = ""
    pretrain_data: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("diffusion-ape", "diffusion-none", "restorative", "contrastive", "random")
    heads: tuple[str, ...] = HEADS
    scratch: bool = True
    finetune: tuple[str, ...] = ("diffusion-ape", "contrastive")
    folds: int = 0
    seed: int = 0
    seeds: tuple[int, ...] = ()
    phantom_seed: int = 0
    regime: str = "iid"
    variation: str = "default"
    pretrain_steps: int | None = None
    probe_steps: int | None = None
    probe_fov_crops: int | None = None
    bpr_steps: int | None = None
    scratch_steps: int | None = None
    finetune_steps: int | None = None
    early_stopping_steps: int | None = None
    early_stopping_min_steps: int | None = None
    selection: str = "best"
    compare_selection: tuple[str, ...] = ()
    end_to_end: dict[str, Any] = dataclasses.field(default_factory=dict)
    timesteps: tuple[int, ...] = ()
    train_T: tuple[int, ...] = ()
    timestep_method: str = "diffusion-ape"
    label_counts: tuple[int, ...] = ()
    label_methods: tuple[str, ...] = ("diffusion-ape", "contrastive")
    workers: int = 2
    progress: bool = True
    jobs: int = 1


def variant_key(overrides: dict[str, Any]) -> str:
    """A short stable name for a dict of setting overrides."""
    import hashlib
    import json

    return hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]


def method_parts(method: str) -> tuple[str, str | None]:
    """'diffusion-ape' -> ('diffusion', 'ape'); 'restorative' -> ('restorative', None)."""
    if method.startswith("diffusion"):
        cond = method.split("-", 1)[1] if "-" in method else "none"
        if cond not in CONDITIONS:
            raise InputError(None, f"unknown diffusion condition in method {method!r} ({', '.join(CONDITIONS)})")
        return "diffusion", cond
    if method not in ("restorative", "contrastive", "random"):
        raise InputError(None, f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return method, None


REGIMES = ("iid", "shifted")

# ExperimentConfig fields that change how an experiment runs, not its results: a folder may be
# resumed with other values
RUNTIME_FIELDS = frozenset({"workers", "progress", "jobs"})

# ExperimentConfig fields that only choose which rows an experiment reports, each row from steps of
# its own (named by method, label count, ...): a folder may be resumed with more of them (the new
# rows' steps run, the finished ones are kept), never with fewer. Not ``heads``: one probe step fits
# every head, so a head added later would find the step finished without it.
ROW_FIELDS = frozenset({"methods", "finetune", "scratch", "label_counts", "label_methods"})


def setting_conflicts(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings of config ``new`` that a folder made with ``saved`` cannot be resumed with: every
    field that differs, except row fields that keep every saved row (``scratch``: False -> True) and
    ``seeds`` that keep every saved seed (a folder of seeds 0-2 takes 0-4; a single-seed folder takes
    no seed list, since its report would be replaced by the seeds' one)."""
    bad = []
    for k in sorted(set(saved) | set(new)):
        a, b = saved.get(k), new.get(k)
        if k == "seeds":
            lost = list(a or ()) != list(b or ()) and not (a and set(a) <= set(b or ()))
        elif k not in ROW_FIELDS:
            lost = a != b
        elif isinstance(a, bool) or isinstance(b, bool):
            lost = bool(a) and not b
        else:
            lost = not set(a or ()) <= set(b or ())
        if lost:
            bad.append(k)
    return bad

# the shifted regime's labelled site (phantom settings; test and unlabelled phantoms keep the
# generator's full ranges): portal venous phase at a typical enhancement, one noise level and
# reconstruction, 5 mm slices, abdomen-only scans
TRAIN_SITE: dict[str, Any] = {"phases": ["portal_venous"], "phase_weights": [1.0], "enhancement": [0.95, 1.05],
                              "noise_hu": [10.0, 11.0], "blur_mm": [0.8, 0.9], "spacing_z": [5.0, 5.0],
                              "z_modes": ["abdomen"], "z_mode_weights": [1.0]}


class Experiment:
    """Shared machinery: data, cached preprocessing, BPR / pretraining / probing steps."""

    def __init__(self, cfg: ExperimentConfig, out: str | Path, force: bool = False, log: Callable[[str], None] = print,
                 budget: dict[str, Any] | None = None):
        """``budget``: the stage settings to use instead of the preset named by ``cfg.budget`` (to
        reopen a finished folder with the settings saved in its config.yaml after a preset changed)."""
        self.cfg = cfg
        self.out = Path(out)
        self.log = log
        self.budget = get_budget(cfg.budget) if budget is None else budget
        for m in (*cfg.methods, *cfg.finetune, *cfg.label_methods):
            method_parts(m)
        from voxdiff.probe.train import SELECTIONS

        for rule in (cfg.selection, *cfg.compare_selection):
            if rule not in SELECTIONS:
                raise InputError(None, f"unknown checkpoint rule {rule!r}; choose from {', '.join(SELECTIONS)}")
        if cfg.regime not in REGIMES:
            raise InputError(None, f"unknown regime {cfg.regime!r}; choose from {', '.join(REGIMES)}")
        if cfg.end_to_end:  # refused now, not after pretraining, when the first end-to-end row starts
            try:
                for mode in ("scratch", "finetune"):
                    self.tuned_cfg(mode)
            except (TypeError, ValueError) as e:
                raise InputError(None, f"end_to_end: {e}") from None
        from voxdiff.data.phantom import VARIATIONS

        if cfg.variation not in VARIATIONS:
            raise InputError(None, f"unknown phantom variation {cfg.variation!r}; choose from {', '.join(sorted(VARIATIONS))}")
        self._claim_folder(force)
        self.runner = StepRunner(self.out, log=log)
        write_config(self.out / "config.yaml", cfg, extra={"budget_settings": self.budget})
        self._cases: dict[str, list] = {}
        self.keep_bundles = True  # write a segmenter bundle per probe (voxdiff segment can use it)
        self.t0 = time.perf_counter()

    @classmethod
    def reopen(cls, folder: str | Path, log: Callable[[str], None] | None = None) -> Experiment:
        """A finished (or partly finished) experiment folder, with the config and budget settings saved
        in its config.yaml (so a preset changed since does not refuse it); for scripts that reuse its
        steps (``benchmarks/``)."""
        import yaml

        folder = Path(folder)
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        cfg = from_dict(ExperimentConfig, saved["config"], strict=False)  # fields renamed since are ignored
        return cls(cfg, folder, log=log or (lambda *a: None), budget=saved["budget_settings"])

    def refit_frozen(self, ext, pcfg=None, heads: Sequence[str] = ("nonlinear",), voxels: int | None = None,
                     fold: int = 0) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
        """Frozen heads fitted on ``ext`` as ``compare`` fits them (voxel sampling on whole-volume
        features of the fold's training cases, checkpoint chosen on its validation cases), scored on
        the validation and test cases: ``{"val": scores, "test": scores}`` (see :meth:`score`)."""
        from voxdiff.probe.voxel import fit_heads_voxels

        train, val, test = self.folds()[fold]
        pcfg = self.probe_cfg() if pcfg is None else pcfg
        vox = int(self.budget.get("probe_voxels", 8192) if voxels is None else voxels)
        fitted = fit_heads_voxels(ext, train, val, tuple(heads), pcfg, progress=False, voxels_per_step=vox)
        return {"val": self.score(ext, fitted, val, pcfg, volume=True),
                "test": self.score(ext, fitted, test, pcfg, volume=True)}

    def _claim_folder(self, force: bool) -> None:
        """Resume an experiment folder made with the same config, or one that only adds rows (more methods,
        fine-tuned rows, label counts, ...: :data:`ROW_FIELDS`); refuse anything else unless forced."""
        import shutil

        import yaml

        saved = self.out / "config.yaml"

        def results_part(cfg: Any) -> Any:
            """The settings that shape results (not how they are run); empty ``label_counts`` spelled
            out as the budget's, so that naming them is neither more nor fewer rows."""
            if not isinstance(cfg, dict):
                return cfg
            out = {k: v for k, v in cfg.items() if k not in RUNTIME_FIELDS}
            # the same folder given relative or absolute (or through a symlink) is the same data
            if out.get("data"):
                out["data"] = str(Path(out["data"]).resolve())
            out["pretrain_data"] = [str(Path(p).resolve()) for p in out.get("pretrain_data") or ()]
            counts = out.get("label_counts") or self.budget.get("label_counts") or ()
            out["label_counts"] = [int(c or 0) for c in counts]  # 0 (or None in a budget): all
            return out

        mine = {"config": results_part(to_dict(self.cfg)), "budget_settings": to_dict(self.budget)}

        def conflicts() -> list[str]:
            """The settings that differ from the folder's (row fields only when rows would be lost)."""
            doc = yaml.safe_load(saved.read_text()) or {}
            cfg = doc.get("config")
            if isinstance(cfg, dict):  # a folder made before fields were added/renamed: compare with their defaults
                try:
                    cfg = to_dict(from_dict(ExperimentConfig, cfg, strict=False))
                except (TypeError, ValueError):
                    pass
            if not isinstance(cfg, dict):
                return ["config"]
            bad = [] if doc.get("budget_settings") == mine["budget_settings"] else ["budget settings"]
            return bad + setting_conflicts(results_part(cfg), mine["config"])

        if self.out.exists() and any(self.out.iterdir()):
            if not saved.is_file():
                # not one of our experiment folders: never mix with a user's files
                check_output_path(self.out, force=force, inputs=(self.cfg.data or None,))
                bad: list[str] = []
            else:
                bad = conflicts()
                if bad and not force:
                    raise InputError(self.out, f"experiment folder was made with other settings ({', '.join(bad)}); "
                                               "use another --out, or --force to start it over")
            if force and (not saved.is_file() or bad):
                shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------- data
    def data_origin(self) -> dict[str, str]:
        """``{"training_data": "phantoms"}`` when the experiment runs on generated phantoms (recorded
        in its segmenter bundles, so that ``voxdiff segment`` can say so on real CT), else empty."""
        from voxdiff.data.phantom import training_data_record

        return training_data_record(self.cfg.data or None)

    def data_dir(self) -> Path:
        if self.cfg.data:
            p = Path(self.cfg.data)
            if not p.exists():
                raise InputError(p, "data folder not found")
            return p

        def make(tmp: Path) -> dict[str, Any]:
            from voxdiff.data.phantom import PhantomConfig, make_phantom_dataset, with_variation

            ph = dict(self.budget["phantoms"])
            counts = {k: ph.pop(k) for k in ("n_train", "n_test", "n_unlabelled")}
            site = dict(self.budget.get("train_site") or TRAIN_SITE) if self.cfg.regime == "shifted" else None
            pcfg = with_variation(from_dict(PhantomConfig, ph), self.cfg.variation)
            make_phantom_dataset(tmp / "data", seed=self.cfg.phantom_seed, cfg=pcfg, force=True,
                                 workers=self.cfg.workers, preview=True, progress=self.cfg.progress,
                                 train_site=site, **counts)
            return {"counts": counts, "train_site": site}

        self.runner.run("phantoms", make)
        return self.out / "phantoms" / "data"

    @property
    def preprocess(self):
        from voxdiff.data.preprocess import PreprocessConfig

        return PreprocessConfig(spacing=tuple(self.budget["spacing"]))

    def cases(self, which: str) -> list:
        """Preprocessed cases: 'train' / 'test' (labelled) or 'unlabelled'."""
        if which in self._cases:
            return self._cases[which]
        from voxdiff.data.adapters import open_dataset
        from voxdiff.data.cache import load_preprocessed

        data = self.data_dir()
        cache = self.out / "cache"
        if which == "unlabelled":
            srcs = [Path(p) for p in self.cfg.pretrain_data] or (
                [data / "unlabelled"] if (data / "unlabelled").is_dir() else [data])
            out = []
            for s in srcs:
                if s == data:
                    ds = open_dataset(s, split="train")
                    ds.refs = [dataclasses.replace(r, label_path=None) for r in ds.refs]
                else:
                    ds = open_dataset(s)
                out += load_preprocessed(ds, self.preprocess, cache_dir=cache, progress=self.cfg.progress)
            for c in out:
                c.label = None
        else:
            ds = open_dataset(data, split=which)
            ds.refs = [r for r in ds.refs if r.label_path is not None]
            if not ds.refs:
                raise InputError(data, f"no labelled {which} cases (folds=0 needs imagesTs/labelsTs)")
            out = load_preprocessed(ds, self.preprocess, cache_dir=cache, progress=self.cfg.progress)
        self._cases[which] = out
        return out

    def folds(self) -> list[tuple[list, list, list]]:
        """(train, val, test) preprocessed cases per fold."""
        from voxdiff.data.splits import make_splits

        train = self.cases("train")
        n_val = int(self.budget["probe"].get("val_from_train", 1))
        if self.cfg.folds == 0:
            folds_ids = [{"train": [c.case_id for c in train], "test": [c.case_id for c in self.cases("test")]}]
            pool = {c.case_id: c for c in train + self.cases("test")}
        else:
            ids = sorted(c.case_id for c in train)
            folds_ids = [{"train": f["train"], "test": f["val"]} for f in make_splits(ids, "kfold", k=self.cfg.folds, seed=self.cfg.seed)]
            pool = {c.case_id: c for c in train}
        out = []
        for k, f in enumerate(folds_ids):
            rng = np.random.default_rng(self.cfg.seed + k)
            tr = [f["train"][i] for i in rng.permutation(len(f["train"]))]
            if len(tr) <= n_val:
                raise InputError(None, f"fold {k}: {len(tr)} training case(s) cannot spare {n_val} for validation")
            val, tr = tr[:n_val], tr[n_val:]
            out.append(([pool[i] for i in sorted(tr)], [pool[i] for i in val], [pool[i] for i in f["test"]]))
        return out

    # ------------------------------------------------------------------------------- BPR
    def bpr_config(self, kind: str, **over: Any):
        """The :class:`BPRTrainConfig` of a ``kind`` BPR at this budget (``over``: field overrides)."""
        from voxdiff.bpr.train import BPRTrainConfig

        opts = {**self.budget["bpr"], **self.budget.get("bpr_kind", {}).get(kind, {})}
        if self.cfg.bpr_steps is not None:
            opts["steps"] = int(self.cfg.bpr_steps)
        opts.update(kind=kind, spacing=tuple(self.budget["spacing"]), seed=self.cfg.seed)
        opts.update(over)
        return from_dict(BPRTrainConfig, opts)

    def bpr(self, kind: str, **over: Any) -> Path:
        """The trained ``kind`` BPR's model folder (trained first unless done); with field overrides
        ``over``, a variant kept in ``OUT/variants/`` (see ``benchmarks/probe_variants.py``)."""
        name = f"bpr-{kind}" + (f"-{variant_key(over)}" if over else "")
        name = f"variants/{name}" if over else name
        slice_model: str | None = None
        if not self.runner.done(name):
            want = self.bpr_config(kind, **over)
            if want.kind == "ape" and want.task.anchor == "slice" and not want.task.slice_model:
                # the S anchor of the ape model: the experiment's own slice model (trained first unless done)
                slice_model = str(self.bpr("slice"))

        def run(tmp: Path) -> dict[str, Any]:
            from voxdiff.bpr.train import can_resume, train_bpr

            bcfg = self.bpr_config(kind, **over)
            if slice_model is not None:
                bcfg.task.slice_model = slice_model
            # an interrupted run's checkpoint (one of the format before the engine: trained again)
            resume = can_resume(tmp / "model")
            train_bpr(bcfg, tmp / "model", cases=self.cases("unlabelled"), resume=resume, force=not resume,
                      progress=self.cfg.progress)
            res: dict[str, Any] = {"kind": kind, "steps": bcfg.optim.steps}
            try:  # quality on the labelled test cases (landmarks from labels), when available
                from voxdiff.bpr import load_bpr
                from voxdiff.bpr.quality import ape_quality, slice_quality

                model = load_bpr(tmp / "model")
                test = self.cases("test") if self.cfg.folds == 0 else self.cases("train")
                res["quality"] = slice_quality(model, test) if kind == "slice" else ape_quality(model, test)
            except Exception as e:  # quality is informative only; never fail the experiment on it
                res["quality_error"] = f"{type(e).__name__}: {e}"
            return res

        self.runner.run(name, run, resumable=True)
        return self.out / name / "model"

    # ------------------------------------------------------------------------------- pretraining
    def pretrain_config(self, method: str, diffusion_steps: int | None = None, **over: Any):
        """The :class:`PretrainConfig` of ``method`` at this budget (``over``: field overrides)."""
        from voxdiff.pretrain.train import PretrainConfig

        base, cond = method_parts(method)
        opts = dict(self.budget["pretrain"])
        if self.cfg.pretrain_steps is not None:
            opts["steps"] = int(self.cfg.pretrain_steps)
        opts.update(self.budget.get("pretrain_method", {}).get(base, {}))
        opts.update(method=base, seed=self.cfg.seed, preprocess=to_dict(self.preprocess))
        if base == "diffusion":
            opts["condition"] = cond
            if cond in BPR_CONDITIONS:  # position and none need no body part regressor
                opts["bpr_path"] = str(self.bpr(cond))
            if diffusion_steps:
                T = int(diffusion_steps)
                opts["diffusion_steps"] = T
                # keep the noise level of the features comparable: t / T as at the budget's T
                ref_T = int(self.budget["pretrain"].get("diffusion_steps", 1000))
                scaled = (min(T - 1, max(0, round(t * T / ref_T))) for t in self.budget["pretrain"]["feature_timesteps"])
                opts["feature_timesteps"] = tuple(dict.fromkeys(scaled))  # several t may meet at a short T
        else:
            for k in ("diffusion_steps", "feature_timesteps", "feature_input"):
                opts.pop(k, None)
        opts.update(over)
        if opts.get("data") and not opts.get("cache_dir"):
            opts["cache_dir"] = str(self.out / "cache")
        return from_dict(PretrainConfig, opts)

    def pretrained(self, method: str, diffusion_steps: int | None = None, **over: Any) -> Path:
        """The pretrained backbone's model folder (pretrained first unless done); with field
        overrides ``over``, a variant kept in ``OUT/variants/``."""
        base, _ = method_parts(method)
        name = f"pretrain-{method}" + (f"-T{diffusion_steps}" if diffusion_steps else "")
        name = f"variants/{name}-{variant_key(over)}" if over else name

        def run(tmp: Path) -> dict[str, Any]:
            from voxdiff.core.trainstate import latest_train_state
            from voxdiff.pretrain.train import pretrain

            pcfg = self.pretrain_config(method, diffusion_steps, **over)
            resume = latest_train_state(tmp / "model" / "train_state") is not None  # an interrupted run's
            # the experiment's unlabelled set, unless the overrides name other pretraining data
            cases = None if pcfg.data.paths else self.cases("unlabelled")
            pretrain(pcfg, tmp / "model", resume=resume, progress=self.cfg.progress, force=not resume, cases=cases)
            res = {"method": method, "steps": pcfg.optim.steps if base != "random" else 0}
            log = tmp / "model" / "metrics.jsonl"
            if log.is_file():
                import json

                lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
                if lines:
                    res["first_loss"] = lines[0].get("loss")
                    res["last_loss"] = lines[-1].get("loss")
            return res

        self.runner.run(name, run, resumable=True)
        return self.out / name / "model"

    # ------------------------------------------------------------------------------- probing
    def probe_cfg(self, **over: Any):
        from voxdiff.probe.train import ProbeConfig

        opts = dict(self.budget["probe"])
        if self.cfg.probe_steps is not None:
            opts["steps"] = int(self.cfg.probe_steps)
        if self.cfg.probe_fov_crops is not None:
            opts["fov_crops"] = int(self.cfg.probe_fov_crops)
        opts["seed"] = self.cfg.seed
        opts.update(over)
        return from_dict(ProbeConfig, opts)

    def probe(self, name: str, model_dir: Path, fold: int, heads: tuple[str, ...], timesteps: tuple[int, ...] | None = None,
              n_train: int | None = None) -> dict[str, Any]:
        """Fit frozen heads on one fold and score them on its test cases."""

        def run(tmp: Path) -> dict[str, Any]:
            from voxdiff.features.extract import (
                feature_input_of,
                feature_side_of,
                feature_timesteps,
                with_feature_settings,
                with_timesteps,
            )
            from voxdiff.features.norm import fixed_norm_stats, norm_stats_of
            from voxdiff.pretrain.load import load_pretrained
            from voxdiff.probe.heads import count_parameters
            from voxdiff.probe.train import fit_heads

            train, val, test = self.folds()[fold]
            if n_train:
                train = train[:n_train]
            pcfg = self.probe_cfg()
            ext = load_pretrained(model_dir, device=pcfg.runtime.device)
            with_feature_settings(ext, pcfg)  # the probe settings' t, feature_input and feature_side, as `voxdiff probe`
            if timesteps is not None:
                with_timesteps(ext, timesteps)
            hist: list = []
            if self.voxel_mode:
                from voxdiff.probe.voxel import fit_heads_voxels

                fitted = fit_heads_voxels(ext, train, val, heads, pcfg, progress=self.cfg.progress, history=hist,
                                          voxels_per_step=int(self.budget.get("probe_voxels", 8192)))
            else:
                fitted = fit_heads(ext, train, val, heads, pcfg, progress=self.cfg.progress, history=hist)
            scores = self.score(ext, fitted, test, pcfg, volume=self.voxel_mode)
            if self.keep_bundles:
                from voxdiff.probe.bundle import save_segmenter
                from voxdiff.probe.train import volume_roi

                for h, m in fitted.items():
                    roi = volume_roi(pcfg) if self.voxel_mode else pcfg.inference.roi
                    save_segmenter(tmp / f"segmenter-{h}", model_dir, m, h, ext.preprocess, roi, pcfg.inference.overlap,
                                   meta={"experiment_step": name, **self.data_origin()}, inference="volume" if self.voxel_mode else "window",
                                   timesteps=feature_timesteps(ext), feature_input=feature_input_of(ext),
                                   feature_side=feature_side_of(ext), norm_stats=fixed_norm_stats(ext.backbone))
            return {"fold": fold, "train_cases": [c.case_id for c in train], "val_cases": [c.case_id for c in val],
                    "test_cases": [c.case_id for c in test], "timesteps": feature_timesteps(ext),
                    "norm_stats": norm_stats_of(ext),
                    "head_parameters": {h: count_parameters(m) for h, m in fitted.items()},
                    "backbone_parameters": count_parameters(ext.backbone), "scores": scores,
                    "history": hist}

        return self.runner.run(name, run)

    def tuned_cfg(self, mode: str, early_stopping: bool = False, from_probe: bool = False):
        """The :class:`ProbeConfig` of fine-tuning (``finetune``) or from-scratch training (``scratch``).

        Plain: the budget's ``finetune_steps`` / ``scratch_steps`` (config overrides win) with the
        budget's ``end_to_end`` settings (both modes; the config's ``end_to_end`` over them) and, for
        fine-tuning, its ``finetune`` settings. ``early_stopping``: the budget's ``early_stopping`` settings
        (maximum steps, validation interval, patience, minimum steps; ``early_stopping_steps`` and
        ``early_stopping_min_steps`` override the maximum and the minimum for both modes), as the
        label-efficiency experiment trains to convergence with the best-validation checkpoint.
        ``from_probe``: fine-tuning starts from the frozen probe's head (LP-FT); for the fixed-step
        rows of ``compare`` and the demo the budget's ``lpft`` settings then apply over its ``finetune``
        ones (label-efficiency's rows, trained to convergence, keep the settings they were measured with)."""
        over: dict[str, Any] = dict(self.budget.get("end_to_end", {}))
        if self.cfg.end_to_end:
            over.update(self.cfg.end_to_end)
        if mode == "finetune":
            over.update(self.budget.get("finetune", {}))
            if from_probe and not early_stopping:
                over.update(self.budget.get("lpft", {}))
        if early_stopping:
            over.update(self.budget.get("early_stopping", {}))
            if self.cfg.early_stopping_steps is not None:
                over["steps"] = int(self.cfg.early_stopping_steps)
            if self.cfg.early_stopping_min_steps is not None:
                over["min_steps"] = int(self.cfg.early_stopping_min_steps)
        else:
            key, cfg_steps = ("scratch_steps", self.cfg.scratch_steps) if mode == "scratch" else (
                "finetune_steps", self.cfg.finetune_steps)
            steps = cfg_steps if cfg_steps is not None else self.budget.get(key, self.budget.get("scratch_steps"))
            if steps is not None:
                over["steps"] = int(steps)
        over["selection"] = self.cfg.selection
        return self.probe_cfg(**over)

    def tuned(self, name: str, fold: int, mode: str, model_dir: Path | None = None, n_train: int | None = None,
              early_stopping: bool = False, init_probe: str | None = None,
              also_score: dict[str, list] | None = None) -> dict[str, Any]:
        """Backbone + non-linear head trained end to end on one fold and scored on its test cases:
        ``finetune`` starts from the pretrained ``model_dir``; ``scratch`` from random init (the
        same architecture). The state of the ``selection`` rule is scored (and, under ``by_selection``,
        those of the ``compare_selection`` rules). ``init_probe``: fine-tuning starts from the
        non-linear head of this (finished) probe step of the same backbone and fold (LP-FT).
        ``also_score``: more labelled case sets (name -> cases, e.g. held-out phantoms) the selected
        state is scored on as the test cases are (under ``also_scores``; the trained network is not
        kept, so this is the only time they can be scored)."""

        def run(tmp: Path) -> dict[str, Any]:
            from voxdiff.pretrain.load import load_pretrained
            from voxdiff.probe.bundle import load_segmenter_head
            from voxdiff.probe.train import fit_network

            train, val, test = self.folds()[fold]
            if n_train:
                train = train[:n_train]
            src = self.pretrained("random") if mode == "scratch" else model_dir
            if src is None:
                raise ValueError("fine-tuning needs a pretrained model folder")
            pcfg = self.tuned_cfg(mode, early_stopping, from_probe=bool(init_probe))
            ext = load_pretrained(src, device=pcfg.runtime.device)
            hist: list = []
            init = load_segmenter_head(self.out / init_probe / "segmenter-nonlinear") if init_probe else None
            alts: dict[str, Any] | None = {r: None for r in self.cfg.compare_selection} or None
            tuned, head = fit_network(ext, train, val, mode, pcfg, progress=self.cfg.progress, history=hist,
                                      init_head=init, alternatives=alts)
            whole = bool(pcfg.sampling.whole_volume)  # scored in the window it trained in
            scores = self.score(tuned, {mode: head}, test, pcfg, volume=whole)
            from voxdiff.features.norm import norm_stats_of

            out = {"fold": fold, "mode": mode, "init": init_probe or "random", "norm_stats": norm_stats_of(tuned),
                   "train_cases": [c.case_id for c in train],
                   "val_cases": [c.case_id for c in val], "test_cases": [c.case_id for c in test],
                   "max_steps": pcfg.optim.steps, "steps_run": getattr(head, "steps_run", None),
                   "selection": pcfg.optim.selection, "best_step": getattr(head, "best_step", None),
                   "best_val_dice": getattr(head, "best_val_dice", None), "scores": scores, "history": hist}
            if also_score:
                out["also_scores"] = {k: self.score(tuned, {mode: head}, cases, pcfg, volume=whole)
                                      for k, cases in also_score.items()}
            if alts:
                # states kept at the same step are the same state: each step is scored once
                by_step = {head.best_step: scores}
                out["by_selection"] = {}
                for r, (e, h) in alts.items():
                    if h.best_step not in by_step:
                        by_step[h.best_step] = self.score(e, {mode: h}, test, pcfg, volume=whole)
                    out["by_selection"][r] = {"best_step": h.best_step, "val_score": h.best_val_dice,
                                              "scores": by_step[h.best_step]}
            return out

        return self.runner.run(name, run)

    def scratch(self, name: str, fold: int, n_train: int | None = None, early_stopping: bool = False) -> dict[str, Any]:
        """The same backbone + non-linear head trained end to end from random init (scores under "scratch")."""
        return self.tuned(name, fold, "scratch", n_train=n_train, early_stopping=early_stopping)

    @property
    def voxel_mode(self) -> bool:
        """Frozen heads trained on voxel samples of whole-volume features (default) or on patches."""
        return self.budget.get("probe_mode", "voxels") == "voxels"

    def score(self, ext, heads: dict, test: list, pcfg, volume: bool = False) -> dict[str, dict[str, dict[str, float]]]:
        """Dice per head, case and organ (``{head: {case_id: {"1": dice, ...}}}``, NaN where an organ is
        absent) of ``heads`` on ``ext``'s features of the cases ``test``: whole-volume features
        (``volume``, as the voxel probe trains) or sliding windows."""
        from voxdiff.evaluate.metrics import dice_per_class
        from voxdiff.probe.predict import logits_to_labels, predict_logits, unit_image
        from voxdiff.probe.voxel import predict_logits_volume

        out: dict[str, dict[str, dict[str, float]]] = {h: {} for h in heads}
        for case in test:
            unit = unit_image(case, ext.preprocess.hu_window)
            if volume:
                logits = predict_logits_volume(ext, dict(heads), unit, pcfg)
            else:
                logits = predict_logits(ext, dict(heads), unit, pcfg.inference.roi, pcfg.inference.overlap)
            for h, lg in logits.items():
                pred = logits_to_labels(lg)
                out[h][case.case_id] = {str(k): v for k, v in dice_per_class(pred, case.label, pcfg.n_classes).items()}
        return out

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def mean_of_cases(scores: dict[str, dict[str, float]]) -> float:
    """Mean over cases of each case's mean Dice over the organs it has (one head's :meth:`Experiment.score`)."""
    from voxdiff.evaluate.metrics import aggregate_cases

    return float(aggregate_cases(scores_to_per_case(scores))["mean_of_cases"])


def scores_to_per_case(scores: dict[str, dict[str, float]]) -> dict[str, dict[int, float]]:
    return {cid: {int(k): (float("nan") if v is None else float(v)) for k, v in d.items()} for cid, d in scores.items()}


