"""The pretraining data path: batches by step (workers, resume), int16 memory maps, no per-step sync."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from pretrain_synth import synthetic_case, synthetic_cases

from voxdiff.core.config import from_dict
from voxdiff.core.errors import InputError, TrainingError
from voxdiff.core.trainstate import latest_train_state, read_train_state
from voxdiff.data.types import Case
from voxdiff.pretrain.data import StepBatches, step_batches, step_generator
from voxdiff.pretrain.tasks.base import get_task_class, make_task_config
from voxdiff.pretrain.tasks.diffusion import DiffusionTask
from voxdiff.pretrain.train import (
    EMA,
    Dist,
    MetricLog,
    PretrainConfig,
    _Joint,
    build_task_and_backbone,
    load_cases,
    pretrain,
    unused_parameter_names,
)


def tiny(**kw) -> PretrainConfig:
    base = dict(method="diffusion", patch_size=(16, 16, 16), batch_size=2, steps=4, base_channels=4, num_levels=3,
                log_every=2, checkpoint_every=2, warmup_steps=1, lr=2e-3, bf16=False, diffusion_steps=100,
                threads=1)
    base.update(kw)
    return from_dict(PretrainConfig, base)


@pytest.fixture(scope="module")
def cases():
    return synthetic_cases(3)


def mapped(cases, root) -> list[Case]:
    """The cases as int16 memory maps (what a preprocessing cache gives with mmap=True)."""
    out = []
    for i, c in enumerate(cases):
        p = root / f"c{i}.npy"
        np.save(p, np.clip(np.rint(c.image), -32768, 32767).astype(np.int16))
        out.append(Case(np.load(p, mmap_mode="r"), None, c.meta))
    return out


def _state(out):
    return read_train_state(latest_train_state(out / "train_state"))


def _assert_same_weights(a, b):
    sa, _ = _state(a)
    sb, _ = _state(b)
    keys = [k for k in sa if k.startswith(("model.", "ema.", "optim."))]
    assert keys and keys == [k for k in sb if k.startswith(("model.", "ema.", "optim."))]
    for k in keys:
        assert torch.equal(sa[k], sb[k]), k


def test_batches_depend_on_seed_rank_and_step_only(cases):
    task = DiffusionTask({"diffusion_steps": 20})
    sb = StepBatches(task.sample_batch, cases, 2, (16, 16, 16), seed=7, rank=0)
    from_zero = list(step_batches(sb, 0, 5))
    from_three = list(step_batches(sb, 3, 5, workers=2, prefetch_factor=1))
    for a, b in zip(from_zero[3:], from_three):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # different steps and ranks draw different patches
    assert len({tuple(b["origin"].flatten().tolist()) for b in from_zero}) == 5
    other_rank = StepBatches(task.sample_batch, cases, 2, (16, 16, 16), seed=7, rank=1)[0]
    assert not torch.equal(other_rank["image"], from_zero[0]["image"])
    assert step_generator(7, 0, 3).integers(1 << 30) == step_generator(7, 0, 3).integers(1 << 30)


def test_workers_give_bit_identical_training_and_resume(tmp_path, cases):
    a = pretrain(tiny(workers=0), tmp_path / "w0", cases=cases, progress=False)
    b = pretrain(tiny(workers=2), tmp_path / "w2", cases=cases, progress=False)
    _assert_same_weights(a, b)
    la = [r["loss"] for r in map(json.loads, (a / "metrics.jsonl").read_text().splitlines())]
    lb = [r["loss"] for r in map(json.loads, (b / "metrics.jsonl").read_text().splitlines())]
    assert la == lb and len(la) == 2
    # interrupted after 2 steps and resumed (with workers) = uninterrupted
    c = pretrain(tiny(workers=2), tmp_path / "r", cases=cases, progress=False, stop_after=2)
    assert _state(c)[1]["meta"]["step"] == 2
    pretrain(tiny(workers=2), c, cases=cases, progress=False, resume=True)
    _assert_same_weights(b, c)
    # the seed matters (the test can fail)
    d = pretrain(tiny(workers=0, seed=1), tmp_path / "s1", cases=cases, progress=False)
    sa, _ = _state(a)
    sd, _ = _state(d)
    assert not torch.equal(sa["model.backbone.stem.weight"], sd["model.backbone.stem.weight"])


@pytest.mark.parametrize("method,options", [("diffusion", {}), ("restorative", {"shuffle_blocks": 20}),
                                            ("contrastive", {"n_pairs": 32})])
def test_tasks_draw_the_same_batches_from_int16_memory_maps(tmp_path, cases, method, options):
    cls = get_task_class(method)
    task = cls(make_task_config(cls, options, defaults=tiny(method=method)))
    maps = mapped(cases, tmp_path)
    assert isinstance(maps[0].image, np.memmap) and maps[0].image.dtype == np.int16
    ints = [Case(np.asarray(m.image).astype(np.float32), None, m.meta) for m in maps]
    a = task.sample_batch(maps, 3, (16, 16, 8), np.random.default_rng(5))
    b = task.sample_batch(ints, 3, (16, 16, 8), np.random.default_rng(5))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert a["image"].dtype == torch.float32 and 0 <= float(a["image"].min()) < float(a["image"].max()) <= 1


def test_pretrain_from_a_cache_uses_memory_maps(tmp_path):
    data = tmp_path / "cts"
    data.mkdir()
    for i in range(2):
        c = synthetic_case(i, shape=(40, 40, 24))
        nib.save(nib.Nifti1Image(c.image.astype(np.int16), c.meta.affine), str(data / f"ct{i}.nii.gz"))
    cfg = tiny(data=[str(data)], data_kind="folder", cache_dir=str(tmp_path / "cache"), workers=2, steps=2)
    cfg.preprocess.crop_to_body = False
    loaded = load_cases(cfg)
    assert all(isinstance(c.image, np.memmap) and c.image.dtype == np.int16 for c in loaded)
    in_memory = load_cases(tiny(data=[str(data)], data_kind="folder"))
    assert all(c.image.dtype == np.float32 and not isinstance(c.image, np.memmap) for c in in_memory)
    out = pretrain(cfg, tmp_path / "run", progress=False)
    assert (out / "backbone" / "model.safetensors").is_file()
    with pytest.raises(InputError, match="workers must be >= 0"):
        pretrain(tiny(workers=-1), tmp_path / "bad", cases=loaded, progress=False)


def test_nan_between_log_steps_is_caught_before_the_next_checkpoint(tmp_path, cases, nan_task):
    # logged every 4 steps, checkpoints every 3: the NaN of step 5 is found at step 6 (a checkpoint
    # step), reported with its own step, and never written
    out = tmp_path / "n"
    with pytest.raises(TrainingError, match=r"loss is nan at step 5.*last good checkpoint \(step 3\)"):
        pretrain(tiny(method="nan_after_3", steps=12, log_every=4, checkpoint_every=3), out, cases=cases,
                 progress=False)
    assert nan_task.calls == 6
    assert latest_train_state(out / "train_state").name == "step_00000003"
    tensors, _ = _state(out)
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.dtype.is_floating_point)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4]


def test_metric_log_sums_on_the_device_and_reduces_once():
    log = MetricLog()
    log.add({"loss": torch.tensor(1.0), "per": [1.0, 3.0], "b": {"sum": torch.tensor(6.0), "count": torch.tensor(3)}})
    log.add({"loss": torch.tensor([2.0, 4.0]), "b": {"sum": torch.tensor(0.0), "count": torch.tensor(0)},
             "empty": {"sum": torch.tensor(0.0), "count": torch.tensor(0)}})
    assert log.reduce(Dist(), torch.device("cpu")) == {"loss": pytest.approx(7 / 3), "per": 2.0, "b": 2.0}
    assert log.reduce(Dist(), torch.device("cpu")) == {}


def test_ema_foreach_update_matches_the_formula():
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(m, 0.9)
    before = {k: v.clone() for k, v in ema.state().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    m[1].num_batches_tracked += 5
    ema.update(m, step=100)
    d = min(0.9, 101 / 110)
    for k, v in m.state_dict().items():
        if v.dtype.is_floating_point:
            assert torch.allclose(ema.state()[k], d * before[k] + (1 - d) * v, atol=1e-6), k
        else:
            assert torch.equal(ema.state()[k], v)
    assert not torch.equal(ema.state()["0.weight"], before["0.weight"])


@pytest.mark.parametrize("method,options,expect", [
    ("restorative", {"shuffle_blocks": 20}, []),
    ("contrastive", {"n_pairs": 32}, ["backbone.out_conv.weight"]),
    ("diffusion", {}, ["backbone.null_embedding"]),
])
def test_unused_parameters_are_found_per_task_without_side_effects(cases, method, options, expect):
    """DDP gets find_unused_parameters=True only where a parameter really gets no gradient."""
    cfg = tiny(method=method, task_options=options)
    torch.manual_seed(0)
    task, backbone, _ = build_task_and_backbone(cfg)
    joint = _Joint(backbone, task)
    before = {k: v.clone() for k, v in joint.state_dict().items()}
    rng_before = torch.get_rng_state()
    names = unused_parameter_names(joint, task, cases, cfg, torch.device("cpu"))
    for e in expect:
        assert e in names, names
    if not expect:
        assert names == []
    # nothing changed: weights, buffers (BatchNorm statistics of the projector), grads, the RNG
    after = joint.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in joint.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_conditioned_diffusion_on_memory_maps_matches_float_volumes(tmp_path):
    """Whole-volume BPR fields computed from int16 maps = from float32 volumes of the same values,
    and the field crops of every batch agree."""
    from pretrain_synth import StandInBPR

    cases = synthetic_cases(2, shape=(24, 20, 16))
    maps = mapped(cases, tmp_path)
    floats = [Case(np.asarray(m.image).astype(np.float32), None, m.meta) for m in maps]
    tasks = []
    for cs, sub in ((maps, "m"), (floats, "f")):
        task = DiffusionTask({"condition": "ape", "diffusion_steps": 50}, bpr=StandInBPR("ape"))
        task.prepare(cs, cache_dir=tmp_path / sub)
        tasks.append(task)
    for fa, fb in zip(tasks[0]._fields, tasks[1]._fields):
        assert fa.shape == fb.shape and all(np.array_equal(a, b) for a, b in zip(fa.profiles, fb.profiles))
    a = tasks[0].sample_batch(maps, 3, (16, 16, 16), np.random.default_rng(1))
    b = tasks[1].sample_batch(floats, 3, (16, 16, 16), np.random.default_rng(1))
    assert a.keys() == b.keys() and "cond_profiles" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert float(tasks[0].batch_condition(a).std()) > 0


@pytest.mark.parametrize("workers", [0, 1])
def test_a_user_error_while_drawing_batches_keeps_its_message(workers):
    from voxdiff.core.errors import ModelError

    def bad(cases, batch_size, patch_size, rng):
        raise ModelError("/data/ct7.npy", "unreadable volume")

    with pytest.raises(ModelError, match=r"^/data/ct7.npy: unreadable volume$"):
        list(step_batches(StepBatches(bad, [], 1, (4, 4, 4), seed=0), 0, 3, workers=workers))
