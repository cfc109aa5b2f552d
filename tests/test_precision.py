import logging

import torch

from voxdiff.core import precision


def test_bf16_dropped_where_not_native(monkeypatch, caplog):
    monkeypatch.delenv("VOXDIFF_NO_BF16", raising=False)  # (the suite may run with bf16 turned off)
    monkeypatch.setattr(precision, "_cpu_bf16_native", lambda: False)
    monkeypatch.setattr(precision, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="voxdiff"):
        assert precision.use_bf16("cpu", True) is False
        assert precision.use_bf16("cpu", True) is False
    assert sum("no native bf16" in r.message for r in caplog.records) == 1  # said once
    with precision.bf16_autocast("cpu", True):
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_kept_where_native(monkeypatch):
    monkeypatch.delenv("VOXDIFF_NO_BF16", raising=False)
    monkeypatch.setattr(precision, "_cpu_bf16_native", lambda: True)
    assert precision.use_bf16("cpu", True) is True
    assert precision.use_bf16("cpu", False) is False
    with precision.bf16_autocast("cpu", True):
        y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert y.dtype == torch.bfloat16


def test_env_turns_bf16_off(monkeypatch):
    from voxdiff.core.precision import use_bf16

    monkeypatch.setenv("VOXDIFF_NO_BF16", "1")
    assert use_bf16("cpu", True) is False
