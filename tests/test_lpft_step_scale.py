"""benchmarks/lpft_step_scale.py: how far one backbone step moves the standardised features a head sees."""

import copy

import pytest
import torch
from standin import StandinExtractor, load_benchmark
from standin import two_organ_case as _case

from voxdiff.probe.heads import make_head

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs():
    c = _case(0)
    x = torch.from_numpy(((c.image + 200.0) / 600.0).clip(0, 1))[None, None].float()
    y = torch.from_numpy(c.label.astype("int64"))[None]
    return x, y


def _head(ext, x, std_factor=1.0):
    torch.manual_seed(3)
    head = make_head("nonlinear", [int(lv.channels) for lv in ext.levels], 14, 8, 1)
    torch.nn.init.normal_(head.out.weight, std=0.1)
    with torch.no_grad():
        pyr = ext(x)
    for s, f in zip(head.scales, pyr):
        flat = f.transpose(0, 1).reshape(f.shape[1], -1)
        s.set_stats(flat.mean(1), flat.std(1) * std_factor)
    return head.eval()


def test_a_zero_step_changes_nothing_and_the_backbone_is_restored():
    ss = load_benchmark("lpft_step_scale")
    ext = StandinExtractor(channels=(4, 8))
    x, y = _inputs()
    head = _head(ext, x)
    before = copy.deepcopy(ext.backbone.state_dict())
    res = ss.step_response(ext, head, x, y, [0.0, 1e-3])
    zero = [s for s in res["steps"] if s["lr"] == 0.0]
    assert [s["kind"] for s in zero] == ["adam", "random"]
    for s in zero:
        assert s["raw_rms"] == [0.0, 0.0] and s["standardised_rms"] == [0.0, 0.0] and s["logit_rms"] == 0.0
        assert s["loss"] == pytest.approx(res["loss"], rel=1e-6)
    moved = [s for s in res["steps"] if s["lr"] == 1e-3]
    assert all(s["logit_rms"] > 0 and min(s["raw_rms"]) > 0 for s in moved)  # (so the checks above can fail)
    after = ext.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in ext.backbone.parameters())  # the extractor's frozen flags are back


def test_the_head_divides_the_same_raw_change_by_its_channels_spread():
    ss = load_benchmark("lpft_step_scale")
    ext = StandinExtractor(channels=(4, 8))
    x, y = _inputs()
    wide, narrow = _head(ext, x), _head(ext, x, std_factor=0.1)
    a = ss.step_response(ext, wide, x, y, [1e-3])
    b = ss.step_response(ext, narrow, x, y, [1e-3])
    assert b["feature_std"] == pytest.approx([0.1 * v for v in a["feature_std"]], rel=1e-5)
    ra, rb = (next(s for s in r["steps"] if s["kind"] == "random") for r in (a, b))
    assert rb["raw_rms"] == pytest.approx(ra["raw_rms"], rel=1e-6)  # the random step does not depend on the head
    assert rb["standardised_rms"] == pytest.approx([10 * v for v in ra["standardised_rms"]], rel=1e-4)


def test_the_adam_step_descends_where_a_random_step_of_the_same_size_barely_moves():
    ss = load_benchmark("lpft_step_scale")
    ext = StandinExtractor(channels=(4, 8))
    x, y = _inputs()
    res = ss.step_response(ext, _head(ext, x), x, y, [1e-4])
    adam, rand = res["steps"]
    assert adam["loss"] < res["loss"] and not adam["loss_rises"]
    assert abs(rand["loss"] - res["loss"]) < 0.2 * (res["loss"] - adam["loss"])
    assert adam["logit_rms"] > 3 * rand["logit_rms"]


def test_a_step_far_too_large_is_flagged_as_raising_the_loss():
    ss = load_benchmark("lpft_step_scale")
    ext = StandinExtractor(channels=(4, 8))
    x, y = _inputs()
    res = ss.step_response(ext, _head(ext, x, std_factor=0.01), x, y, [1e-4, 0.3])
    small, big = (next(s for s in res["steps"] if s["kind"] == "adam" and s["lr"] == lr) for lr in (1e-4, 0.3))
    assert not small["loss_rises"] and big["loss_rises"] and big["loss"] > res["loss"]


def test_bad_options_are_refused(tmp_path):
    ss = load_benchmark("lpft_step_scale")
    with pytest.raises(SystemExit, match="not an experiment folder"):
        ss.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="--lrs must be comma-separated numbers"):
        ss.main([str(tmp_path), "--lrs", "1e-5,fast"])
    with pytest.raises(SystemExit, match="--lrs must be >= 0"):
        ss.main([str(tmp_path), "--lrs=-1e-5"])
