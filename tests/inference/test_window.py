"""Slab-by-slab sliding window against MONAI's sliding_window_inference (the straightforward path)."""

from __future__ import annotations

import inspect

import pytest
import torch
from monai.inferers import sliding_window_inference

from medssl.inference.window import count_windows, scan_interval, sliding_window_segment, window_starts


def _net(channels: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, channels, 3, padding=1)
    ).eval()


@pytest.mark.parametrize(
    "shape, roi, overlap, mode, batch",
    [
        ((40, 37, 50), (16, 16, 16), 0.25, "gaussian", 3),
        ((33, 20, 70), (16, 8, 16), 0.5, "gaussian", 1),
        ((24, 24, 40), (16, 16, 8), 0.75, "constant", 7),  # many slabs open at once
        ((10, 37, 12), (16, 16, 16), 0.5, "constant", 4),  # smaller than the roi: padded and cropped back
        ((16, 16, 16), (16, 16, 16), 0.25, "gaussian", 2),  # exactly one window
    ],
)
def test_slab_window_equals_monai(shape, roi, overlap, mode, batch):
    net = _net()
    image = torch.randn(1, *shape)
    calls = []
    labels, probs = sliding_window_segment(
        image, net, roi, overlap=overlap, mode=mode, sw_batch_size=batch, probabilities=True, progress=calls.append
    )
    with torch.no_grad():
        ref = sliding_window_inference(image[None], roi, batch, net, overlap=overlap, mode=mode)[0]
    assert labels.shape == shape and labels.dtype == torch.uint8
    assert probs.shape == (5, *shape) and probs.dtype == torch.float16
    assert torch.equal(labels, ref.argmax(0).to(torch.uint8))
    torch.testing.assert_close(probs.float(), ref.softmax(0), atol=2e-3, rtol=0)
    assert sum(calls) == count_windows(shape, roi, overlap)


def test_windows_follow_last_axis_and_cover_the_image():
    size, roi = (50, 40, 90), (16, 16, 16)
    starts = window_starts(size, roi, 0.25)
    assert [s[-1] for s in starts] == sorted(s[-1] for s in starts)
    covered = torch.zeros(size, dtype=torch.bool)
    for x, y, z in starts:
        covered[x : x + 16, y : y + 16, z : z + 16] = True
    assert covered.all()
    assert scan_interval(size, roi, 0.25) == (12, 12, 12)
    assert scan_interval((16, 40, 90), roi, 0.5) == (16, 8, 8)


def test_slab_buffer_does_not_grow_with_depth():
    """The float32 buffer depth is bounded by roi + sw_batch_size × stride, whatever the volume's depth."""

    class Zeros(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 2, *x.shape[2:])

    def max_buffer_depth(depth: int) -> int:
        sizes = []

        def record(_):
            # the buffer is a local of the running function: read it from the caller's frame
            sizes.append(inspect.currentframe().f_back.f_locals["num"].shape[-1])

        sliding_window_segment(torch.randn(1, 16, 16, depth), Zeros(), (16, 16, 16), overlap=0.5, progress=record)
        return max(sizes)

    shallow, deep = max_buffer_depth(48), max_buffer_depth(192)
    assert shallow == deep <= 16 + 4 * 8


@pytest.mark.parametrize("bad", [{"overlap": 1.0}, {"overlap": -0.1}, {"sw_batch_size": 0}, {"roi_size": (8, 8)}])
def test_bad_arguments(bad):
    kwargs = {"roi_size": (8, 8, 8), "overlap": 0.25, "sw_batch_size": 1, **bad}
    roi = kwargs.pop("roi_size")
    with pytest.raises(ValueError, match=str(list(bad.values())[0]).strip("()")[:3]):
        sliding_window_segment(torch.zeros(1, 8, 8, 8), _net(), roi, **kwargs)
