"""Weak and strong 3D views for S5CL (hierarchical supervised / self-supervised / pseudo-label contrast).

Tran et al., "S5CL: Unifying Fully-Supervised, Self-Supervised, and Semi-Supervised Learning Through Hierarchical
Contrastive Learning", MICCAI 2022 (https://arxiv.org/abs/2203.07307) use a weak view (flips, rotations, mild
colour jitter) and a strong view (adds random resized crops, affine warps, strong colour changes, cut-out) of each
image. In 3D:

- **weak**: random flips along each axis, ``rot90`` in the axial plane, small intensity scale / shift;
- **strong**: the weak recipe, then a random resized crop (``RandScaleCropd`` + ``Resized`` back to the input
  size), a random affine (rotation, scale), stronger intensity changes (scale, shift, gamma, Gaussian noise) and
  coarse dropout.

:func:`s5cl_weak_strong_views` copies one image into a weak and a strong key. ``shared_geometry=True`` (used for
token-level contrast) applies one set of flips / rotations to the image and its label before copying and gives the
strong view intensity changes and dropout only, so token ``t`` of both views covers the same tissue.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    CopyItemsd,
    RandAdjustContrastd,
    RandAffined,
    RandCoarseDropoutd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleCropd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
)
from monai.utils import ensure_tuple_rep

__all__ = ["s5cl_weak_transforms", "s5cl_strong_transforms", "s5cl_weak_strong_views"]


def _keys(image_key: str, label_key: str | None) -> list[str]:
    return [image_key] if label_key is None else [image_key, label_key]


def _weak_spatial(keys: Sequence[str], flip_prob: float, rot90_prob: float) -> list:
    return [
        *(RandFlipd(keys=list(keys), prob=flip_prob, spatial_axis=axis) for axis in range(3)),
        RandRotate90d(keys=list(keys), prob=rot90_prob, max_k=3, spatial_axes=(0, 1)),
    ]


def _weak_intensity(image_key: str, intensity_prob: float, scale: float, shift: float) -> list:
    return [
        RandScaleIntensityd(keys=image_key, factors=scale, prob=intensity_prob),
        RandShiftIntensityd(keys=image_key, offsets=shift, prob=intensity_prob),
    ]


def _strong_intensity(
    image_key: str, prob: float, scale: float, shift: float, gamma: tuple[float, float], noise_std: float
) -> list:
    return [
        RandScaleIntensityd(keys=image_key, factors=scale, prob=prob),
        RandShiftIntensityd(keys=image_key, offsets=shift, prob=prob),
        RandAdjustContrastd(keys=image_key, gamma=tuple(gamma), prob=prob),
        RandGaussianNoised(keys=image_key, std=noise_std, prob=prob),
    ]


def s5cl_weak_transforms(
    image_key: str = "image",
    label_key: str | None = None,
    *,
    flip_prob: float = 0.5,
    rot90_prob: float = 0.5,
    intensity_prob: float = 0.5,
    intensity_scale: float = 0.1,
    intensity_shift: float = 0.05,
    spatial: bool = True,
) -> list:
    """The weak view of ``image_key`` (channel-first ``(C, H, W, D)``, intensities about ``[0, 1]``).

    Args:
        image_key: the image to augment.
        label_key: a label map that follows the spatial transforms (nearest-neighbour; ``None``: no label).
        flip_prob: probability of a flip, per axis.
        rot90_prob: probability of a ``k * 90°`` rotation in the axial plane (axes 0, 1 must have equal size).
        intensity_prob, intensity_scale, intensity_shift: ``x * (1 + U(-s, s)) + U(-o, o)``, each with that
            probability.
        spatial: include the flips and rotations (``False``: intensity only).

    Returns:
        a list of MONAI dictionary transforms.
    """
    chain = _weak_spatial(_keys(image_key, label_key), flip_prob, rot90_prob) if spatial else []
    return chain + _weak_intensity(image_key, intensity_prob, intensity_scale, intensity_shift)


def s5cl_strong_transforms(
    image_key: str = "image",
    label_key: str | None = None,
    *,
    spatial_size: Sequence[int] | int | None = None,
    crop_scale: tuple[float, float] = (0.6, 1.0),
    affine_prob: float = 0.5,
    rotate_range: float = 0.26,
    scale_range: float = 0.1,
    intensity_prob: float = 0.8,
    intensity_scale: float = 0.25,
    intensity_shift: float = 0.1,
    gamma: tuple[float, float] = (0.7, 1.5),
    noise_std: float = 0.05,
    dropout_prob: float = 0.5,
    dropout_holes: int = 4,
    dropout_size: int = 4,
    dropout_max_size: int = 8,
    spatial: bool = True,
    weak_kwargs: dict | None = None,
) -> list:
    """The strong view: the weak recipe, then random resized crop, affine, strong intensity and coarse dropout.

    Args:
        image_key, label_key: as in :func:`s5cl_weak_transforms` (labels are resized / warped nearest-neighbour).
        spatial_size: the input's spatial size, to resize the random crop back to (required when ``spatial``).
        crop_scale: the crop's edge as a fraction of the input edge, drawn per axis from this range.
        affine_prob, rotate_range, scale_range: random affine (radians, relative scale), reflection padding.
        intensity_prob, intensity_scale, intensity_shift: stronger scale / shift than the weak view.
        gamma: range of the random gamma (``RandAdjustContrastd``).
        noise_std: maximum standard deviation of additive Gaussian noise.
        dropout_prob, dropout_holes, dropout_size, dropout_max_size: coarse dropout (boxes filled with zeros).
        spatial: include flips, rotations, crop and affine (``False``: intensity and dropout only).
        weak_kwargs: options of the weak part (:func:`s5cl_weak_transforms`).

    Raises:
        ValueError: ``spatial`` without ``spatial_size``, or a ``crop_scale`` outside ``(0, 1]``.
    """
    lo, hi = (float(s) for s in crop_scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
    keys = _keys(image_key, label_key)
    chain = s5cl_weak_transforms(image_key, label_key, spatial=spatial, **dict(weak_kwargs or {}))
    if spatial:
        if spatial_size is None:
            raise ValueError("spatial_size is required for the strong view's random resized crop")
        modes = ["trilinear", "nearest"][: len(keys)]
        chain += [
            RandScaleCropd(keys=keys, roi_scale=lo, max_roi_scale=hi, random_center=True, random_size=True),
            Resized(keys=keys, spatial_size=ensure_tuple_rep(spatial_size, 3), mode=modes),
            RandAffined(
                keys=keys,
                prob=affine_prob,
                rotate_range=(rotate_range,) * 3,
                scale_range=(scale_range,) * 3,
                mode=["bilinear", "nearest"][: len(keys)],
                padding_mode="reflection",
            ),
        ]
    chain += _strong_intensity(image_key, intensity_prob, intensity_scale, intensity_shift, gamma, noise_std)
    chain.append(
        RandCoarseDropoutd(
            keys=image_key,
            holes=dropout_holes,
            spatial_size=dropout_size,
            max_spatial_size=dropout_max_size,
            fill_value=0.0,
            prob=dropout_prob,
        )
    )
    return chain


def s5cl_weak_strong_views(
    image_key: str = "image",
    weak_key: str = "image_weak",
    strong_key: str = "image_strong",
    *,
    label_key: str | None = None,
    shared_geometry: bool = False,
    spatial_size: Sequence[int] | int | None = None,
    weak_kwargs: dict | None = None,
    strong_kwargs: dict | None = None,
) -> list:
    """Copy ``image_key`` into a weak and a strong view, each augmented with its own random draws.

    Args:
        image_key: the (cropped) image; left unchanged unless ``shared_geometry``.
        weak_key, strong_key: output keys.
        label_key: a label map (only with ``shared_geometry``: it then follows the shared flips / rotations).
        shared_geometry: one set of flips / rotations for the image (and label) before copying; the strong view
            then adds intensity changes and dropout only (no crop / affine), so both views stay voxel-aligned.
        spatial_size: the input size, required for the strong view's random resized crop when not
            ``shared_geometry``.
        weak_kwargs, strong_kwargs: options of :func:`s5cl_weak_transforms` / :func:`s5cl_strong_transforms`.

    Example::

        chain = [*load_and_crop, *s5cl_weak_strong_views("image", spatial_size=(32, 32, 32))]
        chain = [*load_and_crop, *s5cl_weak_strong_views("image", label_key="label", shared_geometry=True)]
    """
    if len({image_key, weak_key, strong_key}) != 3:
        raise ValueError(f"image_key, weak_key and strong_key must differ, got {(image_key, weak_key, strong_key)}")
    if label_key is not None and not shared_geometry:
        raise ValueError(f"label_key={label_key!r} needs shared_geometry=True (one label for both views)")
    weak_kwargs, strong_kwargs = dict(weak_kwargs or {}), dict(strong_kwargs or {})
    copy = CopyItemsd(keys=image_key, times=2, names=[weak_key, strong_key])
    if not shared_geometry:
        return [
            copy,
            *s5cl_weak_transforms(weak_key, **weak_kwargs),
            *s5cl_strong_transforms(strong_key, spatial_size=spatial_size, weak_kwargs=weak_kwargs, **strong_kwargs),
        ]
    flips = {k: weak_kwargs.pop(k) for k in ("flip_prob", "rot90_prob") if k in weak_kwargs}
    return [
        *_weak_spatial(_keys(image_key, label_key), flips.get("flip_prob", 0.5), flips.get("rot90_prob", 0.5)),
        copy,
        *s5cl_weak_transforms(weak_key, spatial=False, **weak_kwargs),
        *s5cl_strong_transforms(strong_key, spatial=False, weak_kwargs=weak_kwargs, **strong_kwargs),
    ]
