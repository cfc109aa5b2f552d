"""voxdiff features refuses a data set with an image that is not CT in HU (one line naming it,
exit 2, no output folder) unless --allow_non_ct."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from voxdiff.cli import main
from voxdiff.core.config import from_dict
from voxdiff.data.types import Case, CaseMeta
from voxdiff.pretrain.train import PretrainConfig, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def _body(seed, shape=(36, 32, 20)):
    r = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    img = np.where(x**2 / 0.8 + y**2 / 0.6 < 1, 40.0, -1000.0)
    return (img + r.normal(0, 10, shape)).astype(np.float32)


def test_features_refuse_a_mask_unless_allowed(tmp_path, capsys):
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    cfg = from_dict(PretrainConfig, dict(method="random", patch_size=(16, 16, 16), batch_size=2, steps=1, base_channels=4, num_levels=3))
    model = pretrain(cfg, tmp_path / "rnd", cases=[Case(_body(0), None, CaseMeta("c0", None, None, (36, 32, 20), aff, aff, (1.0, 1.0, 2.0)))],
                     progress=False)
    data = tmp_path / "data"
    data.mkdir()
    nib.save(nib.Nifti1Image(_body(1).astype(np.int16), aff), str(data / "ct.nii.gz"))
    mask = data / "organ.nii.gz"  # a 0/255 mask stored as int16: only its values give it away
    nib.save(nib.Nifti1Image(np.where(_body(2) > 0, 255, 0).astype(np.int16), aff), str(mask))
    out = tmp_path / "feats"
    argv = ["features", str(model), str(data), "-o", str(out), "--roi", "[16,16,16]", "--progress", "false"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"voxdiff: error: {mask}: only 2 distinct values"), err
    assert not out.exists()
    assert main(argv + ["--allow_non_ct"]) == 0
    assert (out / "features.json").is_file()
