"""Model-grid → input-grid inversion against naive dense references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.inference.grid import (
    axis_map,
    labels_to_input_grid,
    model_grid_shape,
    probabilities_to_input_grid,
    refine_boundaries,
)

# (model affine, input affine): flips, a permutation, resampling by non-integer factors and shifts
CASES = {
    "identity": (np.eye(4), np.eye(4)),
    "flip-and-scale": (np.diag([1.5, 1.5, 2.0, 1.0]), np.diag([-0.7, 0.8, 3.1, 1.0])),
    "permuted": (
        np.diag([1.5, 1.5, 2.0, 1.0]),
        np.array([[0, 0.9, 0, 4.0], [0, 0, -1.1, 30.0], [2.5, 0, 0, -3.0], [0, 0, 0, 1]]),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_nearest_labels_match_a_per_voxel_loop(case):
    model_affine, input_affine = CASES[case]
    rng = np.random.default_rng(0)
    model = rng.integers(0, 5, size=(13, 11, 9)).astype(np.uint8)
    amap = axis_map(model_affine, input_affine)
    shape = (10, 12, 7)
    got = labels_to_input_grid(model, amap, shape)
    t = np.linalg.inv(model_affine) @ input_affine
    for i in range(shape[0]):
        for j in range(shape[1]):
            for k in range(shape[2]):
                m = t[:3, :3] @ np.array([i, j, k]) + t[:3, 3]
                m = np.clip(np.floor(m + 0.5).astype(int), 0, np.array(model.shape) - 1)
                assert got[i, j, k] == model[tuple(m)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_boundary_refinement_equals_dense_linear_inversion(case):
    model_affine, input_affine = CASES[case]
    torch.manual_seed(0)
    logits = torch.nn.functional.avg_pool3d(torch.randn(1, 4, 20, 18, 16) * 8, 5, stride=1, padding=2)[0]
    probs = logits.softmax(0).numpy()
    amap = axis_map(model_affine, input_affine)
    shape = (12, 14, 9)
    dense = probabilities_to_input_grid(probs, amap, shape, scale=2**15 - 1).astype(np.float32)  # naive: all classes
    model_labels = probs.argmax(0).astype(np.uint8)
    labels = labels_to_input_grid(model_labels, amap, shape)
    n = refine_boundaries(labels, model_labels, probs.astype(np.float16), amap, chunk=97)
    assert n == 0 if case == "identity" else 0 < n < labels.size  # voxel centres on voxel centres: nothing to do
    assert np.mean(labels == dense.argmax(-1)) >= 0.995  # float16 / int16 rounding may flip near-ties only


def test_rotated_grids_are_rejected():
    c, s = np.cos(0.3), np.sin(0.3)
    rotated = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="rotated"):
        axis_map(np.eye(4), rotated)


def test_model_grid_shape_follows_orientation_and_spacing():
    lps_permuted = np.array([[0, 0, -0.75, 0], [-0.75, 0, 0, 0], [0, 2.5, 0, 0], [0, 0, 0, 1]])  # x→P, y→S, z→L
    assert model_grid_shape((512, 200, 256), lps_permuted, (1.5, 1.5, 2.0), "RAS") == (128, 256, 250)
    assert model_grid_shape((10, 20, 30), np.eye(4), None, "RAS") == (10, 20, 30)
