"""benchmarks/heldout_heads.py: frozen heads scored on phantoms that no run has seen."""

import numpy as np
import pytest
from standin import load_benchmark


def _exp(tmp_path):
    from voxdiff.experiments.base import Experiment, ExperimentConfig

    return Experiment(ExperimentConfig(budget="tiny", methods=("random",), workers=1, progress=False),
                      tmp_path / "e", log=lambda *a: None)


def test_heldout_phantoms_are_labelled_new_and_reused(tmp_path):
    hh = load_benchmark("heldout_heads")
    exp = _exp(tmp_path)
    own = exp.cases("train") + exp.cases("test")
    cases = hh.heldout_cases(exp, tmp_path / "h", seed=4242, n=2)
    assert len(cases) == 2 and all(c.label is not None and c.label.any() for c in cases)
    assert all(c.image.shape == c.label.shape for c in cases)
    for c in cases:  # none of them is one of the run's phantoms
        assert not any(c.image.shape == o.image.shape and np.array_equal(c.image, o.image) for o in own)
    again = hh.heldout_cases(exp, tmp_path / "h", seed=4242, n=2)  # written once, read back the same
    assert [np.array_equal(a.image, b.image) for a, b in zip(cases, again)] == [True, True]
    with pytest.raises(SystemExit, match="holds 2 phantoms, not --n 3"):
        hh.heldout_cases(exp, tmp_path / "h", seed=4242, n=3)
    with pytest.raises(SystemExit, match="the run's own phantom seed"):
        hh.heldout_cases(exp, tmp_path / "h2", seed=exp.cfg.phantom_seed, n=2)


def test_bad_arguments_are_refused(tmp_path):
    hh = load_benchmark("heldout_heads")
    with pytest.raises(SystemExit, match="not an experiment folder"):
        hh.main([str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="--upsample: modes from nearest, trilinear"):
        hh.main([str(tmp_path), "--upsample", "cubic"])
    with pytest.raises(SystemExit, match="--n must be at least 1"):
        hh.main([str(tmp_path), "--n", "0"])
    exp = _exp(tmp_path)
    with pytest.raises(SystemExit, match="no nonlinear segmenter bundle in step probe-random-f0"):
        hh.score(exp, "probe-random-f0", "nonlinear", [], ("nearest",))
    with pytest.raises(SystemExit, match="no pretrained contrastive backbone"):
        hh.train_probe(exp, "contrastive", 10)
