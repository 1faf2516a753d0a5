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
    precision: str = "fp32",
    invert: str = "probabilities",
) -> np.ndarray:
    """Labels ``(X, Y, Z)`` on the input grid by the MONAI tutorial recipe (fp32, probabilities inverted).

    ``precision="bf16"`` runs the network under ``torch.autocast`` (MONAI's AMP way); ``invert="labels"`` takes
    the argmax on the model grid and inverts the one-channel label map with nearest-neighbour ``Invertd`` instead
    of inverting ``C`` channels of probabilities: the recipe with medssl's precision and windows, so a benchmark
    can tell what comes from bf16 and window count from what medssl's slab pipeline adds.

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
        precision: ``"fp32"`` (the recipe) or ``"bf16"`` (autocast).
        invert: ``"probabilities"`` (the recipe: softmax, linear ``Invertd`` of every channel, argmax) or
            ``"labels"`` (argmax, then nearest ``Invertd``).

    Raises:
        ValueError: an unknown ``precision`` or ``invert``.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if invert not in ("probabilities", "labels"):
        raise ValueError(f"invert must be probabilities or labels, got {invert!r}")
    from monai.inferers import sliding_window_inference
    from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd

    from medssl.transforms.presets import preprocessing_from_summary

    pre = Compose(preprocessing_from_summary(preprocessing, keys=("image",), crop_foreground=False))
    data = pre({"image": str(path)})
    image = data["image"][None].to(device)
    dev = torch.device(device)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = sliding_window_inference(image, tuple(roi_size), sw_batch_size, network, overlap=overlap, mode=mode)
    batch = {"image": data["image"], "pred": logits.float().cpu()[0]}
    if invert == "probabilities":
        steps = [
            Activationsd(keys="pred", softmax=True),
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", argmax=True),
        ]
    else:
        steps = [
            AsDiscreted(keys="pred", argmax=True),
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True, to_tensor=True),
        ]
    post = Compose(steps)
    out = post(batch)
    return np.asarray(np.rint(out["pred"][0].numpy()), dtype=np.uint8)
