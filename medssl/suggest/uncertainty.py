"""Voxel-wise uncertainty maps of softmax probabilities ``(C, X, Y, Z)`` (float16 from the Predictor), computed a
slab of planes at a time so the float32 copies stay small, and the prediction descriptor used for diversity."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["FOREGROUND_THRESHOLD", "normalised_entropy", "kl_divergence", "foreground", "descriptor", "active_dropout"]

FOREGROUND_THRESHOLD = 0.1
_POOL = 4  # descriptor grid per axis
_EPS = 1e-6
_SLAB = 16  # planes per chunk of the voxel-wise maps


def _slabs(n: int):
    for z in range(0, n, _SLAB):
        yield slice(z, min(z + _SLAB, n))


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``H(p) / log C`` per voxel in ``[0, 1]``: ``probs`` ``(C, X, Y, Z)`` → float32 ``(X, Y, Z)``."""
    c = int(probs.shape[0])
    out = torch.empty(probs.shape[1:], dtype=torch.float32)
    for zs in _slabs(int(probs.shape[-1])):
        p = probs[..., zs].float().clamp_min(_EPS)
        out[..., zs] = -(p * p.log()).sum(0) / math.log(max(c, 2))
    return out


def kl_divergence(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` per voxel in nats: two ``(C, X, Y, Z)`` maps → float32 ``(X, Y, Z)``."""
    out = torch.empty(teacher.shape[1:], dtype=torch.float32)
    for zs in _slabs(int(teacher.shape[-1])):
        t = teacher[..., zs].float().clamp_min(_EPS)
        s = student[..., zs].float().clamp_min(_EPS)
        out[..., zs] = (t * (t.log() - s.log())).sum(0).clamp_min(0.0)
    return out


def foreground(probs: torch.Tensor, threshold: float = FOREGROUND_THRESHOLD) -> torch.Tensor:
    """Foreground-probable voxels: ``1 - p(background) >= threshold``, ``(X, Y, Z)`` bool."""
    return (1.0 - probs[0].float()) >= threshold


def descriptor(probs: torch.Tensor) -> np.ndarray:
    """Softmax average-pooled to ``4 × 4 × 4`` per class, flattened; computed one z bin at a time."""
    z = int(probs.shape[-1])
    edges = np.linspace(0, z, _POOL + 1).round().astype(int)
    parts = []
    for z0, z1 in zip(edges[:-1], edges[1:]):
        z1 = max(z1, z0 + 1)
        slab = probs[..., z0:z1].float()[None]
        parts.append(F.adaptive_avg_pool3d(slab, (_POOL, _POOL, 1))[0, ..., 0])
    return torch.stack(parts, -1).flatten().numpy().astype(np.float32)


def active_dropout(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The dropout layers of ``network`` with a drop probability above 0 (what Monte-Carlo dropout samples)."""
    from medssl.losses.consistency import _DROPOUT

    return [m for m in network.modules() if isinstance(m, _DROPOUT) and float(getattr(m, "p", 0.0)) > 0.0]
