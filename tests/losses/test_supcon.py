"""SupConLoss against a slow per-anchor reference (labeled, instance, mixed), NT-Xent, and two gloo ranks."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from medssl.losses.contrastive import NTXentLoss
from medssl.losses.supcon import SupConLoss


def naive_supcon(features: torch.Tensor, labels: list[int] | None, t: float) -> torch.Tensor:
    """Khosla et al. L_out, one anchor at a time; label < 0 or None = the sample is its own class."""
    n, v, _ = features.shape
    z = torch.nn.functional.normalize(features, dim=-1)
    items = [(i, a) for a in range(v) for i in range(n)]

    def cls(i: int):
        return ("instance", i) if labels is None or labels[i] < 0 else ("class", labels[i])

    losses = []
    for i, a in items:
        others = [(j, b) for j, b in items if (j, b) != (i, a)]
        pos = [(j, b) for j, b in others if cls(j) == cls(i)]
        if not pos:
            continue
        denom = sum(torch.exp(z[i, a] @ z[j, b] / t) for j, b in others)
        terms = [torch.log(torch.exp(z[i, a] @ z[j, b] / t) / denom) for j, b in pos]
        losses.append(-sum(terms) / len(pos))
    return torch.stack(losses).mean()


CASES = {
    "labeled": [0, 1, 0, 2, 1, 2],
    "instance": None,
    "mixed": [0, -1, 0, -1, 1, 1],
}


# instance contrast with one view has no positives (see test_no_positive_gives_connected_zero)
COMBOS = [(case, views) for case in sorted(CASES) for views in (1, 2, 3) if not (case == "instance" and views == 1)]


@pytest.mark.parametrize("case, views", COMBOS)
@pytest.mark.parametrize("t", [0.2, 0.7])
def test_matches_naive_reference_value_and_gradient(case, views, t):
    labels = CASES[case]
    g = torch.Generator().manual_seed(views)
    x = torch.randn(6, views, 5, generator=g, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    lab = None if labels is None else torch.tensor(labels)
    got = SupConLoss(temperature=t)(a, lab)
    want = naive_supcon(b, labels, t)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    want.backward()
    # the loss normalises in fp32, so gradients agree to fp32 precision
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_mask_equals_negative_labels():
    x = torch.randn(6, 2, 4)
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    keep = torch.tensor([True, False, True, False, True, True])
    loss = SupConLoss(0.5)
    masked = loss(x, labels, mask=keep)
    explicit = loss(x, torch.where(keep, labels, torch.full_like(labels, -1)))
    assert masked.item() == pytest.approx(explicit.item(), rel=1e-6)
    assert masked.item() != pytest.approx(loss(x, labels).item(), rel=1e-3)


def test_instance_mode_with_two_views_equals_nt_xent():
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    supcon = SupConLoss(temperature=0.3)(torch.stack([z1, z2], dim=1))
    assert supcon.item() == pytest.approx(NTXentLoss(temperature=0.3)(z1, z2).item(), rel=1e-5)


def test_labels_pull_classes_together():
    """Embeddings clustered by class give a lower labeled loss than the same points with shuffled labels."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 4
    labels = torch.arange(3).repeat_interleave(4)
    x = centres[labels][:, None] + 0.1 * torch.randn(12, 2, 16, generator=g)
    loss = SupConLoss(0.2)
    assert loss(x, labels) < loss(x, labels[torch.randperm(12, generator=g)]) - 0.5


def test_no_positive_gives_connected_zero():
    x = torch.randn(4, 1, 3, requires_grad=True)
    value = SupConLoss(0.2)(x)  # one view, no labels: no anchor has a positive
    assert value.item() == 0.0
    value.backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0


def test_finite_at_small_temperature_and_bf16():
    x = torch.randn(8, 2, 32).bfloat16()
    value = SupConLoss(0.01)(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert value.dtype == torch.float32 and math.isfinite(value.item())


def test_bad_inputs():
    with pytest.raises(ValueError, match="temperature"):
        SupConLoss(temperature=0.0)
    loss = SupConLoss()
    with pytest.raises(ValueError, match=r"\(N, V, F\)"):
        loss(torch.randn(2, 2, 2, 2))
    with pytest.raises(ValueError, match="labels must have shape"):
        loss(torch.randn(4, 2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="mask must have shape"):
        loss(torch.randn(4, 2, 3), torch.tensor([0, 1, 0, 1]), mask=torch.tensor([True]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, x: torch.Tensor, labels: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = x.shape[0] // world
        part = x[rank * n : (rank + 1) * n].clone().requires_grad_()
        loss = SupConLoss(temperature=0.3, gather_distributed=True)(part, labels[rank * n : (rank + 1) * n])
        loss.backward()
        out[rank] = (loss.detach(), part.grad)
    finally:
        torch.distributed.destroy_process_group()


def test_gathered_batch_matches_one_process_with_the_whole_batch():
    """Two gloo ranks, mixed labels (classes spanning ranks, instances on both): same loss and gradients."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 2, 5, generator=g)
    labels = torch.tensor([0, -1, 1, 0, 1, -1, 0, -1])
    full_x = x.clone().requires_grad_()
    full = SupConLoss(temperature=0.3)(full_x, labels)
    full.backward()

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank_main, args=(2, _free_port(), x, labels, out), nprocs=2, start_method="spawn")
        res = dict(out)
    # two views per sample: every anchor has a positive, so both ranks average over the same number of anchors
    losses = torch.stack([res[r][0] for r in range(2)])
    assert losses.mean().item() == pytest.approx(full.item(), rel=1e-5)
    grads = torch.cat([res[r][1] for r in range(2)]) / 2
    torch.testing.assert_close(grads, full_x.grad, rtol=1e-4, atol=1e-6)
