"""DDP: the same pretrain call under torchrun with 2 CPU processes (gloo)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from voxdiff.core.checkpoint import load_checkpoint

SCRIPT = r'''
import json, os, sys
import torch
sys.path.insert(0, sys.argv[2])
from pretrain_synth import synthetic_cases
from voxdiff.pretrain import train as T

rank = int(os.environ["RANK"])
# one process group for both runs below (pretrain uses a group it finds and leaves it in place)
torch.distributed.init_process_group("gloo")
log = open(os.path.join(sys.argv[1] + f".rank{rank}.jsonl"), "w")
real_forward = T._Joint.forward
def forward(self, batch, generator):
    w = float(sum(p.detach().double().sum() for p in self.backbone.parameters()))
    log.write(json.dumps({"origin": batch["origin"].tolist(), "case": batch["case_index"].tolist(), "wsum": w}) + "\n")
    log.flush()
    return real_forward(self, batch, generator)
T._Joint.forward = forward
real_ddp = T.nn.parallel.DistributedDataParallel
def ddp(*a, **kw):
    log.write(json.dumps({"find_unused_parameters": kw["find_unused_parameters"]}) + "\n")
    return real_ddp(*a, **kw)
T.nn.parallel.DistributedDataParallel = ddp
cfg = T.PretrainConfig(method="diffusion", data=T.PretrainData(patch_size=(16, 16, 16), batch_size=1),
                       optim=T.OptimConfig(steps=4), backbone=T.BackboneConfig(base_channels=4, num_levels=2),
                       task=T.TaskOptions(diffusion_steps=50),
                       runtime=T.RuntimeConfig(log_every=2, checkpoint_every=2, bf16=False, device="cpu"))
T.pretrain(cfg, sys.argv[1], cases=synthetic_cases(2), progress=False)
# restorative uses every parameter: DDP runs with find_unused_parameters=False (it raises at the
# second step if a parameter got no gradient); batches drawn by a worker process
T._Joint.forward = real_forward
cfg2 = T.PretrainConfig(method="restorative", data=T.PretrainData(patch_size=(16, 16, 16), batch_size=1, workers=1),
                        optim=T.OptimConfig(steps=3), backbone=T.BackboneConfig(base_channels=4, num_levels=2),
                        task=T.TaskOptions(options={"shuffle_blocks": 10}),
                        runtime=T.RuntimeConfig(log_every=3, checkpoint_every=3, bf16=False, device="cpu"))
T.pretrain(cfg2, sys.argv[1] + "_restorative", cases=synthetic_cases(2), progress=False)
torch.distributed.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_process_ddp_on_cpu(tmp_path):
    script = tmp_path / "run_ddp.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ddp_out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(script), str(out), str(Path(__file__).parent)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = [[json.loads(x) for x in Path(f"{out}.rank{k}.jsonl").read_text().splitlines()] for k in (0, 1)]
    # diffusion: its backbone's null time embedding gets no gradient -> find_unused_parameters=True;
    # restorative uses every parameter -> False
    assert [x["find_unused_parameters"] for x in logs[0] if "find_unused_parameters" in x] == [True, False]
    assert (Path(f"{out}_restorative") / "backbone" / "model.safetensors").is_file()
    logs = [[x for x in lg if "origin" in x] for lg in logs]
    # the first forward is the one-patch check for unused parameters; it leaves the weights as they were
    assert all(lg[0]["wsum"] == lg[1]["wsum"] for lg in logs)
    logs = [lg[1:] for lg in logs]
    assert len(logs[0]) == len(logs[1]) == 4
    # each rank draws its own patches ...
    assert [x["origin"] for x in logs[0]] != [x["origin"] for x in logs[1]]
    # ... but the weights stay identical (gradients are averaged), and they do change
    for a, b in zip(*logs):
        assert a["wsum"] == pytest.approx(b["wsum"], rel=1e-9, abs=1e-9)
    assert logs[0][0]["wsum"] != logs[0][-1]["wsum"]
    # only rank 0 wrote: one complete output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    tensors, info = load_checkpoint(out / "backbone", kind="backbone")
    assert info["meta"]["world_size"] == 2
    ts = sorted(p.name for p in (out / "train_state").iterdir())
    assert "latest" in ts
    st, sinfo = load_checkpoint(out / "train_state" / "step_00000004", kind="train-state")
    assert "rng.gen.1" in st and len(sinfo["meta"]["rng"]) == 2
