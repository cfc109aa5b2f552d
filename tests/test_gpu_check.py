"""benchmarks/gpu_check.sh in its CPU dry-run mode (tiny sizes): the script a GPU machine runs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_demo")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run(tmp_path, tiny_demo):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VOXDIFF_TEST_DEVICE")}
    # the demo step resumes a copy of a finished tiny demo (tests/conftest.py; a fresh one is
    # test_demo_end_to_end_on_the_tiny_budget): the script's demo command, resume and step report
    shutil.copytree(tiny_demo[0], tmp_path / "demo")
    env.update(PYTHON=sys.executable, WHEEL_DIR=str(tmp_path / "no_wheels"), GPU_CHECK_TIMEOUT="240",
               OMP_NUM_THREADS="1", DEMO_OUT=str(tmp_path / "demo"))
    report = tmp_path / "report.json"
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick",
                          "--ct_shape", "64", "64", "40", "--threads", "1", "--workers", "0", "1", "--json", str(report),
                          "--demo=tiny"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not (tmp_path / "no_wheels" / "site").exists()  # everything importable: nothing installed
    for line in ("pretrain engine, 3 steps, workers 0", "pretrain engine, 3 steps, workers 1", "batch assembly vs device step", "features 64x64x40 CT"):
        assert line in out.stdout, out.stdout
    # then the demo (tiny budget here): it resumed the folder (every step finished) and printed the
    # report, then each step's own seconds
    assert "[skip] probe-diffusion-ape-f0 (finished earlier)" in out.stdout, out.stdout[-2000:]
    assert "[run ]" not in out.stdout and "Dice (%) on held-out phantoms" in out.stdout
    assert (tmp_path / "demo" / "report.md").is_file()
    for step in ("phantoms", "bpr-ape", "pretrain-diffusion-ape", "probe-diffusion-ape-f0", "finetune-contrastive-f0"):
        assert f"  {step}: " in out.stdout, out.stdout[-2000:]
    r = json.loads(report.read_text())
    assert r["env"]["device"] == "cpu" and r["env"]["quick"] is True
    assert [p["workers"] for p in r["pretrain"]] == [0, 1]
    for p in r["pretrain"]:
        assert p["steps"] == 3 and p["it_per_s"] > 0 and p["it_per_s_steady"] > 0 and p["peak_gpu_GiB"] is None
        assert p["loss"] == p["loss"]
    # the same batches for any number of workers: the same loss after the same steps
    assert r["pretrain"][0]["loss"] == r["pretrain"][1]["loss"]
    s = r["split"]
    assert s["batch_ms"] > 0 and s["step_ms"] > 0 and abs(s["batch_fraction"] + s["step_fraction"] - 1) < 0.01
    f = r["features"]
    # 64x64x40 at 0.8x0.8x1 mm -> at most 52x52x20 on the 1x1x2 mm grid after cropping to the body
    assert all(0 < g <= m for g, m in zip(f["grid_shape"], (52, 52, 20)))
    shapes = f["feature_shapes"]
    assert len(shapes) == 3 and shapes[0][2:] == f["grid_shape"]  # finest level at full resolution
    assert [s[1] for s in shapes] == [4, 8, 16]  # quick model: base 4, 3 levels


def test_gpu_check_refuses_cuda_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA device is available" in out.stderr and "Traceback" not in out.stderr
