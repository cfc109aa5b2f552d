"""How far one fine-tuning step moves what the head sees: the first optimiser step of LP-FT's backbone
(Adam's; LP-FT's AdamW adds only its tiny weight decay), and a random step of the same size, measured on the
frozen probe's standardised features.

The non-linear and linear heads standardise every feature channel with fixed statistics measured on the
training features (``FeatureScale``: ``(f - mean) / std``). A weight step moves the raw features by some
amount; the head sees that amount divided by each channel's spread. This script measures both for a
finished demo (or ``cpu-small`` compare) folder: it loads the frozen non-linear probe of each method (its
backbone, fixed normalisation statistics and head, as LP-FT starts), draws one whole training volume as
LP-FT does, and applies to the backbone alone (the head fixed, in eval mode):

- **adam**: the first step of Adam at learning rate ``lr`` on that volume's loss (Dice + cross-entropy),
  which moves every weight by about ``lr`` against the sign of its gradient;
- **random**: every weight moved by ``+lr`` or ``-lr`` at random.

Per pyramid level it reports the RMS change of the raw features, the RMS change of the standardised ones
(what the head sees), the median per-channel spread the head divides by, the RMS change of the logits and
the loss before and after. One JSON line per (folder, method)::

    python benchmarks/lpft_step_scale.py runs/demo --methods diffusion-ape,contrastive --lrs 1e-5,1e-6
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lpft_demo_seeds import start_on  # noqa: E402
from voxdiff.core.outputs import emit_row  # noqa: E402


def head_inv_std(head: torch.nn.Module, n_levels: int) -> list[torch.Tensor | None]:
    """Each level's fixed ``1 / std`` of the head's standardisation (None where the head has none)."""
    scales = getattr(head, "scales", None)
    if scales is None:
        return [None] * n_levels
    return [s.inv_std.detach().clone() for s in scales]


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def step_response(ext: Any, head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lrs: Sequence[float],
                  inputs: dict[str, torch.Tensor] | None = None, seed: int = 1) -> dict[str, Any]:
    """The effect of one backbone step on the features ``head`` sees, for ``x`` (B, 1, X, Y, Z) with
    labels ``y``; ``inputs``: the extractor's extra inputs for ``x`` (voxel indices, condition).

    For every ``lr``: an ``adam`` step (Adam's first update on the loss of ``x``, no weight decay) and a
    ``random`` step (each weight +-lr). The backbone is restored afterwards, its ``requires_grad`` flags
    too. Returns ``{"loss", "feature_std" (median per level), "steps": [{kind, lr, raw_rms,
    standardised_rms, logit_rms, loss, loss_rises}]}``: an ``adam`` step whose loss rises overshoots, so
    ``lr`` is too large for these features (docs/RESULTS.md, "Why diffusion + APE's LP-FT needs ten times
    smaller steps")."""
    from voxdiff.probe.predict import features
    from voxdiff.probe.train import dice_ce_loss

    inputs = inputs or {}
    bb = ext.backbone
    params = list(bb.parameters())
    flags = [p.requires_grad for p in params]
    state0 = copy.deepcopy(bb.state_dict())
    head.eval()
    bb.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        pyr0 = features(ext, x, grad=True, **inputs)
        inv = head_inv_std(head, len(pyr0))
        loss0 = dice_ce_loss(head(pyr0, out_size=x.shape[2:]), y)
        bb.zero_grad(set_to_none=True)
        loss0.backward()
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        bb.zero_grad(set_to_none=True)
        pyr0 = [f.detach() for f in pyr0]
        with torch.no_grad():
            logits0 = head(pyr0, out_size=x.shape[2:])
        out: dict[str, Any] = {"loss": float(loss0.detach()),
                               "feature_std": [None if i is None else float((1.0 / i).median()) for i in inv],
                               "steps": []}
        for lr in lrs:
            for kind in ("adam", "random"):
                bb.load_state_dict(state0)
                if kind == "adam":
                    opt = torch.optim.Adam([p for p, g in zip(params, grads) if g is not None], lr=float(lr))
                    for p, g in zip(params, grads):
                        if g is not None:
                            p.grad = g.clone()
                    opt.step()
                    bb.zero_grad(set_to_none=True)
                else:
                    gen = torch.Generator().manual_seed(seed)
                    with torch.no_grad():
                        for p in params:
                            p.add_((torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) * float(lr))
                with torch.no_grad():
                    pyr1 = features(ext, x, **inputs)
                    logits1 = head(pyr1, out_size=x.shape[2:])
                    loss1 = float(dice_ce_loss(logits1, y))
                raw = [_rms(a - b) for a, b in zip(pyr1, pyr0)]
                std = [_rms((a - b) * (1.0 if i is None else i.to(a)[None, :, None, None, None]))
                       for a, b, i in zip(pyr1, pyr0, inv)]
                out["steps"].append({"kind": kind, "lr": float(lr), "raw_rms": raw, "standardised_rms": std,
                                     "logit_rms": _rms(logits1 - logits0), "loss": loss1,
                                     "loss_rises": bool(loss1 > out["loss"])})
    finally:
        bb.load_state_dict(state0)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    return out


def run_method(folder: Path, method: str, lrs: Sequence[float], draw_seed: int = 0) -> dict[str, Any]:
    """:func:`step_response` for ``method``'s frozen non-linear probe in ``folder`` on one whole training
    volume drawn as LP-FT draws them (its sampler, seed ``draw_seed``)."""
    from voxdiff.experiments.base import Experiment
    from voxdiff.experiments.experiments import probe_step
    from voxdiff.probe.bundle import load_segmenter
    from voxdiff.probe.train import make_sampler

    exp = Experiment.reopen(folder)
    bundle = folder / probe_step(method, 0) / "segmenter-nonlinear"
    if not (bundle / "segmenter.json").is_file():
        raise SystemExit(f"{folder}: no finished non-linear probe of {method} ({bundle} is missing)")
    seg = load_segmenter(bundle, "cpu")
    cfg = exp.tuned_cfg("finetune", from_probe=True)
    sampler = make_sampler(seg.extractor, exp.folds()[0][0], cfg, np.random.default_rng(draw_seed), end_to_end=True)
    x, y = sampler.sample(1)
    res = step_response(seg.extractor, seg.head, x, y, lrs, sampler.extractor_inputs())
    return {"folder": str(folder), "method": method, "volume": list(x.shape[2:]), **res}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="finished demo (or cpu-small compare) folders")
    ap.add_argument("--methods", default="diffusion-ape,contrastive")
    ap.add_argument("--lrs", default="1e-5,1e-6", help="step sizes (comma-separated)")
    ap.add_argument("--draw_seed", type=int, default=0, help="seed of the training volume's draw")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="JSON-lines file the rows are appended to")
    a = ap.parse_args(argv)
    try:
        lrs = [float(v) for v in a.lrs.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--lrs must be comma-separated numbers, not {a.lrs!r}") from None
    if not lrs or any(not lr >= 0 for lr in lrs):
        raise SystemExit(f"--lrs must be >= 0, not {a.lrs!r}")
    start_on(a.folders, a.threads)
    for f in a.folders:
        for m in [m.strip() for m in a.methods.split(",") if m.strip()]:
            emit_row(run_method(f, m, lrs, a.draw_seed), a.out)


if __name__ == "__main__":
    main()
