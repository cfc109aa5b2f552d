"""benchmarks/regime_table.py on hand-made experiment folders: rows read from the steps' per-case
scores, regime differences over seeds and cases, and rows against from scratch."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from standin import load_benchmark


def _result(folder: Path, key: str, per_case: dict[str, float]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    prev = json.loads((folder / "result.json").read_text())["scores"] if (folder / "result.json").exists() else {}
    prev[key] = {c: {"1": v, "2": v, "3": None} for c, v in per_case.items()}  # organ 3 absent (NaN)
    (folder / "result.json").write_text(json.dumps({"scores": prev}))


def _folder(root: Path, probe: float, scratch: float, finetune: float | None, slope: float = 0.0) -> Path:
    cases = [f"c{i}" for i in range(6)]
    _result(root / "probe-diffusion-ape-f0", "linear", {c: probe - 0.1 for c in cases})
    _result(root / "probe-diffusion-ape-f0", "nonlinear", {c: probe + slope * i for i, c in enumerate(cases)})
    _result(root / "scratch-f0", "scratch", {c: scratch + 0.01 * i for i, c in enumerate(cases)})
    if finetune is not None:
        _result(root / "finetune-diffusion-ape-f0", "finetune", {c: finetune for c in cases})
    return root


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # constant paired differences
def test_rows_differences_and_scratch_comparison(tmp_path: Path, monkeypatch, capsys):
    rt = load_benchmark("regime_table")
    a = [_folder(tmp_path / f"a{s}", 0.40 + 0.02 * s, 0.50, 0.55) for s in (0, 1)]
    b = [_folder(tmp_path / f"b{s}", 0.30 + 0.02 * s, 0.60, None, slope=0.002) for s in (0, 1)]
    rows = rt.regime(a)
    assert set(rows) == {"diffusion-ape linear", "diffusion-ape nonlinear", "scratch", "finetune-diffusion-ape"}
    assert np.allclose(rt.seed_means(rows["diffusion-ape nonlinear"]), [0.40, 0.42])
    assert abs(rt.seed_means(rows["scratch"])[0] - 0.525) < 1e-9  # 0.50 .. 0.55 over six cases
    monkeypatch.setattr(sys, "argv", ["regime_table.py", "--a", ",".join(map(str, a)), "--b", ",".join(map(str, b)),
                                      "--names", "iid,site"])
    rt.main()
    out = capsys.readouterr().out
    first, second = out.split("each row against from scratch")
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in first.splitlines() if ln.startswith("| ")}
    assert "| 41.0 | 31.5 | -9.5 ± 0.0 | 0 / 6 |" in lines["diffusion-ape nonlinear"]
    assert "| 52.5 | 62.5 | +10.0 ± 0.0 | 6 / 0 |" in lines["scratch"]
    assert "finetune-diffusion-ape" not in out  # only regime A has it
    # within regime B: the non-linear probe (0.305, 0.325) against scratch 0.625 on both seeds
    assert "| diffusion-ape nonlinear | 31.5 ± 1.4 | -31.0 ± 1.4 | 0 / 6 |" in second


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
def test_one_set_of_seeds_against_a_chosen_row(tmp_path: Path, monkeypatch, capsys):
    rt = load_benchmark("regime_table")
    b = [_folder(tmp_path / f"b{s}", 0.30 + 0.02 * s, 0.60, None) for s in (0, 1, 2)]
    monkeypatch.setattr(sys, "argv", ["regime_table.py", "--b", ",".join(map(str, b)),
                                      "--against", "diffusion-ape nonlinear"])
    rt.main()
    out = capsys.readouterr().out
    assert "each row against diffusion-ape nonlinear" in out and " - iid" not in out  # no A/B table
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in out.splitlines() if ln.startswith("| ")}
    assert "| 32.0 ± 2.0 | |" in lines["diffusion-ape nonlinear"]  # the reference: 0.30, 0.32, 0.34
    assert "| diffusion-ape linear | 22.0 ± 2.0 | -10.0 ± 0.0 | 0 / 6 |" in lines["diffusion-ape linear"]
    assert "| scratch | 62.5 ± 0.0 | +30.5 ± 2.0 | 6 / 0 |" in lines["scratch"]  # 0.60 .. 0.65 against 0.30 .. 0.34
    monkeypatch.setattr(sys, "argv", ["regime_table.py", "--b", ",".join(map(str, b)), "--against", "nope"])
    with pytest.raises(SystemExit, match="no row 'nope'"):
        rt.main()
