"""Two gloo ranks under torchrun against one process: the first SSL step, and a NaN on one rank.

What "the same step" means for the SSL recipe's loss ``total = r + c * r`` (``r`` the L1 of view 1's reconstruction,
``c`` the NT-Xent): rank ``k`` with half the batch computes ``r_k`` over its samples and ``c_k`` over its anchors
against the negatives of both ranks (gathered). The means over ranks of ``r_k`` and ``c_k`` are exactly the one-process
``r`` and ``c`` of the whole batch. DDP averages gradients, so the 2-rank step follows the gradient of
``J = mean_k (r_k + c_k * r_k)``, which equals the one-process ``T = r + c * r`` minus the covariance over ranks
``mean_k(r_k c_k) - r c``; the additive terms match exactly, the product term matches in expectation. The test checks
the reported parts against the one-process ``r`` and ``c``, the weights after the step against a one-process SGD step
on ``J`` (computed from an obviously-correct NT-Xent written out here), and ``T - J`` against the covariance.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_ddp_worker.py"


def _worker_module():
    spec = importlib.util.spec_from_file_location("medssl_ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ntxent_of_anchors(z1: torch.Tensor, z2: torch.Tensor, rows: range, t: float) -> torch.Tensor:
    """Mean NT-Xent over the anchors ``z1[i]`` and ``z2[i]`` for ``i`` in ``rows``, negatives from all of z1, z2."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    terms = []
    for i in list(rows) + [n + j for j in rows]:
        pos = i + n if i < n else i - n
        sims = z @ z[i] / t
        others = torch.cat([sims[:i], sims[i + 1 :]])
        terms.append(torch.logsumexp(others, dim=0) - sims[pos])
    return torch.stack(terms).mean()


@pytest.fixture(scope="module")
def two_rank_step(tmp_path_factory, torchrun_script) -> Path:
    out = tmp_path_factory.mktemp("ddp_step")
    proc = torchrun_script(WORKER, "step", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_rank_step_equals_one_process_step_on_the_whole_batch(two_rank_step):
    w = _worker_module()
    ranks = [torch.load(two_rank_step / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, p in ranks[0]["state_dict"].items():
        torch.testing.assert_close(ranks[1]["state_dict"][name], p, rtol=0, atol=0, msg=name)

    net = w.tiny_vit()
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    data = w.samples(2 * w.PER_RANK)
    recon = net(torch.cat([data["image"], data["image_2"]]))[0]
    rec1, rec2 = recon.chunk(2)
    halves = [range(k * w.PER_RANK, (k + 1) * w.PER_RANK) for k in range(2)]
    r = [F.l1_loss(rec1[list(h)], data["gt_image"][list(h)]) for h in halves]
    c = [_ntxent_of_anchors(rec1.flatten(1), rec2.flatten(1), h, 0.5) for h in halves]

    # the reported parts average to the one-process L1 and NT-Xent of the whole batch
    r_full = F.l1_loss(rec1, data["gt_image"])
    from medssl.losses.contrastive import NTXentLoss

    c_full = NTXentLoss(temperature=0.5)(rec1.flatten(1), rec2.flatten(1))
    reported_r = sum(x["parts"]["loss_reconstruction"] for x in ranks) / 2
    reported_c = sum(x["parts"]["loss_contrastive"] for x in ranks) / 2
    assert reported_r == pytest.approx(r_full.item(), rel=1e-5)
    assert reported_c == pytest.approx(c_full.item(), rel=1e-5)
    assert c_full.item() == pytest.approx(((c[0] + c[1]) / 2).item(), rel=1e-5)  # the reference agrees too

    # the 2-rank total is the mean of the per-rank products; it differs from T by the covariance over ranks
    j = sum(rk + ck * rk for rk, ck in zip(r, c)) / 2
    reported_total = sum(x["parts"]["loss"] for x in ranks) / 2
    assert reported_total == pytest.approx(j.item(), rel=1e-5)
    # T - J = -cov, checked in float64: in float32 the covariance (about 1e-6 here) is at the resolution of totals
    # of size |T| (eps 1.2e-7 x |T|), and their rounding follows the CPU's summation order. The tolerance is a few
    # float64 roundings of the operands' magnitudes, and the covariance must stand far above it.
    rec64, rec64_2, gt64 = rec1.double(), rec2.double(), data["gt_image"].double()
    r64 = [F.l1_loss(rec64[list(h)], gt64[list(h)]) for h in halves]
    c64 = [_ntxent_of_anchors(rec64.flatten(1), rec64_2.flatten(1), h, 0.5) for h in halves]
    r_all = F.l1_loss(rec64, gt64)
    c_all = _ntxent_of_anchors(rec64.flatten(1), rec64_2.flatten(1), range(2 * w.PER_RANK), 0.5)
    t = r_all + c_all * r_all
    j64 = sum(rk + ck * rk for rk, ck in zip(r64, c64)) / 2
    products = sum(rk * ck for rk, ck in zip(r64, c64)) / 2
    cov = products - r_all * c_all
    tol = 16 * torch.finfo(torch.float64).eps * sum(abs(v.item()) for v in (t, j64, products, r_all * c_all))
    assert abs(cov.item()) > 100 * tol
    assert (t - j64).item() == pytest.approx(-cov.item(), abs=tol)

    # the weights: one SGD step on J in one process
    j.backward()
    with torch.no_grad():
        expected = {n: (w0[n] - w.LR * p.grad) if p.grad is not None else w0[n] for n, p in net.named_parameters()}
    changed = 0
    for name, value in expected.items():
        got = ranks[0]["state_dict"][name]
        torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-6, msg=name)
        changed += int(not torch.equal(got, w0[name]))
    assert changed > 10  # the step moved the weights, so the comparison above has teeth


def test_nan_on_one_rank_stops_both_ranks_at_the_same_iteration(tmp_path, torchrun_script):
    start = time.monotonic()
    proc = torchrun_script(WORKER, "nan", tmp_path)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    errors = {r: (tmp_path / f"rank{r}.err").read_text() for r in range(2)}  # both raised, neither was killed
    assert "iteration 2 " in errors[0] and "on rank(s) [1]" in errors[0]
    assert "iteration 2 " in errors[1] and "on rank 1: loss=nan" in errors[1]
    assert "before the optimizer step" in errors[0]
    assert not list(tmp_path.glob("rank*.pt"))  # no rank reached the end of training
    assert elapsed < 120
