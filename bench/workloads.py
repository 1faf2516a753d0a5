"""Models, batches and FLOP counts the step benchmarks share (built the same way for baseline and medssl)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Cycle",
    "count_flops",
    "seg_batches",
    "ssl_batches",
    "unetr_kwargs",
    "vit_autoenc_kwargs",
]

# the view corruption of bundles/ssl_pretrain.yaml
SSL_VIEW_KWARGS = {"inpaint_prob": 0.5, "in_holes": 6, "in_min_size": 5, "in_max_size": 32, "out_holes": 6,
                   "out_min_size": 20, "out_max_size": 64, "shuffle_prob": 0.8, "shuffle_holes": 10,
                   "shuffle_size": 8}  # fmt: skip


def vit_autoenc_kwargs(tiny: bool) -> dict[str, Any]:
    """``ViTAutoEnc`` arguments of ssl_pretrain.yaml (ViT-B/16 at 96³) or of tiny.yaml (32³, 2 narrow layers)."""
    if tiny:
        return {"in_channels": 1, "img_size": [32] * 3, "patch_size": 16, "hidden_size": 96, "mlp_dim": 192,
                "num_layers": 2, "num_heads": 4, "proj_type": "conv"}  # fmt: skip
    return {"in_channels": 1, "img_size": [96] * 3, "patch_size": 16, "hidden_size": 768, "mlp_dim": 3072,
            "num_layers": 12, "num_heads": 12, "proj_type": "conv"}  # fmt: skip


def unetr_kwargs(tiny: bool, classes: int = 14) -> dict[str, Any]:
    """UNETR arguments of btcv_unetr.yaml (ViT-B/16, 96³, feature size 16) or of tiny.yaml."""
    common = {"in_channels": 1, "out_channels": classes, "norm_name": "instance", "res_block": True,
              "dropout_rate": 0.0, "proj_type": "conv"}  # fmt: skip
    if tiny:
        return {**common, "img_size": (32, 32, 32), "hidden_size": 96, "mlp_dim": 192, "num_heads": 4,
                "feature_size": 8}  # fmt: skip
    return {**common, "img_size": (96, 96, 96), "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12,
            "feature_size": 16}  # fmt: skip


def _phantom(roi: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT phantom (HU, labels) a little larger than ``roi`` in every axis."""
    from medssl.data.phantoms import make_ct_abdomen

    image, label, _ = make_ct_abdomen(seed, shape=(roi + roi // 2, roi + roi // 2, roi + 8))
    return image.astype(np.float32), label


def ssl_batches(count: int, batch: int, roi: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` SSL batches ``{"image", "image_2", "gt_image"}`` of shape (batch, 1, roi, roi, roi).

    Random crops of a windowed CT phantom (HU −57..164 → 0..1, as the recipe) and the recipe's two corrupted
    views (:func:`medssl.transforms.views.ssl_two_view_transforms`), seeded.
    """
    import torch
    from monai.transforms import Compose, RandSpatialCropSamplesd

    from medssl.transforms.views import ssl_two_view_transforms

    image, _ = _phantom(roi, seed)
    clean = np.clip((image + 57.0) / (164.0 + 57.0), 0.0, 1.0)[None]
    crop = RandSpatialCropSamplesd("image", roi_size=[roi] * 3, num_samples=batch, random_size=False)
    views = Compose(ssl_two_view_transforms(**SSL_VIEW_KWARGS))
    crop.set_random_state(seed)
    views.set_random_state(seed + 1)
    out = []
    for _ in range(count):
        items = [views(item) for item in crop({"image": torch.from_numpy(clean)})]
        out.append({k: torch.stack([torch.as_tensor(i[k]).as_subclass(torch.Tensor) for i in items]).float()
                    for k in ("image", "image_2", "gt_image")})  # fmt: skip
    return out


def seg_batches(count: int, batch: int, roi: int, classes: int = 14, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` segmentation batches ``{"image", "label"}``, (batch, 1, roi³), from the BTCV-like phantom.

    HU −175..250 → 0..1 and ``RandCropByPosNegLabeld`` (pos 1 : neg 1) as btcv_unetr.yaml; labels above
    ``classes - 1`` are set to background.
    """
    import torch
    from monai.transforms import RandCropByPosNegLabeld

    image, label = _phantom(roi, seed)
    data = {"image": torch.from_numpy(np.clip((image + 175.0) / 425.0, 0.0, 1.0)[None]),
            "label": torch.from_numpy(np.where(label < classes, label, 0).astype(np.float32)[None])}  # fmt: skip
    crop = RandCropByPosNegLabeld(["image", "label"], "label", [roi] * 3, pos=1, neg=1, num_samples=batch)
    crop.set_random_state(seed)
    out = []
    for _ in range(count):
        items = crop(data)
        out.append({k: torch.stack([torch.as_tensor(i[k]).as_subclass(torch.Tensor) for i in items]).float()
                    for k in ("image", "label")})  # fmt: skip
    return out


class Cycle:
    """An endless iterator over a few pre-made batches, shared by every ``iter()`` (ignite restarts it per run)."""

    def __init__(self, batches: Sequence[Any]) -> None:
        self._it: Iterator[Any] = itertools.cycle(batches)

    def __iter__(self) -> Cycle:
        return self

    def __next__(self) -> Any:
        return next(self._it)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (multiply-adds count 2) of the matmuls, convolutions and attention ``fn`` runs (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
