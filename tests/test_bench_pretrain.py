"""benchmarks/bench_pretrain.py at a tiny size (patch 16, 2 timed pairs): the script's functions and its
printed tables keep working. Nothing here checks a speed."""

import re
import sys
from pathlib import Path

import pytest
from standin import load_benchmark
from torch import nn

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_pretrain")


def test_monai_pick_same_first_width_and_at_least_our_parameters(bench):
    ours = bench.count_parameters(bench.build_ours(4, 8, 4))
    ch, n = bench.pick_monai(4, 8, 4, ours)
    assert ch[0] == 8 and len(ch) == 4 and n >= ours
    assert all(c % 8 == 0 for c in ch) and list(ch) == sorted(ch)
    assert n == bench.monai_params(4, ch)
    # the smallest such tuple: narrowing its coarsest level by one step drops below our count
    if ch[-1] - 8 >= ch[-2]:
        assert bench.monai_params(4, ch[:-1] + (ch[-1] - 8,)) < ours


def conv_rows(res):
    return res["conv"]["rows"]


def test_measure_tiny(bench, one_thread):
    res = bench.measure(patch=16, batch=2, base=8, levels=3, cond=3, steps=2, warmup=1, conv_repeats=1,
                        larger=False)
    o, m = res["ours"], res["monai"]
    assert o["channels"] == (8, 16, 32) and m["channels"][0] == 8 and m["params"] >= o["params"]
    assert m["picked"] and m["matched"]
    assert len(o["times"]) == len(m["times"]) == 2 and len(res["ratio"]["pairs"]) == 2
    assert res["ratio"]["min"] <= res["ratio"]["median_pair"] <= res["ratio"]["max"]
    # against MONAI's faster weight layout (both are timed when ours runs channels-last)
    fastest = min([m["seconds"]] + ([res["monai_cl"]["seconds"]] if "monai_cl" in res else []))
    assert res["ratio"]["of_medians"] == pytest.approx(fastest / o["seconds"])
    assert ("monai_cl" in res) == bench.channels_last_wanted("cpu", False)
    assert {r["layout"] for r in conv_rows(res)} <= {"contiguous", "channels-last"}
    assert o["flops"] > 0 and o["gflops"] > 0
    conv = res["conv"]
    # every conv layer of our network once (each runs once a step): stem, 3 + 2 blocks of 2 convs,
    # the decoder blocks' 1x1x1 skips (2w -> w), 2 down, 2 up, the head
    n_convs = sum(isinstance(mod, (nn.Conv3d, nn.ConvTranspose3d)) for mod in bench.build_ours(4, 8, 3).modules())
    assert sum(r["count"] for r in conv["rows"]) == n_convs == 1 + 5 * 2 + 2 + 2 + 2 + 1
    assert conv["best_gflops"] == max(r["gflops"] for r in conv["rows"])
    # conv FLOPs are most of the step's counted FLOPs (the rest: the timestep MLP's matmuls)
    assert 0.9 * o["flops"] <= conv["network_convs_flops"] <= o["flops"]
    assert res["percent_of_best_conv"] == pytest.approx(100 * o["gflops"] / conv["best_gflops"])
    assert set(res["targets"]) == {"conv_60pct", "monai_2x"}
    assert len(res["engine"]["times"]) == 2 and res["engine"]["seconds"] > 0
    text = bench.report(res)
    for line in ("voxdiff unet (base 8, 3 levels)", "MONAI DiffusionModelUNet", "speed ratio voxdiff / MONAI",
                 "% of the best conv3d rate", "trained by Engine.fit", "| conv3d (forward + backward) |"):
        assert line in text


def test_main_prints_both_comparisons(bench, one_thread, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_pretrain.py", "--patch", "16", "--batch", "2", "--levels", "3",
                                      "--steps", "2", "--warmup", "1", "--conv_repeats", "1", "--brief"])
    bench.main()
    out = capsys.readouterr().out
    assert "1 thread(s)" in out and "speed ratio voxdiff / MONAI" in out and "best conv3d rate" in out
    assert "| conv3d (forward + backward) |" not in out  # --brief


def test_passes_apart(bench, one_thread):
    res = bench.measure(patch=16, batch=2, base=8, levels=3, cond=3, steps=1, warmup=0, conv_repeats=1,
                        larger=False, with_monai=False, engine=False, passes=True)
    net_rows = {bench.conv_key(r): r for r in conv_rows(res) if r["source"] == "network"}
    assert len(res["passes"]) == len(net_rows)
    for p in res["passes"]:
        whole = net_rows[bench.conv_key(p)]
        assert p["layout"] == whole["layout"]
        # forward + dW (+ dx where the network needs it) are the multiply-adds of the whole layer's step
        assert whole["flops"] == (3 if p["input_grad"] else 2) * p["forward_flops"]
        assert p["forward_s"] > 0 and p["dw_s"] >= 0
        if not p["input_grad"]:
            assert p["dx_s"] == 0
    stem = [p for p in res["passes"] if not p["input_grad"]]
    assert len(stem) == 1 and stem[0]["weight"][1] == 4  # only the stem sees the input, which needs no dx
    text = bench.report(res, verbose=False)
    assert "| conv3d, passes apart |" in text and "network convs, passes apart:" in text
    shares = [int(v) for v in re.findall(r"(\d+) % \(", text.split("network convs, passes apart:")[1])]
    assert len(shares) == 3 and 98 <= sum(shares) <= 102


def test_a_width_monai_cannot_have_is_one_line_before_anything_runs(bench, monkeypatch, capsys):
    """``--base 12``: no MONAI network has that full-resolution width (multiples of 8), so the script
    says so in one line and exits 2 instead of a traceback after the allocator and threads are set."""
    monkeypatch.setattr(sys, "argv", ["bench_pretrain.py", "--base", "12"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--base 12: MONAI's DiffusionModelUNet takes widths in multiples of 8" in err
    assert "Traceback" not in err and "--no_monai" in err
