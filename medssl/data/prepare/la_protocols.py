"""How ``medssl prepare la2018`` turns one LA 2018 case into the volumes a protocol trains and tests on.

* ``full`` (default): the whole scan, intensities as stored (the bundles z-score them).
* ``uamt``: the published preprocessing of UA-MT (Yu et al., "Uncertainty-aware Self-ensembling Model for
  Semi-supervised 3D Left Atrium Segmentation", MICCAI 2019; ``code/dataloaders/la_heart_processing.py`` of
  github.com/yulequan/UA-MT, which wrote its ``mri_norm2.h5`` files). **Optimistic**: every volume, test cases
  and the volumes used as unlabeled included, is cropped around its own ground-truth atrium, so the test input
  already says where the answer is.
  Use it only to compare with numbers published under that protocol.

The published rule, in the voxel order of the NRRD file (``x, y, z``; pynrrd's arrays, ITK's index order):

1. label = (``laendo`` == 255); its bounding box ``[lo, hi]`` per axis (``hi`` the last foreground index);
2. ``pad = max(P - (hi - lo), 0) // 2`` with the training patch ``P = (112, 112, 80)``;
3. six margins drawn with ``numpy.random.randint`` in the order x-low, x-high, y-low, y-high, z-low, z-high:
   ``randint(10, 20)`` (10-19 voxels) in-plane, ``randint(5, 10)`` (5-9 slices) along z;
4. ``start = max(lo - margin_low - pad, 0)``, ``stop = min(hi + margin_high + pad, size)`` (a Python slice, so
   ``stop`` itself is excluded); the script computes the z bounds but slices only ``x`` and ``y``: every slice
   is kept;
5. intensities: z-score over every voxel of the whole, uncropped scan (``numpy.mean`` / ``numpy.std``,
   population std), stored as float32, then cropped.

The published script draws the margins from numpy's global, unseeded generator in ``glob`` order, so its exact
crops cannot be regenerated; here each case draws from its own legacy ``RandomState`` seeded by ``(seed,
crc32(case id))``, so a crop depends on the seed and the case only, not on which other cases are present.
The crop keeps world coordinates: the written image's origin is the world position of its first voxel.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from medssl.errors import ConfigError

__all__ = [
    "LA_PROTOCOLS",
    "UAMT_PATCH_SIZE",
    "UAMT_MARGIN_RANGES",
    "check_protocol",
    "uamt_margins",
    "uamt_crop_box",
    "uamt_zscore",
    "uamt_case",
]

LA_PROTOCOLS = ("full", "uamt")
UAMT_PATCH_SIZE = (112, 112, 80)
# numpy.random.randint(low, high) bounds (high excluded) of the low- and high-side margin per axis x, y, z
UAMT_MARGIN_RANGES = ((10, 20), (10, 20), (5, 10))


def check_protocol(protocol: str | None) -> str:
    """The protocol name (``None`` or ``""`` → ``"full"``).

    Raises:
        ConfigError: not one of :data:`LA_PROTOCOLS`.
    """
    name = "full" if protocol in (None, "") else protocol
    if name not in LA_PROTOCOLS:
        raise ConfigError("protocol", f"unknown la2018 protocol {protocol!r}; choose one of {list(LA_PROTOCOLS)}")
    return name


def uamt_margins(case_id: str, seed: int = 0) -> tuple[int, int, int, int, int, int]:
    """The six random margins of one case, drawn in the published order (x-low, x-high, y-low, y-high, z-low,
    z-high) from a ``RandomState`` seeded by ``(seed, crc32(case_id))``."""
    rng = np.random.RandomState([int(seed) & 0xFFFFFFFF, zlib.crc32(case_id.encode("utf-8"))])
    return tuple(int(rng.randint(lo, hi)) for lo, hi in UAMT_MARGIN_RANGES for _ in range(2))  # type: ignore[return-value]


def uamt_crop_box(
    label_xyz: np.ndarray, margins: Sequence[int], patch_size: Sequence[int] = UAMT_PATCH_SIZE
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """The published crop of one case: ``((x_start, x_stop), (y_start, y_stop), (0, z_size))``, stops excluded.

    Args:
        label_xyz: the label in file voxel order ``(x, y, z)``; foreground is any non-zero voxel.
        margins: six margins as :func:`uamt_margins` returns them.
        patch_size: the training patch that the box is widened towards (published: 112 × 112 × 80).

    Raises:
        ValueError: not 3D, no foreground, or not six margins.
    """
    label_xyz = np.asarray(label_xyz)
    if label_xyz.ndim != 3:
        raise ValueError(f"label must be 3D (x, y, z), got shape {label_xyz.shape}")
    if len(margins) != 6:
        raise ValueError(f"need six margins (x-low, x-high, y-low, y-high, z-low, z-high), got {list(margins)}")
    found = np.nonzero(label_xyz)
    if found[0].size == 0:
        raise ValueError("the label has no foreground voxel to crop around")
    box = []
    for axis in range(2):  # the published script slices x and y only
        lo, hi = int(found[axis].min()), int(found[axis].max())
        pad = max(int(patch_size[axis]) - (hi - lo), 0) // 2
        start = max(lo - int(margins[2 * axis]) - pad, 0)
        stop = min(hi + int(margins[2 * axis + 1]) + pad, label_xyz.shape[axis])
        box.append((start, stop))
    box.append((0, int(label_xyz.shape[2])))
    return box[0], box[1], box[2]


def uamt_zscore(image: np.ndarray) -> np.ndarray:
    """The published normalisation: ``(image - mean) / std`` over every voxel (population std), as float32.

    Raises:
        ValueError: a constant image (std 0) or non-finite values.
    """
    values = np.asarray(image, dtype=np.float64)
    mean, std = float(values.mean()), float(values.std())
    if not np.isfinite(mean) or not np.isfinite(std) or std == 0.0:
        raise ValueError(f"cannot z-score an image with mean {mean} and std {std}")
    return ((values - mean) / std).astype(np.float32)


def uamt_case(image: Any, label: Any, case_id: str, seed: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """Apply the published preprocessing to one case.

    Args:
        image: the ``lgemri.nrrd`` SimpleITK image.
        label: the ``laendo.nrrd`` SimpleITK image (0 / 255, same grid; checked by the caller).
        case_id: the case folder name (seeds the margins).
        seed: margin seed.

    Returns:
        ``(image, label, crop)``: SimpleITK images (float32 z-scored image, uint8 0/1 label) cropped, with their
        origin moved to the first kept voxel, and the plain record ``{"start", "stop", "margins", "source_shape"}``
        (voxel indices in the ``x, y, z`` order of the source file; stops excluded).

    Raises:
        ValueError: an empty label or a constant image.
    """
    import SimpleITK as sitk

    label_zyx = sitk.GetArrayViewFromImage(label) == 255
    margins = uamt_margins(case_id, seed)
    box = uamt_crop_box(label_zyx.T, margins)
    out_image = sitk.GetImageFromArray(uamt_zscore(sitk.GetArrayViewFromImage(image)))
    out_image.CopyInformation(image)
    out_label = sitk.GetImageFromArray(label_zyx.astype(np.uint8))
    out_label.CopyInformation(label)
    (x0, x1), (y0, y1), (z0, z1) = box
    crop = {
        "start": [x0, y0, z0],
        "stop": [x1, y1, z1],
        "margins": list(margins),
        "source_shape": [int(s) for s in image.GetSize()],
    }
    # SimpleITK slices in (x, y, z) index order and moves the origin to the first kept voxel
    return out_image[x0:x1, y0:y1, z0:z1], out_label[x0:x1, y0:y1, z0:z1], crop
