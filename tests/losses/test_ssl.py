"""Reconstruction-regularised contrastive loss: total = r + c * r exactly, parts against direct computation."""

from __future__ import annotations

import pytest
import torch

from medssl.losses.contrastive import NTXentLoss
from medssl.losses.ssl import ReconstructionContrastiveLoss, reconstruction_contrastive_loss


def _inputs(seed=0, shape=(3, 1, 8, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(shape, generator=g)
    r1 = (clean + 0.1 * torch.randn(shape, generator=g)).requires_grad_()
    r2 = (clean + 0.1 * torch.randn(shape, generator=g)).requires_grad_()
    return r1, r2, clean


@pytest.mark.parametrize("seed", [0, 1])
def test_total_is_r_plus_c_times_r(seed):
    r1, r2, clean = _inputs(seed)
    parts = ReconstructionContrastiveLoss(temperature=0.05)(r1, r2, clean)
    r, c = parts["reconstruction"], parts["contrastive"]
    assert torch.equal(parts["total"], r + c * r)
    assert r.item() == pytest.approx((r1 - clean).abs().mean().item(), rel=1e-6)
    assert c.item() == pytest.approx(NTXentLoss(0.05)(r1.flatten(1), r2.flatten(1)).item(), rel=1e-6)


def test_gradient_reaches_both_reconstructions_and_loss_decreases():
    r1, r2, clean = _inputs(2)
    loss = ReconstructionContrastiveLoss(temperature=0.05)
    before = loss(r1, r2, clean)["total"]
    before.backward()
    assert r1.grad.abs().sum() > 0 and r2.grad.abs().sum() > 0  # r2 only through the contrastive term
    with torch.no_grad():
        r1 -= 0.5 * r1.grad / r1.grad.norm()
        r2 -= 0.5 * r2.grad / r2.grad.norm()
    assert loss(r1, r2, clean)["total"] < before


def test_function_and_module_agree():
    r1, r2, clean = _inputs(3)
    a = reconstruction_contrastive_loss(r1, r2, clean, NTXentLoss(0.1))
    b = ReconstructionContrastiveLoss(temperature=0.1)(r1, r2, clean)
    for k in ("total", "reconstruction", "contrastive"):
        assert torch.equal(a[k], b[k])


def test_shape_mismatch():
    r1, r2, clean = _inputs()
    with pytest.raises(ValueError, match=r"\(3, 1, 8, 8, 4\)"):
        ReconstructionContrastiveLoss()(r1, r2, clean[..., :4])
