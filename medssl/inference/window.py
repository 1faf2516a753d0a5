"""Sliding-window segmentation that emits labels slab by slab along the last axis.

MONAI's :func:`monai.inferers.sliding_window_inference` accumulates the blended logits of the whole volume,
``C × X × Y × Z`` float32 plus a count map, before anything can be argmax-ed. :func:`sliding_window_segment`
places the windows exactly where MONAI does (same padding, scan interval, :func:`monai.data.utils.dense_patch_slices`
grid and importance map), but visits them in order of their start along the last axis. Once every window that
covers a plane has been blended, that plane is final: it is argmax-ed into the label volume and its buffer is
released. The float32 buffer therefore holds ``C × X × Y × (roi_z + a few strides)`` voxels, independent of
``Z``; the blended result is the same as MONAI's up to the order of floating-point additions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices

__all__ = [
    "scan_interval",
    "overlap_for_stride",
    "window_starts",
    "sliding_window_segment",
    "count_windows",
    "label_dtype",
]


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """Window stride per axis, as MONAI computes it: ``roi * (1 - overlap)`` (at least 1), or ``roi`` when the
    roi spans the axis."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    out = []
    for size, roi in zip(image_size, roi_size):
        out.append(int(roi) if roi == size else max(int(roi * (1 - overlap)), 1))
    return tuple(out)


def overlap_for_stride(roi_size: Sequence[int], stride: Sequence[int]) -> tuple[float, ...]:
    """Per-axis overlap for which MONAI's sliding window steps by exactly ``stride`` voxels.

    MONAI steps by ``int(roi * (1 - overlap))``; every overlap in ``(1 - (stride + 1) / roi, 1 - stride / roi]``
    gives ``stride``. This returns the middle of that interval, ``1 - (stride + 0.5) / roi`` (so float rounding
    cannot tip it to a neighbour), and ``0.0`` when ``stride == roi``. MONAI's window starts are then those of a
    stride-based loop such as UA-MT's ``test_single_case``: ``min(k * stride, size - roi)`` for
    ``k = 0 .. ceil((size - roi) / stride)``, after the same zero padding of axes shorter than the roi.
    For UA-MT's LA test (roi 112 × 112 × 80, stride 18 in-plane, 4 along z) this is ``(0.8348, 0.8348, 0.94375)``.

    Args:
        roi_size: window size per axis.
        stride: wanted step per axis, ``1 <= stride <= roi``.

    Raises:
        ValueError: lengths differ or a stride is outside ``[1, roi]``.

    Example::

        SlidingWindowInferer(roi_size=(112, 112, 80), overlap=overlap_for_stride((112, 112, 80), (18, 18, 4)))
    """
    if len(roi_size) != len(stride):
        raise ValueError(f"roi_size {list(roi_size)} and stride {list(stride)} must have the same length")
    out = []
    for roi, step in zip(roi_size, stride):
        if int(step) != step or not 1 <= step <= roi:
            raise ValueError(
                f"stride must be an integer in [1, roi]; got stride {list(stride)} for roi {list(roi_size)}"
            )
        out.append(0.0 if step == roi else 1.0 - (int(step) + 0.5) / int(roi))
    return tuple(out)


def window_starts(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """Start corner of every window (image already padded to at least ``roi_size``), sorted by last-axis start."""
    interval = scan_interval(image_size, roi_size, overlap)
    slices = dense_patch_slices(tuple(image_size), tuple(roi_size), interval)
    starts = [tuple(int(s.start) for s in sl) for sl in slices]
    return sorted(starts, key=lambda s: s[-1])  # stable: keeps MONAI's order within one slab


def label_dtype(num_classes: int) -> torch.dtype:
    """``uint8`` for up to 256 classes, else ``int16``."""
    return torch.uint8 if num_classes <= 256 else torch.int16


def _first_output(out) -> torch.Tensor:
    """Deep-supervision networks return a list / tuple / dict; the full-resolution head comes first."""
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out


def sliding_window_segment(
    image: torch.Tensor,
    network: Callable[[torch.Tensor], torch.Tensor],
    roi_size: Sequence[int],
    *,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
    autocast: AbstractContextManager | None = None,
    probabilities: bool = False,
    progress: Callable[[int], None] | None = None,
    input_dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blend window logits like MONAI's sliding window, emitting argmax labels one finished slab at a time.

    Args:
        image: ``(in_channels, X, Y, Z)`` preprocessed image on any device (windows are moved to ``device``).
        network: maps ``(B, in_channels, *roi_size)`` to logits ``(B, C, *roi_size)`` (or a list whose first
            element is that).
        roi_size: window size ``(rx, ry, rz)``; an axis shorter than the roi is zero-padded symmetrically, as
            MONAI does, and cropped back.
        sw_batch_size: windows per network call.
        overlap: fraction of overlap between neighbouring windows, in ``[0, 1)``.
        mode: ``"gaussian"`` or ``"constant"`` blending (:func:`monai.data.utils.compute_importance_map`).
        sigma_scale: Gaussian sigma as a fraction of the roi.
        device: where the network runs and the slab buffer lives (default: ``image.device``).
        autocast: context entered around each network call (e.g. bf16 autocast).
        probabilities: also return softmax probabilities (float16, ``(C, X, Y, Z)``, on the CPU).
        progress: called with the number of windows done after every batch.
        input_dtype: dtype of the windows fed to the network (``torch.bfloat16`` for a bf16 network).
        channels_last: feed windows in ``torch.channels_last_3d`` memory format.

    Returns:
        ``(labels, probabilities)``: labels ``(X, Y, Z)`` (``uint8`` up to 256 classes, else ``int16``) on the
        CPU; probabilities as above or ``None``.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (channels, X, Y, Z), got shape {tuple(image.shape)}")
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi_size must be 3 positive ints, got {roi_size}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    device = torch.device(device) if device is not None else image.device
    autocast = autocast if autocast is not None else nullcontext()
    size = tuple(int(s) for s in image.shape[1:])
    pad = []  # F.pad order: last axis first
    for k in range(2, -1, -1):
        diff = max(roi[k] - size[k], 0)
        pad += [diff // 2, diff - diff // 2]
    if any(pad):
        image = F.pad(image, pad, mode="constant", value=0.0)
    padded = tuple(int(s) for s in image.shape[1:])
    offset = (pad[4], pad[2], pad[0])  # where the original voxels start in the padded image
    starts = window_starts(padded, roi, overlap)
    weight = compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale, device=device, dtype=torch.float32)

    rz = roi[2]
    labels: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    num: torch.Tensor | None = None  # blended logits of planes [base, base + num.shape[-1]) of the padded image
    den = torch.zeros((*padded[:2], 2 * rz), dtype=torch.float32, device=device)
    base = 0

    def finalize(upto: int) -> None:
        """Emit planes [base, upto) of the padded image and drop them from the buffers."""
        nonlocal base, num, den
        n = upto - base
        if n <= 0:
            return
        z0, z1 = max(base, offset[2]), min(upto, offset[2] + size[2])  # inside the original extent
        if z1 > z0:
            xs = slice(offset[0], offset[0] + size[0])
            ys = slice(offset[1], offset[1] + size[1])
            block = num[:, xs, ys, z0 - base : z1 - base]
            labels[:, :, z0 - offset[2] : z1 - offset[2]] = block.argmax(0).to("cpu", labels.dtype)
            if probs is not None:
                p = torch.softmax(block / den[xs, ys, z0 - base : z1 - base], dim=0)
                probs[:, :, :, z0 - offset[2] : z1 - offset[2]] = p.to("cpu", torch.float16)
        keep = num.shape[-1] - n
        num[..., :keep] = num[..., n:].clone()
        num[..., keep:] = 0
        den[..., :keep] = den[..., n:].clone()
        den[..., keep:] = 0
        base = upto

    def ensure_depth(end: int) -> None:
        nonlocal num, den
        need = end - base
        if need > num.shape[-1]:
            grow = need - num.shape[-1]
            num = torch.cat([num, num.new_zeros((*num.shape[:-1], grow))], dim=-1)
            den = torch.cat([den, den.new_zeros((*den.shape[:-1], grow))], dim=-1)

    for i in range(0, len(starts), sw_batch_size):
        batch = starts[i : i + sw_batch_size]
        windows = torch.stack([image[:, x : x + roi[0], y : y + roi[1], z : z + rz] for x, y, z in batch])
        windows = windows.to(device, input_dtype)
        if channels_last:
            windows = windows.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), autocast:
            out = _first_output(network(windows))
        out = out.float()
        if num is None:
            classes = int(out.shape[1])
            num = torch.zeros((classes, *padded[:2], 2 * rz), dtype=torch.float32, device=device)
            labels = torch.zeros(size, dtype=label_dtype(classes))
            if probabilities:
                probs = torch.zeros((classes, *size), dtype=torch.float16)
        ensure_depth(max(z for _, _, z in batch) + rz)
        for (x, y, z), logits in zip(batch, out):
            zs = slice(z - base, z - base + rz)
            num[:, x : x + roi[0], y : y + roi[1], zs] += logits * weight
            den[x : x + roi[0], y : y + roi[1], zs] += weight
        nxt = starts[i + sw_batch_size][-1] if i + sw_batch_size < len(starts) else padded[2]
        finalize(nxt)
        if progress is not None:
            progress(len(batch))
    assert labels is not None and base == padded[2], "every plane is finalized"
    return labels, probs


def count_windows(size: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Number of windows :func:`sliding_window_segment` runs on an image of spatial ``size``."""
    padded = [max(int(s), int(r)) for s, r in zip(size, roi_size)]
    return len(window_starts(padded, roi_size, overlap))
