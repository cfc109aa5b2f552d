"""Dataset adapters on tiny generated folders: layouts, detection, label maps to BTCV ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_helpers import affine_for, synthetic_ct, write_dicom_series, write_nifti

from voxdiff.core.errors import InputError
from voxdiff.data.adapters import open_dataset
from voxdiff.data.labels import AMOS_TO_BTCV, FLARE22_TO_BTCV

AFF = affine_for("RAS", (1.5, 1.5, 3.0), (-10, -20, -30))
SHAPE = (16, 14, 8)


def _pair(seed=0):
    img, lab = synthetic_ct(SHAPE, seed)
    return img.astype(np.int16), lab


def _labels_with(ids):
    lab = np.zeros(SHAPE, np.uint8)
    for n, i in enumerate(ids):
        lab[n % SHAPE[0], 2, 3 + (n // SHAPE[0])] = i
    return lab


def test_btcv_rawdata_layout(tmp_path):
    root = tmp_path / "RawData"
    for cid in ("0001", "0002", "0010"):
        img, lab = _pair(int(cid))
        write_nifti(root / "Training" / "img" / f"img{cid}.nii.gz", img, AFF)
        write_nifti(root / "Training" / "label" / f"label{cid}.nii.gz", lab, AFF)
    ds = open_dataset(root)
    assert ds.kind == "btcv"
    assert ds.case_ids == ["0001", "0002", "0010"]
    c = ds.load(ds.refs[0])
    assert c.image.dtype == np.float32 and c.label.dtype == np.uint8
    np.testing.assert_array_equal(c.label, _pair(1)[1])
    np.testing.assert_allclose(c.meta.original_affine, AFF)
    assert c.meta.spacing == pytest.approx((1.5, 1.5, 3.0))


def test_flare22_labels_map_to_btcv(tmp_path):
    root = tmp_path / "FLARE22_LabeledCase50"
    img, _ = _pair()
    write_nifti(root / "images" / "FLARE22_Tr_0001_0000.nii.gz", img, AFF)
    write_nifti(root / "labels" / "FLARE22_Tr_0001.nii.gz", _labels_with(range(14)), AFF)
    ds = open_dataset(root)
    assert ds.kind == "flare"
    assert ds.case_ids == ["FLARE22_Tr_0001"]
    lab = ds.load(ds.refs[0]).label
    src = _labels_with(range(14))
    for f, b in FLARE22_TO_BTCV.items():
        assert np.all(lab[src == f] == b)
    assert FLARE22_TO_BTCV[1] == 6 and FLARE22_TO_BTCV[3] == 1 and FLARE22_TO_BTCV[12] == 0 and FLARE22_TO_BTCV[13] == 3
    assert 10 not in set(np.unique(lab).tolist())  # FLARE has no portal/splenic vein


def test_amos_labels_map_and_mri_skipped(tmp_path):
    root = tmp_path / "amos22"
    img, _ = _pair()
    for cid in ("amos_0001", "amos_0600"):
        write_nifti(root / "imagesTr" / f"{cid}.nii.gz", img, AFF)
        write_nifti(root / "labelsTr" / f"{cid}.nii.gz", _labels_with(range(16)), AFF)
    (root / "dataset.json").write_text(json.dumps({"name": "AMOS", "labels": {"0": "background", "1": "spleen"}}))
    ds = open_dataset(root)
    assert ds.kind == "amos"
    assert ds.case_ids == ["amos_0001"]  # 0600 is MRI
    lab = ds.load(ds.refs[0]).label
    src = _labels_with(range(16))
    assert np.all(lab[src == 10] == 11)  # pancreas
    assert np.all(lab[src == 9] == 9)  # postcava = IVC
    assert np.all(lab[src == 14] == 0) and np.all(lab[src == 13] == 0)
    assert AMOS_TO_BTCV[6] == 6


def test_nnunet_v2_by_names_and_split(tmp_path):
    root = tmp_path / "Dataset123_Abd"
    img, _ = _pair()
    # ids differ from BTCV, names match: liver=1, right kidney=2, duodenum=3 (no BTCV class)
    labels = {"background": 0, "liver": 1, "kidney_right": 2, "duodenum": 3}
    (root).mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                   "numTraining": 2, "file_ending": ".nii.gz"}))
    for cid in ("abd_001", "abd_002"):
        write_nifti(root / "imagesTr" / f"{cid}_0000.nii.gz", img, AFF)
        write_nifti(root / "labelsTr" / f"{cid}.nii.gz", _labels_with([0, 1, 2, 3]), AFF)
    write_nifti(root / "imagesTs" / "abd_100_0000.nii.gz", img, AFF)
    with pytest.warns(UserWarning, match="duodenum"):
        ds = open_dataset(root, split="train")
    assert ds.kind == "nnunet" and ds.case_ids == ["abd_001", "abd_002"]
    lab = ds.load(ds.refs[0]).label
    src = _labels_with([0, 1, 2, 3])
    assert np.all(lab[src == 1] == 6) and np.all(lab[src == 2] == 2) and np.all(lab[src == 3] == 0)
    with pytest.warns(UserWarning):
        test = open_dataset(root, split="test")
    assert test.case_ids == ["abd_100"] and test.refs[0].label_path is None
    with pytest.warns(UserWarning):
        assert len(open_dataset(root, split="all")) == 3


def test_nnunet_orphan_labels_and_extra_channels_are_warned_about(tmp_path):
    import warnings

    from voxdiff.core.errors import VoxdiffWarning

    root = tmp_path / "Dataset124_Abd"
    img, lab = _pair()
    root.mkdir()
    doc = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 6}, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(doc))
    write_nifti(root / "imagesTr" / "abd_001_0000.nii.gz", img, AFF)
    write_nifti(root / "labelsTr" / "abd_001.nii.gz", lab, AFF)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean data set warns about nothing
        assert open_dataset(root, split="train").case_ids == ["abd_001"]
    # a label map whose image was renamed or lost: the case is not used, and that is said
    write_nifti(root / "labelsTr" / "abd_002.nii.gz", lab, AFF)
    with pytest.warns(VoxdiffWarning, match=r"labelsTr: 1 label map\(s\) with no image in imagesTr, not used: abd_002.nii.gz"):
        assert open_dataset(root, split="train").case_ids == ["abd_001"]
    (root / "labelsTr" / "abd_002.nii.gz").unlink()
    # several input channels: channel 0 is read as CT, the others ignored, and that is said
    doc["channel_names"] = {"0": "CT", "1": "PET"}
    (root / "dataset.json").write_text(json.dumps(doc))
    write_nifti(root / "imagesTr" / "abd_001_0001.nii.gz", img, AFF)
    with pytest.warns(VoxdiffWarning, match=r"2 input channels \(0: CT, 1: PET\); voxdiff reads channel 0"):
        ds = open_dataset(root, split="train")
    assert ds.case_ids == ["abd_001"] and ds.refs[0].image_path.endswith("abd_001_0000.nii.gz")


def test_msd_v1_dataset_json_ids_as_given(tmp_path):
    root = tmp_path / "Task09_Whatever"
    img, lab = _pair()
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"name": "x", "labels": {"0": "background", "1": "thing", "6": "other"}}))
    write_nifti(root / "imagesTr" / "case_1.nii.gz", img, AFF)
    write_nifti(root / "labelsTr" / "case_1.nii.gz", _labels_with([0, 1, 6]), AFF)
    ds = open_dataset(root)
    assert ds.kind == "nnunet" and ds.case_ids == ["case_1"]
    np.testing.assert_array_equal(ds.load(ds.refs[0]).label, _labels_with([0, 1, 6]))


def test_label_values_outside_schema_name_the_file(tmp_path):
    root = tmp_path / "bt"
    img, _ = _pair()
    write_nifti(root / "img" / "img0001.nii.gz", img, AFF)
    bad = _labels_with([0, 6, 17])
    p = write_nifti(root / "label" / "label0001.nii.gz", bad, AFF)
    ds = open_dataset(root)
    with pytest.raises(InputError, match="17") as e:
        ds.load(ds.refs[0])
    assert str(p) in str(e.value)


def test_plain_folder_with_nifti_and_dicom(tmp_path):
    root = tmp_path / "unl"
    img, _ = _pair()
    write_nifti(root / "a.nii.gz", img, AFF)
    write_nifti(root / "sub" / "b.nii", img, AFF)
    write_dicom_series(root / "patient3" / "series1", img.astype(np.float32), spacing=(1, 1, 2))
    (root / "notes.txt").write_text("not an image")
    ds = open_dataset(root)
    assert ds.kind == "folder"
    assert sorted(ds.case_ids) == ["a", "patient3_series1", "sub_b"]
    assert all(r.label_path is None for r in ds.refs)
    c = ds.load(ds.ref("patient3_series1"))
    assert c.label is None and c.image.shape == SHAPE
    np.testing.assert_array_equal(c.image, img)
    one = open_dataset(root / "a.nii.gz")
    assert one.kind == "folder" and one.case_ids == ["a"]


def test_label_on_same_grid_other_orientation_is_aligned(tmp_path):
    # image stored LPS, label stored LAS on the same physical grid (as for the real DICOM sample)
    img, lab = _pair()
    aff_lps = affine_for("LPS", (1.5, 1.5, 3.0), (20, 30, -30))
    lab_las = lab[:, ::-1, :]
    aff_las = aff_lps.copy()
    aff_las[:3, 1] *= -1
    aff_las[:3, 3] = aff_lps[:3, 3] + aff_lps[:3, 1] * (SHAPE[1] - 1)
    root = tmp_path / "bt"
    write_nifti(root / "img" / "img0001.nii.gz", img, aff_lps)
    write_nifti(root / "label" / "label0001.nii.gz", lab_las, aff_las)
    ds = open_dataset(root)
    np.testing.assert_array_equal(ds.load(ds.refs[0]).label, lab)


def test_unknown_kind_and_split(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", _pair()[0], AFF)
    with pytest.raises(InputError, match="kind"):
        open_dataset(tmp_path, kind="nope")
    with pytest.raises(InputError, match="split"):
        open_dataset(tmp_path, split="nope")
    with pytest.raises(InputError, match="dataset.json"):
        open_dataset(tmp_path, kind="nnunet")


def test_folder_skips_label_dirs_and_imagesTr_needs_dataset_json(tmp_path):
    img, lab = _pair()
    write_nifti(tmp_path / "u" / "scans" / "a.nii.gz", img, AFF)
    write_nifti(tmp_path / "u" / "labels" / "a.nii.gz", lab, AFF)
    ds = open_dataset(tmp_path / "u")
    assert ds.case_ids == ["scans_a"]
    write_nifti(tmp_path / "n" / "imagesTr" / "x_0000.nii.gz", img, AFF)
    with pytest.raises(InputError, match="dataset.json"):
        open_dataset(tmp_path / "n")
