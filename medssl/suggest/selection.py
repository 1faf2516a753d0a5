"""Greedy diverse selection of the volumes to label (:func:`select`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medssl.errors import ConfigError
from medssl.suggest.scoring import Score

__all__ = ["Suggestion", "similarity_matrix", "select"]


@dataclass
class Suggestion:
    """One chosen volume: ``rank`` (1 = label first), its :class:`Score` and the diversity-adjusted score."""

    rank: int
    score: Score
    adjusted_score: float


def similarity_matrix(descriptors: np.ndarray) -> np.ndarray:
    """RBF similarity ``exp(-d² / median d²)`` of ``(N, D)`` descriptors (median over the distinct pairs);
    identical rows have similarity 1."""
    x = np.asarray(descriptors, dtype=np.float64)
    d2 = np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0)
    off = d2[~np.eye(len(x), dtype=bool)]
    positive = off[off > 0]
    scale = float(np.median(positive)) if positive.size else 1.0
    return np.exp(-d2 / scale)


def select(scores: Sequence[Score], count: int, *, diversity: float = 0.5) -> list[Suggestion]:
    """Greedy diverse selection of ``count`` volumes (deterministic: ties go to the earlier record).

    Each step takes the volume maximising ``score / max score - diversity * max similarity`` to those already
    chosen (:func:`similarity_matrix` of the descriptors). With ``diversity=0``, or scores without descriptors
    (``random``), it is the plain ranking by score.

    Raises:
        ConfigError: ``count`` < 1 or ``diversity`` < 0.
    """
    if int(count) < 1:
        raise ConfigError("count", f"count must be >= 1, got {count}")
    if float(diversity) < 0:
        raise ConfigError("diversity", f"diversity must be >= 0, got {diversity}")
    n = len(scores)
    values = np.array([s.score for s in scores], dtype=np.float64)
    top = float(np.abs(values).max()) if n else 0.0
    norm = values / top if top > 0 else np.zeros(n)
    use = diversity > 0 and n > 1 and all(s.descriptor is not None for s in scores)
    sim = similarity_matrix(np.stack([s.descriptor for s in scores])) if use else np.zeros((n, n))
    chosen: list[Suggestion] = []
    penalty = np.zeros(n)
    remaining = list(range(n))
    while remaining and len(chosen) < int(count):
        adjusted = norm - diversity * penalty
        best = max(remaining, key=lambda i: (adjusted[i], -i))
        chosen.append(Suggestion(len(chosen) + 1, scores[best], float(adjusted[best])))
        remaining.remove(best)
        penalty = np.maximum(penalty, sim[best])
    return chosen
