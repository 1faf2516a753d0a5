"""How far intensity alone gets on a phantom: the best global window per organ, fitted on the case itself."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["intensity_threshold_baseline"]


def intensity_threshold_baseline(
    image: np.ndarray, label: np.ndarray, labels: Mapping[int, str] | Iterable[int], n_quantiles: int = 41
) -> dict[int, float]:
    """Dice of the best global intensity window per organ: a lower bound that any learned model must beat.

    For organ ``k`` the candidate windows are all ``[lo, hi]`` with ``lo <= hi`` taken from ``n_quantiles``
    evenly spaced percentiles (0-100) of the image values inside the organ; the mask ``lo <= image <= hi`` over
    the whole volume is scored against ``label == k`` and the best Dice is kept. The thresholds are fitted on the
    very case they are scored on (an oracle), so the result is optimistic. Counting uses one sort of the image
    and binary searches, exact and O(N log N).

    Args:
        image: intensities, any shape.
        label: integer label map of the same shape.
        labels: label indices (or a ``{index: name}`` mapping); 0 (background) is ignored.
        n_quantiles: size of the percentile grid.

    Returns:
        ``{label: best Dice}``; ``nan`` for a label absent from ``label``.

    Raises:
        ValueError: shapes differ or ``n_quantiles < 2``.
    """
    image, label = np.asarray(image), np.asarray(label)
    if image.shape != label.shape:
        raise ValueError(f"image shape {image.shape} differs from label shape {label.shape}")
    if n_quantiles < 2:
        raise ValueError(f"n_quantiles must be >= 2, got {n_quantiles}")
    flat_image = np.sort(image, axis=None)
    result = {}
    for k in sorted(int(k) for k in labels):
        if k == 0:
            continue
        organ = np.sort(image[label == k])
        if organ.size == 0:
            result[k] = float("nan")
            continue
        edges = np.unique(np.percentile(organ, np.linspace(0, 100, n_quantiles), method="nearest"))
        lo, hi = np.meshgrid(edges, edges, indexing="ij")
        valid = lo <= hi
        lo, hi = lo[valid], hi[valid]
        in_window = np.searchsorted(flat_image, hi, "right") - np.searchsorted(flat_image, lo, "left")
        true_pos = np.searchsorted(organ, hi, "right") - np.searchsorted(organ, lo, "left")
        result[k] = float(np.max(2.0 * true_pos / (organ.size + in_window)))
    return result
