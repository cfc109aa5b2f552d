"""voxdiff probe -> voxdiff evaluate end to end on tiny phantoms: bundles, CV summary, report, figures."""

import json

import numpy as np
import pytest
import torch

from voxdiff.cli import main
from voxdiff.evaluate.report import EvaluateConfig, evaluate_models, find_models, summary_markdown


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    torch.set_num_threads(1)
    from voxdiff.core.config import from_dict
    from voxdiff.data.phantom import PhantomConfig, make_phantom_dataset
    from voxdiff.data.preprocess import PreprocessConfig
    from voxdiff.data.splits import write_splits
    from voxdiff.pretrain.train import PretrainConfig, pretrain

    w = tmp_path_factory.mktemp("ev")
    ph = make_phantom_dataset(w / "ph", n_train=4, n_test=1, n_unlabelled=0, seed=7,
                              cfg=PhantomConfig(shape=(40, 40, 24)), preview=False, progress=False)
    ids = sorted(p.name.split(".")[0] for p in (ph / "labelsTr").iterdir())
    write_splits(ph / "splits_final.json", [{"train": ids[:3], "val": ids[3:]}, {"train": ids[1:], "val": ids[:1]}])
    pretrain(from_dict(PretrainConfig, dict(method="random", data=[str(ph)], preprocess=PreprocessConfig(spacing=(5.0, 5.0, 5.0)),
                            steps=1, base_channels=4, num_levels=3, patch_size=(16, 16, 16), bf16=False, device="cpu")),
             w / "pt", progress=False)
    return w, ph


def test_probe_cv_and_evaluate(workspace, capsys):
    w, ph = workspace
    cv = w / "cv"
    for fold in (0, 1):
        args = ["probe", str(w / "pt"), str(ph), "-o", str(cv / f"fold_{fold}"), "--fold", str(fold),
                "--heads", "[linear, nonlinear]", "--steps", "3", "--val_every", "3", "--patch_size", "[16, 16, 16]",
                "--roi", "[32, 32, 32]", "--bf16", "false", "--device", "cpu", "--hidden", "8"]
        assert main(args) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "nonlinear" in text
    doc = json.loads((cv / "fold_0" / "probe.json").read_text())
    assert doc["test_cases"] == sorted(json.loads((ph / "splits_final.json").read_text())[0]["val"])
    assert len(doc["train_cases"]) == 2 and len(doc["val_cases"]) == 1  # one training case held out
    assert not set(doc["test_cases"]) & set(doc["train_cases"] + doc["val_cases"])
    assert doc["heads"]["linear"]["parameters"] < doc["heads"]["nonlinear"]["parameters"]
    for part in ("backbone/model.safetensors", "head/model.json", "segmenter.json"):
        assert (cv / "fold_1" / "linear" / part).is_file()
    # fitted on a phantom data set: the bundle records it (voxdiff segment warns on real CT)
    assert json.loads((cv / "fold_1" / "linear" / "segmenter.json").read_text())["meta"]["training_data"] == "phantoms"

    assert [p.parent.name for p in find_models(cv, "linear")] == ["fold_0", "fold_1"]
    out = w / "ev"
    assert main(["evaluate", str(cv), str(ph), "-o", str(out), "--head", "linear", "--device", "cpu",
                 "--figures", "1", "--surface", "true"]) == 0
    s = json.loads((out / "summary.json").read_text())  # strict JSON: no NaN
    assert s["n_folds"] == 2
    assert [f["fold"] for f in s["folds"]] == [0, 1]
    assert all(f["cases_from"] == "fold" for f in s["folds"])
    case_ids = [c for f in s["folds"] for c in f["cases"]]
    assert sorted(case_ids) == sorted(json.loads((ph / "splits_final.json").read_text())[0]["val"]
                                      + json.loads((ph / "splits_final.json").read_text())[1]["val"])
    one = next(iter(s["folds"][0]["cases"].values()))
    assert set(one) == {"dice", "hd95", "surface_dice"} and len(one["dice"]) == 13
    for v in one["dice"].values():
        assert v is None or 0.0 <= v <= 1.0
    cvm = s["cross_validation"]["mean"]
    fold_means = [f["aggregate"]["mean"] for f in s["folds"]]
    assert cvm["mean"] == pytest.approx(np.mean(fold_means), abs=1e-5)
    assert cvm["std"] == pytest.approx(np.std(fold_means, ddof=1), abs=1e-5)
    assert set(s["cross_validation"]["groups"]) == {"Big", "Medium", "Small"}
    md = (out / "summary.md").read_text()
    assert "cross-validation" in md and "| liver |" in md
    assert (out / "figures" / "dice_per_organ.png").is_file()
    assert len(list((out / "figures").glob("overlay_*.png"))) == 1
    assert (out / "config.yaml").is_file()
    # existing output refused without --force; nothing changed
    before = (out / "summary.json").read_text()
    assert main(["evaluate", str(cv), str(ph), "-o", str(out), "--head", "linear"]) == 2
    assert (out / "summary.json").read_text() == before


def test_evaluate_bundle_on_test_set_and_cross_dataset(workspace, tmp_path):
    w, ph = workspace
    from standin import tiny_segmenter

    from voxdiff.data.preprocess import PreprocessConfig

    model = tiny_segmenter(tmp_path / "m", preprocess=PreprocessConfig(spacing=(5.0, 5.0, 5.0)))
    # the bundle was not trained on ph: "auto" evaluates every labelled case (cross-dataset use)
    s = evaluate_models(model, ph, tmp_path / "e1", EvaluateConfig(device="cpu", figures=0), progress=False)
    assert s["folds"][0]["cases_from"] == "all" and s["pooled"]["n_cases"] == 5
    s = evaluate_models(model, ph, tmp_path / "e2", EvaluateConfig(cases="test", device="cpu", figures=0), progress=False)
    assert s["pooled"]["n_cases"] == 1 and s["cross_validation"] is None
    assert "Per case" in summary_markdown(s)


def test_bad_inputs(workspace, tmp_path, capsys):
    w, ph = workspace
    assert main(["evaluate", str(tmp_path / "nothing"), str(ph), "-o", str(tmp_path / "o")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["probe", str(w / "pt"), str(ph), "-o", str(tmp_path / "p"), "--heads", "[mlp]"]) == 2
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("option, value, problem", [
    ("--overlap", "1.5", "overlap must lie in [0, 1), got 1.5"),
    ("--tau_mm", "-1", "tau_mm (the surface Dice tolerance) must be > 0 mm"),
    ("--n_classes", "0", "n_classes (background included) must be >= 2"),
    ("--figures", "-1", "figures must be >= 0"),
    ("--sw_batch_size", "0", "sw_batch_size must be >= 1"),
])
def test_settings_that_cannot_be_meant_are_refused_first(option, value, problem, tmp_path, capsys):
    # checked before the model or the data is looked at (neither exists here), nothing written
    out = tmp_path / "o"
    assert main(["evaluate", str(tmp_path / "no_model"), str(tmp_path / "no_data"), "-o", str(out), option, value]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"voxdiff: error: {problem}") and not out.exists()


def test_probe_with_other_timesteps_and_mix_head_gives_bundles_that_segment(workspace, tmp_path):
    """``--t`` overrides a diffusion model's feature timesteps: the heads see one channel block per t,
    the bundle records them, and ``voxdiff segment`` rebuilds the same extractor from it."""
    import nibabel as nib

    from voxdiff.core.config import from_dict
    from voxdiff.data.preprocess import PreprocessConfig
    from voxdiff.pretrain.train import PretrainConfig, pretrain
    from voxdiff.probe.bundle import load_segmenter

    w, ph = workspace
    pretrain(from_dict(PretrainConfig, dict(method="diffusion", data=[str(ph)], preprocess=PreprocessConfig(spacing=(5.0, 5.0, 5.0)),
                            steps=1, base_channels=4, num_levels=3, patch_size=(16, 16, 16), bf16=False, device="cpu",
                            diffusion_steps=100, feature_timesteps=(10,))), tmp_path / "dm", progress=False)
    out = tmp_path / "p"
    assert main(["probe", str(tmp_path / "dm"), str(ph), "-o", str(out), "--fold", "0", "--heads", "[nonlinear, mix]",
                 "--t", "[1, 50, 90]", "--feature_input", "clean", "--steps", "2", "--val_every", "2",
                 "--roi", "[32, 32, 32]", "--bf16", "false", "--device", "cpu", "--hidden", "8"]) == 0
    seg = load_segmenter(out / "mix")
    assert seg.info["timesteps"] == [1, 50, 90] and seg.extractor.passes == 3
    # --feature_input is recorded too, and the loaded extractor's passes see the clean image
    assert seg.info["feature_input"] == "clean" and seg.extractor.task.opts.feature_input == "clean"
    assert load_segmenter(out / "nonlinear").extractor.task.opts.feature_input == "clean"
    assert seg.head.groups == 3 and len(seg.head.mix_weights()) == 3 * 3
    assert load_segmenter(out / "nonlinear").head.level_channels == [3 * lv.channels for lv in seg.extractor.backbone.levels]
    img = sorted((ph / "imagesTs").glob("*.nii.gz"))[0]
    assert main(["segment", str(out / "mix"), str(img), "-o", str(tmp_path / "s.nii.gz"), "--device", "cpu"]) == 0
    assert nib.load(tmp_path / "s.nii.gz").shape == nib.load(img).shape
    # --t or --feature_input on a model without timesteps, or a value that is not one: one line, nothing written
    assert main(["probe", str(w / "pt"), str(ph), "-o", str(tmp_path / "q"), "--t", "[1]", "--steps", "1"]) == 2
    assert main(["probe", str(w / "pt"), str(ph), "-o", str(tmp_path / "q"), "--feature_input", "clean", "--steps", "1"]) == 2
    assert main(["probe", str(tmp_path / "dm"), str(ph), "-o", str(tmp_path / "q"), "--feature_input", "blurred",
                 "--steps", "1"]) == 2
    assert not (tmp_path / "q").exists()
