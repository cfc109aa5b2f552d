"""benchmarks/selection_table.py on hand-made label-efficiency folders whose end-to-end steps
carry the compared rules' scores (``by_selection``)."""

import json
from pathlib import Path

import pytest
from standin import load_benchmark


@pytest.fixture(scope="module")
def st():
    return load_benchmark("selection_table")


def _scores(v: float, cases: list[str]) -> dict:
    return {c: {"1": v, "2": v, "3": None} for c in cases}  # organ 3 absent: NaN, left out


def _step(folder: Path, name: str, key: str, best: float, last: float, cases: list[str]) -> None:
    d = folder / "labels" / name
    d.mkdir(parents=True)
    doc = {"selection": "best", "best_step": 500, "steps_run": 2400, "scores": {key: _scores(best, cases)},
           "by_selection": {"last": {"best_step": 2400, "val_score": 0.3, "scores": {key: _scores(last, cases)}}}}
    (d / "result.json").write_text(json.dumps(doc))


@pytest.mark.filterwarnings("ignore:Precision loss")  # every case differs by the same amount
def test_rules_side_by_side_with_paired_tests(st, tmp_path, capsys):
    cases = [f"c{i}" for i in range(6)]
    folders = []
    for s in (0, 1):
        f = tmp_path / f"s{s}"
        _step(f, "scratch-n2-f0", "scratch", 0.40, 0.42 + 0.02 * s, cases)
        _step(f, "finetune-contrastive-n2-f0", "finetune", 0.30, 0.46 + 0.02 * s, cases)
        _step(f, "finetune-diffusion-ape-n2-f0", "finetune", 0.35, 0.45, cases)
        (f / "labels" / "contrastive-n2-f0").mkdir()  # a frozen probe: not an end-to-end row
        folders.append(str(f))
    st.main([",".join(folders)])
    out = capsys.readouterr().out
    assert "| 2 | scratch | best | 500, 500 | 40.0 ± 0.0 |" in out
    assert "| 2 | finetune-contrastive | last | 2400, 2400 | 47.0 ± 1.4 |" in out
    assert "contrastive-n2" not in out.replace("finetune-contrastive", "")
    # fine-tuned - scratch flips sign with the rule: -10 under best, +4 under last (each folder)
    assert "| 2 | finetune-contrastive - scratch, both best | -10.0 ± 0.0 |" in out
    assert "| 2 | finetune-contrastive - scratch, both last | +4.0 ± 0.0 |" in out
    assert "| 2 | finetune-contrastive: last - best | +17.0 ± 1.4 |" in out
    assert "+16.0; +18.0" in out
    assert "| 2 | finetune-contrastive - finetune-diffusion-ape, both best | -5.0 ± 0.0 |" in out
    assert "| 2 | finetune-contrastive - finetune-diffusion-ape, both last | +2.0 ± 1.4 |" in out


def _frozen(folder: Path, name: str, v: float, cases: list[str]) -> None:
    d = folder / "labels" / name
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"scores": {"nonlinear": _scores(v, cases)}}))


@pytest.mark.filterwarnings("ignore:Precision loss")
def test_variant_against_baseline_pairs_folders_by_position(st, tmp_path, capsys):
    """``--baseline``: the i-th baseline folder pairs with the i-th variant folder (other names), every
    row and rule in both is compared, the frozen probes included; a row only one side has is left out."""
    cases = [f"c{i}" for i in range(6)]
    var, base = [], []
    for s in (0, 1):
        b, v = tmp_path / f"base-s{s}", tmp_path / f"long-s{s}"
        _step(b, "scratch-n2-f0", "scratch", 0.40, 0.42, cases)
        _step(v, "scratch-n2-f0", "scratch", 0.40, 0.42, cases)  # the same run copied
        _step(b, "finetune-diffusion-ape-n2-f0", "finetune", 0.35, 0.45, cases)
        _step(v, "finetune-diffusion-ape-n2-f0", "finetune", 0.38 + 0.02 * s, 0.44, cases)
        _step(b, "finetune-contrastive-n2-f0", "finetune", 0.30, 0.46, cases)  # not in the variant
        _frozen(b, "diffusion-ape-n2-f0", 0.20, cases)
        _frozen(v, "diffusion-ape-n2-f0", 0.25, cases)
        base.append(str(b))
        var.append(str(v))
    st.main([",".join(var), "--baseline", ",".join(base)])
    out = capsys.readouterr().out.split("variant - baseline")[1]
    assert "| 2 | finetune-diffusion-ape | best | +4.0 ± 1.4 |" in out
    assert "+3.0; +5.0" in out
    assert "| 2 | finetune-diffusion-ape | last | -1.0 ± 0.0 |" in out
    assert "| 2 | frozen-diffusion-ape-nonlinear | - | +5.0 ± 0.0 |" in out
    assert "| 2 | scratch | best | +0.0 ± 0.0 |" in out
    assert "contrastive" not in out
    with pytest.raises(SystemExit, match="names 1 folders for 2"):
        st.main([",".join(var), "--baseline", base[0]])
