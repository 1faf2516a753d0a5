"""The reconstruction-regularised contrastive loss of the self-supervised ViT recipe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from medssl.losses.contrastive import NTXentLoss

__all__ = ["reconstruction_contrastive_loss", "ReconstructionContrastiveLoss"]


def reconstruction_contrastive_loss(
    recon1: torch.Tensor, recon2: torch.Tensor, clean: torch.Tensor, contrastive: NTXentLoss
) -> dict[str, torch.Tensor]:
    """``total = r + c * r`` with ``r = L1(recon1, clean)`` and ``c = NT-Xent(flatten(recon1), flatten(recon2))``.

    The contrastive term is scaled by the reconstruction loss, as in the self-supervised pretraining of
    Tang et al., "Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image Analysis", CVPR 2022,
    in the MONAI ViTAutoEnc tutorial form (https://arxiv.org/abs/2111.14791).

    Args:
        recon1: reconstruction of view 1, shape (B, C, H, W, D).
        recon2: reconstruction of view 2, same shape.
        clean: the clean crop both views were made from, same shape.
        contrastive: the NT-Xent loss module.

    Returns:
        ``{"total", "reconstruction", "contrastive"}`` scalars (``total`` carries the gradient).

    Raises:
        ValueError: shapes differ.
    """
    if not (recon1.shape == recon2.shape == clean.shape):
        raise ValueError(
            f"recon1, recon2 and clean must share a shape, got {tuple(recon1.shape)}, {tuple(recon2.shape)}, "
            f"{tuple(clean.shape)}"
        )
    r = F.l1_loss(recon1.float(), clean.float())
    c = contrastive(recon1.flatten(start_dim=1), recon2.flatten(start_dim=1))
    return {"total": r + c * r, "reconstruction": r, "contrastive": c}


class ReconstructionContrastiveLoss(_Loss):
    """Module form of :func:`reconstruction_contrastive_loss`.

    Args:
        temperature: NT-Xent temperature (0.05 in the recipe).
        gather_distributed: NT-Xent negatives from all DDP ranks.

    Example::

        loss = ReconstructionContrastiveLoss(temperature=0.05)
        parts = loss(recon1, recon2, clean)  # parts["total"].backward()
    """

    def __init__(self, temperature: float = 0.05, gather_distributed: bool = False) -> None:
        super().__init__()
        self.contrastive = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)

    def forward(self, recon1: torch.Tensor, recon2: torch.Tensor, clean: torch.Tensor) -> dict[str, torch.Tensor]:
        return reconstruction_contrastive_loss(recon1, recon2, clean, self.contrastive)
