"""benchmarks/label_rows.py: one label count's steps are label-efficiency's, run on the open experiment."""

from standin import load_benchmark

from voxdiff.experiments.base import ExperimentConfig


class _Exp:
    """What label_items needs of an Experiment; records the steps the thunks would run."""

    def __init__(self, n_train: int, budget: dict | None = None):
        self.cfg = ExperimentConfig(budget="tiny", label_counts=(1, 2, 0), label_methods=("contrastive",))
        self.n_train, self.calls, self.budget = n_train, [], budget or {}

    def folds(self):
        return [(list(range(self.n_train)), [], [])]

    def pretrained(self, m):
        return f"pretrain-{m}"

    def scratch(self, name, fold, n_train, early_stopping):
        self.calls.append((name, "scratch", n_train))

    def probe(self, name, model, fold, heads, n_train):
        self.calls.append((name, model, n_train))

    def tuned(self, name, fold, mode, model, n_train, early_stopping, init_probe=None):
        self.calls.append((name, model, n_train) + ((init_probe,) if init_probe else ()))


def test_row_items_are_the_label_efficiency_steps_of_one_count():
    lr = load_benchmark("label_rows")
    exp = _Exp(n_train=6)
    items = lr.row_items(exp, 2, ["diffusion-ape"])
    assert exp.cfg.label_counts == (2,) and exp.cfg.label_methods == ("diffusion-ape",)
    for _, run in items:
        run()
    assert exp.calls == [("labels/scratch-n2-f0", "scratch", 2),
                         ("labels/diffusion-ape-n2-f0", "pretrain-diffusion-ape", 2),
                         ("labels/finetune-diffusion-ape-n2-f0", "pretrain-diffusion-ape", 2)]
    exp = _Exp(n_train=4)  # as many labels as training cases: label-efficiency's "all" row
    for _, run in lr.row_items(exp, 4, ["contrastive"]):
        run()
    assert [c[0] for c in exp.calls] == ["labels/scratch-nall-f0", "labels/contrastive-nall-f0",
                                         "labels/finetune-contrastive-nall-f0"]
    # a budget with finetune_init "probe": LP-FT from the same count's frozen probe (run first if need be)
    exp = _Exp(n_train=6, budget={"finetune_init": "probe"})
    for _, run in lr.row_items(exp, 1, ["contrastive"])[2:]:
        run()
    assert exp.calls == [("labels/contrastive-n1-f0", "pretrain-contrastive", 1),
                         ("labels/finetune-contrastive-n1-f0-lpft", "pretrain-contrastive", 1, "labels/contrastive-n1-f0")]


def test_a_variant_folder_links_all_but_the_fine_tuned_rows(tmp_path):
    import pytest
    import yaml

    lr = load_benchmark("label_rows")
    src = tmp_path / "bench" / "seed-0"
    (src / "labels" / "scratch-n1-f0").mkdir(parents=True)
    (src / "labels" / "finetune-contrastive-n1-f0").mkdir()
    (src / "pretrain-contrastive").mkdir()
    (src / "labels" / ".scratch-n2-f0.x.partial").mkdir()
    (src / "config.yaml").write_text(yaml.safe_dump({"config": {"seed": 0},
                                                     "budget_settings": {"finetune": {"warmup_steps": 30}}}))
    dst = lr.variant_folder(src, tmp_path / "var" / "seed-0", {"fresh_noise": True})
    saved = yaml.safe_load((dst / "config.yaml").read_text())
    assert saved["budget_settings"]["finetune"] == {"warmup_steps": 30, "fresh_noise": True}
    assert (dst / "pretrain-contrastive").resolve() == (src / "pretrain-contrastive").resolve()
    assert (dst / "labels" / "scratch-n1-f0").is_symlink()
    assert not (dst / "labels" / "finetune-contrastive-n1-f0").exists()
    assert not (dst / "labels" / ".scratch-n2-f0.x.partial").exists()
    assert [p.name for p in dst.parent.iterdir()] == ["seed-0"]  # nothing left aside
    # the source's own config is untouched; the same variant reopens, another one is refused
    assert yaml.safe_load((src / "config.yaml").read_text())["budget_settings"]["finetune"] == {"warmup_steps": 30}
    # the experiment rewrites config.yaml when it opens the folder; the variant is recorded beside it
    (dst / "config.yaml").write_text(yaml.safe_dump({"config": {"seed": 0}, "budget_settings": saved["budget_settings"]}))
    assert lr.variant_folder(src, dst, {"fresh_noise": True}) == dst
    with pytest.raises(SystemExit, match="another variant"):
        lr.variant_folder(src, dst, {"fresh_noise": False})


def test_a_variant_folder_may_change_the_fine_tuning_start(tmp_path):
    import yaml

    lr = load_benchmark("label_rows")
    src = tmp_path / "bench" / "seed-0"
    (src / "labels" / "contrastive-n1-f0").mkdir(parents=True)
    (src / "config.yaml").write_text(yaml.safe_dump({"config": {"seed": 0}, "budget_settings": {"pretrain": {"steps": 9}}}))
    dst = lr.variant_folder(src, tmp_path / "var" / "seed-0", {}, {"finetune_init": "probe"})
    saved = yaml.safe_load((dst / "config.yaml").read_text())["budget_settings"]
    assert saved["finetune_init"] == "probe" and saved["pretrain"] == {"steps": 9}
    assert (dst / "labels" / "contrastive-n1-f0").is_symlink()  # LP-FT's start is the linked frozen probe
    import pytest
    with pytest.raises(SystemExit, match="another variant"):
        lr.variant_folder(src, dst, {})
    with pytest.raises(SystemExit):  # only fine-tuning settings may differ in a variant
        lr.main(["bench", "1", "--budget", '{"pretrain": {}}', "--out", str(tmp_path / "x")])


def test_a_longer_stopping_cap_retrains_the_scratch_rows_too(tmp_path):
    import yaml

    lr = load_benchmark("label_rows")
    src = tmp_path / "bench" / "seed-0"
    for row in ("scratch-n1-f0", "contrastive-n1-f0", "finetune-contrastive-n1-f0"):
        (src / "labels" / row).mkdir(parents=True)
    (src / "config.yaml").write_text(yaml.safe_dump({"config": {"seed": 0}, "budget_settings": {
        "early_stopping": {"steps": 1200, "val_every": 100, "patience": 3}}}))
    dst = lr.variant_folder(src, tmp_path / "var" / "seed-0", {}, {"early_stopping": {"steps": 2400}})
    saved = yaml.safe_load((dst / "config.yaml").read_text())["budget_settings"]
    assert saved["early_stopping"] == {"steps": 2400, "val_every": 100, "patience": 3}  # merged, not replaced
    assert sorted(p.name for p in (dst / "labels").iterdir()) == ["contrastive-n1-f0"]
    exp = _Exp(n_train=6)  # --methods '': the from-scratch rows alone
    for _, run in lr.row_items(exp, 1, []):
        run()
    assert exp.calls == [("labels/scratch-n1-f0", "scratch", 1)]


def test_a_variant_of_a_variant_leaves_its_source_record_alone(tmp_path):
    """A variant made from a variant folder (e.g. fixed statistics on top of clean passes) records
    itself in a file of its own: its source's variant.json is not linked and overwritten."""
    import json

    import yaml

    lr = load_benchmark("label_rows")
    base = tmp_path / "bench" / "seed-0"
    (base / "labels" / "scratch-n1-f0").mkdir(parents=True)
    (base / "config.yaml").write_text(yaml.safe_dump({"config": {"seed": 0}, "budget_settings": {"finetune": {}}}))
    first = lr.variant_folder(base, tmp_path / "clean" / "seed-0", {"feature_input": "clean"})
    (first / "labels" / "diffusion-ape-n1-f0").mkdir()
    before = (first / "variant.json").read_text()
    second = lr.variant_folder(first, tmp_path / "fixed" / "seed-0", {"norm_stats": "fixed"})
    assert (first / "variant.json").read_text() == before
    assert not (second / "variant.json").is_symlink()
    assert json.loads((second / "variant.json").read_text()) == {"of": str(first.resolve()), "finetune": {"norm_stats": "fixed"}}
    saved = yaml.safe_load((second / "config.yaml").read_text())["budget_settings"]["finetune"]
    assert saved == {"feature_input": "clean", "norm_stats": "fixed"}
    assert (second / "labels" / "diffusion-ape-n1-f0").is_symlink() and (second / "labels" / "scratch-n1-f0").is_symlink()
    assert lr.variant_folder(first, second, {"norm_stats": "fixed"}) == second  # reopens


def test_a_variant_with_end_to_end_settings_trains_the_from_scratch_rows_again(tmp_path):
    import yaml

    lr = load_benchmark("label_rows")
    src = tmp_path / "bench" / "seed-0"
    (src / "labels" / "scratch-n1-f0").mkdir(parents=True)
    (src / "labels" / "contrastive-n1-f0").mkdir()
    (src / "config.yaml").write_text(yaml.safe_dump({"config": {"seed": 0}, "budget_settings": {}}))
    e2e = {"end_to_end": {"patch_size": [80, 80, 48], "batch_size": 1}}
    dst = lr.variant_folder(src, tmp_path / "var" / "seed-0", {}, e2e)
    assert yaml.safe_load((dst / "config.yaml").read_text())["budget_settings"]["end_to_end"] == e2e["end_to_end"]
    assert not (dst / "labels" / "scratch-n1-f0").exists()  # trained again with the new patches
    assert (dst / "labels" / "contrastive-n1-f0").is_symlink()  # frozen heads do not use the section
