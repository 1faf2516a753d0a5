"""NT-Xent against a slow reference, MONAI's ContrastiveLoss, and itself across two gloo ranks."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from monai.losses import ContrastiveLoss

from medssl.losses.contrastive import NTXentLoss


def naive_ntxent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """Loops over anchors, straight from the SimCLR paper's equation (1), in float64."""
    z = [v.double() for v in torch.cat([z1.flatten(1), z2.flatten(1)])]
    n = z1.shape[0]

    def sim(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(sim(z[i], z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim(z[i], z[j]) / t) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("n, f", [(2, 8), (4, 32), (8, 3)])
@pytest.mark.parametrize("t", [0.05, 0.5, 1.0])
def test_matches_naive_reference(n, f, t):
    g = torch.Generator().manual_seed(n * 100 + f)
    z1, z2 = torch.randn(n, f, generator=g), torch.randn(n, f, generator=g)
    assert NTXentLoss(temperature=t)(z1, z2).item() == pytest.approx(naive_ntxent(z1, z2, t), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("t", [0.05, 0.5])
def test_matches_monai_contrastive_loss_value_and_gradient(t):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 2, 4, 4, generator=g)
    b = 0.2 * a + torch.randn(6, 2, 4, 4, generator=g)  # weakly aligned: loss well above float32 rounding
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.flatten(1).clone().requires_grad_(), b.flatten(1).clone().requires_grad_()
    ours = NTXentLoss(temperature=t)(a1, b1)  # takes (N, ...) and flattens
    ref = ContrastiveLoss(temperature=t)(a2, b2)
    assert ref.item() > 0.1
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a1.grad.flatten(1), a2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b1.grad.flatten(1), b2.grad, rtol=1e-4, atol=1e-6)


def test_aligned_views_give_lower_loss_and_parts():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 16, generator=g)
    loss = NTXentLoss(temperature=0.05)
    aligned, parts = loss(z, z + 0.01 * torch.randn(8, 16, generator=g), return_parts=True)
    shuffled = loss(z, z[torch.randperm(8, generator=g)])
    assert aligned < shuffled
    assert parts["positive_similarity"] > 0.99
    assert -0.5 < parts["negative_similarity"] < 0.5
    assert not parts["positive_similarity"].requires_grad


def test_small_temperature_stays_finite():
    z1 = torch.randn(4, 10) * 1e3
    assert torch.isfinite(NTXentLoss(temperature=1e-3)(z1, -z1))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(4, 3\) vs \(4, 2\)"):
        NTXentLoss()(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        NTXentLoss(temperature=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = z1.shape[0] // world
        a = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
        b = z2[rank * n : (rank + 1) * n].clone().requires_grad_()
        loss = NTXentLoss(temperature=0.1, gather_distributed=True)(a, b)
        loss.backward()
        out[rank] = (loss.detach(), a.grad, b.grad)
    finally:
        torch.distributed.destroy_process_group()


def test_gathered_negatives_match_one_process_with_the_whole_batch():
    """Two gloo ranks with half the batch each: mean of rank losses = full-batch loss; gradients sum to it."""
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    full1, full2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = NTXentLoss(temperature=0.1)(full1, full2)
    full.backward()

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank_main, args=(2, _free_port(), z1, z2, out), nprocs=2, start_method="spawn")
        res = dict(out)
    losses = torch.stack([res[r][0] for r in range(2)])
    assert losses.mean().item() == pytest.approx(full.item(), rel=1e-5)
    # DDP averages gradients over ranks: each rank's local gradient / world equals the full-batch gradient
    g1 = torch.cat([res[r][1] for r in range(2)]) / 2
    g2 = torch.cat([res[r][2] for r in range(2)]) / 2
    # all_gather's backward sums the copies' gradients across ranks (reduce-scatter), so each rank's local
    # gradient covers its anchors and its negatives used elsewhere
    torch.testing.assert_close(g1, full1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g2, full2.grad, rtol=1e-4, atol=1e-6)
