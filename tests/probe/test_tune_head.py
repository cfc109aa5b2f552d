"""Fine-tuning's ``tune head``: the head trains on the backbone's frozen features through the
fine-tuning path (here on whole volumes, from a fitted probe head as LP-FT starts), the backbone stays
bit-identical and in eval mode; refused where it cannot be meant."""

from __future__ import annotations

import pytest
import torch
from test_transfer_encoder import _case, _cfg, _extractor

from voxdiff.core.errors import InputError
from voxdiff.probe.heads import make_head
from voxdiff.probe.train import NetworkTask, check_probe_config, fit_network

pytestmark = pytest.mark.usefixtures("one_thread")


def _fitted_head(ext):
    torch.manual_seed(3)
    head = make_head("nonlinear", [int(lv.channels) for lv in ext.levels], 14, 8, 1)
    for m in head.modules():  # a head "fitted" elsewhere: non-trivial BatchNorm statistics and weights
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.nn.init.normal_(head.out.weight, std=0.1)
    return head.eval()


@pytest.mark.parametrize("whole_volume", [True, False])
def test_tune_head_trains_the_head_alone(whole_volume, monkeypatch):
    ext = _extractor()
    start = {k: v.clone() for k, v in ext.backbone.named_parameters()}
    head0 = _fitted_head(ext)
    modes = []
    step = NetworkTask.step

    def spy(self, *a, **k):  # the backbone's mode and whether it builds a graph, at every step
        modes.append((self.backbone.training, any(p.requires_grad for p in self.backbone.parameters())))
        return step(self, *a, **k)

    monkeypatch.setattr(NetworkTask, "step", spy)
    cfg = _cfg(steps=3, backbone_lr=1e-2, lr=1e-2, transfer="all", tune="head", whole_volume=whole_volume,
               batch_size=1, selection="last")
    tuned, head = fit_network(ext, [_case(0)], [], "finetune", cfg, progress=False, init_head=head0)
    for k, v in tuned.backbone.named_parameters():
        assert torch.equal(v, start[k]), k
    assert modes == [(False, False)] * 3
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(head.parameters(), head0.parameters()))
    assert moved > 1e-3
    # the fitted head's BatchNorm statistics are kept on whole volumes (as LP-FT keeps them)
    kept = all(torch.equal(a.running_mean, b.running_mean) for a, b in zip(head.modules(), head0.modules())
               if isinstance(a, torch.nn.BatchNorm3d))
    assert kept == whole_volume


def test_tune_all_moves_the_backbone_where_tune_head_does_not():
    ext = _extractor()
    start = {k: v.clone() for k, v in ext.backbone.named_parameters()}
    cfg = _cfg(steps=2, backbone_lr=1e-2, lr=1e-2, transfer="all", tune="all", whole_volume=True, batch_size=1,
               selection="last")
    tuned, _ = fit_network(ext, [_case(0)], [], "finetune", cfg, progress=False, init_head=_fitted_head(ext))
    assert max(float((v - start[k]).abs().max()) for k, v in tuned.backbone.named_parameters()) > 1e-3


def test_tune_head_is_refused_where_it_cannot_be_meant():
    with pytest.raises(InputError, match="tune head keeps the backbone frozen"):
        check_probe_config(_cfg(transfer="encoder", tune="head"))
    check_probe_config(_cfg(transfer="all", tune="head"))
    ext = _extractor()
    with pytest.raises(InputError, match="tune head keeps the backbone frozen"):
        fit_network(ext, [_case(0)], [], "finetune", _cfg(steps=1, transfer="encoder", tune="head"), progress=False)
    with pytest.raises(InputError, match="from scratch"):
        fit_network(ext, [_case(0)], [], "scratch", _cfg(steps=1, transfer="all", tune="head"), progress=False)
