"""benchmarks/variation_table.py on hand-made label-efficiency folders: ``PATH@N`` keeps one
protocol's rows out of another's, the paired tests use only the folders that have the rows, and the
figure is drawn from the same rows."""

import json
from pathlib import Path

import pytest
from standin import load_benchmark


@pytest.fixture(scope="module")
def vt():
    return load_benchmark("variation_table")


def _step(folder: Path, name: str, key: str, per_case: dict[str, float], n_train: int) -> None:
    """``labels/NAME/result.json``: every case two organs of Dice ``v`` and one absent (NaN)."""
    d = folder / "labels" / name
    d.mkdir(parents=True)
    scores = {c: {"1": v, "2": v, "3": None} for c, v in per_case.items()}
    (d / "result.json").write_text(json.dumps({"scores": {key: scores}, "train_cases": [f"t{i}" for i in range(n_train)]}))


def _folders(root: Path) -> dict[str, Path]:
    cases = [f"c{i}" for i in range(6)]
    out = {}
    for s in (0, 1):
        one = out[f"one-s{s}"] = root / f"one-s{s}"  # 1 label, the protocol under study
        _step(one, "scratch-n1-f0", "scratch", {c: 0.30 + 0.02 * s for c in cases}, 1)
        _step(one, "finetune-diffusion-ape-n1-f0", "finetune", {c: 0.35 + 0.02 * s for c in cases}, 1)
        full = out[f"all-s{s}"] = root / f"all-s{s}"  # all labels, and a 1-label row of another protocol
        _step(full, "scratch-nall-f0", "scratch", {c: 0.60 for c in cases}, 7)
        _step(full, "finetune-diffusion-ape-nall-f0", "finetune", {c: 0.64 for c in cases}, 7)
        _step(full, "scratch-n1-f0", "scratch", {c: 0.05 for c in cases}, 1)
    return out


def test_at_filter_table_paired_and_figure(vt, tmp_path, capsys):
    f = _folders(tmp_path)
    b = ",".join([str(f["one-s0"]), str(f["one-s1"]), f"{f['all-s0']}@all", f"{f['all-s1']}@all"])
    vt.main(["--a", str(f["all-s0"]), "--b", b, "--names", "other,fixed", "--methods", "scratch,finetune-diffusion-ape",
             "--paired", "1,all", "--label_methods", "diffusion-ape", "--figure", str(tmp_path / "fig")])
    out = capsys.readouterr().out
    # B's 1-label scratch row: 30 and 32 from the 1-label folders; the other protocol's 5.0 is left out
    assert "| scratch | 1 | 5.0 | 31.0 ± 1.4 |" in out
    assert "| scratch | all | 60.0 | 60.0 ± 0.0 |" in out
    # paired at 1 label over the two 1-label folders only: +5.0 on each, every case better
    assert "| 1 | diffusion-ape fine-tuned - from scratch | 2 | +5.0 ± 0.0 |" in out
    assert "| all | diffusion-ape fine-tuned - from scratch | 2 | +4.0 ± 0.0 |" in out
    assert (tmp_path / "fig" / "label_efficiency.png").stat().st_size > 0

    rows = vt.figure_rows(vt.collect(b.split(","), ["scratch", "finetune-diffusion-ape"]))
    got = {(r["method"], r["mode"], r["n_train"]): r["summary"]["mean"]["mean"] for r in rows}
    assert got == pytest.approx({("from-scratch", "scratch", 1): 0.31, ("from-scratch", "scratch", 7): 0.60,
                                 ("diffusion-ape", "fine-tuned", 1): 0.36, ("diffusion-ape", "fine-tuned", 7): 0.64})


def test_entry(vt):
    assert vt.entry("runs/x") == (Path("runs/x"), None)
    assert vt.entry("runs/x@1+2") == (Path("runs/x"), {"1", "2"})
