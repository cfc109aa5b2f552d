"""``voxdiff pretrain`` and ``voxdiff sample`` end to end on a tiny NIfTI folder."""

import json

import nibabel as nib
import numpy as np
import pytest
from pretrain_synth import StandInBPR, synthetic_case, synthetic_cases

from voxdiff.cli import main
from voxdiff.core.config import from_dict
from voxdiff.pretrain.sample import SampleConfig, sample_patches, write_grid
from voxdiff.pretrain.train import PretrainConfig, pretrain


@pytest.fixture(scope="module")
def nifti_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cts")
    for i in range(2):
        c = synthetic_case(i, shape=(48, 48, 24))
        nib.save(nib.Nifti1Image(c.image.astype(np.int16), c.meta.affine), str(root / f"ct{i}.nii.gz"))
    return root


def test_cli_pretrain_resume_and_sample(tmp_path, nifti_folder, capsys):
    out = tmp_path / "run"
    args = ["pretrain", str(out), "--data", str(nifti_folder), "--data.kind", "folder", "--optim.steps", "4",
            "--data.patch_size", "[16,16,16]", "--backbone.base_channels", "4", "--backbone.num_levels", "3",
            "--task.diffusion_steps", "50", "--runtime.checkpoint_every", "2", "--runtime.log_every", "2",
            "--runtime.bf16", "false", "--progress", "false",
            "--preprocess.crop_to_body", "false"]
    assert main(args) == 0
    assert "pretrained backbone" in capsys.readouterr().out
    info = json.loads((out / "backbone" / "model.json").read_text())
    assert info["config"]["patch_size"] == [16, 16, 16]
    assert info["config"]["preprocess"]["crop_to_body"] is False
    # existing output is refused with a one-line error
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("voxdiff: error:") and "not empty" in err and err.count("\n") == 1
    # resume a finished run: nothing to train, outputs rewritten
    assert main(args + ["--resume"]) == 0
    png = tmp_path / "s.png"
    assert main(["sample", str(out), "-o", str(png), "--n", "2", "--sampler", "ddim", "--steps", "3"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sample", str(out), "-o", str(png), "--n", "2"]) == 2  # exists
    assert main(["sample", str(out), "-o", str(png), "--n", "2", "--sampler", "ddpm", "--steps", "3", "--force"]) == 0
    assert main(["sample", str(out), "-o", str(tmp_path / "x.png"), "--sampler", "magic"]) == 2
    assert not (tmp_path / "x.png").exists()


def test_cli_rejects_bad_input(tmp_path, capsys):
    assert main(["pretrain", str(tmp_path / "o"), "--data", str(tmp_path / "none"), "--progress", "false"]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["pretrain", str(tmp_path / "o"), "--progress", "false"]) == 2
    assert "no training data" in capsys.readouterr().err


def test_sampling_a_conditioned_model_uses_real_patches(tmp_path):
    cases = synthetic_cases(2)
    cfg = from_dict(PretrainConfig, dict(patch_size=(16, 16, 16), steps=2, base_channels=4, num_levels=3, bf16=False,
                         diffusion_steps=20, condition="slice", checkpoint_every=2))
    bpr = StandInBPR("slice")
    out = pretrain(cfg, tmp_path / "c", cases=cases, bpr=bpr, progress=False)
    # the stand-in BPR was passed in memory (no bpr/ copy), so give it again when loading
    import voxdiff.pretrain.sample as S

    real_load = S.load_backbone
    S.load_backbone = lambda p, device="cpu": real_load(p, bpr=bpr, device=device)
    try:
        with pytest.raises(Exception, match="--data"):
            sample_patches(out, SampleConfig(n=2, steps=2), progress=False)
        samples, reals = sample_patches(out, SampleConfig(n=2, steps=2), progress=False, cases=cases)
    finally:
        S.load_backbone = real_load
    assert samples.shape == reals.shape == (2, 1, 16, 16, 16)
    assert 0 <= float(samples.min()) and float(samples.max()) <= 1
    png = write_grid(tmp_path / "g.png", samples, reals)
    assert png.stat().st_size > 1000


def test_sampling_refuses_non_diffusion_models(tmp_path):
    out = pretrain(from_dict(PretrainConfig, dict(method="random", patch_size=(16, 16, 16), base_channels=4, num_levels=3)),
                   tmp_path / "r", cases=synthetic_cases(1), progress=False)
    from voxdiff.core.errors import ModelError

    with pytest.raises(ModelError, match="diffusion model"):
        sample_patches(out, SampleConfig(n=1, steps=1), progress=False)
