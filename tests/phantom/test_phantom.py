"""Synthetic CT phantoms: determinism, anatomy (presence, volumes, left/right, up/down), intensity
overlap between organs, the nnU-Net writer, the CLI and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from voxdiff.core.errors import InputError
from voxdiff.data.labels import ORGAN_IDS, ORGAN_NAMES, dataset_json_labels
from voxdiff.data.phantom import PhantomConfig, case_plan, generate_phantom, make_phantom_dataset, preview_png

# small grid for speed (about 0.2 s per case); realism checks use the default 128x128x96 grid
SMALL = dict(shape=(56, 56, 40), spacing_xy=(6.0, 7.0), spacing_z=(5.0, 12.0))

# plausible organ volumes (mL) at the default grid; documented in docs/PHANTOMS.md
VOLUME_RANGES = {
    "spleen": (70, 450),
    "right_kidney": (70, 300),
    "left_kidney": (60, 300),
    "gallbladder": (8, 120),
    "esophagus": (3, 60),
    "liver": (800, 2800),
    "stomach": (100, 900),
    "aorta": (20, 250),
    "inferior_vena_cava": (20, 200),
    "portal_and_splenic_vein": (5, 60),
    "pancreas": (25, 160),
    "right_adrenal_gland": (1, 20),
    "left_adrenal_gland": (1, 20),
}


@pytest.fixture(scope="module")
def abdomen_cases():
    cfg = PhantomConfig(z_modes=("abdomen",))
    return [generate_phantom(s, cfg) for s in (11, 12, 13)]


def _centroid_world(case, organ: int) -> np.ndarray:
    idx = np.argwhere(case.label == organ)
    c = idx.mean(axis=0)
    return (case.meta.affine @ np.r_[c, 1.0])[:3]


def test_deterministic_and_seed_dependent():
    cfg = PhantomConfig(**SMALL)
    generate = getattr(generate_phantom, "__wrapped__", generate_phantom)  # the generator, not the suite's memo
    a, b, c = generate(3, cfg), generate(3, cfg), generate(4, cfg)
    assert a.image.dtype == np.float32 and a.label.dtype == np.uint8
    assert a.image.shape == a.label.shape == cfg.shape
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.meta.affine, b.meta.affine)
    assert a.meta.extra == b.meta.extra
    assert not np.array_equal(a.label, c.label)
    assert np.abs(a.image - c.image).mean() > 10


def test_affine_is_ras_with_sampled_spacing():
    cfg = PhantomConfig(**SMALL)
    case = generate_phantom(5, cfg)
    assert nib.aff2axcodes(case.meta.affine) == ("R", "A", "S")
    sp = np.linalg.norm(case.meta.affine[:3, :3], axis=0)
    np.testing.assert_allclose(sp, case.meta.spacing)
    assert cfg.spacing_xy[0] <= sp[0] and sp[0] == sp[1]
    assert cfg.spacing_z[0] - 1e-6 <= sp[2] <= cfg.spacing_z[1] + 1e-6
    ex = case.meta.extra
    assert ex["z_mode"] in cfg.z_modes and ex["phase"] in cfg.phases
    lo, hi = ex["scan_z_mm"]
    z_first = case.meta.affine[2, 3]
    assert abs(lo - z_first) < 0.1 and hi > lo


def test_every_organ_present_with_plausible_volume(abdomen_cases):
    for case in abdomen_cases:
        vox_ml = float(np.prod(case.meta.spacing)) / 1000.0
        counts = np.bincount(case.label.ravel(), minlength=14)
        assert set(np.unique(case.label)) <= set(range(14))
        for oid in ORGAN_IDS:
            lo, hi = VOLUME_RANGES[ORGAN_NAMES[oid]]
            vol = counts[oid] * vox_ml
            assert lo <= vol <= hi, f"{case.case_id} {ORGAN_NAMES[oid]}: {vol:.1f} mL not in [{lo}, {hi}]"
            assert case.meta.extra["organ_volumes_ml"][oid] == pytest.approx(vol, abs=0.2)


def test_landmarks_match_the_labels(abdomen_cases):
    """Landmark heights (world mm, same frame as the affine) agree with the painted organs."""
    for case in abdomen_cases:
        lm = case.meta.extra["landmarks_z_mm"]
        for key, organ in (("kidney_right_center", 2), ("kidney_left_center", 3)):
            assert abs(_centroid_world(case, organ)[2] - lm[key]) < 15, key
        aff = case.meta.affine
        zmax = aff[2, 3] + aff[2, 2] * np.argwhere(case.label == 6)[:, 2].max()
        assert abs(zmax - lm["liver_top"]) < 15
        assert lm["kidney_right_center"] < lm["kidney_left_center"]


def test_left_right_in_world_coordinates(abdomen_cases):
    # RAS+: world x grows toward the patient's right
    for case in abdomen_cases:
        liver, spleen = _centroid_world(case, 6), _centroid_world(case, 1)
        rk, lk = _centroid_world(case, 2), _centroid_world(case, 3)
        aorta, ivc = _centroid_world(case, 8), _centroid_world(case, 9)
        radr, ladr = _centroid_world(case, 12), _centroid_world(case, 13)
        assert liver[0] > spleen[0] + 50
        assert rk[0] > lk[0] + 80
        assert ivc[0] > aorta[0] + 15
        assert radr[0] > ladr[0]
        # gallbladder on the right, stomach on the left, aorta/IVC anterior to the kidneys
        assert _centroid_world(case, 4)[0] > 0 + case.meta.extra["subject_to_world_mm"][0]
        assert _centroid_world(case, 7)[0] < liver[0]
        assert aorta[1] > (rk[1] + lk[1]) / 2


def test_superior_inferior_order():
    cfg = PhantomConfig(z_modes=("chest_abdomen",), **{k: v for k, v in SMALL.items() if k != "spacing_z"}, spacing_z=(3.0, 12.0))
    case = generate_phantom(21, cfg)
    aff = case.meta.affine
    zw = lambda k: aff[2, 3] + aff[2, 2] * k  # noqa: E731
    body = case.image > -500
    lung = (case.image < -600) & (case.label == 0)
    # lungs: inside the body outline (exclude outside air by a per-slice convex-ish test: rows between body voxels)
    inner = np.zeros_like(lung)
    for k in range(case.image.shape[2]):
        xs = np.nonzero(body[:, :, k].any(axis=1))[0]
        ys = np.nonzero(body[:, :, k].any(axis=0))[0]
        if xs.size and ys.size:
            inner[xs.min() + 5 : xs.max() - 5, ys.min() + 5 : ys.max() - 5, k] = True
    lung &= inner
    z_lung = zw(np.argwhere(lung)[:, 2].mean())
    z_liver = zw(np.argwhere(case.label == 6)[:, 2].mean())
    z_kid = zw(np.argwhere(np.isin(case.label, (2, 3)))[:, 2].mean())
    assert z_lung > z_liver > z_kid
    # the right kidney sits lower than the left one; adrenals above the kidneys
    assert _centroid_world(case, 2)[2] < _centroid_world(case, 3)[2]
    assert _centroid_world(case, 12)[2] > _centroid_world(case, 2)[2]
    lm = case.meta.extra["landmarks_z_mm"]
    order = ["pubic_symphysis", "iliac_crest", "aortic_bifurcation", "kidney_right_center", "pancreas", "liver_top", "heart_top", "lung_apex"]
    zs = [lm[k] for k in order]
    assert zs == sorted(zs), dict(zip(order, zs))


def test_pelvis_is_low_and_z_range_varies():
    cfg = PhantomConfig(z_modes=("abdomen_pelvis",), **SMALL)
    case = generate_phantom(31, cfg)
    bone = case.image > 350
    k = np.argwhere(bone)[:, 2]
    # lowest slices hold the femoral heads: bone lateral to the midline on both sides
    low = bone[:, :, : max(2, case.image.shape[2] // 8)]
    xs = np.argwhere(low)[:, 0]
    assert xs.size and xs.min() < case.image.shape[0] * 0.35 and xs.max() > case.image.shape[0] * 0.65
    assert k.min() == 0
    # different seeds scan different z-ranges relative to the anatomy
    spans = set()
    for s in range(6):
        c = generate_phantom(s, PhantomConfig(**SMALL))
        lm = c.meta.extra["landmarks_z_mm"]
        lo, hi = c.meta.extra["scan_z_mm"]
        spans.add((c.meta.extra["z_mode"], round(lo - lm["pubic_symphysis"], -1)))
    assert len(spans) >= 4


def _dice_per_organ(pred: np.ndarray, gt: np.ndarray) -> list[float]:
    out = []
    for o in ORGAN_IDS:
        p, g = pred == o, gt == o
        den = p.sum() + g.sum()
        out.append(2 * (p & g).sum() / den if den else np.nan)
    return out


def test_organs_not_identifiable_from_intensity_alone():
    """A Bayes classifier on HU alone (per-class HU histograms fitted on some phantoms, with and
    without class priors) gives low Dice on other phantoms: shape, texture and context matter."""
    cfg = PhantomConfig(z_modes=("abdomen",), **SMALL)
    cases = [generate_phantom(s, cfg) for s in range(40, 47)]
    bins = np.arange(-1100, 3200, 5)

    def fit(cs):
        h = np.zeros((14, len(bins) + 1))
        for c in cs:
            np.add.at(h, (c.label.ravel().astype(int), np.digitize(c.image.ravel(), bins)), 1)
        return h

    h = fit(cases[:5])
    rules = {"bayes": h.argmax(0), "balanced": (h / np.maximum(h.sum(1, keepdims=True), 1)).argmax(0)}
    for name, rule in rules.items():
        scores = []
        for c in cases[5:]:
            pred = rule[np.digitize(c.image.ravel(), bins)]
            scores.append(_dice_per_organ(pred, c.label.ravel()))
        per_organ = np.nanmean(np.array(scores, float), axis=0)
        assert np.nanmean(per_organ) < 0.2, (name, per_organ.round(2))
        assert (per_organ > 0.5).sum() <= 1, (name, per_organ.round(2))
    # the metric itself can detect separable intensities (positive control)
    c = cases[5]
    fake = c.label.astype(np.float32) * 100.0
    hf = np.zeros((14, len(bins) + 1))
    np.add.at(hf, (c.label.ravel().astype(int), np.digitize(fake.ravel(), bins)), 1)
    d = _dice_per_organ(hf.argmax(0)[np.digitize(fake.ravel(), bins)], c.label.ravel())
    assert np.nanmean(d) > 0.99


def test_soft_tissue_hu_ranges_overlap(abdomen_cases):
    case = abdomen_cases[0]
    med = {o: float(np.median(case.image[case.label == o])) for o in (1, 3, 6, 11)}
    muscle_like = case.image[(case.label == 0) & (case.image > 0) & (case.image < 250)]
    assert muscle_like.size > 1000
    for o, m in med.items():
        assert -20 < m < 260, (ORGAN_NAMES[o], m)


def test_dataset_layout_and_json(tmp_path: Path):
    out = tmp_path / "ph"
    cfg = PhantomConfig(**SMALL)
    make_phantom_dataset(out, n_train=2, n_test=1, n_unlabelled=2, seed=7, cfg=cfg, progress=False, preview=True)
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "CT"}
    assert dj["labels"] == dataset_json_labels()
    assert dj["numTraining"] == 2 and dj["file_ending"] == ".nii.gz"
    assert dj["voxdiff_phantom"]["config"]["shape"] == list(cfg.shape)
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["phantom_000_0000.nii.gz", "phantom_001_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert [p.name for p in (out / "imagesTs").iterdir()] == ["phantom_002_0000.nii.gz"]
    assert [p.name for p in (out / "labelsTs").iterdir()] == ["phantom_002.nii.gz"]
    assert len(list((out / "unlabelled").glob("*.nii.gz"))) == 2
    assert (out / "config.yaml").is_file() and (out / "phantoms.json").is_file()
    png = out / "preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000
    img = nib.load(out / "imagesTr" / "phantom_000_0000.nii.gz")
    lab = nib.load(out / "labelsTr" / "phantom_000.nii.gz")
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.affine, lab.affine)
    # the stored case equals a fresh generation from its seed
    seed0 = dj["voxdiff_phantom"]["cases"]["phantom_000"]["seed"]
    ref = generate_phantom(seed0, cfg)
    np.testing.assert_array_equal(np.asarray(lab.dataobj), ref.label)
    np.testing.assert_allclose(np.asarray(img.dataobj), np.rint(ref.image), atol=0.5)
    # no leftovers of the staging folder
    assert [p.name for p in tmp_path.iterdir()] == ["ph"]
    # parallel workers write identical files
    out2 = tmp_path / "ph2"
    make_phantom_dataset(out2, n_train=2, n_test=1, n_unlabelled=2, seed=7, cfg=cfg, progress=False, preview=False, workers=2)
    for f in sorted(out.rglob("*.nii.gz")):
        assert f.read_bytes() == (out2 / f.relative_to(out)).read_bytes(), f.name


@pytest.mark.parametrize("train_site", [None, {"phases": ["native"]}])
def test_the_preview_is_drawn_from_the_case_in_hand(tmp_path: Path, monkeypatch, train_site):
    """Every case is generated once: the dataset's preview is drawn from the first labelled case as it
    was written, and equals a preview of a fresh generation (a training case drawn under a
    ``train_site`` is previewed as the dataset's config draws it, generated once more)."""
    from voxdiff.data.phantom import dataset

    calls = []
    generate = dataset.generate_phantom

    def counted(seed, cfg=None, **kw):
        calls.append(seed)
        return generate(seed, cfg, **kw)

    monkeypatch.setattr(dataset, "generate_phantom", counted)
    cfg = PhantomConfig(**SMALL)
    out = tmp_path / "ph"
    make_phantom_dataset(out, n_train=1, n_test=0, n_unlabelled=1, seed=5, cfg=cfg, progress=False, preview=True,
                         train_site=train_site)
    first = case_plan(1, 0, 1, seed=5)[0]
    assert len(calls) == (2 if train_site is None else 3) and calls[0] == first["seed"]
    ref = preview_png(generate(first["seed"], cfg, case_id=first["case_id"]), tmp_path / "ref.png")
    assert (out / "preview.png").read_bytes() == ref.read_bytes()


def test_sets_use_disjoint_seeds_and_are_stable():
    plan = case_plan(30, 10, 50, seed=0)
    by_set = {}
    for p in plan:
        by_set.setdefault(p["set"], set()).add(p["seed"])
    assert all(len(v) == n for v, n in zip(by_set.values(), (30, 10, 50)))
    assert not (by_set["train"] & by_set["test"]) and not (by_set["train"] & by_set["unlabelled"]) and not (by_set["test"] & by_set["unlabelled"])
    # growing one set does not change the seeds of the others
    plan2 = case_plan(31, 10, 5, seed=0)
    assert [p["seed"] for p in plan2 if p["set"] == "test"] == [p["seed"] for p in plan if p["set"] == "test"]
    assert case_plan(2, 1, 1, seed=1)[0]["seed"] != plan[0]["seed"]


def test_existing_output_refused_without_force(tmp_path: Path):
    out = tmp_path / "ph"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        make_phantom_dataset(out, 1, 0, 0, cfg=PhantomConfig(**SMALL), progress=False, preview=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    make_phantom_dataset(out, 1, 0, 0, cfg=PhantomConfig(**SMALL), progress=False, preview=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "dataset.json").is_file()


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch):
    import voxdiff.data.phantom.dataset as ds

    calls = {"n": 0}
    real = ds.generate_phantom

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(ds, "generate_phantom", flaky)
    with pytest.raises(RuntimeError):
        make_phantom_dataset(tmp_path / "ph", 2, 0, 0, cfg=PhantomConfig(**SMALL), progress=False, preview=False)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path: Path, capsys):
    from voxdiff.cli import main

    out = tmp_path / "cli"
    args = ["phantom", str(out), "--n_train", "1", "--n_test", "1", "--n_unlabelled", "1", "--seed", "3", "--quiet", "--preview",
            "--shape", "[48,48,32]", "--spacing_xy", "[7.0,8.0]", "--spacing_z", "[6.0,14.0]", "--phases", "[arterial]"]
    assert main(args) == 0
    assert (out / "preview.png").is_file()
    meta = json.loads((out / "phantoms.json").read_text())
    assert {m["phase"] for m in meta.values()} == {"arterial"}
    assert nib.load(out / "imagesTr" / "phantom_000_0000.nii.gz").shape == (48, 48, 32)
    capsys.readouterr()
    # existing output: one-line error, exit 2, untouched
    before = sorted(p.name for p in out.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not empty" in err and str(out) in err
    assert sorted(p.name for p in out.rglob("*")) == before
    # bad config values
    assert main(["phantom", str(tmp_path / "bad"), "--spacing_xy", "[0.0,1.0]", "--quiet"]) == 2
    assert main(["phantom", str(tmp_path / "bad"), "--z_modes", "[head]", "--quiet"]) == 2
    # (the hyphenated spellings of before are hidden aliases)
    assert main(["phantom", str(tmp_path / "bad"), "--n-train", "0", "--n-test", "0", "--n-unlabelled=0", "--quiet"]) == 2
    assert main(["phantom", str(tmp_path / "bad"), "--seed", "-1", "--quiet"]) == 2
    capsys.readouterr()
    assert main(["phantom", str(tmp_path / "bad"), "--shape", "[8,8,8]", "--quiet"]) == 2  # too small for the organs
    assert "sizes >= 16" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_preview_png_function(tmp_path: Path):
    case = generate_phantom(2, PhantomConfig(**SMALL))
    p = preview_png(case, tmp_path / "v.png")
    assert p.read_bytes()[:4] == b"\x89PNG"
    case.label = None  # unlabelled case: image-only views
    assert preview_png(case, tmp_path / "u.png").stat().st_size > 1000


def test_thorax_detail_draws_thin_vessels_and_changes_only_the_chest():
    """The detailed thorax keeps the same subject, scan and labels; its lungs lose the -250 HU
    vessel blobs (thin partial-volume tubes instead), so far fewer lung voxels sit between lung and
    soft tissue, and its heart holds more contrast-enhanced blood."""
    base = dict(shape=(64, 64, 48), unlabelled_z_modes=("chest",), phases=("arterial",))
    a = generate_phantom(5, PhantomConfig(**base), unlabelled=True)
    b = generate_phantom(5, PhantomConfig(**base, thorax_detail=True), unlabelled=True)
    assert "thorax_detail" not in a.meta.extra and b.meta.extra["thorax_detail"] is True
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.meta.affine, b.meta.affine)
    # lung: the air-filled region inside the body (closing of < -600 HU inside the filled body outline)
    from scipy import ndimage as ndi

    body = np.stack([ndi.binary_fill_holes(a.image[:, :, k] > -500) for k in range(a.image.shape[2])], axis=2)
    lung = ndi.binary_closing(a.image < -600, iterations=2) & ndi.binary_erosion(body, iterations=2)
    assert lung.sum() > 2000
    mid_a = ((a.image[lung] > -450) & (a.image[lung] < -50)).mean()
    mid_b = ((b.image[lung] > -450) & (b.image[lung] < -50)).mean()
    assert mid_a > 3 * mid_b, (mid_a, mid_b)
    bright_a, bright_b = (a.image > 200).sum(), (b.image > 200).sum()  # enhanced blood (and bone)
    assert bright_b > 1.03 * bright_a, (bright_a, bright_b)


def test_angiographic_phase_is_a_bright_bolus_and_leaves_the_default_draw_alone():
    """The CT angiography phase puts the left heart and the aorta where a chest CTA has them
    (400-580 HU, above any arterial-phase subject), keeps the same subject and labels, and the
    default phase set does not include it, so default phantoms are drawn as before."""
    assert "angiographic" not in PhantomConfig().phases
    base = dict(shape=(56, 56, 40), unlabelled_z_modes=("chest",))
    cta = generate_phantom(3, PhantomConfig(**base, phases=("angiographic",)), unlabelled=True)
    art = generate_phantom(3, PhantomConfig(**base, phases=("arterial",), enhancement=(1.3, 1.3)), unlabelled=True)
    hu_c, hu_a = cta.meta.extra["tissue_hu"], art.meta.extra["tissue_hu"]
    assert cta.meta.extra["phase"] == "angiographic" and cta.meta.extra["phase_weights_art_pv"][1] == 0.0
    for t in ("BLOOD_L", "AORTA"):
        assert 380 <= hu_c[t] <= 600 and hu_c[t] > hu_a[t] + 40, (t, hu_c[t], hu_a[t])
    np.testing.assert_array_equal(cta.meta.affine, art.meta.affine)
    assert (cta.image > 350).sum() > (art.image > 350).sum()
    # a phase outside the list is still refused
    with pytest.raises(InputError, match="phases"):
        PhantomConfig(phases=("delayed",))


def test_angiographic_superior_vena_cava_is_dense_and_other_phases_keep_it_a_vein(monkeypatch):
    """In CT angiography the SVC carries contrast arriving nearly undiluted from the arm: far
    brighter than the arterial bolus, in the upper chest, right of the midline, with the labels
    unchanged. In every other phase the SVC is drawn exactly as the other veins, so the dense-SVC
    numbers cannot change a default phantom."""
    from voxdiff.data.phantom import generator as gen

    # the generator itself, not the suite's memo: a module constant is changed below
    generate_phantom = getattr(gen.generate_phantom, "__wrapped__", gen.generate_phantom)
    base = dict(shape=(56, 56, 40), unlabelled_z_modes=("chest",))
    cta = generate_phantom(3, PhantomConfig(**base, phases=("angiographic",)), unlabelled=True)
    art = generate_phantom(3, PhantomConfig(**base, phases=("arterial",)), unlabelled=True)
    hu = cta.meta.extra["tissue_hu"]
    assert gen.SVC_CTA_HU[0] <= hu["SVC"] <= gen.SVC_CTA_HU[1] and hu["SVC"] > hu["AORTA"] + 100
    assert "SVC" not in art.meta.extra["tissue_hu"]
    monkeypatch.setattr(gen, "SVC_CTA_HU", (2500.0, 2500.0))
    dense = generate_phantom(3, PhantomConfig(**base, phases=("angiographic",)), unlabelled=True)
    art2 = generate_phantom(3, PhantomConfig(**base, phases=("arterial",)), unlabelled=True)
    np.testing.assert_array_equal(art2.image, art.image)
    np.testing.assert_array_equal(dense.label, cta.label)
    changed = np.abs(dense.image - cta.image) > 1.0
    assert changed.sum() > 20, changed.sum()
    # where it changed: the vessel lies in the upper half of the scan, beside the aorta (label 8)
    zc = np.nonzero(changed)[2].mean()
    aorta_z = np.nonzero(cta.label == 8)[2]
    assert zc > cta.image.shape[2] / 2 and aorta_z.min() <= zc <= aorta_z.max() + 2, (zc, aorta_z.min(), aorta_z.max())
    # everything else is the same subject: outside a margin around the vessel nothing moved
    from scipy import ndimage as ndi

    near = ndi.binary_dilation(changed, iterations=4)
    np.testing.assert_allclose(dense.image[~near], cta.image[~near], atol=1.0)


def test_upper_chest_gives_the_thorax_above_the_arch_apices_vessels_and_clavicles():
    """``upper_chest`` changes only the thorax above the aortic arch of the same subject: the lungs
    end in apices a little above T1 (no aerated lung above, less lung just below), the arch's
    branches and brachiocephalic veins add enhanced vessels, the clavicles and manubrium add bone
    in the anterior wall; labels and everything below the arch stay as they were."""
    base = dict(shape=(56, 56, 80), unlabelled_z_modes=("chest",), phases=("arterial",), enhancement=(1.2, 1.2))
    # seed 6: a chest scan that reaches a few mm above the lung apex
    plain = generate_phantom(6, PhantomConfig(**base), unlabelled=True)
    upper = generate_phantom(6, PhantomConfig(**base, upper_chest=True), unlabelled=True)
    assert "upper_chest" not in plain.meta.extra and upper.meta.extra["upper_chest"] is True
    np.testing.assert_array_equal(upper.label, plain.label)
    z0, dz = upper.meta.affine[2, 3], upper.meta.affine[2, 2]
    k = lambda z: int(round((z - z0) / dz))  # noqa: E731 - slice index of a world z
    lm = upper.meta.extra["landmarks_z_mm"]
    arch, apex = k(lm["aortic_arch"]), k(lm["lung_apex"])
    assert 0 < arch < plain.image.shape[2] - 10 and apex > arch + 10, (arch, apex)
    changed = np.nonzero(np.abs(upper.image - plain.image) > 1.0)[2]
    assert changed.size > 500 and changed.min() >= arch - 3, (changed.size, changed.min(), arch)
    np.testing.assert_array_equal(upper.image[:, :, : arch - 3], plain.image[:, :, : arch - 3])
    # aerated lung (< -700 HU inside the body, away from the outside air) above the apex: none
    from scipy import ndimage as ndi

    def lung_per_slice(img):
        body = np.stack([ndi.binary_erosion(ndi.binary_fill_holes(img[:, :, j] > -500), iterations=3)
                         for j in range(img.shape[2])], axis=2)
        return ((img < -700) & body).sum(axis=(0, 1))

    lu, lp = lung_per_slice(upper.image), lung_per_slice(plain.image)
    assert apex < upper.image.shape[2] - 1 and lp[apex + 1:].sum() > 100
    # above the apex: almost no lung (the smooth displacement field moves the apex by a few mm)
    assert lu[apex + 1:].sum() < 0.15 * lp[apex + 1:].sum(), (lu[apex + 1:], lp[apex + 1:])
    top = slice(apex - 3, apex + 1)  # just below it: a small dome
    assert lu[top].sum() < 0.85 * lp[top].sum(), (lu[top].sum(), lp[top].sum())
    assert lu[arch:].sum() < 0.9 * lp[arch:].sum()
    # enhanced vessels (150-450 HU) and bone (> 600 HU) above the arch: more of both
    above = (slice(None), slice(None), slice(arch + 2, None))
    for lo, hi in ((150, 450), (600, 4000)):
        nu = ((upper.image[above] > lo) & (upper.image[above] < hi)).sum()
        npl = ((plain.image[above] > lo) & (plain.image[above] < hi)).sum()
        assert nu > 1.2 * npl + 10, (lo, nu, npl)


def test_findings_keep_their_organ_label_and_leave_default_phantoms_alone():
    """Lesions replace organ voxels but keep the organ's label (as BTCV and TotalSegmentator label
    them); in the native phase a cyst is water-dark inside the liver; a removed gallbladder takes
    its label away; a phantom asked for no findings is the default one, voxel for voxel."""
    from voxdiff.data.phantom import tissues as T

    base = dict(shape=(64, 64, 48), phases=("native",))
    plain = generate_phantom(4, PhantomConfig(**base))
    assert "findings" not in plain.meta.extra
    again = generate_phantom(4, PhantomConfig(**base, steatosis_prob=0.0, lesion_rate=0.0))
    np.testing.assert_array_equal(plain.image, again.image)
    sick = generate_phantom(4, PhantomConfig(**base, lesion_rate=6.0, gallbladder_absent_prob=1.0))
    f = sick.meta.extra["findings"]
    assert f["gallbladder_absent"] is True and not (sick.label == 4).any() and (plain.label == 4).any()
    assert len(f["lesions"]) >= 1 and all(les["voxels"] >= 0 for les in f["lesions"])
    # the same subject and scan: the affine is unchanged and every other organ keeps its voxels
    np.testing.assert_array_equal(sick.meta.affine, plain.meta.affine)
    for organ in (1, 2, 3, 6):
        assert (sick.label == organ).sum() == (plain.label == organ).sum()
    # where a liver cyst was painted, the liver label stays and the CT number drops to about water
    cysts = [les for les in f["lesions"] if les["kind"] == "liver_cyst" and les["voxels"] > 20]
    if cysts:
        liver = plain.label == 6
        dark = liver & (sick.image < plain.image - 25)
        assert dark.sum() >= 0.5 * sum(c["voxels"] for c in cysts)
        assert abs(float(np.median(sick.image[dark]))) < 40
    # lesion tissues map to their organ's label, the left kidney's copy to the left kidney
    assert T.LABEL_OF[T.LIVER_CYST] == 6 and T.LABEL_OF[T.LIVER_MET] == 6 and T.LABEL_OF[T.SPLEEN_LESION] == 1
    assert T.LABEL_OF[T.KID_CYST] == 2 and T.LABEL_OF[T.KID_CYST + T.KID_L_OFFSET] == 3 and T.LABEL_OF[T.ASCITES] == 0


def test_fatty_liver_and_ascites_change_the_ct_numbers():
    base = dict(shape=(64, 64, 48), phases=("native",))
    plain = generate_phantom(6, PhantomConfig(**base))
    fat = generate_phantom(6, PhantomConfig(**base, steatosis_prob=1.0))
    shift = fat.meta.extra["findings"]["steatosis_hu"]
    assert -70 <= shift <= -15
    liver = plain.label == 6
    assert float(np.median(fat.image[liver]) - np.median(plain.image[liver])) == pytest.approx(shift, abs=6)
    wet = generate_phantom(6, PhantomConfig(**base, ascites_prob=1.0))
    assert "ascites_mm" in wet.meta.extra["findings"]
    np.testing.assert_array_equal(wet.label, plain.label)  # free fluid is background
    fat_voxels = (plain.image < -60) & (plain.label == 0)
    assert ((wet.image > -20) & fat_voxels).sum() > 50  # visceral fat turned to fluid


def test_wide_variation_preset_and_its_cli(tmp_path: Path):
    from voxdiff.cli import main
    from voxdiff.data.phantom import WIDE_VARIATION, with_variation

    cfg = with_variation(PhantomConfig(noise_hu=(9.0, 10.0)), "wide")
    assert cfg.noise_hu == (9.0, 10.0)  # given explicitly: kept
    assert cfg.organ_jitter == WIDE_VARIATION["organ_jitter"] and cfg.lesion_rate == WIDE_VARIATION["lesion_rate"]
    assert with_variation(PhantomConfig(), "default") == PhantomConfig()
    with pytest.raises(InputError):
        with_variation(PhantomConfig(), "extreme")
    with pytest.raises(InputError):
        PhantomConfig(steatosis_prob=1.5)
    # organ sizes spread more than in the default phantoms (same seeds, same grid)
    sizes = {}
    for name, c in (("default", PhantomConfig(**SMALL)), ("wide", with_variation(PhantomConfig(**SMALL), "wide"))):
        sizes[name] = np.std([np.log((generate_phantom(s, c).label == 1).sum() + 1) for s in range(8)])
    assert sizes["wide"] > sizes["default"], sizes
    out = tmp_path / "wide"
    args = ["phantom", str(out), "--n_train", "1", "--n_test", "0", "--n_unlabelled", "0", "--seed", "3", "--quiet",
            "--shape", "[48,48,32]", "--spacing_xy", "[7.0,8.0]", "--spacing_z", "[6.0,14.0]", "--variation", "wide"]
    assert main(args) == 0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["config"]["lesion_rate"] == WIDE_VARIATION["lesion_rate"]
    assert main(["phantom", str(tmp_path / "bad"), "--variation", "extreme", "--quiet"]) == 2
    assert not (tmp_path / "bad").exists()


def test_phantom_images_and_data_sets_say_what_they_are(tmp_path):
    """Every phantom image carries a header description and the data set its name, so a segmenter
    fitted on phantoms can tell them from real CT; anything else is not taken for a phantom."""
    import nibabel as nib

    from voxdiff.data.io import save_nifti
    from voxdiff.data.phantom import PHANTOM_DESCRIPTION, is_phantom_dataset, is_phantom_image

    root = make_phantom_dataset(tmp_path / "ph", n_train=1, n_test=1, n_unlabelled=1, seed=3,
                                cfg=PhantomConfig(shape=(32, 32, 24)), preview=False, progress=False)
    images = sorted(root.glob("images*/*.nii.gz")) + sorted((root / "unlabelled").glob("*.nii.gz"))
    assert len(images) == 3 and all(is_phantom_image(p) for p in images)
    assert not any(is_phantom_image(p) for p in root.glob("labels*/*.nii.gz"))  # labels carry no description
    assert is_phantom_dataset(root)
    arr = np.asarray(nib.load(str(images[0])).dataobj)
    plain = save_nifti(tmp_path / "plain.nii.gz", arr, np.eye(4), dtype=np.int16)  # the same voxels, no description
    other = save_nifti(tmp_path / "other.nii.gz", arr, np.eye(4), dtype=np.int16, description="scanner X")
    assert nib.load(str(other)).header["descrip"].item() == b"scanner X"
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti")
    assert not any(is_phantom_image(p) for p in (plain, other, junk, tmp_path / "missing.nii.gz", tmp_path))
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text('{"name": "BTCV"}')
    assert not is_phantom_dataset(tmp_path / "ds") and not is_phantom_dataset(tmp_path / "nowhere")
    from voxdiff.data.phantom import fitted_on_phantoms, training_data_record

    assert training_data_record(root) == training_data_record(None) == {"training_data": "phantoms"}
    assert training_data_record(tmp_path / "ds") == {}
    assert fitted_on_phantoms(training_data_record(root)) and not fitted_on_phantoms({}) and not fitted_on_phantoms(None)
    with pytest.raises(ValueError, match="79 characters"):
        save_nifti(tmp_path / "long.nii.gz", arr, np.eye(4), description="x" * 80)
    assert PHANTOM_DESCRIPTION and not (tmp_path / "long.nii.gz").exists()


def test_the_suites_phantom_memo_hands_out_equal_independent_copies():
    """tests/conftest.py keeps the phantoms each test process has drawn: what it hands out must equal a
    fresh draw, carry the name asked for, and be a copy that a test may write into."""
    generate = getattr(generate_phantom, "__wrapped__", None)
    if generate is None:
        pytest.skip("the phantom memo of tests/conftest.py is not installed")
    cfg = PhantomConfig(**SMALL)
    fresh = generate(8, cfg, unlabelled=True, case_id="named")
    first = generate_phantom(8, cfg, unlabelled=True)
    first.image[:] = 0.0
    first.meta.extra["body"]["adiposity"] = -1.0
    kept = generate_phantom(8, cfg, unlabelled=True, case_id="named")
    np.testing.assert_array_equal(kept.image, fresh.image)
    np.testing.assert_array_equal(kept.label, fresh.label)
    np.testing.assert_array_equal(kept.meta.affine, fresh.meta.affine)
    assert kept.meta.extra == fresh.meta.extra and kept.meta.case_id == "named"
    labelled = generate_phantom(8, cfg)  # `unlabelled` is part of the key: its own draw
    assert labelled.meta.case_id == "phantom_8"
    assert labelled.meta.extra == generate(8, cfg).meta.extra != fresh.meta.extra
