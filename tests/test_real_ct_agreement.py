"""benchmarks/real_ct_agreement.py: its table, and the refusals that keep the experiment folder untouched."""

import pytest
from standin import load_benchmark


def test_table_has_each_methods_mean_and_liver_per_labelled_ct():
    rc = load_benchmark("real_ct_agreement")
    rows = {"contrastive": {"ts_a_abdomen_ct.nii.gz": {"mean": 0.0771, "dice": {"liver": 0.265}},
                            "ts_b_upper_abdomen_dicom": {"mean": 0.021, "dice": {"liver": None}}},
            "random": {"ts_a_abdomen_ct.nii.gz": {"mean": 0.024, "dice": {"liver": 0.168}}}}
    lines = rc.table(rows).splitlines()
    assert lines[0] == "| method | ts_a mean / liver | ts_b mean / liver |"
    assert lines[2] == "| contrastive | 0.077 / 0.27 | 0.021 / - |"
    assert lines[3] == "| random | 0.024 / 0.17 | - |"


def test_refuses_an_output_inside_the_experiment_and_a_missing_bundle(tmp_path, capsys):
    rc = load_benchmark("real_ct_agreement")
    exp = tmp_path / "demo"
    exp.mkdir()
    with pytest.raises(SystemExit) as e:
        rc.main([str(exp), "--out", str(exp / "real")])
    assert e.value.code == 2 and "outside the experiment folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        rc.main([str(exp), "--out", str(tmp_path / "real"), "--methods", "contrastive"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "probe-contrastive-f0" in err and "no segmenter bundle" in err
    assert not (tmp_path / "real").exists() and sorted(p.name for p in exp.iterdir()) == []
