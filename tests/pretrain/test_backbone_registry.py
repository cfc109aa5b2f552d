"""The registry through pretraining and loading: ``--backbone fpn3d`` trains and loads, models
written before the registry (no ``backbone_name``) load as the UNet, unknown names are refused."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from pretrain_synth import synthetic_case, synthetic_cases

from voxdiff.cli import main
from voxdiff.core.config import from_dict
from voxdiff.core.errors import InputError, ModelError
from voxdiff.pretrain.backbones import Backbone, FPN3d
from voxdiff.pretrain.load import load_pretrained
from voxdiff.pretrain.train import PretrainConfig, pretrain


@pytest.fixture(scope="module")
def nifti_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cts")
    for i in range(2):
        c = synthetic_case(i, shape=(40, 40, 24))
        nib.save(nib.Nifti1Image(c.image.astype(np.int16), c.meta.affine), str(root / f"ct{i}.nii.gz"))
    return root


def test_cli_pretrain_fpn3d_trains_and_loads(tmp_path, nifti_folder):
    out = tmp_path / "run"
    assert main(["pretrain", str(out), "--backbone", "fpn3d", "--data", str(nifti_folder), "--data.kind", "folder",
                 "--optim.steps", "4", "--data.patch_size", "[16,16,16]", "--backbone.base_channels", "4",
                 "--backbone.num_levels", "3", "--backbone.blocks_per_level", "2", "--task.diffusion_steps", "50",
                 "--optim.warmup_steps", "1", "--runtime.log_every", "1", "--runtime.checkpoint_every", "4",
                 "--runtime.bf16", "false", "--progress", "false",
                 "--preprocess.crop_to_body", "false"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    cfg = json.loads((out / "backbone" / "model.json").read_text())["config"]
    assert cfg["backbone_name"] == "fpn3d" and cfg["backbone"]["blocks_per_level"] == 2
    ex = load_pretrained(out)
    assert isinstance(ex.backbone, FPN3d) and not ex.backbone.training
    # BatchNorm running statistics moved during training and were saved (EMA) with the weights
    bn = ex.backbone.encoder[0][0].norm1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    feats = ex(torch.rand(1, 1, 16, 8, 12))
    assert [tuple(f.shape) for f in feats] == [(1, 4, 16, 8, 12), (1, 8, 8, 4, 6), (1, 16, 4, 2, 3)]
    assert [lv.channels for lv in ex.levels] == [4, 8, 16] and ex.divisor == 4
    assert all(torch.isfinite(f).all() for f in feats)


def test_unknown_backbone_is_refused_before_any_output(tmp_path, nifti_folder, capsys):
    out = tmp_path / "o"
    assert main(["pretrain", str(out), "--backbone", "vit", "--data", str(nifti_folder), "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown backbone 'vit'" in err and "fpn3d, unet" in err
    assert not out.exists()


def test_contrastive_projector_follows_the_fpn3d_pyramid(tmp_path):
    cfg = from_dict(PretrainConfig, dict(method="contrastive", backbone="fpn3d", patch_size=(16, 16, 16), steps=1, batch_size=2,
                         base_channels=4, num_levels=2, blocks_per_level=1, bf16=False, warmup_steps=1))
    out = pretrain(cfg, tmp_path / "c", cases=synthetic_cases(2), progress=False)
    ex = load_pretrained(out)
    assert isinstance(ex.backbone, FPN3d)
    assert ex.task.projector[0].in_features == 4 + 8


def test_models_saved_before_the_registry_load_as_unet(tmp_path):
    cfg = from_dict(PretrainConfig, dict(method="random", patch_size=(16, 16, 16), base_channels=4, num_levels=2, bf16=False))
    out = pretrain(cfg, tmp_path / "r", cases=[], progress=False)
    doc_path = out / "backbone" / "model.json"
    doc = json.loads(doc_path.read_text())
    assert doc["config"]["backbone_name"] == "unet"
    x = torch.rand(1, 1, 8, 8, 8)
    expect = load_pretrained(out)(x)
    del doc["config"]["backbone_name"]  # exactly what earlier versions wrote
    doc_path.write_text(json.dumps(doc))
    ex = load_pretrained(out)
    assert type(ex.backbone) is Backbone
    assert all(torch.equal(a, b) for a, b in zip(ex(x), expect))
    # a name this voxdiff does not know is a model error naming it
    doc["config"]["backbone_name"] = "swin3d"
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="needs backbone 'swin3d'"):
        load_pretrained(out)
    # the wrong name for the saved configuration is refused too, not half-loaded
    doc["config"]["backbone_name"] = "fpn3d"
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="incompatible fpn3d backbone configuration"):
        load_pretrained(out)
    # a preprocessing config PreprocessConfig refuses is a model error naming the backbone folder
    doc["config"]["backbone_name"] = "unet"
    doc["config"]["preprocess"]["hu_window"] = [1000, -1000]
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=r"backbone: invalid preprocessing config \(preprocess.hu_window must be"):
        load_pretrained(out)


def test_patch_size_must_fit_the_backbone_divisor():
    from voxdiff.pretrain.train import build_task_and_backbone

    with pytest.raises(InputError, match="multiple of 4"):
        build_task_and_backbone(from_dict(PretrainConfig, dict(backbone="fpn3d", patch_size=(16, 16, 10), base_channels=4,
                                               num_levels=3)))


def test_batchnorm_backbone_refuses_one_value_per_channel():
    from voxdiff.pretrain.train import build_task_and_backbone

    cfg = dict(patch_size=(8, 8, 8), base_channels=4, num_levels=4, batch_size=1)
    with pytest.raises(InputError, match="BatchNorm needs more than one value"):
        build_task_and_backbone(from_dict(PretrainConfig, dict(backbone="fpn3d", **cfg)))
    build_task_and_backbone(from_dict(PretrainConfig, dict(backbone="unet", **cfg)))  # GroupNorm: fine
    build_task_and_backbone(from_dict(PretrainConfig, dict(backbone="fpn3d", **{**cfg, "batch_size": 2})))
