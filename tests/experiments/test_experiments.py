"""The experiment machinery at the tiny budget: complete reports, and resuming after an interruption."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import yaml

from voxdiff.experiments import experiments as ex
from voxdiff.experiments.base import ExperimentConfig, method_parts
from voxdiff.experiments.runner import StepRunner


def test_step_runner_skips_finished_and_discards_interrupted(tmp_path):
    r = StepRunner(tmp_path, log=lambda s: None)
    calls = []

    def ok(d):
        (d / "file.txt").write_text("x")
        calls.append(1)
        return {"value": 3}

    assert r.run("a", ok)["value"] == 3
    assert r.run("a", ok)["value"] == 3
    assert len(calls) == 1 and r.skipped == ["a"]

    def boom(d):
        (d / "half.txt").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        r.run("b", boom)
    assert not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]  # no partial folder left


def test_step_seconds_are_its_own_not_those_of_the_steps_it_ran_first(tmp_path):
    """A step that needs another one runs it inside itself; its "seconds" leave that step's out
    (the demo's report once gave pretraining the BPR training's time)."""
    r = StepRunner(tmp_path, log=lambda s: None)

    def inner(d):
        time.sleep(0.3)
        return {}

    def outer(d):
        r.run("inner", inner)
        time.sleep(0.1)
        return {}

    def top(d):
        r.run("outer", outer)
        return {}

    t0 = time.perf_counter()
    r.run("top", top)
    wall = time.perf_counter() - t0
    sec = {n: r.result(n)["seconds"] for n in ("inner", "outer", "top")}
    assert sec["inner"] >= 0.3 and 0.1 <= sec["outer"] < 0.25 and sec["top"] < 0.1, sec
    assert sum(sec.values()) == pytest.approx(wall, abs=0.05)
    # the total behind a report counts each step once, whether it ran now or had finished earlier
    assert r.step_seconds() == pytest.approx(sum(sec.values()))
    again = StepRunner(tmp_path, log=lambda s: None)
    again.run("top", top)
    assert again.step_seconds() == pytest.approx(sum(sec.values()))  # a later invocation finds them all
    (tmp_path / "inner" / "sub").mkdir()
    (tmp_path / "inner" / "sub" / "result.json").write_text('{"seconds": 100}')  # a file inside a step
    (tmp_path / ".outer.tmp").mkdir()
    (tmp_path / ".outer.tmp" / "result.json").write_text('{"seconds": 100}')  # a staged step
    assert again.step_seconds() == pytest.approx(sum(sec.values()))


def test_report_time_gives_the_steps_total_when_steps_had_finished_earlier():
    from voxdiff.experiments.report import time_phrase

    assert time_phrase({"seconds": 120.4}) == "120 s in all"  # results.json of older folders
    assert time_phrase({"seconds": None}) == ""  # gathered tables carry no time
    assert time_phrase({"seconds": 120.4, "step_seconds": 119.0}) == "120 s in all"
    assert time_phrase({"seconds": 2.0, "step_seconds": 3838.2}) == (
        "3838 s of steps in all (2 s in this invocation; the rest finished earlier)")


def test_step_runner_keeps_and_continues_interrupted_resumable_step(tmp_path):
    r = StepRunner(tmp_path, log=lambda s: None)
    seen = []

    def train(d):
        seen.append(sorted(p.name for p in d.iterdir() if p.name != ".elapsed"))
        if not (d / "ckpt").exists():
            (d / "ckpt").write_text("step 3")
            time.sleep(0.2)
            raise KeyboardInterrupt
        return {"from": (d / "ckpt").read_text()}

    with pytest.raises(KeyboardInterrupt):
        r.run("variants/pre", train, resumable=True)
    assert not (tmp_path / "variants" / "pre").exists()
    assert (tmp_path / "variants" / ".pre.partial" / "ckpt").is_file()  # the work so far is kept
    res = r.run("variants/pre", train, resumable=True)
    assert res["from"] == "step 3" and seen == [[], ["ckpt"]]  # the second run was handed the checkpoint
    assert res["seconds"] >= 0.2  # the interrupted run's time counts
    assert (tmp_path / "variants" / "pre" / "result.json").is_file()
    assert not (tmp_path / "variants" / ".pre.partial").exists()


def test_interrupted_pretraining_step_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Ctrl-C in an experiment's pretraining keeps its checkpoints; the rerun continues from them and
    ends with the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    import voxdiff.pretrain.train as pt
    from voxdiff.experiments.base import Experiment

    def experiment(name):
        cfg = ExperimentConfig(budget="tiny", methods=("diffusion-none",), scratch=False, workers=1, progress=False,
                               pretrain_steps=6)
        return Experiment(cfg, tmp_path / name, log=lambda s: None)

    real = pt.pretrain
    calls = []

    def interrupted(pcfg, out, resume=False, **k):
        calls.append(resume)
        if not resume:
            real(pcfg, out, resume=False, stop_after=3, **k)  # writes a checkpoint at step 3
            raise KeyboardInterrupt("simulated Ctrl-C")
        return real(pcfg, out, resume=resume, **k)

    monkeypatch.setattr(pt, "pretrain", interrupted)
    exp = experiment("a")
    with pytest.raises(KeyboardInterrupt):
        exp.pretrained("diffusion-none")
    assert (tmp_path / "a" / ".pretrain-diffusion-none.partial" / "model" / "train_state").is_dir()
    resumed = experiment("a").pretrained("diffusion-none")
    assert calls == [False, True]
    monkeypatch.setattr(pt, "pretrain", real)
    straight = experiment("b").pretrained("diffusion-none")
    a = load_file(str(next((resumed / "backbone").glob("*.safetensors"))))
    b = load_file(str(next((straight / "backbone").glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_method_names():
    assert method_parts("diffusion-ape") == ("diffusion", "ape")
    assert method_parts("diffusion-none") == ("diffusion", "none")
    assert method_parts("diffusion-position") == ("diffusion", "position")
    assert method_parts("contrastive") == ("contrastive", None)
    from voxdiff.core.errors import InputError

    with pytest.raises(InputError):
        method_parts("diffusion-foo")
    with pytest.raises(InputError):
        method_parts("simclr")


@pytest.mark.slow
def test_compare_tiny_report_and_resume(tmp_path, monkeypatch):
    cfg = ExperimentConfig(budget="tiny", methods=("diffusion-none", "restorative"), heads=("linear", "nonlinear"),
                           scratch=False, finetune=("restorative", "contrastive"), workers=1, progress=False)
    out = tmp_path / "exp"
    logs: list[str] = []

    # interrupt the second pretraining: the first method's finished steps must survive
    import voxdiff.pretrain.train as pt

    real = pt.pretrain

    def flaky(pcfg, *a, **k):
        if pcfg.method == "restorative":
            raise KeyboardInterrupt("simulated Ctrl-C")
        return real(pcfg, *a, **k)

    monkeypatch.setattr(pt, "pretrain", flaky)
    with pytest.raises(KeyboardInterrupt):
        ex.compare(cfg, out, log=logs.append)
    assert (out / "pretrain-diffusion-none" / "result.json").is_file()
    assert (out / "probe-diffusion-none-f0" / "result.json").is_file()
    assert not (out / "pretrain-restorative").exists()
    monkeypatch.setattr(pt, "pretrain", real)

    logs.clear()
    res = ex.compare(cfg, out, log=logs.append)
    skipped = [line for line in logs if line.startswith("[skip]")]
    ran = [line for line in logs if line.startswith("[run ]")]
    assert any("pretrain-diffusion-none" in s for s in skipped)
    assert any("probe-diffusion-none-f0" in s for s in skipped)
    assert not any("diffusion-none" in s for s in ran)
    assert any("pretrain-restorative" in s for s in ran)

    # complete report: a row per method x head, a fine-tuned row per fine-tuned method that was
    # compared (contrastive was not), with finite Dice in [0, 1] and the per-case scores
    assert [(r["method"], r["head"]) for r in res["rows"]] == [
        ("diffusion-none", "linear"), ("diffusion-none", "nonlinear"), ("restorative", "linear"),
        ("restorative", "nonlinear"), ("restorative", "fine-tuned")]
    for r in res["rows"]:
        m = r["summary"]["mean"]["mean"]
        assert 0.0 <= m <= 1.0 and not math.isnan(m)
        assert r["per_case"]
        # the row's mean is its own per-case scores', aggregated as nnU-Net does: per organ over the
        # cases (NaN where an organ is absent), then over the organs
        organs = sorted({o for d in r["per_case"].values() for o in d}, key=int)
        per_organ = [np.nanmean([np.nan if d.get(o) is None else d[o] for d in r["per_case"].values()])
                     for o in organs]
        assert m == pytest.approx(float(np.nanmean(per_organ)), abs=1e-9)
    assert len({r["summary"]["mean"]["mean"] for r in res["rows"]}) > 1  # rows are not copies of one another
    doc = json.loads((out / "results.json").read_text())
    assert doc["experiment"] == "compare" and len(doc["rows"]) == 5
    md = (out / "report.md").read_text()
    assert "| diffusion-none | nonlinear |" in md and "per_organ.png" in md
    assert "| restorative | fine-tuned (4 steps) |" in md  # the budget's finetune_steps
    tuned = json.loads((out / "finetune-restorative-f0" / "result.json").read_text())
    assert tuned["mode"] == "finetune" and tuned["max_steps"] == 4 and tuned["steps_run"] == 4
    for f in ("per_organ.png", "size_groups.png", "config.yaml"):
        assert (out / f).stat().st_size > 0
    # each probe step left a segmenter bundle that voxdiff segment accepts, on the budget's feature side
    bundle = out / "probe-restorative-f0" / "segmenter-nonlinear"
    bdoc = json.loads((bundle / "segmenter.json").read_text())
    assert bdoc["feature_side"] == "both"
    assert bdoc["meta"]["training_data"] == "phantoms"  # generated phantoms: voxdiff segment says so on real CT
    from voxdiff.probe.bundle import load_segmenter

    seg = load_segmenter(bundle, device="cpu")
    assert seg.extractor.feature_side == "both"
    assert seg.head.level_channels == seg.extractor.backbone.side_channels("both")

    # a third run redoes nothing, and its report still gives the time the steps took
    logs.clear()
    res3 = ex.compare(cfg, out, log=logs.append)
    assert not [line for line in logs if line.startswith("[run ]")]
    assert res3["step_seconds"] >= res["step_seconds"] * 0.99 and res3["step_seconds"] > res3["seconds"]

    # more case sets scored with the selected state (held-out phantoms in the benchmarks): the test cases
    # given again score exactly as the test cases do
    from voxdiff.experiments.base import Experiment

    exp = Experiment.reopen(out)
    exp.cfg.progress = False
    test = exp.folds()[0][2]
    ft = exp.tuned("also-restorative", 0, "finetune", exp.pretrained("restorative"), init_probe="probe-restorative-f0",
                   also_score={"again": test, "first": test[:1]})
    assert ft["also_scores"]["again"] == ft["scores"] and set(ft["also_scores"]["first"]["finetune"]) == {test[0].case_id}


def test_other_settings_are_refused(tmp_path):
    from voxdiff.core.errors import InputError
    from voxdiff.experiments.base import Experiment

    out = tmp_path / "e"
    exp = Experiment(ExperimentConfig(budget="tiny", methods=("random",)), out, log=lambda s: None)
    with pytest.raises(InputError, match=r"other settings \(methods\)"):
        Experiment(ExperimentConfig(budget="tiny", methods=("restorative",)), out, log=lambda s: None)
    with pytest.raises(InputError, match=r"other settings \(heads, seed\)"):
        Experiment(ExperimentConfig(budget="tiny", methods=("random",), heads=("linear",), seed=4), out,
                   log=lambda s: None)
    # the same data folder spelled relative or absolute is the same setting; another folder is not
    (tmp_path / "d").mkdir()
    user = Experiment(ExperimentConfig(budget="tiny", methods=("random",), data=str(tmp_path / "d")), tmp_path / "p",
                      log=lambda s: None)
    # bundles record phantom training data for generated or given phantom sets only
    assert user.data_origin() == {} and exp.data_origin() == {"training_data": "phantoms"}
    (tmp_path / "d" / "dataset.json").write_text(json.dumps({"name": "voxdiff_phantoms"}))
    assert user.data_origin() == {"training_data": "phantoms"}
    (tmp_path / "d" / "dataset.json").unlink()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        Experiment(ExperimentConfig(budget="tiny", methods=("random",), data="d"), tmp_path / "p", log=lambda s: None)
        (tmp_path / "d2").mkdir()
        with pytest.raises(InputError, match=r"other settings \(data\)"):
            Experiment(ExperimentConfig(budget="tiny", methods=("random",), data="d2"), tmp_path / "p",
                       log=lambda s: None)
    with pytest.raises(InputError, match="unknown checkpoint rule 'median'"):
        Experiment(ExperimentConfig(budget="tiny", compare_selection=("median",)), tmp_path / "r", log=lambda s: None)
    assert not (tmp_path / "r").exists()
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "precious.txt").write_text("data")
    with pytest.raises(InputError, match="not empty"):
        Experiment(ExperimentConfig(budget="tiny"), tmp_path / "user", log=lambda s: None)
    assert (tmp_path / "user" / "precious.txt").read_text() == "data"


@pytest.mark.slow
def test_timesteps_and_label_efficiency_tiny(tmp_path):
    cfg = ExperimentConfig(budget="tiny", workers=1, progress=False, heads=("linear", "nonlinear"), timesteps=(0, 5),
                           train_T=(10, 100), timestep_method="diffusion-none", label_counts=(1, 0),
                           label_methods=("diffusion-none",), compare_selection=("last", "smoothed"))
    res = ex.timesteps(cfg, tmp_path / "ts", log=lambda s: None)
    assert [r["t"] for r in res["by_t"]] == [0, 5]
    assert [r["T"] for r in res["by_T"]] == [10, 100]
    # the T=100 point reuses the budget's model; T=10 features sit at the same noise level t/T
    assert res["by_T"][0]["feature_t"] == [0]
    for r in res["by_t"] + res["by_T"]:
        assert 0.0 <= r["nonlinear"]["mean"]["mean"] <= 1.0
    md = (tmp_path / "ts" / "report.md").read_text()
    assert "Feature timestep t" in md and (tmp_path / "ts" / "dice_vs_t.png").is_file()
    assert (tmp_path / "ts" / "dice_vs_T.png").is_file()
    # a probe at another timestep than the model's records it in its bundle (segment runs the same pass)
    doc = json.loads((tmp_path / "ts" / "t-sweep" / "diffusion-none-t5-f0" / "segmenter-nonlinear" / "segmenter.json").read_text())
    assert doc["timesteps"] == [5]

    res = ex.label_efficiency(cfg, tmp_path / "le", log=lambda s: None)
    # for each label count: from scratch, the frozen linear / non-linear probes and the fine-tuned backbone
    n_all = 2  # tiny: 3 labelled training phantoms, 1 held out for validation
    expect = [(n, m, k) for n in (1, n_all) for m, k in (("from-scratch", "scratch"), ("diffusion-none", "linear"),
                                                         ("diffusion-none", "nonlinear"), ("diffusion-none", "fine-tuned"))]
    assert [(r["n_train"], r["method"], r["mode"]) for r in res["rows"]] == expect
    for r in res["rows"]:
        assert 0.0 <= r["summary"]["mean"]["mean"] <= 1.0
    # end to end: trained with the budget's early stopping, the kept step is a validated one
    for r in res["rows"]:
        if r["mode"] in ("scratch", "fine-tuned"):
            assert all(2 <= b <= s <= 8 and b % 2 == 0 for b, s in zip(r["best_step"], r["steps_run"]))
    # tiny says finetune_init "probe": LP-FT from the frozen non-linear probe of the same labelled cases
    one = json.loads((tmp_path / "le" / "labels" / "finetune-diffusion-none-n1-f0-lpft" / "result.json").read_text())
    assert len(one["train_cases"]) == 1 and one["val_cases"] and not set(one["val_cases"]) & set(one["test_cases"])
    probe = json.loads((tmp_path / "le" / "labels" / "diffusion-none-n1-f0" / "result.json").read_text())
    assert one["init"] == "labels/diffusion-none-n1-f0" and probe["train_cases"] == one["train_cases"]
    assert [r["init"] for r in res["rows"] if r["mode"] == "fine-tuned"] == ["labels/diffusion-none-n1-f0",
                                                                            "labels/diffusion-none-nall-f0"]
    assert one["max_steps"] == 8
    # the other checkpoint rules' states of the same run, scored on the same test cases
    assert one["selection"] == "best" and set(one["by_selection"]) == {"last", "smoothed"}
    last = one["by_selection"]["last"]
    assert last["best_step"] == one["steps_run"] and set(last["scores"]["finetune"]) == set(one["test_cases"])
    assert last["val_score"] == pytest.approx(one["history"][-1]["val_dice"]["finetune"])
    assert one["by_selection"]["smoothed"]["best_step"] in [h["step"] for h in one["history"]]
    tuned_rows = [r for r in res["rows"] if r["mode"] in ("scratch", "fine-tuned")]
    assert all(set(r["by_selection"]) == {"last", "smoothed"} and r["selection"] == "best" for r in tuned_rows)
    assert all("by_selection" not in r for r in res["rows"] if r["mode"] not in ("scratch", "fine-tuned"))
    row = next(r for r in tuned_rows if r["mode"] == "fine-tuned" and r["n_train"] == 1)
    assert row["by_selection"]["last"]["best_step"] == [one["steps_run"]]
    png = (tmp_path / "le" / "label_efficiency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (tmp_path / "le" / "report.md").read_text()
    assert "| labelled cases | from scratch | diffusion-none, frozen linear probe |" in md
    assert "diffusion-none, fine-tuned" in md and "label_efficiency.png" in md
    assert "Fine-tuned rows start from the non-linear head of the frozen probe" in md
    assert "other checkpoint rules" in md and "| 1 | diffusion-none, fine-tuned | last |" in md


def test_stage_configs_follow_budget_and_overrides(tmp_path):
    from voxdiff.experiments.base import Experiment
    from voxdiff.experiments.budgets import get_budget

    budget = get_budget("tiny")
    budget["pretrain"]["diffusion_steps"] = 1000
    budget["pretrain"]["feature_timesteps"] = (1, 5, 250)
    budget["pretrain"]["feature_input"] = "clean"
    exp = Experiment(ExperimentConfig(budget="tiny", methods=("diffusion-none",), pretrain_steps=7), tmp_path / "e",
                     log=lambda *a: None, budget=budget)
    cfg = exp.pretrain_config("diffusion-none")
    assert cfg.optim.steps == 7 and cfg.task.condition == "none" and tuple(cfg.task.feature_timesteps) == (1, 5, 250)
    assert cfg.task.feature_input == "clean"
    assert exp.pretrain_config("contrastive").task.feature_input == "noisy"  # diffusion settings stay off the others
    # t / T kept at a short chain; timesteps that meet there are kept once, in order
    short = exp.pretrain_config("diffusion-none", diffusion_steps=10)
    assert short.task.diffusion_steps == 10 and tuple(short.task.feature_timesteps) == (0, 2)
    assert exp.pretrain_config("diffusion-none", patch_size=(32, 32, 16)).data.patch_size == (32, 32, 16)
    assert not cfg.data.paths  # pretraining on the experiment's own unlabelled cases
    other = exp.pretrain_config("diffusion-none", data=["elsewhere/unlabelled"])  # other pretraining data:
    assert list(other.data.paths) == ["elsewhere/unlabelled"] and other.data.cache_dir == str(tmp_path / "e" / "cache")
    assert other.preprocess == cfg.preprocess  # ... on the experiment's grid and through its cache
    b = exp.bpr_config("ape", steps=3)
    assert b.kind == "ape" and b.optim.steps == 3 and tuple(b.preprocess.spacing) == tuple(budget["spacing"])
    assert b.data.ape_patch == budget["bpr"]["ape_patch"] and b.runtime.checkpoint_every == budget["bpr"]["checkpoint_every"]


def test_end_to_end_settings_reach_fine_tuning_and_from_scratch_but_not_frozen_heads(tmp_path):
    from voxdiff.core.errors import InputError
    from voxdiff.experiments.base import Experiment

    def exp(name, **kw):
        return Experiment(ExperimentConfig(budget="tiny", **kw), tmp_path / name, log=lambda *a: None)

    plain = exp("plain")
    base_patch, base_roi = plain.probe_cfg().sampling.patch_size, plain.probe_cfg().inference.roi
    for m in ("scratch", "finetune"):
        assert plain.tuned_cfg(m).sampling.patch_size == base_patch and plain.tuned_cfg(m).inference.roi == base_roi
    e = exp("e2e", end_to_end={"patch_size": [32, 32, 16], "batch_size": 1, "roi": [48, 48, 48]})
    for m in ("scratch", "finetune"):
        for stop in (False, True):
            c = e.tuned_cfg(m, early_stopping=stop)
            assert tuple(c.sampling.patch_size) == (32, 32, 16) and c.sampling.batch_size == 1
            assert tuple(c.inference.roi) == (48, 48, 48)
    assert e.probe_cfg().sampling.patch_size == base_patch and e.probe_cfg().inference.roi == base_roi
    # the budget's section, under the config's; the budget's fine-tuning settings win for fine-tuning
    e.budget["end_to_end"] = {"patch_size": [16, 16, 16], "hidden": 4}
    e.budget["finetune"] = {**e.budget.get("finetune", {}), "hidden": 6}
    assert tuple(e.tuned_cfg("scratch").sampling.patch_size) == (32, 32, 16)
    assert e.tuned_cfg("scratch").head.hidden == 4 and e.tuned_cfg("finetune").head.hidden == 6
    # a misspelt setting is refused when the experiment opens, before any step, and claims no folder
    with pytest.raises(InputError, match="end_to_end: .*patch_sise"):
        exp("typo", end_to_end={"patch_sise": [32, 32, 16]})
    assert not (tmp_path / "typo").exists()


def test_lpft_settings_reach_only_fine_tuning_from_the_probes_head(tmp_path):
    """The budget's ``lpft`` section (cpu-small: whole volumes, backbone 1e-5) applies to the
    fixed-step fine-tuning that starts from the frozen probe's head (compare, the demo), not to
    fine-tuning from a random head, to rows trained to convergence (label-efficiency) nor to from
    scratch; cpu-bench keeps its patches."""
    from voxdiff.experiments.base import Experiment
    from voxdiff.experiments.budgets import get_budget

    small = get_budget("cpu-small")
    assert small["lpft"]["whole_volume"] and small["lpft"]["backbone_lr"] == 1e-5
    assert small["lpft"]["validate_start"]  # the frozen probe is LP-FT's first candidate
    assert small["lpft"]["patience"] == 1  # and LP-FT stops at its first validation without progress
    assert "lpft" not in get_budget("cpu-bench") and get_budget("cpu-bench")["finetune_steps"] == 150
    e = Experiment(ExperimentConfig(budget="tiny"), tmp_path / "e", log=lambda *a: None)
    e.budget["lpft"] = {"whole_volume": True, "batch_size": 1, "backbone_lr": 1e-5}
    e.budget["lpft"]["validate_start"] = True
    e.budget["lpft"]["patience"] = 1
    c = e.tuned_cfg("finetune", from_probe=True)
    assert c.sampling.whole_volume and c.sampling.batch_size == 1 and c.optim.backbone_lr == 1e-5
    assert c.optim.validate_start and c.optim.patience == 1
    for plain in (e.tuned_cfg("finetune"), e.tuned_cfg("scratch"), e.tuned_cfg("scratch", from_probe=True)):
        assert plain.optim.patience == 0  # fixed-step rows that are not LP-FT never stop early
    for other in (e.tuned_cfg("finetune"), e.tuned_cfg("finetune", early_stopping=True), e.tuned_cfg("scratch"),
                  e.tuned_cfg("scratch", from_probe=True), e.tuned_cfg("finetune", early_stopping=True, from_probe=True)):
        assert not other.sampling.whole_volume and other.optim.backbone_lr != 1e-5 and not other.optim.validate_start


def test_early_stopping_cap_override_and_report_marks_runs_kept_at_the_cap(tmp_path):
    from voxdiff.experiments.base import Experiment
    from voxdiff.experiments.report import label_markdown

    def cap(**kw):
        exp = Experiment(ExperimentConfig(budget="tiny", **kw), tmp_path / f"e{len(kw)}", log=lambda *a: None)
        return [exp.tuned_cfg(m, early_stopping=True).optim.steps for m in ("scratch", "finetune")]

    assert cap() == [8, 8]  # the budget's early-stopping cap, for both modes
    assert cap(early_stopping_steps=20, scratch_steps=3) == [20, 20]  # one cap for both; plain steps unaffected
    exp = Experiment(ExperimentConfig(budget="tiny", early_stopping_min_steps=6), tmp_path / "min", log=lambda *a: None)
    assert [exp.tuned_cfg(m, early_stopping=True).optim.min_steps for m in ("scratch", "finetune")] == [6, 6]
    assert exp.tuned_cfg("scratch").optim.min_steps == 0  # plain (fixed-step) runs do not stop early anyway
    rows = [{"n_train": 1, "method": "from-scratch", "mode": "scratch", "summary": {"mean": {"mean": 0.3}},
             "steps_run": [1200], "best_step": [1200], "max_steps": [1200]},
            {"n_train": 1, "method": "contrastive", "mode": "fine-tuned", "summary": {"mean": {"mean": 0.4}},
             "steps_run": [1000], "best_step": [700], "max_steps": [1200]}]
    md = label_markdown({"rows": rows, "seconds": 1.0, "budget": {}}, [])
    assert "| 1 | from scratch | 1200 | 1200 (cap) |" in md and "| 1000 | 700 |" in md
    assert "--early_stopping_steps" in md
    rows[0]["best_step"] = [900]
    assert "(cap)" not in label_markdown({"rows": rows, "seconds": 1.0, "budget": {}}, [])
    # the header gives the settings the runs used (overrides included); a run kept at its first
    # validation is marked, with the flag that holds early stopping off
    budget = {"early_stopping": {"steps": 1200, "val_every": 100, "patience": 3}}
    rows[0].update(best_step=[100], steps_run=[400], max_steps=[2400])
    md = label_markdown({"rows": rows, "seconds": 1.0, "budget": budget,
                         "config": {"early_stopping_steps": 2400, "early_stopping_min_steps": 600}}, [])
    assert "for up to 2400 steps" in md and "never before step 600" in md
    assert "| 1 | from scratch | 400 | 100 (first) |" in md and "--early_stopping_min_steps" in md
    md = label_markdown({"rows": rows, "seconds": 1.0, "budget": budget,
                         "config": ExperimentConfig(early_stopping_min_steps=600)}, [])  # as the experiment passes it
    assert "for up to 1200 steps" in md and "never before step 600" in md
    md = label_markdown({"rows": rows, "seconds": 1.0, "budget": budget}, [])
    assert "for up to 1200 steps" in md and "never before" not in md
    md = label_markdown({"rows": rows, "seconds": 1.0, "budget": budget,
                         "config": {"early_stopping_steps": 2400, "early_stopping_min_steps": 2400}}, [])
    assert "for 2400 steps each (no early stopping" in md and "stopped after" not in md
    assert "the best-validation state is tested" in md
    # the last-state rule: the kept step is the cap by design, not a sign of a run still improving
    rows[0].update(best_step=[2400], steps_run=[2400], max_steps=[2400])
    md = label_markdown({"rows": rows, "seconds": 1.0, "budget": budget,
                         "config": {"early_stopping_steps": 2400, "early_stopping_min_steps": 2400, "selection": "last"}}, [])
    assert "the last state is tested" in md and "kept by the last rule" in md and "(cap)" not in md
    assert "the best-validation state" not in md.replace("Frozen probes: heads on the frozen pretrained backbone, "
                                                         "best-validation state", "")


def _row(method, head, mean):
    return {"method": method, "head": head, "summary": {"mean": {"mean": mean, "std": 0.0, "n": 1}}}


def test_contrastive_note_is_computed_from_the_rows():
    from voxdiff.experiments.report import contrastive_note

    rows = [_row("diffusion-ape", "nonlinear", 0.26), _row("contrastive", "nonlinear", 0.356),
            _row("diffusion-ape", "fine-tuned", 0.50), _row("contrastive", "fine-tuned", 0.45)]
    note = contrastive_note(rows)
    assert note.count("\n") == 0 and "non-linear probe 35.6 vs 26.0" in note and "fine-tuned" not in note
    rows[1]["summary"]["mean"]["mean"] = 0.2
    assert contrastive_note(rows) is None  # behind everywhere: no line
    assert contrastive_note([_row("contrastive", "nonlinear", 0.9)]) is None  # nothing to compare with
    assert contrastive_note([_row("diffusion-ape", "nonlinear", 0.50001), _row("contrastive", "nonlinear", 0.50004)]) is None


def test_contrastive_note_gives_the_interval_over_the_test_cases():
    """With per-case scores the note says how much the split can tell: the t interval of the non-linear
    probes' difference over the cases (organs averaged per case, absent organs left out)."""
    from voxdiff.evaluate.stats import mean_ci
    from voxdiff.experiments.report import contrastive_note

    ours = {"c1": {"1": 0.50, "2": 0.30}, "c2": {"1": 0.40, "2": None}, "c3": {"1": 0.60, "2": 0.20}}
    other = {"c1": {"1": 0.55, "2": 0.35}, "c2": {"1": 0.60, "2": None}, "c3": {"1": 0.45, "2": 0.45}}
    rows = [dict(_row("diffusion-ape", "nonlinear", 0.40), per_case=ours),
            dict(_row("contrastive", "nonlinear", 0.48), per_case=other)]
    d = [0.05, 0.20, 0.05]  # contrastive - ours per case
    lo, hi = mean_ci(d)
    note = contrastive_note(rows)
    assert note.count("\n") == 0 and "non-linear probe 48.0 vs 40.0" in note
    assert (f"Over the 3 test cases the non-linear probes differ by +10.0 points, 95 % interval "
            f"{100 * lo:+.1f} to {100 * hi:+.1f} (not shown on these cases)") in note
    # every case ahead by the same margin: the interval collapses onto it and excludes zero
    rows[1]["per_case"] = {c: {k: (None if v is None else v + 0.1) for k, v in o.items()} for c, o in ours.items()}
    assert "differ by +10.0 points, 95 % interval +10.0 to +10.0 (shown on these cases)" in contrastive_note(rows)
    rows[0]["per_case"] = {"c1": ours["c1"]}  # one common case: no interval
    assert "interval" not in contrastive_note(rows)


def test_tuned_below_note_names_only_methods_whose_fine_tuned_row_trails_their_probe():
    from voxdiff.experiments.report import tuned_below_note

    rows = [_row("diffusion-ape", "nonlinear", 0.282), _row("diffusion-ape", "fine-tuned", 0.176),
            _row("contrastive", "nonlinear", 0.396), _row("contrastive", "fine-tuned", 0.457),
            _row("random", "nonlinear", 0.148)]
    note = tuned_below_note(rows)
    assert note.count("\n") == 0 and "diffusion-ape 17.6 vs 28.2" in note and "contrastive" not in note
    rows[1]["summary"]["mean"]["mean"] = 0.30
    assert tuned_below_note(rows) is None  # every fine-tuned row at or above its probe: no line
    assert tuned_below_note([_row("diffusion-ape", "fine-tuned", 0.1)]) is None  # no frozen row to compare with
    # a fine-tuned row that kept its start, rescored with other threads (two lanes' demo): 49.7 against 49.7
    # is no drop
    assert tuned_below_note([_row("diffusion-ape", "nonlinear", 0.496948349), _row("diffusion-ape", "fine-tuned", 0.496942963)]) is None


def test_tuned_start_note_names_rows_that_kept_their_start():
    from voxdiff.experiments.report import tuned_start_note

    rows = [_row("diffusion-ape", "nonlinear", 0.49), {**_row("diffusion-ape", "fine-tuned", 0.49), "best_step": [0]},
            _row("contrastive", "nonlinear", 0.52), {**_row("contrastive", "fine-tuned", 0.55), "best_step": [10]}]
    note = tuned_start_note(rows)
    assert note.count("\n") == 0 and "start for diffusion-ape:" in note and "contrastive" not in note
    rows[3]["best_step"] = [[0], [20], [0]]  # per seed of per-fold lists
    assert "contrastive (in 2 of 3 runs)" in tuned_start_note(rows)
    rows[1]["best_step"], rows[3]["best_step"] = [30], [[10], [20], [30]]
    assert tuned_start_note(rows) is None  # every row moved on from its start
    assert tuned_start_note([_row("diffusion-ape", "nonlinear", 0.5)]) is None  # no fine-tuned row


def test_compare_table_says_where_early_stopping_ended_a_row():
    from voxdiff.experiments.report import compare_table

    full = {**_row("contrastive", "fine-tuned", 0.55), "steps": 30, "steps_run": [30], "best_step": [20]}
    cut = {**_row("diffusion-ape", "fine-tuned", 0.49), "steps": 30, "steps_run": [10], "best_step": [0]}
    seeds = {**_row("diffusion-none", "fine-tuned", 0.4), "steps": 30, "steps_run": [[10], [30], [20]]}
    table = compare_table([full, cut, seeds, _row("random", "nonlinear", 0.2)])
    assert "| contrastive | fine-tuned (30 steps) |" in table
    assert "| diffusion-ape | fine-tuned (10 of 30 steps) |" in table
    assert "| diffusion-none | fine-tuned (10-30 of 30 steps) |" in table
    assert "| random | nonlinear |" in table


def test_demo_prints_the_converged_scratch_reference_only_where_it_was_measured():
    from voxdiff.experiments.budgets import get_budget
    from voxdiff.experiments.demo import DEMO_FINETUNE, demo_config, scratch_note

    steps = get_budget("cpu-small")["finetune_steps"]
    note = scratch_note("cpu-small", 0)
    assert "not trained in the demo" in note and "63.3" in note and "label-efficiency" in note
    assert scratch_note("tiny", 0) is None and scratch_note("cpu-small", 1) is None
    assert scratch_note("cpu-small", 0, scratch=True) is None  # a from-scratch row in the table: no note
    assert not demo_config().scratch  # 150 steps of it would be a misleading row (3.2 against 63.3)
    from voxdiff.experiments.demo import TUNED_CONVERGED, tuned_note

    tn = tuned_note("cpu-small", get_budget("cpu-small")["finetune_steps"])
    assert f"train {steps} steps" in tn and "cpu-bench" in tn
    for m, s in TUNED_CONVERGED["rows"].values():  # the measured values, each with its spread
        assert 0 < m < 100 and s > 0 and f"{m:.1f} ± {s:.1f}" in tn
    assert tuned_note("cpu-bench", 1200) is None and tuned_note("cpu-small", 1200) is None
    cfg = demo_config()
    assert {"diffusion-ape", "contrastive"} <= set(cfg.finetune) == set(DEMO_FINETUNE)
    b = get_budget("cpu-small")
    # the demo's fine-tuned rows: a few LP-FT steps on whole volumes (30 of about 1.1 M voxels: about
    # 1.5x the voxels of 150 steps of 2 x 48 x 48 x 32 patches, what from scratch trains on)
    assert b["finetune_init"] == "probe" and b["lpft"]["whole_volume"] and b["finetune_steps"] < b["scratch_steps"]
    assert "on whole volumes" in tuned_note("cpu-small", 30, "probe", True)
    assert "up to 30 steps on whole volumes (stopped after the first validation without progress)" in tuned_note(
        "cpu-small", 30, "probe", True, patience=1)
    assert "up to 30" not in tuned_note("cpu-small", 30, "probe", True)
    assert "on whole volumes" not in tuned_note("cpu-small", 30, "probe")
    # the frozen non-linear head now scores trilinearly, as its LP-FT copy does: no upsampling note
    assert "trilinearly" not in tuned_note("cpu-small", 30, "probe", True)


def test_probe_fov_crops_reach_the_frozen_heads_config_and_change_the_folder(tmp_path):
    from voxdiff.core.errors import InputError
    from voxdiff.experiments.base import Experiment

    quiet = lambda s: None  # noqa: E731
    plain = Experiment(ExperimentConfig(budget="tiny", methods=("random",)), tmp_path / "a", log=quiet)
    assert plain.probe_cfg().sampling.fov_crops == 0  # no preset has crops
    exp = Experiment(ExperimentConfig(budget="tiny", methods=("random",), probe_fov_crops=5, probe_steps=9),
                     tmp_path / "b", log=quiet)
    cfg = exp.probe_cfg()
    assert cfg.sampling.fov_crops == 5 and cfg.optim.steps == 9
    with pytest.raises(InputError, match="other settings.*probe_fov_crops"):  # a frozen row's recipe changed
        Experiment(ExperimentConfig(budget="tiny", methods=("random",), probe_fov_crops=5), tmp_path / "a", log=quiet)
    with pytest.raises(InputError, match="fov_crops must be >= 0"):
        Experiment(ExperimentConfig(budget="tiny", methods=("random",), probe_fov_crops=-1),
                   tmp_path / "c", log=quiet).probe_cfg()


def test_frozen_probe_applies_the_probe_settings_feature_passes(tmp_path, monkeypatch):
    """The experiment's probe step gives the extractor the probe settings' ``t``, ``feature_input``
    and ``feature_side`` (as ``voxdiff probe`` and fine-tuning do), not only the feature side."""
    import voxdiff.features.extract as fx
    import voxdiff.pretrain.load as pl
    from voxdiff.experiments.base import Experiment

    exp = Experiment(ExperimentConfig(budget="tiny", methods=("random",)), tmp_path / "e", log=lambda s: None)
    exp.budget["probe"].update(feature_input="clean", t=(3, 7))
    monkeypatch.setattr(exp, "folds", lambda: [([], [], [])])
    ext = object()
    monkeypatch.setattr(pl, "load_pretrained", lambda *a, **k: ext)
    seen = []

    class Stop(Exception):
        pass

    def settings(e, cfg):
        seen.append((e, cfg.feature_input, tuple(cfg.t), cfg.feature_side))
        raise Stop

    monkeypatch.setattr(fx, "with_feature_settings", settings)
    with pytest.raises(Stop):
        exp.probe("probe-x", tmp_path / "m", 0, ("nonlinear",))
    assert seen == [(ext, "clean", (3, 7), exp.probe_cfg().feature_side)]


def test_folder_of_an_older_config_resumes(tmp_path):
    """A folder whose config.yaml predates fields added since (their defaults apply) or renamed
    (label_method) is resumed; a real change of setting is still refused."""
    import yaml

    from voxdiff.core.errors import InputError
    from voxdiff.experiments.base import Experiment

    out = tmp_path / "e"
    Experiment(ExperimentConfig(budget="tiny", methods=("random",)), out, log=lambda s: None)
    doc = yaml.safe_load((out / "config.yaml").read_text())
    for k in ("finetune", "finetune_steps", "label_methods"):
        doc["config"].pop(k)
    doc["config"]["label_method"] = "diffusion-ape"
    (out / "config.yaml").write_text(yaml.safe_dump(doc))
    Experiment(ExperimentConfig(budget="tiny", methods=("random",)), out, log=lambda s: None)
    with pytest.raises(InputError, match="other settings"):
        Experiment(ExperimentConfig(budget="tiny", methods=("random",), seed=3), out, log=lambda s: None)


def test_a_folder_can_be_resumed_with_more_rows_never_fewer(tmp_path):
    import yaml

    from voxdiff.core.errors import InputError
    from voxdiff.experiments.base import Experiment

    out = tmp_path / "e"
    base = dict(budget="tiny", methods=("random",), finetune=(), scratch=False)
    Experiment(ExperimentConfig(**base), out, log=lambda s: None)
    more = {**base, "methods": ("random", "restorative"), "finetune": ("restorative",), "scratch": True}
    Experiment(ExperimentConfig(**more), out, log=lambda s: None)  # adds rows: accepted
    saved = yaml.safe_load((out / "config.yaml").read_text())["config"]
    assert saved["methods"] == ["random", "restorative"] and saved["scratch"] is True
    for fewer in ({**more, "scratch": False}, {**more, "methods": ("restorative",)}):
        with pytest.raises(InputError, match="other settings"):
            Experiment(ExperimentConfig(**fewer), out, log=lambda s: None)
    with pytest.raises(InputError, match=r"other settings \(seed\)"):  # more rows but another seed
        Experiment(ExperimentConfig(**{**more, "methods": ("random", "restorative", "contrastive"), "seed": 1}), out,
                   log=lambda s: None)
    assert yaml.safe_load((out / "config.yaml").read_text())["config"]["methods"] == ["random", "restorative"]
    # no label_counts = the budget's: naming some of them is fewer rows, naming them all is the same
    from voxdiff.experiments.budgets import get_budget

    out2 = tmp_path / "e2"
    Experiment(ExperimentConfig(**base), out2, log=lambda s: None)
    with pytest.raises(InputError, match=r"other settings \(label_counts\)"):
        Experiment(ExperimentConfig(**{**base, "label_counts": (1,)}), out2, log=lambda s: None)
    assert get_budget("tiny")["label_counts"] == (1, None)  # None: all labelled cases
    Experiment(ExperimentConfig(**{**base, "label_counts": (1, 0)}), out2, log=lambda s: None)
    Experiment(ExperimentConfig(**{**base, "label_counts": (2, 1, 0)}), out2, log=lambda s: None)  # one more


def test_ape_bpr_is_anchored_on_the_experiments_slice_model(tmp_path):
    """The ape BPR of an experiment takes its S coordinate from the experiment's own slice model,
    trained first (once) when the ape model is asked for."""
    import torch

    from voxdiff.bpr import load_bpr
    from voxdiff.experiments.base import Experiment

    logs: list[str] = []
    exp = Experiment(ExperimentConfig(budget="tiny", methods=("diffusion-ape",), progress=False), tmp_path / "e",
                     log=logs.append)
    path = exp.bpr("ape")
    ape = load_bpr(path, kind="ape")
    sl = load_bpr(tmp_path / "e" / "bpr-slice" / "model", kind="slice")
    assert ape.anchor == "slice"
    for k, v in sl.state_dict().items():
        torch.testing.assert_close(ape.slice_model.state_dict()[k], v)
    ran = [line for line in logs if line.startswith("[run ]")]
    assert [r.split()[-1] for r in ran if "bpr-" in r] == ["bpr-slice", "bpr-ape"]
    logs.clear()
    assert exp.bpr("ape") == path and not [line for line in logs if line.startswith("[run ]")]


def test_compare_over_seeds_shares_data_and_reports_paired_tests(tmp_path):
    cfg = ExperimentConfig(budget="tiny", methods=("diffusion-none", "random"), heads=("nonlinear",), scratch=True,
                           finetune=(), seeds=(0, 1), workers=1, progress=False)
    out = tmp_path / "seeds"
    logs: list[str] = []
    res = ex.compare(cfg, out, log=logs.append)
    assert res["experiment"] == "compare-seeds" and res["seeds"] == [0, 1] and res["complete"] is True
    # one phantom set, used by both seeds; each seed's pretraining is its own
    assert (out / "phantoms" / "data" / "dataset.json").is_file()
    assert not (out / "seed-0" / "phantoms").exists() and not (out / "seed-1" / "phantoms").exists()
    w0 = (out / "seed-0" / "pretrain-diffusion-none" / "model")
    w1 = (out / "seed-1" / "pretrain-diffusion-none" / "model")
    assert w0.is_dir() and w1.is_dir()
    from safetensors.numpy import load_file

    f0 = sorted(w0.rglob("*.safetensors"))[0]
    a, b = load_file(f0), load_file(w1 / f0.relative_to(w0))
    assert any(not np.array_equal(a[k], b[k]) for k in a)  # different seeds, different weights
    # breadth first: both seeds' probes ran before any from-scratch row
    ran = [line for line in logs if line.startswith("[run ]")]
    first_scratch = min(i for i, line in enumerate(ran) if "scratch" in line)
    assert max(i for i, line in enumerate(ran) if "probe-" in line) < first_scratch
    # the summary equals the mean / std of the seeds' own results
    rows = {(r["method"], r["head"]): r for r in res["rows"]}
    for key, r in rows.items():
        seeds = []
        for s in (0, 1):
            doc = json.loads((out / f"seed-{s}" / "results.json").read_text())
            seeds.append(next(x for x in doc["rows"] if (x["method"], x["head"]) == key)["summary"]["mean"]["mean"])
        assert r["seed_means"] == pytest.approx(seeds)
        assert r["summary"]["mean"]["mean"] == pytest.approx(np.mean(seeds))
        assert r["summary"]["mean"]["std"] == pytest.approx(np.std(seeds, ddof=1))
        assert len(r["cases"]) == 1  # the tiny budget's one test phantom
    pairs = [(tuple(t["a"]), tuple(t["b"])) for t in res["tests"]]
    assert (("diffusion-none", "nonlinear"), ("random", "nonlinear")) in pairs
    assert (("diffusion-none", "nonlinear"), ("from-scratch", "end-to-end")) in pairs
    for t in res["tests"]:  # the seeds' own test beside the one over cases, and the verdict that needs both
        sd = np.array(rows[tuple(t["a"])]["seed_means"]) - np.array(rows[tuple(t["b"])]["seed_means"])
        assert t["seeds_a_better"] == int((sd > 0).sum()) and t["seeds_b_better"] == int((sd < 0).sum())
        assert t["verdict"] in ("A better", "B better", "not shown across seeds", "no difference shown")
        lo, hi = t["seed_ci95"]  # the seeds' interval around their mean difference, in the table in points
        assert lo <= t["diff_mean"] <= hi
    md = (out / "report.md").read_text()
    assert "Paired comparisons" in md and "| diffusion-none | nonlinear |" in md and "seed t-test p" in md
    first = res["tests"][0]
    assert f"| {100 * first['seed_ci95'][0]:+.1f} to {100 * first['seed_ci95'][1]:+.1f} |" in md
    assert (out / "seeds.png").stat().st_size > 0
    # resumed: nothing reruns
    logs.clear()
    ex.compare(cfg, out, log=logs.append)
    assert not [line for line in logs if line.startswith("[run ]")]
    # a report of what has finished, while a row is still missing for one seed: that row is left out
    import shutil

    shutil.rmtree(out / "seed-1" / "scratch-f0")
    part = ex.compare(cfg, out, log=logs.append, report_only=True)
    assert not [line for line in logs if line.startswith("[run ]")]
    assert ("from-scratch", "end-to-end") not in {(r["method"], r["head"]) for r in part["rows"]}
    assert part["complete"] is False and "Partial report" in (out / "report.md").read_text()
    same = {(r["method"], r["head"]): r["seed_means"] for r in part["rows"]}
    assert same == {k: r["seed_means"] for k, r in rows.items() if k in same} and same


def test_compare_over_seeds_needs_two_seeds(tmp_path):
    from voxdiff.core.errors import VoxdiffError

    with pytest.raises(VoxdiffError, match="at least two"):
        ex.compare(ExperimentConfig(budget="tiny", seeds=(3, 3)), tmp_path / "x", log=lambda s: None)


def test_bench_budget_is_cpu_small_with_the_benchmark_pools():
    from voxdiff.experiments.budgets import get_budget

    small, bench = get_budget("cpu-small"), get_budget("cpu-bench")
    assert bench["pretrain"]["steps"] == 1000 and bench["phantoms"]["n_unlabelled"] >= 48
    assert bench["phantoms"]["n_test"] >= 10 and bench["tuned_early_stopping"] is True
    # the BPR the benchmark was measured with (docs/RESULTS.md): the window-anchored ape, no slice override
    assert bench["bpr_kind"] == {"ape": {"channels": (8, 16, 32), "steps": 300}}
    assert small["bpr_kind"]["ape"]["anchor"] == "slice"
    assert bench["pretrain_method"] == small["pretrain_method"]
    # the demo's one feature window per volume; the benchmark's 64^3 windows (roi), as measured
    assert small["probe"]["feature_roi"] == (160, 160, 160) and "feature_roi" not in bench["probe"]
    # the demo's encoder + decoder features; the benchmark's decoder pyramid (the default), as measured
    assert small["probe"]["feature_side"] == "both" and "feature_side" not in bench["probe"]
    # the demo's fixed normalisation statistics; the benchmark's per-window ones (the default), as measured
    assert small["probe"]["norm_stats"] == "fixed" and "norm_stats" not in bench["probe"]
    # the demo's 600 head steps (chosen on held-out phantoms); the benchmark's 300, as measured
    assert small["probe"]["steps"] == 600 and bench["probe"]["steps"] == 300
    assert small["probe"]["val_every"] == bench["probe"]["val_every"] == 300  # the demo validates twice
    assert {k: v for k, v in bench["probe"].items() if k != "steps"} == \
        {k: v for k, v in small["probe"].items() if k not in ("feature_roi", "feature_side", "norm_stats", "steps")}
    assert bench["bpr"] == {k: v for k, v in small["bpr"].items() if k != "threads"}  # BPRTrainConfig's 1 thread
    same = {k: v for k, v in small["pretrain"].items() if k not in ("steps", "checkpoint_every", "log_every", "feature_input")}
    assert {k: bench["pretrain"][k] for k in same} == same
    # the demo's clean feature passes; the benchmark's noisy ones (the task's default), as measured
    assert small["pretrain"]["feature_input"] == "clean" and "feature_input" not in bench["pretrain"]
    assert {k: v for k, v in small["phantoms"].items() if k not in ("n_train", "n_test", "n_unlabelled")} == \
        {k: v for k, v in bench["phantoms"].items() if k not in ("n_train", "n_test", "n_unlabelled")}
    # everything else is cpu-small's
    changed = {"phantoms", "pretrain", "probe", "bpr", "bpr_kind", "tuned_early_stopping", "finetune_init", "finetune",
               "lpft", "finetune_steps"}
    # the demo fine-tunes at 1e-4 with its fixed statistics; the benchmark at the default, as measured
    assert small["finetune"] == {**bench["finetune"], "backbone_lr": 1e-4} and "backbone_lr" not in bench["finetune"]
    # fine-tuned rows from a random head, as measured (cpu-small's demo starts them from the probe's head)
    assert small["finetune_init"] == "probe" and "finetune_init" not in bench
    # and on patches for 150 steps, as measured (cpu-small's LP-FT trains 30 steps on whole volumes)
    assert "lpft" in small and "lpft" not in bench and bench["finetune_steps"] == 150 > small["finetune_steps"]
    assert set(bench) == (set(small) - {"finetune_init", "lpft"}) | {"tuned_early_stopping"}
    assert {k: bench[k] for k in small if k not in changed} == {k: small[k] for k in small if k not in changed}


def test_shifted_regime_labels_one_site_and_unknown_regimes_are_refused(tmp_path):
    from voxdiff.core.errors import InputError
    from voxdiff.experiments.base import TRAIN_SITE, Experiment

    exp = Experiment(ExperimentConfig(budget="tiny", regime="shifted", workers=1, progress=False), tmp_path / "s",
                     log=lambda s: None)
    cases = json.loads((exp.data_dir() / "phantoms.json").read_text())
    train = [c for c in cases.values() if c["set"] == "train"]
    assert train and all(c["phase"] in TRAIN_SITE["phases"] and c["z_mode"] in TRAIN_SITE["z_modes"] for c in train)
    with pytest.raises(InputError, match="unknown regime"):
        Experiment(ExperimentConfig(budget="tiny", regime="ood"), tmp_path / "r", log=lambda s: None)


def test_wide_variation_phantoms_and_unknown_variations_are_refused(tmp_path):
    from voxdiff.core.errors import InputError
    from voxdiff.data.phantom import WIDE_VARIATION
    from voxdiff.experiments.base import Experiment

    exp = Experiment(ExperimentConfig(budget="tiny", variation="wide", workers=1, progress=False), tmp_path / "w",
                     log=lambda s: None)
    data = exp.data_dir()
    saved = yaml.safe_load((data / "config.yaml").read_text())["config"]
    assert saved["lesion_rate"] == WIDE_VARIATION["lesion_rate"] and saved["organ_jitter"] == WIDE_VARIATION["organ_jitter"]
    assert saved["shape"] == [64, 64, 48]  # the budget's own phantom settings stay
    with pytest.raises(InputError, match="unknown phantom variation"):
        Experiment(ExperimentConfig(budget="tiny", variation="huge"), tmp_path / "v", log=lambda s: None)
    # a folder made with the default phantoms is not reused for wide ones
    Experiment(ExperimentConfig(budget="tiny", workers=1, progress=False), tmp_path / "d", log=lambda s: None)
    with pytest.raises(InputError, match="other settings"):
        Experiment(ExperimentConfig(budget="tiny", variation="wide"), tmp_path / "d", log=lambda s: None)


@pytest.mark.xdist_group("tiny_demo")
def test_demo_end_to_end_on_the_tiny_budget(tiny_demo):
    """`voxdiff demo`'s whole path at the tiny budget (run by the ``tiny_demo`` fixture): the table with
    every method, head and fine-tuned row, the report, and a segmentation of a held-out phantom on that
    file's own grid by the best non-linear probe."""
    import nibabel as nib

    from voxdiff.experiments.demo import DEMO_FINETUNE, DEMO_METHODS

    folder, res, printed = tiny_demo
    rows = {(r["method"], r["head"]) for r in res["compare"]["rows"]}
    assert {(m, h) for m in DEMO_METHODS for h in ("linear", "nonlinear")} <= rows
    assert {(m, "fine-tuned") for m in DEMO_FINETUNE} <= rows
    seg = res["segment"]
    assert seg is not None and (folder / "report.md").is_file()
    assert "[run ] probe-diffusion-ape-f0" in printed  # a fresh folder: every step ran here
    best = max((r for r in res["compare"]["rows"] if r["head"] == "nonlinear"),
               key=lambda r: r["summary"]["mean"]["mean"])
    assert f"probe-{best['method']}-f0" in printed
    test_img = sorted((folder / "phantoms" / "data" / "imagesTs").glob("*.nii.gz"))[0]
    out, ref = nib.load(seg["output"]), nib.load(test_img)
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
    labels = np.unique(np.asarray(out.dataobj))
    assert labels.min() >= 0 and labels.max() <= 13


def test_position_method_needs_no_body_part_regressor(tmp_path):
    from voxdiff.experiments.base import Experiment

    cfg = ExperimentConfig(budget="tiny", methods=("diffusion-position",), scratch=False, workers=1, progress=False)
    exp = Experiment(cfg, tmp_path / "e", log=lambda s: None)
    pc = exp.pretrain_config("diffusion-position")
    assert pc.task.condition == "position" and not pc.task.bpr_path
    assert not any(p.name.startswith("bpr") for p in (tmp_path / "e").iterdir())  # no BPR was trained


def test_reopened_folder_refits_the_compare_rows_frozen_head(tmp_path):
    """``Experiment.reopen`` + ``refit_frozen`` (what the benchmark scripts use to try probe variants on
    a finished folder) fit the same head as ``compare`` did: the same per-case test Dice."""
    from voxdiff.experiments.base import Experiment, mean_of_cases
    from voxdiff.pretrain.load import load_pretrained

    cfg = ExperimentConfig(budget="tiny", methods=("diffusion-none",), heads=("nonlinear",), scratch=False,
                           finetune=(), workers=1, progress=False)
    out = tmp_path / "exp"
    res = ex.compare(cfg, out, log=lambda s: None)
    row = res["rows"][0]
    exp = Experiment.reopen(out)
    from voxdiff.experiments.budgets import get_budget

    assert tuple(exp.cfg.methods) == ("diffusion-none",)
    assert exp.budget["probe"]["steps"] == get_budget("tiny")["probe"]["steps"]  # the saved settings
    sc = exp.refit_frozen(load_pretrained(exp.pretrained("diffusion-none")))  # the finished step, reused
    _, val, test = exp.folds()[0]
    assert set(sc["val"]["nonlinear"]) == {c.case_id for c in val}
    assert set(sc["test"]["nonlinear"]) == set(row["per_case"]) == {c.case_id for c in test}
    for cid, organs in row["per_case"].items():
        for o, v in organs.items():
            got = sc["test"]["nonlinear"][cid][str(o)]
            assert (v is None and math.isnan(got)) or got == pytest.approx(v, abs=1e-6)
    case_means = [np.nanmean([np.nan if v is None else v for v in d.values()]) for d in row["per_case"].values()]
    assert mean_of_cases(sc["test"]["nonlinear"]) == pytest.approx(float(np.mean(case_means)), abs=1e-6)


def test_a_seeds_folder_takes_more_seeds_never_fewer_or_other_ones(tmp_path):
    from voxdiff.core.errors import InputError
    from voxdiff.experiments.base import Experiment

    def make(seeds, where="s"):
        cfg = ExperimentConfig(budget="tiny", methods=("diffusion-none",), scratch=False, seeds=seeds, workers=1,
                               progress=False)
        return Experiment(cfg, tmp_path / where, log=lambda s: None)

    make((0, 1, 2))
    (tmp_path / "s" / "seed-0").mkdir()  # a finished seed's folder stays
    make((0, 1, 2, 3, 4))  # more seeds: resumed
    assert (tmp_path / "s" / "seed-0").is_dir()
    for other in ((0, 1), (0, 1, 5), ()):  # fewer, other or none: refused, nothing removed
        with pytest.raises(InputError, match="seeds"):
            make(other)
    assert (tmp_path / "s" / "seed-0").is_dir()
    make((), where="single")  # a single-seed folder does not become a seeds folder
    with pytest.raises(InputError, match="seeds"):
        make((0, 1), where="single")
