"""benchmarks/bench_bpr_threads.py in its dry-run mode: each kind trained at each thread count for
the warm-up and the full step count, with the torch thread count restored after each run."""

import json

import torch
from standin import load_benchmark


def test_bpr_thread_benchmark_trains_each_kind_at_each_count(tmp_path, capsys):
    bt = load_benchmark("bench_bpr_threads")
    before = torch.get_num_threads()
    out = tmp_path / "bt"
    assert bt.main(["--quick", "--out", str(out), "--threads", "1", "2", "--json", str(tmp_path / "r.json")]) == 0
    assert torch.get_num_threads() == before
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["kind"], r["threads"]) for r in rows] == [("slice", 1), ("slice", 2), ("ape", 1), ("ape", 2)]
    for r in rows:
        run = out / f"{r['kind']}-t{r['threads']}"
        log = (run / "log.csv").read_text().splitlines()
        assert len(log) == 1 + r["steps"] == 1 + 1 + 3  # header, warm-up 1 + 3 timed steps
        assert (run / "model.safetensors").is_file() and r["run_s"] > 0
    # the ape runs were anchored on the benchmark's own slice model
    assert (out / "slice-anchor" / "model.safetensors").is_file()
    text = capsys.readouterr().out
    assert "| ape | 2 |" in text and "| slice | 1 |" in text
