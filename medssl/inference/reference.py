"""The usual MONAI inference recipe, as the reference medssl's inference is measured against.

This is the pipeline of the MONAI tutorials (e.g. the UNETR BTCV notebook): load → preprocess → fp32
:func:`monai.inferers.sliding_window_inference` over the whole volume → softmax → ``Invertd`` of the full
``C``-channel probability map back to the input grid → argmax. It is correct and simple, and it holds several
full-resolution float32 ``C × X × Y × Z`` maps at once. ``bench/inference.py`` times it against
:class:`medssl.inference.Predictor`, and the tests check that both give the same labels.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["monai_reference_labels"]


def monai_reference_labels(
    path: str | os.PathLike,
    network: torch.nn.Module,
    preprocessing: Mapping[str, Any],
    roi_size: Sequence[int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    mode: str = "constant",
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Labels ``(X, Y, Z)`` on the input grid by the MONAI tutorial recipe (fp32, probabilities inverted).

    Args:
        path: a NIfTI / NRRD / MetaImage scan.
        network: the segmentation network (in eval mode).
        preprocessing: ``checkpoint["preprocessing"]``; the foreground crop is left out so the whole field of
            view is segmented.
        roi_size: sliding-window size.
        overlap, sw_batch_size, mode: :func:`monai.inferers.sliding_window_inference` arguments. The UNETR BTCV
            tutorial validates (and its published Dice was measured) at MONAI's default ``overlap=0.25`` with
            ``sw_batch_size=4`` and constant blending (0.8 only in its plotting cell); the default 0.5 here is the
            segmentation bundles' validation overlap.
        device: where the network runs.
    """
    from monai.inferers import sliding_window_inference
    from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd

    from medssl.transforms.presets import preprocessing_from_summary

    pre = Compose(preprocessing_from_summary(preprocessing, keys=("image",), crop_foreground=False))
    data = pre({"image": str(path)})
    image = data["image"][None].to(device)
    with torch.no_grad():
        logits = sliding_window_inference(image, tuple(roi_size), sw_batch_size, network, overlap=overlap, mode=mode)
    batch = {"image": data["image"], "pred": logits.cpu()[0]}
    post = Compose(
        [
            Activationsd(keys="pred", softmax=True),
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", argmax=True),
        ]
    )
    out = post(batch)
    return np.asarray(out["pred"][0].numpy(), dtype=np.uint8)
