"""SSL views: in-painting / out-painting touch only their side of the holes, shuffling permutes within holes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from medssl.transforms.views import RandInOutPaintd, ssl_two_view_transforms, ssl_view_transforms

SHAPE = (1, 40, 36, 32)


def _image(seed: int = 0) -> torch.Tensor:
    # distinct values everywhere, so any moved or replaced voxel is visible
    return torch.from_numpy(np.random.default_rng(seed).random(SHAPE, dtype=np.float32))


def _hole_mask(coords, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for h in coords:
        mask[h] = True
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inpainting_changes_only_inside_holes(seed):
    t = RandInOutPaintd(keys="image", inpaint_prob=1.0).set_random_state(seed)
    clean = _image(seed)
    out = t({"image": clean.clone()})["image"]
    assert t.last_mode == "inpaint" and len(t.hole_coords) == 6
    mask = _hole_mask(t.hole_coords)
    changed = np.asarray(out) != clean.numpy()
    assert not changed[~mask].any()
    assert changed[mask].mean() > 0.99  # noise fill: practically every hole voxel differs
    for h in t.hole_coords:  # sizes within the recipe's 5..32
        sizes = [s.stop - s.start for s in h[1:]]
        assert all(5 <= s <= 32 for s in sizes), sizes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outpainting_changes_only_outside_holes(seed):
    t = RandInOutPaintd(keys="image", inpaint_prob=0.0, out_min_size=6, out_max_size=12).set_random_state(seed)
    clean = _image(seed)
    out = t({"image": clean.clone()})["image"]
    assert t.last_mode == "outpaint"
    mask = _hole_mask(t.hole_coords)
    changed = np.asarray(out) != clean.numpy()
    assert not changed[mask].any()
    assert changed[~mask].mean() > 0.99
    lo, hi = float(clean.min()), float(clean.max())
    assert lo <= float(out.min()) and float(out.max()) <= hi  # noise drawn from the image's range


def test_both_modes_are_drawn():
    t = RandInOutPaintd(keys="image").set_random_state(0)
    modes = []
    for _ in range(20):
        t({"image": _image()})
        modes.append(t.last_mode)
    assert set(modes) == {"inpaint", "outpaint"}


@pytest.mark.parametrize("holes", [1, 10])
def test_pixel_shuffle_preserves_multisets(holes):
    shuffle = ssl_view_transforms("image", shuffle_prob=1.0, shuffle_holes=holes)[1]
    shuffle.set_random_state(3)
    clean = _image(3)
    out = np.asarray(shuffle({"image": clean.clone()})["image"])
    coords = shuffle.shuffle.hole_coords
    assert len(coords) == holes
    mask = _hole_mask(coords)
    ref = clean.numpy()
    np.testing.assert_array_equal(out[~mask], ref[~mask])
    np.testing.assert_array_equal(np.sort(out[mask]), np.sort(ref[mask]))  # the union of holes as a whole
    if holes == 1:  # one hole: its own multiset, and actually permuted
        h = coords[0]
        np.testing.assert_array_equal(np.sort(out[h].ravel()), np.sort(ref[h].ravel()))
        assert (out[h] != ref[h]).any()


def _two_views(seed: int) -> dict:
    chain = Compose(ssl_two_view_transforms()).set_random_state(seed)
    return chain({"image": _image()})


def test_two_views_differ_from_each_other_and_from_clean():
    d = _two_views(0)
    clean = _image().numpy()
    np.testing.assert_array_equal(np.asarray(d["gt_image"]), clean)
    v1, v2 = np.asarray(d["image"]), np.asarray(d["image_2"])
    assert not np.array_equal(v1, clean)
    assert not np.array_equal(v2, clean)
    assert not np.array_equal(v1, v2)


def test_fixed_seed_reproduces_views():
    a, b, c = _two_views(7), _two_views(7), _two_views(8)
    for k in ("image", "image_2"):
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))


def test_views_use_separate_random_transforms():
    chain = ssl_two_view_transforms()
    paint = [t for t in chain if isinstance(t, RandInOutPaintd)]
    assert len(paint) == 2 and paint[0] is not paint[1]
    assert list(paint[0].keys) == ["image"] and list(paint[1].keys) == ["image_2"]


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_bad_inpaint_prob(bad):
    with pytest.raises(ValueError, match=str(bad)):
        RandInOutPaintd(keys="image", inpaint_prob=bad)


def test_keys_must_differ():
    with pytest.raises(ValueError, match="must differ"):
        ssl_two_view_transforms(image_key="image", clean_key="image")
