"""The shifted regime: labelled training phantoms from one acquisition setting, test phantoms from all."""

from __future__ import annotations

import json

import pytest

from voxdiff.core.errors import InputError
from voxdiff.data.phantom import PhantomConfig, make_phantom_dataset

SITE = {"phases": ["portal_venous"], "z_modes": ["abdomen"], "spacing_z": [5.0, 5.0]}


def _cases(root):
    return json.loads((root / "phantoms.json").read_text())


def test_train_site_applies_to_the_labelled_training_cases_only(tmp_path):
    cfg = PhantomConfig(shape=(40, 40, 24))
    out = make_phantom_dataset(tmp_path / "ph", n_train=3, n_test=6, n_unlabelled=2, seed=4, cfg=cfg,
                               preview=False, progress=False, train_site=SITE)
    cases = _cases(out)
    train = [c for c in cases.values() if c["set"] == "train"]
    other = [c for c in cases.values() if c["set"] != "train"]
    assert len(train) == 3 and all(c["phase"] == "portal_venous" and c["z_mode"] == "abdomen" for c in train)
    # the others keep the generator's ranges: with 8 draws, more than one phase / z-range shows up
    assert len({(c["phase"], c["z_mode"]) for c in other}) > 1
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["voxdiff_phantom"]["train_site"] == SITE
    # the same seed without a site: identical test cases (the site changes nothing else)
    iid = make_phantom_dataset(tmp_path / "iid", n_train=3, n_test=6, n_unlabelled=2, seed=4, cfg=cfg,
                               preview=False, progress=False)
    same = _cases(iid)
    for cid, c in cases.items():
        if c["set"] != "train":
            assert same[cid]["phase"] == c["phase"] and same[cid]["scan_z_mm"] == c["scan_z_mm"]


def test_unknown_or_invalid_site_settings_are_refused_before_writing(tmp_path):
    with pytest.raises(InputError, match="unknown phantom settings"):
        make_phantom_dataset(tmp_path / "a", n_train=1, n_test=0, n_unlabelled=0, train_site={"phase": ["x"]},
                             progress=False, preview=False)
    with pytest.raises(InputError, match="phases"):
        make_phantom_dataset(tmp_path / "b", n_train=1, n_test=0, n_unlabelled=0, train_site={"phases": ["late"]},
                             progress=False, preview=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_train_site(tmp_path, capsys):
    from voxdiff.cli import main

    out = tmp_path / "cli"
    assert main(["phantom", str(out), "--n_train", "2", "--n_test", "0", "--n_unlabelled", "0", "--shape", "[32,32,24]",
                 "--train_site", json.dumps({"phases": ["arterial"]}), "--quiet"]) == 0
    assert all(c["phase"] == "arterial" for c in _cases(out).values())
    assert main(["phantom", str(tmp_path / "bad"), "--n_train", "1", "--train_site", "{oops", "--quiet"]) == 2
    assert "--train_site is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
