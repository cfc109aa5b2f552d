"""benchmarks/window_paths.py: the window-shift measure and logits blended on the aligned window plan."""

import numpy as np
import pytest
import torch
from standin import StandinExtractor, load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


class _Pointwise(StandinExtractor):
    """Kernel-1 pyramid that subsamples (strides 1, 2, 4), with the extractor's keyword contract:
    a window's features equal the volume's exactly when the window starts on a multiple of 4."""

    def __init__(self):
        super().__init__(channels=(4, 8, 16), seed=3, pointwise=True)

    def __call__(self, image_unit, voxel_index=None, coords=None):
        with torch.no_grad():
            return self.backbone(image_unit)


def _cfg(roi, feature_roi=None):
    from voxdiff.core.config import from_dict
    from voxdiff.probe.train import ProbeConfig

    return from_dict(ProbeConfig, {"roi": roi, "overlap": 0.25, "feature_roi": feature_roi, "n_classes": 3})


def _volume(shape=(38, 34, 26)):
    return np.random.default_rng(0).random(shape).astype(np.float32)


def test_window_shift_is_zero_on_the_stride_grid_and_not_off_it():
    from voxdiff.probe.voxel import volume_pyramid

    wp = load_benchmark("window_paths")
    ext, vol = _Pointwise(), _volume()
    pyr = volume_pyramid(ext, vol, _cfg((16, 16, 16)))
    aligned = wp.window_shift(ext, vol, pyr, [(0, 0, 0), (4, 8, 4), (20, 16, 8)], (16, 16, 16))
    for diffs in aligned:
        assert max(diffs) < 5e-3  # fp16 storage of the pyramid
    (shifted,) = wp.window_shift(ext, vol, pyr, [(1, 0, 2)], (16, 16, 16))
    assert shifted[0] < 5e-3  # full resolution: where a window starts does not matter
    assert min(shifted[1:]) > 0.05  # coarser levels sample other voxels
    with pytest.raises(ValueError):
        wp.window_shift(ext, vol, pyr, [(30, 0, 0)], (16, 16, 16))


def test_aligned_logits_match_the_volume_path_and_monai_windows_do_not():
    from voxdiff.probe.heads import NonLinearHead
    from voxdiff.probe.predict import predict_logits
    from voxdiff.probe.voxel import predict_logits_volume

    wp = load_benchmark("window_paths")
    ext, vol = _Pointwise(), _volume()
    torch.manual_seed(0)
    head = NonLinearHead([4, 8, 16], 3, hidden=8, upsample="nearest").eval()
    with torch.no_grad():  # a head that is not constant (its output layer starts at zero)
        for p in head.parameters():
            p.normal_(0.0, 0.5)
    cfg = _cfg((16, 16, 16))
    volume = predict_logits_volume(ext, {"h": head}, vol, cfg)["h"]
    aligned = wp.aligned_logits(ext, head, vol, (16, 16, 16), 0.25, 3)
    assert aligned.shape == volume.shape == (3, *vol.shape)
    torch.testing.assert_close(aligned, volume, rtol=0, atol=2e-2)  # the pyramid is stored in fp16
    # MONAI's windows end at the volume's far side (38 - 16 = 22: not a multiple of 4)
    sliding = predict_logits(ext, head, vol, (16, 16, 16), 0.25)
    assert (sliding - volume).abs().max() > 0.1


def test_mean_dice_is_in_percent_over_cases_and_ignores_absent_organs():
    wp = load_benchmark("window_paths")

    class Case:
        def __init__(self, label):
            self.label = label

    lab = np.zeros((4, 4, 4), np.uint8)
    lab[:2] = 1
    perfect = torch.zeros(3, 4, 4, 4)
    perfect[0][lab == 0] = 1
    perfect[1][lab == 1] = 1
    wrong = torch.zeros(3, 4, 4, 4)
    wrong[0] = 1  # predicts background everywhere: organ 1 Dice 0
    assert wp.mean_dice([perfect], [Case(lab)], 3) == 100.0
    assert wp.mean_dice([perfect, wrong], [Case(lab), Case(lab)], 3) == 50.0
