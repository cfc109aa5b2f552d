"""BPRTrainConfig in sections: the flat layout of configs saved before the sections still loads
(config.yaml, train states, budgets) and trains the same model bit for bit; the command line takes
the nested options and the old flat ones (hidden, with a warning)."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch
import yaml
from bpr_helpers import z_textured_case

from voxdiff.bpr import load_bpr, train_bpr
from voxdiff.bpr.train import BPRData, BPRModel, BPROptim, BPRTaskOptions, BPRTrainConfig, engine_config, resolved
from voxdiff.core.config import flat_names, flatten, from_dict, from_namespace, read_config, to_dict, write_config
from voxdiff.core.errors import InputError, ModelError, VoxdiffDeprecationWarning
from voxdiff.core.sections import RuntimeConfig
from voxdiff.core.trainstate import latest_train_state
from voxdiff.data.preprocess import PreprocessConfig
from voxdiff.experiments.budgets import BUDGETS

# a config.yaml's "config" as written before the sections (every field, flat; resolved as training writes it)
FLAT = {
    "kind": "slice", "data": "", "extra_data": [], "extra_ratio": None, "cache_dir": None,
    "spacing": [3.0, 3.0, 3.0], "hu_window": [-1350.0, 1000.0], "crop_to_body": True, "channels": [4, 4, 4],
    "ape_input_pool": 2, "steps": 6, "batch_size": 2, "lr": 0.002, "weight_decay": 0.0001, "slice_patch": 16,
    "slices_per_sample": 4, "ape_patch": 64, "ape_patch_min": None, "ape_points": 256, "ape_crops": 4, "zoom": 1.15,
    "intensity_aug": 0.5, "texture_aug": 0.0, "heuristic_b": 0.01, "w_order": 1.0, "w_distance": 0.05,
    "w_consistency": 0.03, "calib_range_mm": 300.0, "anchor": "window", "slice_model": None, "anchor_knots": 8,
    "anchor_fit": "line", "anchor_slope_range": [0.7, 1.3], "checkpoint_every": 2, "seed": 1, "threads": 1,
}

NESTED = BPRTrainConfig(
    kind="slice", seed=1,
    data=BPRData(batch_size=2, slice_patch=16, slices_per_sample=4, zoom=1.15),
    preprocess=PreprocessConfig(spacing=(3.0, 3.0, 3.0)),
    optim=BPROptim(steps=6),
    model=BPRModel(channels=(4, 4, 4)),
    task=BPRTaskOptions(w_order=1.0, w_distance=0.05, w_consistency=0.03, anchor_fit="line"),  # an old config keeps its fit
    runtime=RuntimeConfig(device="cpu", threads=1, bf16=False, log_every=1, checkpoint_every=2, keep_checkpoints=1),
)


def _flat(cfg: BPRTrainConfig) -> dict:
    """``cfg`` in the layout written before the sections (the inverse of the flat names)."""
    back = {path: name for name, path in flat_names(BPRTrainConfig).items()}
    back.update({path: name for name, path in BPRTrainConfig.FLAT_NAMES.items()})
    back["data.path"] = "data"
    return {back.get(k, k): v for k, v in flatten(BPRTrainConfig, to_dict(cfg)).items()}


@pytest.fixture(scope="module")
def cases():
    return [z_textured_case(s, shape=(24, 24, 20)) for s in range(3)]


def test_flat_and_nested_layouts_give_one_config(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # saved configs load silently
        assert from_dict(BPRTrainConfig, FLAT) == NESTED
    new_only = {"warmup_steps", "min_lr_ratio", "grad_clip", "ema_decay", "body_threshold_hu", "body_margin_mm",
                "device", "bf16", "compile", "log_every", "keep_checkpoints", "tensorboard", "anchor_bandwidth_mm",
                "slice_context", "slice_context_step", "slice_fov_aug", "slice_fov_pair", "slice_trunc_aug", "members",
                "slice_fov_pair_range", "consistency_stop_grad", "slice_teacher", "w_distill", "slice_context_fill"}
    flat = _flat(NESTED)
    assert {k: v for k, v in flat.items() if k not in new_only} == FLAT  # every old field has its place
    assert {k: flat[k] for k in ("grad_clip", "min_lr_ratio", "log_every", "keep_checkpoints")} == {
        "grad_clip": 5.0, "min_lr_ratio": 0.05, "log_every": 1, "keep_checkpoints": 1}  # what was hard-coded
    d = to_dict(NESTED)
    assert set(d) == {"kind", "seed", "members", "data", "preprocess", "optim", "model", "task", "runtime"}
    assert d["optim"]["steps"] == 6 and d["data"]["path"] == "" and d["runtime"]["checkpoint_every"] == 2
    assert from_dict(BPRTrainConfig, d) == NESTED
    write_config(tmp_path / "new", NESTED)
    assert read_config(tmp_path / "new" / "config.yaml", BPRTrainConfig) == NESTED
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({"config": FLAT, "config_class": "voxdiff.bpr.train.BPRTrainConfig"}))
    assert read_config(tmp_path / "old.yaml", BPRTrainConfig) == NESTED
    # the data folders: `data` is the section's path, `extra_data` its extra folders
    cfg = from_dict(BPRTrainConfig, {"data": "a", "extra_data": ["b", "c"], "extra_ratio": 0.5})
    assert cfg.data == BPRData(path="a", extra=("b", "c"), extra_ratio=0.5)


def test_null_steps_and_batch_resolve_per_kind_and_the_warmup_is_five_percent():
    for kind, steps, batch in (("slice", 2400, 8), ("ape", 1200, 4)):
        cfg = BPRTrainConfig(kind=kind)
        assert cfg.optim.steps is None and cfg.data.batch_size is None and cfg.optim.warmup_steps is None
        r = resolved(cfg)
        assert (r.optim.steps, r.data.batch_size, r.optim.warmup_steps) == (steps, batch, steps // 20)
        e = engine_config(cfg, progress=False)
        assert (e.steps, e.warmup_steps, e.grad_clip, e.ema_decay, e.min_lr_ratio) == (steps, steps // 20, 5.0, None, 0.05)
        assert (e.device, e.threads, e.bf16, e.log_every, e.checkpoint_every, e.keep_checkpoints) == ("cpu", 1, False, 1, 100, 1)
    assert engine_config(from_dict(BPRTrainConfig, {"steps": 10}), progress=False).warmup_steps == 1  # at least one
    assert resolved(from_dict(BPRTrainConfig, {"kind": "ape", "batch_size": 3})).data.batch_size == 3


def test_every_budget_reads_into_the_sections():
    for name, budget in BUDGETS.items():
        for kind in ("slice", "ape"):
            opts = {**budget["bpr"], **budget.get("bpr_kind", {}).get(kind, {}), "kind": kind,
                    "spacing": tuple(budget["spacing"])}
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                cfg = from_dict(BPRTrainConfig, opts)
            f = flatten(BPRTrainConfig, to_dict(cfg))
            for k, v in opts.items():
                path = flat_names(BPRTrainConfig).get(k, k)
                assert to_dict(f[path]) == to_dict(v), (name, kind, k)


def test_a_model_trained_from_a_flat_config_is_bit_identical(tmp_path, cases):
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({"config": FLAT}))
    old = train_bpr(read_config(tmp_path / "old.yaml", BPRTrainConfig), tmp_path / "old", cases=cases, progress=False)
    new = train_bpr(NESTED, tmp_path / "new", cases=cases, progress=False)
    a, b = load_bpr(old), load_bpr(new)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ja, jb = (json.loads((p / "model.json").read_text()) for p in (old, new))
    assert ja["config"] == jb["config"]  # model.json: unchanged by the sections
    assert (old / "log.csv").read_text() == (new / "log.csv").read_text()
    doc = yaml.safe_load((new / "config.yaml").read_text())["config"]
    assert doc["optim"]["steps"] == 6 and doc["optim"]["warmup_steps"] == 1  # written resolved, nested
    assert from_dict(BPRTrainConfig, doc) == resolved(NESTED)


def test_resume_from_a_flat_train_state(tmp_path, cases, monkeypatch):
    """A run interrupted before the sections (its train state holds the flat config) continues to
    the same model, and refuses a changed fixed field naming the dotted field."""
    import voxdiff.bpr.train as bt

    full = train_bpr(NESTED, tmp_path / "full", cases=cases, progress=False)
    real_fit = bt.Engine.fit
    monkeypatch.setattr(bt.Engine, "fit", lambda self, end=None: real_fit(self, 3))  # an interrupted run
    cut = train_bpr(NESTED, tmp_path / "cut", cases=cases, progress=False)
    monkeypatch.setattr(bt.Engine, "fit", real_fit)
    js = latest_train_state(cut / "train_state") / "model.json"
    doc = json.loads(js.read_text())
    assert doc["config"] == to_dict(resolved(NESTED))
    doc["config"] = FLAT
    js.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=r"cannot resume: data\.slice_patch was 16"):
        train_bpr(replace(NESTED, data=replace(NESTED.data, slice_patch=20)), cut, cases=cases, progress=False, resume=True)
    train_bpr(NESTED, cut, cases=cases, progress=False, resume=True)
    a, b = load_bpr(full), load_bpr(cut)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert (full / "log.csv").read_text() == (cut / "log.csv").read_text()


def test_options_that_bpr_training_cannot_honour_are_refused(tmp_path, cases):
    with pytest.raises(InputError, match="runtime.device"):
        train_bpr(replace(NESTED, runtime=replace(NESTED.runtime, device="cuda")), tmp_path / "a", cases=cases)
    with pytest.raises(InputError, match="optim.ema_decay"):
        train_bpr(replace(NESTED, optim=replace(NESTED.optim, ema_decay=0.99)), tmp_path / "b", cases=cases)
    # numbers that cannot be meant: refused before anything is written (ape_points 0 used to end in a
    # NaN loss at step 1, a zoom below 1 was silently taken as 1)
    for bad, problem in (({"ape_points": 0}, "data.ape_points must be >= 8"),
                         ({"zoom": 0.5}, r"data.zoom must be >= 1"),
                         ({"intensity_aug": -1.0}, "data.intensity_aug and data.texture_aug must be >= 0")):
        out = tmp_path / f"bad_{next(iter(bad))}"
        with pytest.raises(InputError, match=problem):
            train_bpr(replace(NESTED, data=replace(NESTED.data, **bad)), out, cases=cases)
        assert not out.exists()


@pytest.mark.parametrize("over, problem", [
    ({"hu_window": (500.0, -500.0)}, r"preprocess.hu_window must be two finite HU values, low < high"),
    ({"hu_window": (0.0, float("nan"))}, r"preprocess.hu_window must be two finite"),
    ({"spacing": (3.0, 3.0, 0.0)}, r"preprocess.spacing must be 3 positive sizes"),
    ({"spacing": (3.0, 3.0)}, r"preprocess.spacing must be 3 positive sizes"),
    ({"body_margin_mm": -1.0}, r"preprocess.body_margin_mm must be >= 0"),
])
def test_preprocess_settings_that_cannot_be_meant(over, problem):
    from voxdiff.data.preprocess import PreprocessConfig

    with pytest.raises(InputError, match=problem):
        PreprocessConfig(**over)
    assert PreprocessConfig(spacing=None).spacing is None  # null keeps the native spacing


def _parse(argv: list[str]) -> BPRTrainConfig:
    from voxdiff.cli import build_parser

    parser, root = build_parser()
    return from_namespace(BPRTrainConfig, root.leaf(parser.parse_args(["bpr", "train", "--out", "o", *argv])))


NESTED_ARGS = ["--kind", "ape", "--data", "d1", "--data.extra", "[e1]", "--data.batch_size", "2", "--data.ape_patch", "32",
               "--preprocess.spacing", "[6,6,6]", "--optim.steps", "4", "--optim.lr", "0.01", "--optim.grad_clip", "2",
               "--model.channels", "[4,4,4]", "--task.anchor", "slice", "--task.slice_model", "s",
               "--runtime.threads", "0", "--runtime.checkpoint_every", "2", "--seed", "3"]
FLAT_ARGS = ["--kind", "ape", "--data", "d1", "--extra_data", "[e1]", "--batch_size", "2", "--ape_patch", "32",
             "--spacing", "[6,6,6]", "--steps", "4", "--lr", "0.01", "--grad_clip", "2",
             "--channels", "[4,4,4]", "--anchor", "slice", "--slice_model", "s",
             "--threads", "0", "--checkpoint_every", "2", "--seed", "3"]


def test_command_line_nested_options_and_old_flat_ones():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = _parse(NESTED_ARGS)
    assert cfg.kind == "ape" and cfg.seed == 3
    assert cfg.data == BPRData(path="d1", extra=("e1",), batch_size=2, ape_patch=32)
    assert cfg.preprocess.spacing == (6.0, 6.0, 6.0) and cfg.optim == BPROptim(steps=4, lr=0.01, grad_clip=2.0)
    assert cfg.model.channels == (4, 4, 4) and cfg.task.anchor == "slice" and cfg.task.slice_model == "s"
    assert cfg.runtime.threads == 0 and cfg.runtime.checkpoint_every == 2 and cfg.runtime.device == "cpu"
    with pytest.warns(VoxdiffDeprecationWarning) as rec:
        assert _parse(FLAT_ARGS) == cfg
    shown = {str(w.message) for w in rec}
    assert "BPRTrainConfig: 'steps' is deprecated, use 'optim.steps' (same meaning)" in shown
    assert "BPRTrainConfig: 'extra_data' is deprecated, use 'data.extra' (same meaning)" in shown
    assert len(shown) == 12  # one per flat option (--data is the section's own option)
    assert _parse([]) == BPRTrainConfig()


def test_bpr_train_help_shows_the_sections(capsys):
    from voxdiff.cli import main

    with pytest.raises(SystemExit):
        main(["bpr", "train", "--help"])
    shown = capsys.readouterr().out
    for opt in ("--optim.steps", "--optim.grad_clip", "--data.slice_patch", "--preprocess.spacing", "--model.channels",
                "--task.anchor", "--runtime.threads", "--data PATH|CONFIG"):
        assert opt in shown, opt
    assert "--steps " not in shown and "--extra_data" not in shown and "--slice_patch" not in shown
