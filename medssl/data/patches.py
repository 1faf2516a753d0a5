"""Patch-level labels from segmentations: the organ-patch classification task and ViT token majority labels.

- :func:`organ_patch_task` turns labeled CT volumes (e.g. the ``ct-abdomen`` phantom) into a 3D classification
  task: a cube of ``patch_size`` voxels around each organ's centroid (jittered, several per organ and case), class
  = organ. A few patches per class keep their label, the other training patches become the unlabeled pool (their
  label kept as ``true_label`` so that pseudo-label accuracy can be measured), and the ``validation`` cases give
  the test patches. Used by S5CL's ``classification`` mode (:mod:`medssl.engines.s5cl`).
- :func:`token_majority_labels` gives each ViT token the most frequent label of its patch (S5CL's
  ``segmentation`` mode).

The default organs are the six large ones (spleen, kidneys, liver, stomach, aorta): the gallbladder, esophagus,
adrenal glands, pancreas and the veins are a few voxels wide at phantom resolution, and a patch around them is
mostly its neighbours, i.e. a degenerate class.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_ORGANS",
    "OrganPatchTask",
    "organ_centroids",
    "crop_patch",
    "extract_organ_patches",
    "split_patch_task",
    "organ_patch_task",
    "phantom_organ_patches",
    "phantom_patch_task",
    "token_majority_labels",
]

DEFAULT_ORGANS: tuple[int, ...] = (1, 2, 3, 6, 7, 8)  # BTCV: spleen, right / left kidney, liver, stomach, aorta


@dataclass
class OrganPatchTask:
    """A patch classification task.

    Attributes:
        labeled: ``{"image": (1, P, P, P) float32, "label": class index}`` items, ``labeled_per_class`` per class.
        unlabeled: ``{"image": ..., "true_label": class index}`` items (the label is hidden from training).
        test: ``{"image": ..., "label": class index}`` items from the test cases.
        organs: the label value of each class index.
        class_names: class index → name.
    """

    labeled: list[dict[str, Any]]
    unlabeled: list[dict[str, Any]]
    test: list[dict[str, Any]]
    organs: tuple[int, ...]
    class_names: dict[int, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.organs)


def organ_centroids(label: np.ndarray, organs: Sequence[int]) -> dict[int, np.ndarray]:
    """Voxel centroid ``(3,)`` of each organ present in ``label`` ``(H, W, D)``; absent organs are left out."""
    out = {}
    for organ in organs:
        coords = np.argwhere(label == organ)
        if len(coords):
            out[int(organ)] = coords.mean(axis=0)
    return out


def crop_patch(image: np.ndarray, center: Sequence[float], patch_size: int, fill: float = 0.0) -> np.ndarray:
    """The ``patch_size``³ cube of ``image`` ``(H, W, D)`` starting at ``round(center) - patch_size // 2``, padded
    with ``fill`` outside the image."""
    p = int(patch_size)
    start = np.floor(np.asarray(center, dtype=float) + 0.5).astype(int) - p // 2  # half-up, not to even
    out = np.full((p, p, p), fill, dtype=np.float32)
    src = tuple(slice(max(s, 0), min(s + p, n)) for s, n in zip(start, image.shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    if all(sl.stop > sl.start for sl in src):
        out[dst] = image[src]
    return out


def extract_organ_patches(
    image: np.ndarray,
    label: np.ndarray,
    organs: Sequence[int] = DEFAULT_ORGANS,
    *,
    patch_size: int = 32,
    samples_per_organ: int = 1,
    jitter: int = 0,
    rng: np.random.Generator | None = None,
    case: str = "",
) -> list[dict[str, Any]]:
    """Patches around each organ of one volume.

    Args:
        image: ``(H, W, D)`` intensities (already scaled), padded with its minimum outside the volume.
        label: ``(H, W, D)`` label map of the same shape.
        organs: label values; class index ``i`` is ``organs[i]``.
        patch_size: cube edge in voxels.
        samples_per_organ: patches per organ, centred on the centroid plus a uniform offset in
            ``[-jitter, jitter]`` voxels per axis (the first one without offset).
        jitter: maximum offset in voxels.
        rng: generator for the offsets.
        case: case name stored in each item.

    Returns:
        ``[{"image": (1, P, P, P) float32, "label": class index, "organ": label value, "case": case}, ...]``.

    Raises:
        ValueError: shapes differ or ``patch_size`` / ``samples_per_organ`` < 1.
    """
    if image.shape != label.shape or image.ndim != 3:
        raise ValueError(f"image and label must be 3D arrays of one shape, got {image.shape} and {label.shape}")
    if patch_size < 1 or samples_per_organ < 1:
        raise ValueError(f"patch_size and samples_per_organ must be >= 1, got {patch_size}, {samples_per_organ}")
    rng = rng if rng is not None else np.random.default_rng(0)
    fill = float(image.min())
    centroids = organ_centroids(label, organs)
    items = []
    for index, organ in enumerate(organs):
        if organ not in centroids:
            continue
        for s in range(samples_per_organ):
            offset = rng.integers(-jitter, jitter + 1, size=3) if (jitter and s) else np.zeros(3)
            patch = crop_patch(image, centroids[organ] + offset, patch_size, fill)
            items.append({"image": patch[None], "label": index, "organ": int(organ), "case": case})
    return items


def split_patch_task(
    train: Sequence[Mapping[str, Any]],
    test: Sequence[Mapping[str, Any]],
    organs: Sequence[int],
    labeled_per_class: int,
    *,
    seed: int = 0,
    class_names: Mapping[int, str] | None = None,
) -> OrganPatchTask:
    """Keep ``labeled_per_class`` random training patches per class labeled; hide the others' labels.

    Raises:
        DataError: a class has fewer than ``labeled_per_class`` training patches, or no test patches exist.
    """
    if labeled_per_class < 1:
        raise ValueError(f"labeled_per_class must be >= 1, got {labeled_per_class}")
    rng = np.random.default_rng(seed)
    labeled, unlabeled = [], []
    for index, organ in enumerate(organs):
        members = [dict(item) for item in train if item["label"] == index]
        if len(members) < labeled_per_class:
            raise DataError(
                None, f"organ {organ} has {len(members)} training patches, fewer than {labeled_per_class} labeled"
            )
        chosen = set(rng.choice(len(members), size=labeled_per_class, replace=False).tolist())
        for i, item in enumerate(members):
            if i in chosen:
                labeled.append(item)
            else:
                item["true_label"] = item.pop("label")
                unlabeled.append(item)
    if not test:
        raise DataError(None, "the patch task has no test patches")
    order = rng.permutation(len(unlabeled))
    names = {i: (class_names or {}).get(int(o), str(o)) for i, o in enumerate(organs)}
    return OrganPatchTask(labeled, [unlabeled[i] for i in order], [dict(t) for t in test], tuple(organs), names)


def _scaled(image: np.ndarray, a_min: float, a_max: float) -> np.ndarray:
    return np.clip((image.astype(np.float32) - a_min) / (a_max - a_min), 0.0, 1.0)


def organ_patch_task(
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    *,
    organs: Sequence[int] = DEFAULT_ORGANS,
    patch_size: int = 32,
    labeled_per_class: int = 2,
    samples_per_organ: int = 4,
    jitter: int = 4,
    a_min: float = -175.0,
    a_max: float = 250.0,
    seed: int = 0,
    train_key: str = "training",
    test_key: str = "validation",
) -> OrganPatchTask:
    """The organ-patch task of a labeled CT datalist (default: the ``ct-abdomen`` phantom).

    Volumes are read in RAS orientation at their own spacing (patches are in voxels) and windowed to
    ``[a_min, a_max]`` → ``[0, 1]``. ``train_key`` cases give the labeled and unlabeled patches, ``test_key``
    cases the test patches (every one of them, ``samples_per_organ`` per organ).

    Raises:
        DataError: missing datalist keys or files, organs with too few patches, no test patches.
        ConfigError: ``organs`` is empty or repeats a value.
    """
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    from medssl.data.datalist import load_datalist

    organs = tuple(int(o) for o in organs)
    if not organs or len(set(organs)) != len(organs):
        raise ConfigError("organs", f"must be distinct label values, got {list(organs)}")
    dl = load_datalist(datalist, dataset_dir=dataset_dir, keys=[train_key, test_key])
    load = Compose(
        [
            LoadImaged(keys=["image", "label"], image_only=True),
            EnsureChannelFirstd(keys=["image", "label"]),
            Orientationd(keys=["image", "label"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        ]
    )
    rng = np.random.default_rng(seed)
    opts = {"patch_size": patch_size, "samples_per_organ": samples_per_organ, "jitter": jitter, "rng": rng}
    patches: dict[str, list] = {}
    for key in (train_key, test_key):
        patches[key] = []
        for item in dl.items(key):
            if "label" not in item:
                raise DataError(dl.path, f"{key!r} item {item.get('image')} has no label")
            d = load({"image": item["image"], "label": item["label"]})
            image = _scaled(np.asarray(d["image"][0]), a_min, a_max)
            label = np.asarray(d["label"][0]).round().astype(np.int64)
            patches[key] += extract_organ_patches(image, label, organs, case=Path(item["image"]).name, **opts)
    return split_patch_task(
        patches[train_key], patches[test_key], organs, labeled_per_class, seed=seed, class_names=dl.labels
    )


def phantom_organ_patches(
    train_cases: int = 8,
    test_cases: int = 4,
    *,
    shape: Sequence[int] = (96, 96, 48),
    organs: Sequence[int] = DEFAULT_ORGANS,
    patch_size: int = 32,
    samples_per_organ: int = 4,
    jitter: int = 4,
    a_min: float = -175.0,
    a_max: float = 250.0,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, test)`` labeled patches of ``ct-abdomen`` phantom cases made in memory (no files).

    Train cases are ``0 .. train_cases - 1`` and test cases follow, all of phantom seed ``seed``; split the train
    patches with :func:`split_patch_task` (several label budgets / seeds can share one extraction).
    """
    from medssl.data.phantoms import make_ct_abdomen

    rng = np.random.default_rng(seed)
    opts = {"patch_size": patch_size, "samples_per_organ": samples_per_organ, "jitter": jitter, "rng": rng}
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for case in range(train_cases + test_cases):
        image, label, _ = make_ct_abdomen(seed, shape, case=case)
        items = extract_organ_patches(
            _scaled(image, a_min, a_max), label.astype(np.int64), organs, case=f"case{case}", **opts
        )
        (train if case < train_cases else test).extend(items)
    return train, test


def phantom_patch_task(
    train_cases: int = 8,
    test_cases: int = 4,
    *,
    labeled_per_class: int = 2,
    organs: Sequence[int] = DEFAULT_ORGANS,
    seed: int = 0,
    **patch_kwargs: Any,
) -> OrganPatchTask:
    """:func:`organ_patch_task` on in-memory phantom cases (:func:`phantom_organ_patches` + :func:`split_patch_task`).

    ``patch_kwargs``: ``shape``, ``patch_size``, ``samples_per_organ``, ``jitter``, ``a_min``, ``a_max``.
    """
    from medssl.data.phantoms import BTCV_LABELS

    train, test = phantom_organ_patches(train_cases, test_cases, organs=organs, seed=seed, **patch_kwargs)
    return split_patch_task(train, test, tuple(organs), labeled_per_class, seed=seed, class_names=BTCV_LABELS)


def token_majority_labels(label: torch.Tensor, patch_size: Sequence[int] | int, num_classes: int) -> torch.Tensor:
    """The most frequent label of each ViT patch, in MONAI ``ViT`` token order.

    MONAI's patch embedding flattens the token grid ``(H/p, W/p, D/p)`` in row-major order (last axis fastest);
    the result follows it, so ``tokens[:, t]`` of ``ViT(x)`` and ``labels[:, t]`` describe the same patch. Ties go
    to the smallest label.

    Args:
        label: ``(B, 1, H, W, D)`` or ``(B, H, W, D)`` integer label map, each dim divisible by the patch size.
        patch_size: int or one per axis.
        num_classes: labels are in ``0 .. num_classes - 1``.

    Returns:
        ``(B, N)`` long, ``N = prod(dim / p)``.

    Raises:
        ValueError: a spatial size not divisible by the patch size, or labels outside ``0 .. num_classes - 1``.
    """
    if label.ndim == 5:
        label = label[:, 0]
    if label.ndim != 4:
        raise ValueError(f"expected a (B, 1, H, W, D) or (B, H, W, D) label, got shape {tuple(label.shape)}")
    p = (int(patch_size),) * 3 if isinstance(patch_size, int) else tuple(int(s) for s in patch_size)
    spatial = tuple(label.shape[1:])
    if any(s % q for s, q in zip(spatial, p)):
        raise ValueError(f"label size {spatial} is not divisible by patch_size {p}")
    label = label.long()
    if label.numel() and (int(label.min()) < 0 or int(label.max()) >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {int(label.min())}..{int(label.max())}")
    b = label.shape[0]
    g = [s // q for s, q in zip(spatial, p)]
    blocks = label.reshape(b, g[0], p[0], g[1], p[1], g[2], p[2]).permute(0, 1, 3, 5, 2, 4, 6)
    blocks = blocks.reshape(b, g[0] * g[1] * g[2], -1)
    counts = torch.zeros(b, blocks.shape[1], num_classes, dtype=torch.long, device=label.device)
    counts.scatter_add_(2, blocks, torch.ones_like(blocks))
    return counts.argmax(dim=2)
