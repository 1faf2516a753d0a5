"""NT-Xent contrastive loss (SimCLR) with optional negatives from every DDP rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from medssl.dist import gather_with_grad

__all__ = ["NTXentLoss"]


class NTXentLoss(_Loss):
    """Normalised temperature-scaled cross entropy of two views.

    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020
    (https://arxiv.org/abs/2002.05709). For ``N`` pairs, every one of the ``2N`` embeddings has one positive
    (the other view of the same sample) and ``2N - 2`` negatives; the loss is the mean over the ``2N`` anchors of
    ``-log(exp(sim(i, pos)/t) / sum_{k != i} exp(sim(i, k)/t))`` with cosine similarity ``sim``. This equals
    MONAI's ``ContrastiveLoss`` on one process, computed with a log-sum-exp that stays finite at small
    temperatures.

    With ``gather_distributed=True`` and an initialised process group, the anchors are the local batch and the
    negatives are the batches of all ranks (the effective batch is ``world_size * N``); gradients flow through
    the local part on every rank, so the result matches one process holding the whole batch.

    Args:
        temperature: softmax temperature ``t`` (> 0); the SSL recipe uses 0.05.
        gather_distributed: gather negatives from all DDP ranks.

    Example::

        loss = NTXentLoss(temperature=0.05)
        z1, z2 = torch.randn(4, 128), torch.randn(4, 128)
        value = loss(z1, z2)
        value, parts = loss(z1, z2, return_parts=True)  # parts: positive / negative mean similarity
    """

    def __init__(self, temperature: float = 0.05, gather_distributed: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gather_distributed = bool(gather_distributed)

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, return_parts: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            input: embeddings of view 1, shape (N, ...) (flattened to (N, F)).
            target: embeddings of view 2, same shape as ``input``.
            return_parts: also return ``{"positive_similarity", "negative_similarity"}`` (detached means).

        Returns:
            the scalar loss (and the parts when ``return_parts``).

        Raises:
            ValueError: shapes differ or fewer than 2 dimensions.
        """
        if input.shape != target.shape:
            raise ValueError(f"input and target shapes differ: {tuple(input.shape)} vs {tuple(target.shape)}")
        if input.ndim < 2:
            raise ValueError(f"expected (N, F) or (N, ...) embeddings, got shape {tuple(input.shape)}")
        n = input.shape[0]
        # cosine similarity in fp32: bf16 logits at t=0.05 lose the ranking of near-equal negatives
        z1 = F.normalize(input.reshape(n, -1).float(), dim=1)
        z2 = F.normalize(target.reshape(n, -1).float(), dim=1)
        local = torch.cat([z1, z2], dim=0)  # (2N, F): anchors
        if self.gather_distributed:
            all1, all2 = gather_with_grad(z1), gather_with_grad(z2)
            rank = torch.distributed.get_rank() if all1.shape[0] != n else 0
        else:
            all1, all2, rank = z1, z2, 0
        total = all1.shape[0]
        keys = torch.cat([all1, all2], dim=0)  # (2M, F) with M = world_size * N
        logits = local @ keys.T / self.temperature  # (2N, 2M)

        rows = torch.arange(2 * n, device=local.device)
        local_idx = rank * n + torch.arange(n, device=local.device)
        self_col = torch.cat([local_idx, local_idx + total])  # column of each anchor itself
        pos_col = torch.cat([local_idx + total, local_idx])  # column of its other view
        logits = logits.masked_fill(F.one_hot(self_col, 2 * total).bool(), float("-inf"))
        loss = (torch.logsumexp(logits, dim=1) - logits[rows, pos_col]).mean()
        if not return_parts:
            return loss
        with torch.no_grad():
            sim = logits * self.temperature
            positive = sim[rows, pos_col].mean()
            neg_mask = torch.isfinite(sim)
            neg_mask[rows, pos_col] = False
            negative = sim[neg_mask].mean() if neg_mask.any() else torch.zeros((), device=sim.device)
        return loss, {"positive_similarity": positive, "negative_similarity": negative}
