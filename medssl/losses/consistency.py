"""Consistency losses, their ramp-up, and UA-MT's uncertainty mask for Mean Teacher training.

References:
    Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017, https://arxiv.org/abs/1703.01780
    (softmax-MSE / KL consistency, sigmoid ramp-up ``exp(-5 (1 - t)^2)`` of Laine & Aila, ICLR 2017).
    Yu et al., "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left Atrium Segmentation",
    MICCAI 2019, https://arxiv.org/abs/1907.07034 (UA-MT: LA recipe, T stochastic teacher passes, entropy mask).

Reduction: every loss here averages over all elements ``B * C * spatial`` (``reduction="mean"``). This is the
UA-MT LA script's ``torch.mean(consistency_criterion(...))`` and, for a mask, its
``sum(mask * dist) / (C * sum(mask))``. The original Mean Teacher code instead sums over all elements and
divides by the number of classes (then by the batch size), i.e. ``ours * spatial voxels``; its consistency
weights were tuned for that scale, the UA-MT weight 0.1 for ours.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "softmax_mse_loss",
    "softmax_kl_loss",
    "masked_mean",
    "sigmoid_rampup",
    "ConsistencyWeight",
    "uamt_threshold",
    "predictive_entropy",
    "uncertainty_mask",
    "dropout_on",
    "CONSISTENCY_LOSSES",
]

_REDUCTIONS = ("mean", "sum", "none")


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    if student_logits.ndim < 2:
        raise ValueError(f"logits need a class dimension: (B, C, ...), got shape {tuple(student_logits.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(value: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return value.mean()
    if reduction == "sum":
        return value.sum()
    return value


def softmax_mse_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Squared difference of the class softmaxes; the teacher side is a target (no gradient).

    Args:
        student_logits: ``(B, C, *spatial)`` raw student outputs.
        teacher_logits: same shape, raw teacher outputs (detached here).
        reduction: ``"mean"`` over all elements, ``"sum"``, or ``"none"`` for the ``(B, C, *spatial)`` map.

    Raises:
        ValueError: shapes differ, no class dimension, or an unknown reduction.
    """
    _check(student_logits, teacher_logits, reduction)
    p_s = F.softmax(student_logits.float(), dim=1)
    p_t = F.softmax(teacher_logits.detach().float(), dim=1)
    return _reduce((p_s - p_t) ** 2, reduction)


def softmax_kl_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Elementwise ``KL(teacher || student) = p_t (log p_t - log p_s)``; sum over ``C`` for the per-voxel KL.

    Args and Raises: as :func:`softmax_mse_loss` (``"mean"`` averages over ``B * C * spatial`` like UA-MT).
    """
    _check(student_logits, teacher_logits, reduction)
    log_p_s = F.log_softmax(student_logits.float(), dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float(), dim=1)
    return _reduce(log_p_t.exp() * (log_p_t - log_p_s), reduction)


CONSISTENCY_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"mse": softmax_mse_loss, "kl": softmax_kl_loss}
"""Names accepted by ``MeanTeacherTrainer(consistency=...)``."""


def masked_mean(distance: torch.Tensor, mask: torch.Tensor, eps: float = 1e-16) -> torch.Tensor:
    """``sum(mask * distance) / (C * sum(mask))``: the mean over classes and the voxels the mask keeps.

    Args:
        distance: ``(B, C, *spatial)`` elementwise consistency (``reduction="none"``).
        mask: ``(B, 1, *spatial)`` of 0/1 (broadcast over classes).
        eps: keeps an all-zero mask at a loss of 0 instead of NaN.
    """
    if mask.ndim != distance.ndim or mask.shape[0] != distance.shape[0] or mask.shape[2:] != distance.shape[2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not broadcast as (B, 1, ...) over {tuple(distance.shape)}")
    mask = mask.to(distance.dtype)
    return (mask * distance).sum() / (distance.shape[1] * mask.sum() + eps)


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(current / rampup_length, 0, 1)``; 1.0 when ``rampup_length`` is 0.

    Raises:
        ValueError: negative ``rampup_length``.
    """
    if rampup_length < 0:
        raise ValueError(f"rampup_length must be >= 0, got {rampup_length!r}")
    if rampup_length == 0:
        return 1.0
    t = min(max(float(current), 0.0), float(rampup_length)) / float(rampup_length)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


class ConsistencyWeight:
    """``weight(step) = consistency * sigmoid_rampup(step // rampup_unit, rampup_length)``.

    The UA-MT LA recipe: ``consistency=0.1``, ramped over 40 "epochs" of 150 iterations each (full weight at
    iteration 6000). ``step`` counts iterations from 0.

    Args:
        consistency: final weight.
        rampup_length: ramp length in units of ``rampup_unit`` steps.
        rampup_unit: steps per ramp unit.

    Raises:
        ValueError: negative ``consistency`` or ``rampup_length``, or ``rampup_unit < 1``.
    """

    def __init__(self, consistency: float = 0.1, rampup_length: float = 40, rampup_unit: int = 150) -> None:
        if consistency < 0:
            raise ValueError(f"consistency must be >= 0, got {consistency!r}")
        if rampup_length < 0:
            raise ValueError(f"rampup_length must be >= 0, got {rampup_length!r}")
        if int(rampup_unit) != rampup_unit or rampup_unit < 1:
            raise ValueError(f"rampup_unit must be a positive integer, got {rampup_unit!r}")
        self.consistency = float(consistency)
        self.rampup_length = float(rampup_length)
        self.rampup_unit = int(rampup_unit)

    def __call__(self, step: int) -> float:
        return self.consistency * sigmoid_rampup(int(step) // self.rampup_unit, self.rampup_length)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(consistency={self.consistency}, rampup_length={self.rampup_length}, "
            f"rampup_unit={self.rampup_unit})"
        )


def uamt_threshold(step: int, max_steps: int, num_classes: int = 2) -> float:
    """UA-MT's entropy threshold ``(0.75 + 0.25 * sigmoid_rampup(step, max_steps)) * ln(num_classes)``.

    The paper states it for two classes (``ln 2``, the largest possible entropy); ``ln C`` keeps the same
    meaning for ``C`` classes.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
    return (0.75 + 0.25 * sigmoid_rampup(step, max_steps)) * math.log(num_classes)


def predictive_entropy(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``-sum_c p_c log(p_c + eps)`` over dim 1: ``(B, C, *spatial)`` probabilities → ``(B, 1, *spatial)``."""
    return -(probs * torch.log(probs + eps)).sum(dim=1, keepdim=True)


_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@contextlib.contextmanager
def dropout_on(module: nn.Module):
    """Dropout layers in train mode for the block (everything else, e.g. BatchNorm, keeps its mode)."""
    layers = [m for m in module.modules() if isinstance(m, _DROPOUT)]
    modes = [m.training for m in layers]
    try:
        for m in layers:
            m.train()
        yield len(layers)
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)


@torch.no_grad()
def uncertainty_mask(
    teacher: nn.Module,
    x: torch.Tensor,
    threshold: float,
    *,
    passes: int = 8,
    perturb: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mc_dropout: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """UA-MT uncertainty: entropy of the teacher's mean softmax over ``passes`` stochastic forward passes.

    The stochasticity is what UA-MT uses: ``perturb`` on the input (pass
    ``medssl.engines.ema.teacher_noise``, clamp(N(0, 0.1), ±0.2)) and, with ``mc_dropout``, the teacher's dropout
    layers switched on (Monte-Carlo dropout; BatchNorm stays in eval mode). Passes run one after another and only
    the running mean of the softmax is kept, so memory does not grow with ``passes``.

    Args:
        teacher: segmentation network ``(B, C_in, *spatial) -> (B, C, *spatial)`` logits.
        x: input batch ``(B, C_in, *spatial)``.
        threshold: entropy below which a voxel is trusted (see :func:`uamt_threshold`).
        passes: number of stochastic passes ``T`` (8 in UA-MT).
        perturb: input perturbation applied independently in every pass.
        mc_dropout: activate dropout layers during the passes.

    Returns:
        ``(mask, uncertainty)``, both ``(B, 1, *spatial)``: ``mask`` is 1.0 where ``uncertainty < threshold``.

    Raises:
        ValueError: ``passes < 1``, or the passes would all be identical (no perturbation and no dropout layer).
    """
    if int(passes) != passes or passes < 1:
        raise ValueError(f"passes must be a positive integer, got {passes!r}")
    with dropout_on(teacher) if mc_dropout else contextlib.nullcontext(0) as n_dropout:
        if perturb is None and not n_dropout:
            raise ValueError(
                "uncertainty needs stochastic teacher passes: give an input perturbation or a teacher with dropout"
            )
        mean_probs = None
        for _ in range(int(passes)):
            logits = teacher(perturb(x) if perturb is not None else x)
            if isinstance(logits, (tuple, list)):  # networks with auxiliary outputs: the first is the segmentation
                logits = logits[0]
            probs = F.softmax(logits.float(), dim=1)
            mean_probs = probs if mean_probs is None else mean_probs + probs
    uncertainty = predictive_entropy(mean_probs / passes)
    return (uncertainty < threshold).to(uncertainty.dtype), uncertainty
