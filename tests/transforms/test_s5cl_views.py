"""S5CL weak / strong 3D views: shapes, independence, shared geometry for token contrast, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from medssl.transforms.s5cl_views import s5cl_strong_transforms, s5cl_weak_strong_views, s5cl_weak_transforms


def _run(chain, data, seed):
    c = Compose(chain)
    c.set_random_state(seed)
    return c({k: v.copy() for k, v in data.items()})


def _image(shape=(1, 16, 16, 16)):
    return np.random.default_rng(0).random(shape, dtype=np.float32)


@pytest.mark.parametrize("shape", [(1, 16, 16, 16), (1, 12, 12, 8)])
def test_independent_views_keep_shape_and_differ(shape):
    data = {"image": _image(shape)}
    out = _run(s5cl_weak_strong_views("image", spatial_size=shape[1:]), data, seed=1)
    assert np.array_equal(np.asarray(out["image"]), data["image"])  # the source stays clean
    weak, strong = torch.as_tensor(out["image_weak"]), torch.as_tensor(out["image_strong"])
    assert weak.shape == strong.shape == shape
    assert not torch.allclose(weak, strong)


def test_weak_view_only_flips_rotates_and_jitters():
    """With intensity jitter off, the weak view is a permutation of the voxels (flips / rot90 only)."""
    img = _image()
    chain = s5cl_weak_transforms("image", flip_prob=1.0, rot90_prob=1.0, intensity_prob=0.0)
    out = torch.as_tensor(_run(chain, {"image": img}, seed=3)["image"])
    assert not np.allclose(out.numpy(), img)
    assert np.allclose(np.sort(out.numpy().ravel()), np.sort(img.ravel()))


def test_strong_view_changes_geometry_and_intensity():
    img = _image()
    chain = s5cl_strong_transforms(
        "image", spatial_size=(16, 16, 16), crop_scale=(0.5, 0.5), intensity_prob=1.0, dropout_prob=1.0
    )
    out = torch.as_tensor(_run(chain, {"image": img}, seed=0)["image"]).numpy()
    assert out.shape == img.shape
    # resizing a half-size crop interpolates: values are not a permutation of the input any more
    assert not np.allclose(np.sort(out.ravel()), np.sort(img.ravel()), atol=1e-3)
    assert (out == 0).sum() >= 4**3  # at least one dropout box


def test_shared_geometry_keeps_views_and_label_voxel_aligned():
    """Image = label as float; with intensity changes off, both views must still equal the moved label."""
    rng = np.random.default_rng(1)
    label = rng.integers(0, 4, size=(1, 16, 16, 8)).astype(np.uint8)
    data = {"image": label.astype(np.float32), "label": label}
    off = {"intensity_prob": 0.0}
    chain = s5cl_weak_strong_views(
        "image",
        label_key="label",
        shared_geometry=True,
        weak_kwargs={"flip_prob": 1.0, "rot90_prob": 1.0, **off},
        strong_kwargs={"dropout_prob": 0.0, **off},
    )
    out = _run(chain, data, seed=5)
    lab = torch.as_tensor(out["label"]).float()
    assert not torch.equal(lab, torch.as_tensor(label).float())  # the geometry did change
    assert torch.equal(torch.as_tensor(out["image_weak"]), lab)
    assert torch.equal(torch.as_tensor(out["image_strong"]), lab)


def test_shared_geometry_strong_view_differs_in_intensity_only():
    data = {"image": _image((1, 16, 16, 8))}
    chain = s5cl_weak_strong_views("image", shared_geometry=True, strong_kwargs={"intensity_prob": 1.0})
    out = _run(chain, data, seed=2)
    weak, strong = torch.as_tensor(out["image_weak"]), torch.as_tensor(out["image_strong"])
    assert weak.shape == strong.shape == (1, 16, 16, 8)
    assert not torch.allclose(weak, strong)
    # same geometry: the views stay strongly correlated voxel by voxel
    corr = torch.corrcoef(torch.stack([weak.ravel(), strong.ravel()]))[0, 1]
    assert corr > 0.5


def test_seeded_views_are_reproducible():
    data = {"image": _image()}
    chain = s5cl_weak_strong_views("image", spatial_size=16)
    a, b, c = _run(chain, data, 7), _run(chain, data, 7), _run(chain, data, 8)
    assert torch.equal(torch.as_tensor(a["image_strong"]), torch.as_tensor(b["image_strong"]))
    assert not torch.equal(torch.as_tensor(a["image_strong"]), torch.as_tensor(c["image_strong"]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="spatial_size is required"):
        s5cl_strong_transforms("image")
    with pytest.raises(ValueError, match="crop_scale"):
        s5cl_strong_transforms("image", spatial_size=16, crop_scale=(0.8, 0.5))
    with pytest.raises(ValueError, match="shared_geometry"):
        s5cl_weak_strong_views("image", label_key="label", spatial_size=16)
    with pytest.raises(ValueError, match="must differ"):
        s5cl_weak_strong_views("image", weak_key="image", spatial_size=16)
