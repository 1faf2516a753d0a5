"""Supervised contrastive loss (SupCon, the ``L_out`` form) with instance mode and ignored pseudo-labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from medssl.dist import gather, gather_with_grad, is_distributed

__all__ = ["SupConLoss"]


class SupConLoss(_Loss):
    """Supervised contrastive loss of several views per sample.

    Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020 (https://arxiv.org/abs/2004.11362), the
    ``L_out`` form (the mean over positives is outside the log). With ``N`` samples of ``V`` views each, every one of
    the ``N * V`` embeddings ``z_i`` is an anchor with positives ``P(i)`` (the other embeddings of its class) and
    all other embeddings ``A(i)`` in the denominator::

        loss_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i . z_p / t) / sum_{a in A(i)} exp(z_i . z_a / t) )

    with L2-normalised embeddings. The loss is the mean over anchors with at least one positive (an anchor without
    positives, e.g. a single view of an unlabeled sample, adds negatives only). The ``t / base_t`` factor of the
    reference code is left out (``base_t = t``), as in S5CL.

    Classes:

    - ``labels=None``: instance mode (SimCLR-like): each sample is its own class across its ``V`` views.
    - ``labels`` of shape ``(N,)``: samples with equal labels are positives of each other; a negative label (or
      ``mask[i] == False``, e.g. a pseudo-label below the confidence threshold) makes sample ``i`` its own class,
      i.e. instance contrast for that sample only. This is the "mixed" case of S5CL's unlabeled term.

    With ``gather_distributed=True`` and an initialised process group, embeddings and labels of all ranks are
    gathered (the local embeddings stay the anchors, gradients reach every rank's part), so the loss equals one
    process holding the whole batch; instance classes are made unique per rank.

    Args:
        temperature: softmax temperature ``t`` (> 0); S5CL uses 0.2 on labeled and 0.7 on unlabeled data.
        gather_distributed: gather embeddings from all DDP ranks.

    Example::

        loss = SupConLoss(temperature=0.2)
        z = torch.randn(8, 2, 128)                   # 8 samples, weak and strong view
        value = loss(z, labels=torch.randint(0, 3, (8,)))
        value = loss(z)                              # instance contrast
    """

    def __init__(self, temperature: float = 0.2, gather_distributed: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gather_distributed = bool(gather_distributed)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            features: embeddings ``(N, V, F)`` (``V`` views per sample) or ``(N, F)`` (one view each).
            labels: ``(N,)`` integer classes; negative values mean "no class" (instance contrast). ``None``:
                instance mode for every sample.
            mask: ``(N,)`` bool, ``False`` turns sample ``i``'s label off (instance contrast), e.g. a pseudo-label
                below the confidence threshold.

        Returns:
            the scalar loss (zero, connected to the graph, when no anchor has a positive).

        Raises:
            ValueError: wrong shapes.
        """
        if features.ndim == 2:
            features = features.unsqueeze(1)
        if features.ndim != 3:
            raise ValueError(f"expected features of shape (N, V, F) or (N, F), got {tuple(features.shape)}")
        n, v = features.shape[:2]
        device = features.device
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.long, device=device)
        labels = labels.to(device=device, dtype=torch.long).reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        if mask is not None:
            mask = mask.to(device=device, dtype=torch.bool).reshape(-1)
            if mask.shape[0] != n:
                raise ValueError(f"mask must have shape ({n},), got {tuple(mask.shape)}")
            labels = torch.where(mask, labels, torch.full_like(labels, -1))
        if n == 0:
            return features.sum() * 0.0

        # similarities in fp32: small temperatures in bf16 lose the ranking of close negatives
        z = F.normalize(features.float(), dim=-1)
        if self.gather_distributed and is_distributed():
            # one gather per view, concatenated like NT-Xent's: gloo's backward of all_gather needs contiguous
            # gradients, which a transpose of one gathered (N, V, F) tensor would not give
            per_view = [gather_with_grad(z[:, k].contiguous()) for k in range(v)]
            all_labels = gather(labels)
            rank = torch.distributed.get_rank() if per_view[0].shape[0] != n else 0
        else:
            per_view, all_labels, rank = [z[:, k] for k in range(v)], labels, 0
        total = per_view[0].shape[0]
        # class ids: labeled samples keep theirs, unlabeled ones get a unique id beyond every real class
        unique = torch.arange(total, device=device) + int(all_labels.max().clamp(min=0)) + 1
        classes = torch.where(all_labels >= 0, all_labels, unique)
        local = slice(rank * n, rank * n + n)

        anchors = z.transpose(0, 1).reshape(v * n, -1)  # view-major: row = view * n + sample
        keys = torch.cat(per_view, dim=0)
        anchor_cls = classes[local].repeat(v)
        key_cls = classes.repeat(v)
        logits = anchors @ keys.T / self.temperature  # (V*n, V*total)

        rows = torch.arange(v * n, device=device)
        sample = rows % n + rank * n
        self_col = (rows // n) * total + sample
        is_self = F.one_hot(self_col, v * total).bool()
        logits = logits.masked_fill(is_self, float("-inf"))
        positives = (anchor_cls[:, None] == key_cls[None, :]) & ~is_self
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        n_pos = positives.sum(dim=1)
        has_pos = n_pos > 0
        if not has_pos.any():
            return logits.masked_fill(is_self, 0.0).sum() * 0.0
        pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
        return -(pos_log_prob[has_pos] / n_pos[has_pos]).mean()
