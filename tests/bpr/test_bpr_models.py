"""Networks, the pretraining entry point and model files."""

import json

import numpy as np
import pytest
import torch

from voxdiff.bpr import (
    BodyPartRegressor,
    build_bpr,
    coords_channels,
    coords_for_patches,
    load_bpr,
    save_bpr,
    sincos_encode,
)
from voxdiff.core.checkpoint import save_checkpoint
from voxdiff.core.errors import ModelError


def _model(kind, seed=0, **arch):
    torch.manual_seed(seed)
    m = build_bpr(kind, {"channels": (8, 8, 16, 16), "patch_size": (32, 32, 32), **arch})
    # non-trivial BatchNorm statistics and calibration so that round trips are meaningful
    m.train()
    with torch.no_grad():
        m(torch.rand(4, 1, 32, 32, 16))
    m.calib_scale.fill_(2.5)
    m.calib_offset.fill_(-0.3)
    return m.eval()


@pytest.mark.parametrize("kind,channels", [("slice", 1), ("ape", 3)])
def test_forward_shape_any_patch_size(kind, channels):
    m = _model(kind)
    assert isinstance(m, BodyPartRegressor) and m.kind == kind and m.out_channels == channels
    for shape in [(2, 1, 32, 32, 32), (1, 1, 37, 29, 21)]:
        y = m(torch.rand(*shape))
        assert y.shape == (shape[0], channels) + shape[2:]


def test_slice_scores_are_constant_per_slice_and_independent_of_other_slices():
    m = _model("slice")
    x = torch.rand(1, 1, 32, 32, 24)
    y = m(x)
    assert torch.allclose(y, y[:, :, :1, :1, :].expand_as(y))
    # the same slices in a patch with other z neighbours get exactly the same scores
    y2 = m(x[..., 5:17])
    assert torch.allclose(y2[0, 0, 0, 0], y[0, 0, 0, 0, 5:17], atol=1e-5)
    # and the same in another batch composition (BatchNorm in eval mode)
    y3 = m(torch.cat([torch.rand(1, 1, 32, 32, 12), x[..., 5:17]]))
    assert torch.allclose(y3[1, 0, 0, 0], y2[0, 0, 0, 0], atol=1e-5)


def test_ape_patch_consistency_on_stride_aligned_overlap():
    """Dense head: away from the borders, a voxel's value does not depend on which patch it was cut
    from when the shift is a multiple of the network stride (what remains is the border effect)."""
    m = _model("ape", head="dense")
    vol = torch.rand(1, 1, 96, 48, 48)
    a = m(vol[:, :, :64])
    b = m(vol[:, :, 32:96])
    # shared x range 32..64; compare its central part (far from both patch borders)
    da = a[:, :, 40:56, 16:32, 16:32]
    db = b[:, :, 8:24, 16:32, 16:32]
    spread = a.std()
    assert (da - db).abs().mean() < 0.5 * spread


def test_coords_for_patches_no_grad_sincos_spacing_and_dtype():
    m = _model("ape")
    for p in m.parameters():
        p.requires_grad_(True)
    x = torch.rand(2, 1, 24, 24, 16, dtype=torch.float64)
    y = coords_for_patches(m, x)
    assert y.shape == (2, 3, 24, 24, 16) and y.dtype == torch.float64 and not y.requires_grad
    assert torch.allclose(y.float(), m(x.float()), atol=1e-5)
    y2 = coords_for_patches(m, x, sincos=2)
    assert y2.shape[1] == coords_channels(m, 2) == 15
    assert torch.allclose(y2[:, :3], y)
    assert torch.allclose(y2[:, 3:9], torch.sin(sincos_encode(y, 2)[:, 3:9].asin()), atol=1e-6)
    # patches at 1.5 mm for a model trained at 3 mm are resampled; output keeps the input size
    y3 = coords_for_patches(m, x, spacing=(1.5, 1.5, 1.5))
    assert y3.shape == y.shape and not torch.allclose(y3, y)
    with pytest.raises(ValueError):
        coords_for_patches(m, torch.rand(2, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="smaller"):
        coords_for_patches(m, torch.rand(1, 1, 2, 8, 8))
    assert m.training is False


def test_sincos_values():
    c = torch.tensor([0.25]).view(1, 1, 1, 1, 1)
    e = sincos_encode(c, 2).flatten()
    import math

    expect = [0.25, math.sin(math.pi * 0.25), math.sin(2 * math.pi * 0.25), math.cos(math.pi * 0.25), math.cos(2 * math.pi * 0.25)]
    assert torch.allclose(e, torch.tensor(expect), atol=1e-6)


@pytest.mark.parametrize("kind", ["slice", "ape"])
def test_save_load_round_trip(tmp_path, kind):
    m = _model(kind)
    save_bpr(tmp_path / "m", m)
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "model.json").is_file()
    m2 = load_bpr(tmp_path / "m")
    assert type(m2) is type(m) and not m2.training
    assert all(not p.requires_grad for p in m2.parameters())
    x = torch.rand(2, 1, 32, 32, 20)
    assert torch.allclose(m(x), m2(x), atol=1e-6)
    assert m2.preprocess == m.preprocess and m2.mm_per_unit == pytest.approx(m.mm_per_unit)
    assert load_bpr(tmp_path / "m", kind=kind).kind == kind
    # file-pair form
    save_bpr(tmp_path / "x.safetensors", m)
    assert torch.allclose(load_bpr(tmp_path / "x.safetensors")(x), m(x), atol=1e-6)


def test_load_refuses_other_kind_version_and_foreign_files(tmp_path):
    m = _model("slice")
    save_bpr(tmp_path / "m", m)
    with pytest.raises(ModelError, match="'slice' body part regressor, expected 'ape'"):
        load_bpr(tmp_path / "m", kind="ape")
    # newer BPR version
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    doc["config"]["bpr_version"] = 99
    (tmp_path / "m" / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="version"):
        load_bpr(tmp_path / "m")
    # another voxdiff model kind
    save_checkpoint(tmp_path / "bb", {"w": torch.zeros(2)}, "backbone", {"a": 1})
    with pytest.raises(ModelError, match="'backbone' model, expected 'bpr'"):
        load_bpr(tmp_path / "bb")
    # a bpr JSON whose weights do not match the architecture
    save_checkpoint(tmp_path / "bad", {"w": torch.zeros(2)}, "bpr", m.model_config())
    with pytest.raises(ModelError, match="do not match"):
        load_bpr(tmp_path / "bad")
    # not a voxdiff model at all
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.json").write_text("{not json")
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"xx")
    with pytest.raises(ModelError, match="not a voxdiff model"):
        load_bpr(tmp_path / "junk")
    with pytest.raises(ModelError, match="not found"):
        load_bpr(tmp_path / "nothing")


@pytest.mark.parametrize("pool", [1, 2])
def test_ape_anchor_distances_inside_a_patch_are_physical(pool):
    """Anchor head: inside one patch, output differences are the voxel displacements in mm (model
    spacing, R/A/S axes) divided by the calibrated unit, whatever the weights; patches of any size
    (smaller than the encoder's stride too) keep the input's shape."""
    m = _model("ape", seed=3, head="anchor", input_pool=pool)
    m.preprocess["spacing"] = [2.0, 3.0, 4.0]
    for shape in [(2, 1, 40, 36, 20), (1, 1, 9, 7, 5)]:
        y = m(torch.rand(*shape)).double()
        assert y.shape == (shape[0], 3) + shape[2:]
        mm = m.mm_per_unit
        assert torch.allclose((y[:, 0, 1:] - y[:, 0, :-1]) * mm, torch.full_like(y[:, 0, 1:], 2.0), atol=1e-3)
        assert torch.allclose((y[:, 1, :, 1:] - y[:, 1, :, :-1]) * mm, torch.full_like(y[:, 1, :, 1:], 3.0), atol=1e-3)
        assert torch.allclose((y[:, 2, ..., 1:] - y[:, 2, ..., :-1]) * mm, torch.full_like(y[:, 2, ..., 1:], 4.0), atol=1e-3)
        # channels do not mix: channel 0 is constant across A and S
        assert torch.allclose(y[:, 0, :, 1:], y[:, 0, :, :-1], atol=1e-5)
    # the patch position comes from the content: two different patches get different offsets
    a, b = m(torch.rand(1, 1, 32, 32, 32)), m(torch.zeros(1, 1, 32, 32, 32))
    assert not torch.allclose(a, b)


def test_ape_model_saved_without_head_loads_as_dense(tmp_path):
    """Models saved before the anchor head existed (no "head" in their arch) still load."""
    m = _model("ape", head="dense")
    save_bpr(tmp_path / "old", m)
    doc = json.loads((tmp_path / "old" / "model.json").read_text())
    doc["config"]["arch"].pop("head")
    (tmp_path / "old" / "model.json").write_text(json.dumps(doc))
    back = load_bpr(tmp_path / "old", kind="ape")
    assert back.head_kind == "dense"
    x = torch.rand(1, 1, 32, 32, 32)
    assert torch.allclose(back(x), m(x), atol=1e-6)


def test_texture_augmentation_is_in_plane_and_keeps_the_range():
    import numpy as np

    from voxdiff.bpr.sampling import _gauss_inplane, augment_texture

    x = torch.zeros(1, 1, 9, 9, 3)
    x[0, 0, 4, 4, 1] = 1.0
    b = _gauss_inplane(x, 1.0)
    assert abs(float(b.sum()) - 1.0) < 1e-5  # mass kept
    assert float(b[..., 0].abs().sum()) == 0.0 and float(b[..., 2].abs().sum()) == 0.0  # never across slices
    assert float(b[0, 0, 4, 4, 1]) < 0.5 and float(b[0, 0, 3, 4, 1]) > 0.0
    v = torch.rand(1, 1, 16, 16, 4)
    outs = [augment_texture(v, np.random.default_rng(s), 1.0) for s in range(8)]
    assert all(float(o.min()) >= 0.0 and float(o.max()) <= 1.0 for o in outs)
    assert any(not torch.equal(o, v) for o in outs)
    assert torch.equal(augment_texture(v, np.random.default_rng(0), 0.0), v)


@pytest.mark.parametrize("step", [1, 2])
def test_slice_context_gives_each_slice_its_neighbours_on_every_path(tmp_path, step):
    """With ``context`` c the slice model reads each slice with its c neighbours on each side,
    ``step`` slices apart: changing one slice moves exactly the scores of the slices that see it
    (only its own with c = 0), the stacked training layout and the whole-volume path (chunked along
    z, neighbours taken across chunk borders) give the same scores as the model on the whole
    volume, and the setting survives a save / load."""
    from voxdiff.bpr.inference import slice_scores_volume
    from voxdiff.bpr.sampling import Volume, slice_views

    m, m0 = _model("slice", context=2, context_step=step), _model("slice")
    assert m.arch()["context"] == 2 and "context" not in m0.arch()
    assert m.arch().get("context_step", 1) == step
    vol = torch.rand(32, 32, 23)
    x = vol[None, None]
    moved = x.clone()
    moved[..., 11] += 5.0  # one slice changed: the slices whose neighbourhood holds it move, no others
    for model, seen_by in ((m, {11 + k * step for k in range(-2, 3)}), (m0, {11})):
        d = (model.slice_scores_raw(moved) - model.slice_scores_raw(x))[0].abs()
        assert {int(i) for i in torch.nonzero(d > 1e-7)} == seen_by
    whole = m.slice_scores_raw(x)[0].detach()
    zi = (torch.arange(23)[:, None] + step * torch.arange(-2, 3)[None]).clamp(0, 22).flatten()
    torch.testing.assert_close(m.slice_scores_raw(x[..., zi], stacked=True)[0], whole)
    # one in-plane tile of the model's patch size, z in chunks of 5: the same as the whole volume
    chunked = slice_scores_volume(m, vol, raw=True, z_chunk=5)
    np.testing.assert_allclose(chunked, whole.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 5"):
        m.slice_scores_raw(x[..., :12], stacked=True)
    save_bpr(tmp_path / "m", m)
    m2 = load_bpr(tmp_path / "m")
    assert (m2.context, m2.context_step) == (2, step)
    torch.testing.assert_close(m2.slice_scores_raw(x), m.slice_scores_raw(x))
    # training views: K groups of 2c + 1 slices ``step`` voxels apart, centred on the drawn slices
    ramp = torch.arange(23, dtype=torch.float32).expand(1, 1, 32, 32, 23).contiguous()
    va, _, z = slice_views(Volume(ramp, np.eye(4), "ramp"), 16, 4, np.random.default_rng(0), aug=0.0, context=2,
                           context_step=step)
    assert va.shape == (1, 1, 16, 16, 20) and z.shape == (4,)
    groups = va[0, 0, 0, 0].view(4, 5)
    centre = groups[:, 2]
    torch.testing.assert_close(centre, z.float(), atol=1e-4, rtol=0)  # the ramp's value is its z index (affine eye)
    inner = (centre > 2 * step) & (centre < 22 - 2 * step)
    assert inner.any()
    torch.testing.assert_close((groups[inner] - centre[inner, None]),
                               step * torch.arange(-2.0, 3.0).expand(int(inner.sum()), 5), atol=1e-4, rtol=0)


def test_masked_context_gives_the_slices_beyond_the_scan_one_constant_on_every_path(tmp_path):
    """``context_fill`` "mask": a neighbour beyond the volume's end enters as ``CONTEXT_MASK_VALUE``,
    not as the end slice repeated. So changing the end slice moves only the scores of the slices that
    truly see it (with "repeat" also those that see its copies beyond the end); the stacked layout with
    ``outside``, the chunked whole-volume path and a save / load give the same scores; stacked input
    without ``outside`` is refused; the "repeat" model's saved arch is as before."""
    from voxdiff.bpr.inference import slice_scores_volume
    from voxdiff.bpr.models import CONTEXT_MASK_VALUE, slice_neighbourhood_outside, slice_neighbourhoods

    z = torch.arange(10.0)
    pos = slice_neighbourhoods(z, 2, 0, 9, 2)
    out = slice_neighbourhood_outside(z, 2, 0, 9, 2)
    raw = (z[:, None] + 2 * torch.arange(-2.0, 3.0)[None]).flatten()
    assert torch.equal(out, (raw < 0) | (raw > 9)) and int(out.sum()) == 12
    assert torch.equal(pos[~out], raw[~out])  # inside: the positions themselves, not clamped
    m, rep = _model("slice", context=2, context_step=2, context_fill="mask"), _model("slice", context=2, context_step=2)
    assert m.arch()["context_fill"] == "mask" and "context_fill" not in rep.arch()
    x = torch.rand(1, 1, 32, 32, 15)
    moved = x.clone()
    moved[..., 14] += 5.0  # the last slice: seen by slices 10, 12 and 14 at true offsets
    for model, seen_by in ((m, {10, 12, 14}), (rep, {10, 11, 12, 13, 14})):
        d = (model.slice_scores_raw(moved) - model.slice_scores_raw(x))[0].abs()
        assert {int(i) for i in torch.nonzero(d > 1e-7)} == seen_by, model.context_fill
    whole = m.slice_scores_raw(x)[0].detach()
    zz = torch.arange(15)
    zi, oi = m.neighbourhoods(zz, 15), m.neighbourhood_outside(zz, 15)
    torch.testing.assert_close(m.slice_scores_raw(x[..., zi], stacked=True, outside=oi)[0], whole)
    filled = torch.where(oi.view(1, 1, 1, 1, -1), torch.tensor(CONTEXT_MASK_VALUE), x[..., zi])
    torch.testing.assert_close(m.slice_scores_raw(filled, stacked=True, outside=oi)[0], whole)  # the fill, once
    assert not torch.allclose(m.slice_scores_raw(x[..., zi], stacked=True, outside=torch.zeros_like(oi))[0], whole)
    with pytest.raises(ValueError, match="needs `outside`"):
        m.slice_scores_raw(x[..., zi], stacked=True)
    with pytest.raises(ValueError, match="outside has shape"):
        m.slice_scores_raw(x[..., zi], stacked=True, outside=oi[:5])
    np.testing.assert_allclose(slice_scores_volume(m, x[0, 0], raw=True, z_chunk=4), whole.numpy(), rtol=1e-5, atol=1e-5)
    save_bpr(tmp_path / "m", m)
    m2 = load_bpr(tmp_path / "m")
    assert m2.context_fill == "mask"
    torch.testing.assert_close(m2.slice_scores_raw(x), m.slice_scores_raw(x))
    with pytest.raises(ValueError, match="unknown slice context_fill 'zeros'"):
        build_bpr("slice", {"context": 1, "context_fill": "zeros"})


def test_slice_views_mark_the_stacked_slices_beyond_each_views_range():
    """``return_outside``: per view, exactly the stacked positions that were clamped to its range's
    ends (view a's shorter scan, view b's whole volume); without it the views are as before."""
    from voxdiff.bpr.sampling import Volume, slice_views

    ramp = Volume(torch.arange(40, dtype=torch.float32).expand(1, 1, 32, 32, 40).contiguous(), np.eye(4), "ramp")
    offsets = 3 * torch.arange(-2.0, 3.0)
    marked_a = marked_b = 0
    for seed in range(8):
        kw = dict(aug=0.0, context=2, context_step=3, fov_aug=1.0, fov_min_mm=10.0, fov_pair=True, fov_pair_range="whole")
        va, vb, z, oa, ob = slice_views(ramp, 16, 6, np.random.default_rng(seed), return_outside=True, **kw)
        ra, rb, rz = slice_views(ramp, 16, 6, np.random.default_rng(seed), **kw)
        torch.testing.assert_close((va, vb, z), (ra, rb, rz))
        for v, o in ((va, oa), (vb, ob)):
            g = v[0, 0].amax(dim=(0, 1))
            want = (g.view(6, 5)[:, 2:3] + offsets).flatten()  # where each neighbour would be without clamping
            assert torch.equal(o, (g - want).abs() > 1e-3)
        marked_a += int(oa.sum())
        marked_b += int(ob.sum())
        assert not (ob & ~oa).any()  # the whole volume runs past its ends only where the shorter scan does
    assert marked_a > marked_b


def test_slice_fov_augmentation_gives_views_with_the_ends_of_a_shorter_scan():
    """``fov_aug``: the drawn slices and their neighbours come from a random z-range of at least
    ``fov_min_mm``, the neighbours beyond it repeating its end slices (as at the ends of a shorter
    scan), and that range lies inside the volume, not only at its ends."""
    from voxdiff.bpr.sampling import Volume, slice_views

    ramp = Volume(torch.arange(40, dtype=torch.float32).expand(1, 1, 32, 32, 40).contiguous(), np.eye(4), "ramp")
    offsets = 3 * torch.arange(-2.0, 3.0)
    inside = 0
    for seed in range(8):
        va, _, z = slice_views(ramp, 16, 6, np.random.default_rng(seed), aug=0.0, context=2, context_step=3,
                               fov_aug=1.0, fov_min_mm=10.0)
        groups = va[0, 0].amax(dim=(0, 1)).view(6, 5)  # the ramp's value is its z index (affine eye, 1 mm)
        lo, hi = float(groups.min()), float(groups.max())
        assert hi - lo >= 10.0 - 1e-3 and lo >= -1e-4 and hi <= 39 + 1e-4
        torch.testing.assert_close(groups, (groups[:, 2:3] + offsets).clamp(lo, hi), atol=1e-4, rtol=0)
        repeated = (groups == lo).sum() + (groups == hi).sum()
        inside += int(lo > 0.5 and hi < 38.5 and repeated > 2)
    assert inside >= 4  # shorter scans at any height, their end slices repeated
    # off: the neighbours reach the volume's own ends only
    va, _, _ = slice_views(ramp, 16, 40, np.random.default_rng(0), aug=0.0, context=2, context_step=3)
    assert float(va.min()) < 1e-4 and float(va.max()) > 39 - 1e-4


def test_slice_fov_pair_gives_the_second_view_the_same_slices_from_a_wider_scan():
    """``fov_pair``: view a is the shorter scan; view b holds the same slices, each with its
    neighbours from a z-range that contains view a's (so both views' centre slices agree) and reaches
    further at least sometimes, up to the volume's ends. Off, both views share one neighbourhood."""
    from voxdiff.bpr.sampling import Volume, slice_views

    ramp = Volume(torch.arange(40, dtype=torch.float32).expand(1, 1, 32, 32, 40).contiguous(), np.eye(4), "ramp")
    offsets = 3 * torch.arange(-2.0, 3.0)
    wider = 0
    for seed in range(8):
        va, vb, _ = slice_views(ramp, 16, 6, np.random.default_rng(seed), aug=0.0, context=2, context_step=3,
                                fov_aug=1.0, fov_min_mm=10.0, fov_pair=True)
        ga, gb = (v[0, 0].amax(dim=(0, 1)).view(6, 5) for v in (va, vb))
        torch.testing.assert_close(ga[:, 2], gb[:, 2], atol=1e-4, rtol=0)  # the same slices
        lo_a, hi_a, lo_b, hi_b = float(ga.min()), float(ga.max()), float(gb.min()), float(gb.max())
        assert lo_b <= lo_a + 1e-4 and hi_b >= hi_a - 1e-4 and lo_b >= -1e-4 and hi_b <= 39 + 1e-4
        # each view: its slices' neighbours, clamped to that view's own range
        torch.testing.assert_close(gb, (gb[:, 2:3] + offsets).clamp(lo_b, hi_b), atol=1e-4, rtol=0)
        wider += int((ga - gb).abs().max() > 0.5)
    assert wider >= 6
    for seed in range(4):
        va, vb, _ = slice_views(ramp, 16, 6, np.random.default_rng(seed), aug=0.0, context=2, context_step=3,
                                fov_aug=1.0, fov_min_mm=10.0)
        torch.testing.assert_close(va[0, 0].amax(dim=(0, 1)), vb[0, 0].amax(dim=(0, 1)), atol=1e-4, rtol=0)


def test_slice_fov_pair_range_whole_gives_view_b_the_whole_volume():
    """``fov_pair_range`` "whole": view b's neighbours reach the volume's own ends, clamped only there,
    while view a's are clamped to its shorter range; the same slices in both."""
    from voxdiff.bpr.sampling import Volume, slice_views

    ramp = Volume(torch.arange(40, dtype=torch.float32).expand(1, 1, 32, 32, 40).contiguous(), np.eye(4), "ramp")
    offsets = 3 * torch.arange(-2.0, 3.0)
    shorter = 0
    for seed in range(8):
        va, vb, _ = slice_views(ramp, 16, 6, np.random.default_rng(seed), aug=0.0, context=2, context_step=3,
                                fov_aug=1.0, fov_min_mm=10.0, fov_pair=True, fov_pair_range="whole")
        ga, gb = (v[0, 0].amax(dim=(0, 1)).view(6, 5) for v in (va, vb))
        torch.testing.assert_close(ga[:, 2], gb[:, 2], atol=1e-4, rtol=0)
        torch.testing.assert_close(gb, (gb[:, 2:3] + offsets).clamp(0.0, 39.0), atol=1e-4, rtol=0)
        shorter += int((ga - gb).abs().max() > 0.5)
    assert shorter >= 6


def test_slice_truncation_blanks_view_a_outside_an_inplane_box_and_keeps_view_b_whole():
    """``trunc_aug``: view a keeps a box of at least ``trunc_min`` of each in-plane axis, the window's
    floor (0) outside it, the same voxels inside as without truncation; view b is the whole crop. Off,
    the views and the random stream are exactly those of earlier versions."""
    from voxdiff.bpr.sampling import Volume, slice_views, truncate_inplane

    vol = Volume(torch.rand(1, 1, 40, 40, 30) * 0.8 + 0.1, np.eye(4), "v")
    cut = 0
    for seed in range(8):
        ref_a, ref_b, ref_z = slice_views(vol, 24, 5, np.random.default_rng(seed), aug=0.0)
        va, vb, z = slice_views(vol, 24, 5, np.random.default_rng(seed), aug=0.0, trunc_aug=1.0, trunc_min=0.5)
        torch.testing.assert_close(vb, ref_b)
        torch.testing.assert_close(z, ref_z)
        kept = va[0, 0, :, :, 0] != 0
        xs, ys = kept.any(1).nonzero().view(-1), kept.any(0).nonzero().view(-1)
        # one box: every voxel inside it kept, with view a's untruncated values
        box = (slice(int(xs.min()), int(xs.max()) + 1), slice(int(ys.min()), int(ys.max()) + 1))
        assert bool(kept[box].all()) and int(kept.sum()) == kept[box].numel()
        assert len(xs) >= 12 and len(ys) >= 12
        torch.testing.assert_close(va[0, 0][box], ref_a[0, 0][box])
        assert bool((va[0, 0][~kept] == 0).all())
        cut += int(kept.sum()) < 24 * 24
    assert cut >= 6
    off_a, off_b, _ = slice_views(vol, 24, 5, np.random.default_rng(3), aug=0.0, trunc_aug=0.0)
    on_a, _, _ = slice_views(vol, 24, 5, np.random.default_rng(3), aug=0.0)
    torch.testing.assert_close(off_a, on_a)
    # the truncation itself never blanks more than (1 - min_frac) of an axis
    v = torch.ones(1, 1, 20, 20, 2)
    for seed in range(20):
        t = truncate_inplane(v, np.random.default_rng(seed), 0.75)[0, 0, :, :, 0]
        assert t.any(1).sum() >= 15 and t.any(0).sum() >= 15


def test_separable_crop_sampling_equals_trilinear_grid_sample_with_zero_padding():
    """``sample_axes`` (one linear interpolation per axis inside the box the samples touch) gives the
    values of 3D ``grid_sample`` (trilinear, zeros outside, align_corners) at zoomed axes, partly or
    wholly outside the volume, and reproduces the voxels at integer indices."""
    import torch.nn.functional as F

    from voxdiff.bpr.sampling import Volume, sample_axes

    def norm(i, n):
        return 2.0 * i / (n - 1) - 1.0

    g = torch.Generator().manual_seed(0)
    vol = Volume(torch.rand(1, 1, 23, 17, 29, generator=g), np.eye(4))
    for k in range(80):  # k odd: unit steps (zoom 1, as the ape crops), read as narrowed views when inside
        axes = [float(torch.rand(1, generator=g)) * (n + 16) - 8
                + torch.arange(m) * (1.0 if k % 2 else 0.6 + 0.8 * float(torch.rand(1, generator=g)))
                for n, m in zip(vol.shape, (11, 9, 13))]
        if k == 0:
            axes[1] = axes[1] - 100.0  # wholly below the volume: zeros
        if k == 1:
            axes[2] = axes[2] + 100.0  # wholly beyond it
        gx, gy, gz = torch.meshgrid(*(norm(a, n) for a, n in zip(axes, vol.shape)), indexing="ij")
        ref = F.grid_sample(vol.image, torch.stack([gz, gy, gx], -1)[None].float(), mode="bilinear",
                            padding_mode="zeros", align_corners=True)
        torch.testing.assert_close(sample_axes(vol, axes), ref, atol=1e-5, rtol=0)
    assert float(sample_axes(vol, [torch.arange(5.0), torch.arange(4.0) - 50, torch.arange(3.0)]).abs().max()) == 0.0
    ints = [torch.arange(2, 9).float(), torch.arange(0, 17).float(), torch.arange(28, 20, -1).float()]
    torch.testing.assert_close(sample_axes(vol, ints)[0, 0], vol.image[0, 0][2:9][:, :, list(range(28, 20, -1))])
