"""Preprocessing chains of the published recipes, and their plain-dict summary for checkpoints.

Every preset returns a list of MONAI dictionary transforms (load → channel first → orientation → spacing →
intensity → crop foreground) that a bundle extends with its crops and augmentations. The numbers are arguments
with the recipes' defaults:

- :func:`ct_preprocessing`: BTCV CT (UNETR, Hatamizadeh et al., WACV 2022): RAS, 1.5×1.5×2 mm, HU −175..250 → 0..1.
- :func:`tcia_ssl_preprocessing`: TCIA-COVID19 CT for SSL pretraining: RAS, 2 mm, HU −57..164 → 0..1.
- :func:`la_mri_preprocessing`: LA MRI (Yu et al., UA-MT, MICCAI 2019): RAS, native spacing, z-score on the
  foreground (non-zero voxels).

:func:`preprocessing_summary` records a chain as a plain dict stored in ``checkpoint["preprocessing"]``;
:func:`preprocessing_from_summary` rebuilds the same chain from it (for inference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from monai.transforms import (
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

__all__ = [
    "ct_preprocessing",
    "tcia_ssl_preprocessing",
    "la_mri_preprocessing",
    "preprocessing_summary",
    "preprocessing_from_summary",
]


def _keys(keys: Sequence[str] | str) -> tuple[str, ...]:
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    if not keys:
        raise ValueError("keys must name at least one image")
    return keys


def _window(a_min: float, a_max: float, b_min: float, b_max: float, clip: bool) -> dict[str, Any]:
    if not a_max > a_min:
        raise ValueError(f"intensity window needs a_max > a_min, got a_min={a_min}, a_max={a_max}")
    return {
        "kind": "window",
        "a_min": float(a_min),
        "a_max": float(a_max),
        "b_min": float(b_min),
        "b_max": float(b_max),
        "clip": bool(clip),
    }


def _chain(
    keys: Sequence[str] | str,
    *,
    image_key: str,
    orientation: str | None,
    spacing: Sequence[float] | None,
    intensity: Mapping[str, Any] | None,
    crop_foreground: bool,
    allow_missing_keys: bool,
) -> list:
    """The shared chain; image keys interpolate bilinearly, every other key (labels) by nearest neighbour."""
    keys = _keys(keys)
    if image_key not in keys:
        raise ValueError(f"image_key {image_key!r} must be one of keys {keys}")
    amk = allow_missing_keys
    chain: list = [
        LoadImaged(keys=keys, allow_missing_keys=amk),
        EnsureChannelFirstd(keys=keys, allow_missing_keys=amk),
    ]
    if orientation:
        # explicit labels: RAS codes in the nibabel/ITK world convention MONAI has always used
        labels = (("L", "R"), ("P", "A"), ("I", "S"))
        chain.append(Orientationd(keys=keys, axcodes=orientation, labels=labels, allow_missing_keys=amk))
    if spacing is not None:
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers in mm, got {spacing}")
        modes = tuple("bilinear" if k == image_key else "nearest" for k in keys)
        chain.append(Spacingd(keys=keys, pixdim=tuple(float(s) for s in spacing), mode=modes, allow_missing_keys=amk))
    kind = (intensity or {}).get("kind")
    if kind == "window":
        chain.append(
            ScaleIntensityRanged(
                keys=image_key,
                a_min=intensity["a_min"],
                a_max=intensity["a_max"],
                b_min=intensity["b_min"],
                b_max=intensity["b_max"],
                clip=intensity["clip"],
            )
        )
    elif kind == "zscore":
        chain.append(
            NormalizeIntensityd(keys=image_key, nonzero=bool(intensity.get("nonzero", True)), channel_wise=True)
        )
    elif kind is not None:
        raise ValueError(f"unknown intensity kind {kind!r} (use 'window' or 'zscore')")
    if crop_foreground:
        chain.append(CropForegroundd(keys=keys, source_key=image_key, allow_smaller=True, allow_missing_keys=amk))
    return chain


def ct_preprocessing(
    keys: Sequence[str] | str = ("image", "label"),
    *,
    spacing: Sequence[float] | None = (1.5, 1.5, 2.0),
    orientation: str | None = "RAS",
    a_min: float = -175.0,
    a_max: float = 250.0,
    b_min: float = 0.0,
    b_max: float = 1.0,
    clip: bool = True,
    crop_foreground: bool = True,
    image_key: str = "image",
    allow_missing_keys: bool = False,
) -> list:
    """BTCV CT preset: LoadImaged, EnsureChannelFirstd, Orientationd, Spacingd, ScaleIntensityRanged, CropForegroundd.

    Args:
        keys: image (and label) keys; ``image_key`` is resampled bilinearly, the others by nearest neighbour.
        spacing: target voxel size in mm (``None`` keeps the native spacing).
        orientation: target axis codes (``None`` keeps the native orientation).
        a_min, a_max, b_min, b_max, clip: HU window ``[a_min, a_max]`` mapped to ``[b_min, b_max]``.
        crop_foreground: crop every key to the bounding box of ``image_key > 0`` (after windowing).
        image_key: the intensity image.
        allow_missing_keys: let label keys be absent (inference).

    Example::

        train = Compose(ct_preprocessing() + [RandCropByPosNegLabeld(...)])
    """
    return _chain(
        keys,
        image_key=image_key,
        orientation=orientation,
        spacing=spacing,
        intensity=_window(a_min, a_max, b_min, b_max, clip),
        crop_foreground=crop_foreground,
        allow_missing_keys=allow_missing_keys,
    )


def tcia_ssl_preprocessing(
    keys: Sequence[str] | str = ("image",),
    *,
    spacing: Sequence[float] | None = (2.0, 2.0, 2.0),
    orientation: str | None = "RAS",
    a_min: float = -57.0,
    a_max: float = 164.0,
    b_min: float = 0.0,
    b_max: float = 1.0,
    clip: bool = True,
    crop_foreground: bool = True,
    image_key: str = "image",
    allow_missing_keys: bool = False,
) -> list:
    """TCIA-COVID19 CT preset of the SSL recipe (2 mm, HU −57..164 → 0..1); arguments as :func:`ct_preprocessing`."""
    return ct_preprocessing(
        keys,
        spacing=spacing,
        orientation=orientation,
        a_min=a_min,
        a_max=a_max,
        b_min=b_min,
        b_max=b_max,
        clip=clip,
        crop_foreground=crop_foreground,
        image_key=image_key,
        allow_missing_keys=allow_missing_keys,
    )


def la_mri_preprocessing(
    keys: Sequence[str] | str = ("image", "label"),
    *,
    spacing: Sequence[float] | None = None,
    orientation: str | None = "RAS",
    nonzero: bool = True,
    crop_foreground: bool = False,
    image_key: str = "image",
    allow_missing_keys: bool = False,
) -> list:
    """LA MRI preset: orientation, optional resampling, z-score over the foreground (``nonzero``) voxels.

    Args:
        spacing: target voxel size in mm; ``None`` (default) keeps the native 0.625 mm isotropic grid.
        nonzero: compute mean / std over non-zero voxels only and leave the zero background at 0.
        other arguments: as :func:`ct_preprocessing`.
    """
    return _chain(
        keys,
        image_key=image_key,
        orientation=orientation,
        spacing=spacing,
        intensity={"kind": "zscore", "nonzero": bool(nonzero)},
        crop_foreground=crop_foreground,
        allow_missing_keys=allow_missing_keys,
    )


def preprocessing_summary(
    *,
    spacing: Sequence[float] | None,
    orientation: str | None = "RAS",
    a_min: float | None = None,
    a_max: float | None = None,
    b_min: float = 0.0,
    b_max: float = 1.0,
    clip: bool = True,
    zscore: bool = False,
    nonzero: bool = True,
    crop_foreground: bool = True,
    roi_size: Sequence[int] | None = None,
    image_key: str = "image",
) -> dict[str, Any]:
    """The plain dict stored in ``checkpoint["preprocessing"]`` (lists, floats, strings only).

    Give either the intensity window (``a_min``/``a_max``, …) or ``zscore=True``. The result's keys are
    ``spacing``, ``orientation``, ``intensity`` (``{"kind": "window", a_min, a_max, b_min, b_max, clip}`` or
    ``{"kind": "zscore", "nonzero"}``), ``crop_foreground``, ``roi_size``, ``image_key``.

    Raises:
        ValueError: both or neither of window and z-score given.
    """
    has_window = a_min is not None or a_max is not None
    if zscore == has_window:
        raise ValueError(f"give either a_min/a_max or zscore=True (got a_min={a_min}, a_max={a_max}, zscore={zscore})")
    if has_window:
        if a_min is None or a_max is None:
            raise ValueError(f"a window needs both a_min and a_max, got a_min={a_min}, a_max={a_max}")
        intensity = _window(a_min, a_max, b_min, b_max, clip)
    else:
        intensity = {"kind": "zscore", "nonzero": bool(nonzero)}
    return {
        "spacing": None if spacing is None else [float(s) for s in spacing],
        "orientation": orientation,
        "intensity": intensity,
        "crop_foreground": bool(crop_foreground),
        "roi_size": None if roi_size is None else [int(r) for r in roi_size],
        "image_key": image_key,
    }


def preprocessing_from_summary(
    summary: Mapping[str, Any],
    keys: Sequence[str] | str = ("image",),
    *,
    crop_foreground: bool | None = None,
    allow_missing_keys: bool = False,
) -> list:
    """Rebuild the chain a :func:`preprocessing_summary` describes (inverse of the summary).

    Args:
        summary: ``checkpoint["preprocessing"]``.
        keys: keys to load (the summary's ``image_key`` must be among them).
        crop_foreground: override the summary (inference usually keeps the full field of view so the prediction
            can be inverted onto the input grid).
        allow_missing_keys: let non-image keys be absent.

    Raises:
        ValueError: the summary lacks ``intensity`` or has an unknown kind.
    """
    if "intensity" not in summary or "kind" not in (summary["intensity"] or {}):
        raise ValueError(f"preprocessing summary needs an 'intensity' with a 'kind', got {dict(summary)}")
    return _chain(
        keys,
        image_key=summary.get("image_key", "image"),
        orientation=summary.get("orientation"),
        spacing=summary.get("spacing"),
        intensity=summary["intensity"],
        crop_foreground=summary.get("crop_foreground", True) if crop_foreground is None else crop_foreground,
        allow_missing_keys=allow_missing_keys,
    )
