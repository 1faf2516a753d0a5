"""image_grid / save_image_grid layout and scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.handlers.images import image_grid, save_image_grid


def test_image_grid_layout_and_scaling(tmp_path):
    vol = torch.arange(8 * 6 * 10, dtype=torch.float32).reshape(1, 8, 6, 10)
    grid = image_grid({"a": vol, "b": -vol[0]}, num_slices=3)
    assert grid.shape == (2 * 6, 3 * 8)  # rot90: H x W slices become W x H tiles
    assert 0.0 <= grid.min() and grid.max() <= 1.0  # scaled by the volume's min/max (end slices not shown)
    top = grid[:6]
    assert np.all(np.diff(top[0, [0, 8, 16]]) > 0)  # later slices are brighter in a ramp along depth
    path = save_image_grid(tmp_path / "g.png", {"a": vol, "b": vol}, num_slices=3)
    import matplotlib.pyplot as plt

    assert plt.imread(path).ndim == 3
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        image_grid({"a": torch.zeros(2, 2)})
