"""label_boundaries (contour pixels) and save_overlay_png's contour row: reference and prediction on one slice."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.handlers.images import CONTOUR_COLORS, label_boundaries, save_overlay_png


def test_square_gives_its_boundary_pixels():
    labels = np.zeros((7, 7), dtype=int)
    labels[2:5, 2:5] = 1
    expected = np.zeros((7, 7), dtype=bool)
    expected[2:5, 2:5] = True
    expected[3, 3] = False  # the one interior pixel of a 3 x 3 square
    np.testing.assert_array_equal(label_boundaries(labels), expected)


def test_border_and_touching_labels():
    labels = np.zeros((6, 6), dtype=int)
    labels[0:4, 0:4] = 2  # touches the array border: border pixels are contour (outside is background)
    expected = np.zeros((6, 6), dtype=bool)
    expected[0:4, 0:4] = True
    expected[1:3, 1:3] = False
    np.testing.assert_array_equal(label_boundaries(labels), expected)

    two = np.zeros((3, 6), dtype=int)
    two[:, 1:3], two[:, 3:5] = 1, 2  # a shared edge is a contour of both labels
    got = label_boundaries(two)
    assert got[:, 1:5].all() and not got[:, [0, 5]].any()
    assert not label_boundaries(np.zeros((4, 4), dtype=int)).any()
    with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
        label_boundaries(np.zeros((2, 2, 2), dtype=int))


def _pixels_of(png: np.ndarray, rgb: tuple[float, float, float]) -> int:
    return int((np.abs(png[..., :3] - np.asarray(rgb)) < 0.02).all(-1).sum())


def _plot_area(path) -> np.ndarray:
    import matplotlib.pyplot as plt

    png = plt.imread(path)
    return png[:, : png.shape[1] - 240]  # without the legend (2.3 inches at 100 dpi on the right)


def test_overlay_png_draws_both_contours_on_one_slice(tmp_path):
    image = np.random.default_rng(0).random((32, 32, 6)).astype(np.float32)
    ref = np.zeros((32, 32, 6), dtype=int)
    ref[8:20, 8:20, 2:4] = 1
    pred = np.zeros_like(ref)
    pred[12:26, 12:26, 2:4] = 1
    path = save_overlay_png(tmp_path / "o.png", image, ref, pred, class_names={1: "atrium"}, num_slices=2)
    area = _plot_area(path)
    assert area.shape[0] > 4 * 150  # four rows: image, reference, prediction, contours
    assert _pixels_of(area, CONTOUR_COLORS["reference"]) > 0
    assert _pixels_of(area, CONTOUR_COLORS["prediction"]) > 0

    # a perfect prediction: every contour pixel is shared, so only the "both" colour appears
    same = save_overlay_png(tmp_path / "same.png", image, ref, ref.copy(), num_slices=2)
    area = _plot_area(same)
    assert _pixels_of(area, CONTOUR_COLORS["both"]) > 0
    assert _pixels_of(area, CONTOUR_COLORS["reference"]) == 0 and _pixels_of(area, CONTOUR_COLORS["prediction"]) == 0
