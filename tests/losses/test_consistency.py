"""Consistency losses, ramp-up, UA-MT threshold and uncertainty mask against naive references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medssl.losses.consistency import (
    ConsistencyWeight,
    masked_mean,
    predictive_entropy,
    sigmoid_rampup,
    softmax_kl_loss,
    softmax_mse_loss,
    uamt_threshold,
    uncertainty_mask,
)


def _logits(seed: int, shape=(2, 3, 4, 4, 3)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


def _naive_softmax(x: torch.Tensor) -> torch.Tensor:
    e = x.double().exp()
    return e / e.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("loss", [softmax_mse_loss, softmax_kl_loss])
def test_zero_for_identical_logits_positive_otherwise(loss):
    a = _logits(0)
    assert loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert loss(a, _logits(1)).item() > 1e-3


def test_mse_against_naive_reference():
    s, t = _logits(0), _logits(1)
    ref = ((_naive_softmax(s) - _naive_softmax(t)) ** 2).mean()
    assert softmax_mse_loss(s, t).item() == pytest.approx(ref.item(), rel=1e-5)
    assert softmax_mse_loss(s, t, reduction="sum").item() == pytest.approx(ref.item() * s.numel(), rel=1e-5)
    assert softmax_mse_loss(s, t, reduction="none").shape == s.shape


def test_kl_against_naive_reference():
    s, t = _logits(2), _logits(3)
    p_s, p_t = _naive_softmax(s), _naive_softmax(t)
    per_voxel = (p_t * (p_t.log() - p_s.log())).sum(dim=1)  # KL(teacher || student) per voxel
    assert softmax_kl_loss(s, t).item() == pytest.approx(per_voxel.mean().item() / s.shape[1], rel=1e-5)
    assert (per_voxel >= 0).all()


@pytest.mark.parametrize("loss", [softmax_mse_loss, softmax_kl_loss])
def test_gradient_flows_only_to_student(loss):
    s = _logits(0).requires_grad_(True)
    t = _logits(1).requires_grad_(True)
    loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_loss_argument_errors():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4, 3\) and teacher logits \(2, 2, 4, 4, 3\)"):
        softmax_mse_loss(_logits(0), _logits(1, (2, 2, 4, 4, 3)))
    with pytest.raises(ValueError, match="reduction must be one of"):
        softmax_kl_loss(_logits(0), _logits(1), reduction="avg")


def test_masked_mean_matches_uamt_formula():
    dist = torch.rand(2, 2, 3, 3, 3)
    mask = (torch.rand(2, 1, 3, 3, 3) > 0.5).float()
    expected = sum(
        dist[b, c, i, j, k]
        for b in range(2)
        for c in range(2)
        for i in range(3)
        for j in range(3)
        for k in range(3)
        if mask[b, 0, i, j, k]
    ) / (2 * mask.sum())
    assert masked_mean(dist, mask).item() == pytest.approx(float(expected), rel=1e-5)
    assert masked_mean(dist, torch.ones_like(mask)).item() == pytest.approx(dist.mean().item(), rel=1e-6)
    assert masked_mean(dist, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="does not broadcast"):
        masked_mean(dist, mask[:1])


@pytest.mark.parametrize("current, length", [(0, 40), (20, 40), (40, 40), (55, 40), (-3, 40), (7.5, 10)])
def test_sigmoid_rampup_formula(current, length):
    t = min(max(current, 0), length) / length
    assert sigmoid_rampup(current, length) == pytest.approx(math.exp(-5 * (1 - t) ** 2))


def test_sigmoid_rampup_landmarks():
    assert sigmoid_rampup(0, 40) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(20, 40) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(40, 40) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    with pytest.raises(ValueError, match="got -1"):
        sigmoid_rampup(3, -1)


def test_consistency_weight_recipe():
    w = ConsistencyWeight()  # 0.1, 40 units of 150 steps
    assert w(0) == pytest.approx(0.1 * math.exp(-5))
    assert w(149) == w(0)  # constant within a unit
    assert w(150) == pytest.approx(0.1 * math.exp(-5 * (1 - 1 / 40) ** 2))
    assert w(3000) == pytest.approx(0.1 * math.exp(-5 * 0.25))  # middle: unit 20 of 40
    assert w(6000) == pytest.approx(0.1) and w(10**6) == pytest.approx(0.1)
    steps = range(0, 6001, 150)
    assert all(a < b for a, b in zip([w(s) for s in steps], [w(s) for s in steps][1:]))
    with pytest.raises(ValueError, match="rampup_unit must be a positive integer, got 0"):
        ConsistencyWeight(rampup_unit=0)


def test_uamt_threshold_ramp():
    assert uamt_threshold(0, 6000) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    assert uamt_threshold(3000, 6000) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * math.log(2))
    assert uamt_threshold(6000, 6000) == pytest.approx(math.log(2))
    assert uamt_threshold(6000, 6000, num_classes=14) == pytest.approx(math.log(14))


def test_predictive_entropy_limits():
    uniform = torch.full((1, 2, 2, 2, 2), 0.5)
    certain = torch.zeros(1, 2, 2, 2, 2)
    certain[:, 0] = 1
    assert torch.allclose(predictive_entropy(uniform), torch.full((1, 1, 2, 2, 2), math.log(2)), atol=1e-5)
    assert predictive_entropy(certain).abs().max() < 1e-5


class _DropNet(nn.Module):
    """Logits ``(x, -x)`` per voxel after dropout: confident where |x| is large unless dropout hits it."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.drop = nn.Dropout(p)

    def forward(self, x):
        x = self.drop(x)
        return torch.cat([x, -x], dim=1)


def test_uncertainty_mask_against_naive_reference():
    torch.manual_seed(0)
    x = torch.tensor([0.0, 0.1, 3.0, 8.0]).reshape(1, 1, 4, 1, 1).repeat(1, 1, 1, 2, 2)
    net = _DropNet(p=0.0).eval()
    noise = lambda v: v  # noqa: E731  (deterministic "perturbation": every pass identical)
    mask, unc = uncertainty_mask(net, x, threshold=0.5, passes=3, perturb=noise)
    p = torch.softmax(torch.cat([x, -x], 1), 1)
    ref = -(p * torch.log(p + 1e-6)).sum(1, keepdim=True)
    assert torch.allclose(unc, ref, atol=1e-6)
    assert torch.equal(mask, (ref < 0.5).float())
    assert mask[0, 0, :, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]  # near-zero logits are uncertain


def test_uncertainty_mask_uses_dropout_and_restores_mode():
    torch.manual_seed(0)
    x = torch.full((1, 1, 8, 8, 8), 6.0)
    net = _DropNet(p=0.5).eval()
    _, unc_dropout = uncertainty_mask(net, x, threshold=0.3, passes=8)
    assert not net.drop.training  # eval mode restored
    assert unc_dropout.max() > 0.1  # dropout zeroed some passes: uncertainty where a clean pass is confident
    _, unc_clean = uncertainty_mask(net, x, threshold=0.3, passes=8, perturb=lambda v: v, mc_dropout=False)
    assert unc_clean.max() < 1e-3
    with pytest.raises(ValueError, match="needs stochastic teacher passes"):
        uncertainty_mask(nn.Conv3d(1, 2, 1), x, threshold=0.3)
