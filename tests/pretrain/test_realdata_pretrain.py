"""A short pretraining run on a real CT (skipped when ../shared/data/real_ct is absent)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from voxdiff.data.types import Case, CaseMeta

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real_ct"
pytestmark = pytest.mark.realdata


def test_pretrain_and_features_on_a_real_ct(tmp_path):
    ct = REAL / "ts_a_abdomen_ct.nii.gz"
    if not ct.is_file():
        pytest.skip("real CT samples not available")
    from voxdiff.core.config import from_dict
    from voxdiff.data.io import load_image
    from voxdiff.data.preprocess import PreprocessConfig, hu_to_unit, preprocess_arrays
    from voxdiff.pretrain import PretrainConfig, load_pretrained, pretrain

    pre = PreprocessConfig(spacing=(2.0, 2.0, 4.0))
    hu, aff = load_image(ct)
    img, _, aff2, _ = preprocess_arrays(hu, aff, pre)
    case = Case(img, None, CaseMeta("ts_a", str(ct), None, hu.shape, aff, aff2, (2.0, 2.0, 4.0)))
    cfg = from_dict(PretrainConfig, dict(preprocess=pre, patch_size=(32, 32, 32), batch_size=2, steps=3, base_channels=4,
                         num_levels=3, bf16=False, checkpoint_every=3))
    out = pretrain(cfg, tmp_path / "real", cases=[case], progress=False)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and np.isfinite(json.loads(rows[0])["loss"])
    ex = load_pretrained(out)
    assert ex.preprocess.spacing == (2.0, 2.0, 4.0)
    x = torch.from_numpy(hu_to_unit(img[:64, :64, :32]))[None, None]
    feats = ex(x)
    assert [f.shape[2:] for f in feats] == [(64, 64, 32), (32, 32, 16), (16, 16, 8)]
    assert all(torch.isfinite(f).all() for f in feats)
