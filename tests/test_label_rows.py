"""benchmarks/label_rows.py: the step list of one label count and the claims that share it between processes."""

import os
import subprocess
import sys

from standin import load_benchmark


def test_steps_follow_label_efficiency_names():
    lr = load_benchmark("label_rows")
    assert lr.steps(2, ["diffusion-ape"]) == [("labels/scratch-n2-f0", "scratch", None),
                                             ("labels/diffusion-ape-n2-f0", "probe", "diffusion-ape"),
                                             ("labels/finetune-diffusion-ape-n2-f0", "finetune", "diffusion-ape")]


def test_a_claim_is_held_by_a_live_process_and_taken_over_from_a_dead_one(tmp_path):
    lr = load_benchmark("label_rows")
    marker = tmp_path / "seed-0-labels_scratch-n1-f0"
    assert lr.claim(marker) and marker.read_text() == str(os.getpid())
    assert lr.claim(marker)  # this process's own claim
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        marker.write_text(str(live.pid))
        assert not lr.claim(marker)  # another process, alive: leave the step to it
    finally:
        live.kill()
        live.wait()
    assert lr.claim(marker) and marker.read_text() == str(os.getpid())  # it died: taken over
