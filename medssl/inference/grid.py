"""Map predictions from the model grid back onto the input grid without a dense sampling grid.

The model grid is the input grid after MONAI's ``Orientation`` (a signed permutation of the axes) and
``Spacing`` (a per-axis rescaling that keeps the direction cosines). So the voxel-to-voxel map
``inv(model_affine) @ input_affine`` sends input axis ``k`` to one model axis ``p(k)`` with
``m = a_k * i + b_k``: the inverse transform is separable. Labels come back by nearest neighbour, one 1D index
per axis (``np.ix_``): exact, and no float copy of anything. Probabilities come back by separable linear
interpolation, one class at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = [
    "AxisMap",
    "axis_map",
    "labels_to_input_grid",
    "refine_boundaries",
    "probabilities_to_input_grid",
    "model_grid_shape",
]


class AxisMap:
    """Per input axis ``k``: model axis ``perm[k]`` and model coordinate ``scale[k] * i + shift[k]``."""

    def __init__(self, perm: Sequence[int], scale: Sequence[float], shift: Sequence[float]):
        self.perm = tuple(int(p) for p in perm)
        self.scale = tuple(float(s) for s in scale)
        self.shift = tuple(float(s) for s in shift)

    def coordinates(self, k: int, n: int) -> np.ndarray:
        """Model-grid coordinates of input voxels ``0 .. n-1`` along input axis ``k``."""
        return self.scale[k] * np.arange(n, dtype=np.float64) + self.shift[k]


def axis_map(model_affine: np.ndarray, input_affine: np.ndarray, tol: float = 1e-4) -> AxisMap:
    """Decompose ``inv(model_affine) @ input_affine`` into a signed axis permutation, scales and shifts.

    Raises:
        ValueError: the two grids are not related by a permutation and per-axis scaling (the model grid is
            rotated relative to the input), with the offending matrix.
    """
    t = np.linalg.inv(np.asarray(model_affine, dtype=np.float64)) @ np.asarray(input_affine, dtype=np.float64)
    m = t[:3, :3]
    perm = tuple(int(np.argmax(np.abs(m[:, k]))) for k in range(3))
    if sorted(perm) != [0, 1, 2]:
        raise ValueError(f"model and input grids are not axis-aligned: voxel map {np.round(m, 5).tolist()}")
    off = m.copy()
    for k, p in enumerate(perm):
        off[p, k] = 0.0
    if np.abs(off).max() > tol * np.abs(m).max():
        raise ValueError(
            f"model and input grids are rotated relative to each other: voxel map {np.round(m, 5).tolist()}"
        )
    return AxisMap(perm, [m[p, k] for k, p in enumerate(perm)], [t[p, 3] for p in perm])


def labels_to_input_grid(
    labels: np.ndarray, amap: AxisMap, input_shape: Sequence[int], out: np.ndarray | None = None
) -> np.ndarray:
    """Nearest-neighbour labels on the input grid.

    Args:
        labels: ``(X', Y', Z')`` labels on the model grid.
        amap: from :func:`axis_map`.
        input_shape: ``(X, Y, Z)`` of the input.
        out: optional preallocated result.

    Returns:
        ``(X, Y, Z)`` labels, same dtype. Input voxels outside the model grid take the nearest edge voxel.
    """
    moved = np.transpose(labels, amap.perm)
    index = []
    for k, n in enumerate(input_shape):
        c = np.floor(amap.coordinates(k, int(n)) + 0.5).astype(np.int64)
        index.append(np.clip(c, 0, moved.shape[k] - 1))
    result = moved[np.ix_(*index)]
    if out is not None:
        out[...] = result
        return out
    return result


def _corners(amap: AxisMap, k: int, n: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear-interpolation neighbours ``lo, hi`` and weight of ``hi`` for input axis ``k`` (``hi = lo`` when the
    weight is 0, so a grid that maps voxel centres onto voxel centres has a single neighbour)."""
    c = np.clip(amap.coordinates(k, n), 0, size - 1)
    lo = np.minimum(np.floor(c).astype(np.int64), size - 1)
    w = c - lo
    hi = np.where(w > 1e-6, np.minimum(lo + 1, size - 1), lo)
    return lo, hi, w.astype(np.float32)


def refine_boundaries(
    labels: np.ndarray, model_labels: np.ndarray, probabilities: np.ndarray, amap: AxisMap, chunk: int = 1 << 17
) -> int:
    """Replace nearest-neighbour labels by the argmax of linearly interpolated probabilities where they can differ.

    Where all (up to 8) interpolation neighbours of an input voxel carry the same model-grid label ``c``, every
    neighbour's probability vector has its maximum at ``c``, and so has any convex combination of them: the
    nearest label already equals the argmax of the interpolated probabilities. Only the other voxels, along
    label boundaries, are interpolated, ``chunk`` voxels at a time. The result equals MONAI's recipe
    (``Invertd`` of the probabilities with bilinear interpolation, then argmax) up to float16 rounding of the
    probabilities, without its full-resolution ``C``-channel map.

    Args:
        labels: ``(X, Y, Z)`` nearest-neighbour labels on the input grid (:func:`labels_to_input_grid`); updated
            in place.
        model_labels: ``(X', Y', Z')`` labels on the model grid (the argmax of ``probabilities``).
        probabilities: ``(C, X', Y', Z')`` softmax probabilities on the model grid (float16 is enough).
        amap: from :func:`axis_map`.

    Returns:
        The number of voxels interpolated.
    """
    moved_l = np.transpose(model_labels, amap.perm)
    moved_p = np.transpose(probabilities, (0, *[p + 1 for p in amap.perm]))
    corners = [_corners(amap, k, n, moved_l.shape[k]) for k, n in enumerate(labels.shape)]
    boundary = np.zeros(labels.shape, dtype=bool)
    for pick in itertools.product((0, 1), repeat=3):
        index = [corners[k][b] for k, b in enumerate(pick)]
        boundary |= moved_l[np.ix_(*index)] != labels
    points = np.nonzero(boundary)
    del boundary
    for start in range(0, len(points[0]), chunk):
        ijk = [p[start : start + chunk] for p in points]
        acc = np.zeros((len(ijk[0]), moved_p.shape[0]), dtype=np.float32)
        for pick in itertools.product((0, 1), repeat=3):
            weight = np.ones(len(ijk[0]), dtype=np.float32)
            where = []
            for k, b in enumerate(pick):
                lo, hi, w = corners[k]
                weight *= w[ijk[k]] if b else 1 - w[ijk[k]]
                where.append((hi if b else lo)[ijk[k]])
            acc += moved_p[:, where[0], where[1], where[2]].T * weight[:, None]
        labels[tuple(ijk)] = acc.argmax(1)
    return len(points[0])


def _linear_along(a: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """1D linear interpolation of ``a`` along ``axis`` at ``coords`` (edge values outside)."""
    n = a.shape[axis]
    c = np.clip(coords, 0, n - 1)
    lo = np.minimum(np.floor(c).astype(np.int64), max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    w = (c - lo).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    return np.take(a, lo, axis=axis) * (1 - w) + np.take(a, hi, axis=axis) * w


def probabilities_to_input_grid(
    probabilities: np.ndarray, amap: AxisMap, input_shape: Sequence[int], scale: int = 32767
) -> np.ndarray:
    """Linearly interpolated probabilities on the input grid, quantised to ``int16`` (value × ``scale``).

    Args:
        probabilities: ``(C, X', Y', Z')`` on the model grid (any float dtype).
        amap: from :func:`axis_map`.
        input_shape: ``(X, Y, Z)``.

    Returns:
        ``(X, Y, Z, C)`` int16, the NIfTI channel-last layout.
    """
    c_count = probabilities.shape[0]
    result = np.empty((*tuple(int(n) for n in input_shape), c_count), dtype=np.int16)
    coords = [amap.coordinates(k, int(n)) for k, n in enumerate(input_shape)]
    for c in range(c_count):
        channel = np.transpose(np.asarray(probabilities[c], dtype=np.float32), amap.perm)
        for k in range(3):
            channel = _linear_along(channel, k, coords[k])
        result[..., c] = np.rint(np.clip(channel, 0, 1) * scale)
    return result


def model_grid_shape(
    shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float] | None, orientation: str | None
) -> tuple[int, int, int]:
    """Approximate model-grid shape after orientation and resampling (for memory estimates before any work)."""
    import nibabel as nib

    shape = [int(s) for s in shape]
    in_spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    perm = [int(a) for a in nib.orientations.io_orientation(affine)[:, 0]] if orientation else [0, 1, 2]
    out = [0, 0, 0]
    for k, p in enumerate(perm):
        target = float(spacing[p]) if spacing is not None else in_spacing[k]
        out[p] = max(1, int(round(shape[k] * in_spacing[k] / target)))
    return tuple(out)
