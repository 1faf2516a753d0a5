"""Preprocessing presets on a small synthetic NIfTI: spacing, orientation, intensity, summary round trip."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from medssl.transforms.presets import (
    ct_preprocessing,
    la_mri_preprocessing,
    preprocessing_from_summary,
    preprocessing_summary,
    tcia_ssl_preprocessing,
)

SHAPE = (30, 24, 12)


@pytest.fixture
def ct_case(tmp_path):
    """LPS-flipped axes (negative x/y), 1 x 1.25 x 3 mm; HU: air -1000, body 0, organ 100, bone 1000."""
    img = np.full(SHAPE, -1000.0, dtype=np.float32)
    img[5:25, 4:20, 2:10] = 0.0
    img[8:18, 6:16, 3:9] = 100.0
    img[18:22, 4:8, 2:10] = 1000.0
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[8:18, 6:16, 3:9] = 3
    affine = np.diag([-1.0, -1.25, 3.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, -5.0]
    nib.save(nib.Nifti1Image(img, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "lab.nii.gz")
    return {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}


def _spacing_and_codes(t):
    from nibabel.orientations import aff2axcodes

    aff = np.asarray(t.affine)
    return np.sqrt((aff[:3, :3] ** 2).sum(0)), "".join(aff2axcodes(aff))


def test_ct_preset_geometry_and_window(ct_case):
    out = Compose(ct_preprocessing(crop_foreground=False))(dict(ct_case))
    img, lab = out["image"], out["label"]
    spacing, codes = _spacing_and_codes(img)
    np.testing.assert_allclose(spacing, [1.5, 1.5, 2.0], atol=1e-5)
    assert codes == "RAS"
    # the physical extent is preserved (within one voxel per axis)
    extent_in = np.array(SHAPE) * [1.0, 1.25, 3.0]
    assert np.all(np.abs(np.array(img.shape[1:]) * [1.5, 1.5, 2.0] - extent_in) <= [1.5, 1.5, 2.0])
    assert img.shape == lab.shape
    arr = img.numpy()
    assert arr.min() >= 0.0 and arr.max() <= 1.0
    # HU 0 → (0 + 175) / 425, HU 100 → 275 / 425; air and bone clip to 0 and 1
    assert np.isclose(arr, 175 / 425, atol=1e-4).any()
    assert np.isclose(arr, 275 / 425, atol=1e-4).any()
    assert arr.min() == 0.0 and arr.max() == 1.0
    assert set(np.unique(lab.numpy())) <= {0, 3}  # nearest neighbour: no interpolated label values
    # the organ label sits on organ intensity after resampling
    organ = lab.numpy() == 3
    assert organ.sum() > 0 and np.median(arr[organ]) == pytest.approx(275 / 425, abs=1e-3)
    assert organ.sum() * 1.5 * 1.5 * 2.0 == pytest.approx(10 * 10 * 6 * 1.0 * 1.25 * 3.0, rel=0.3)


def test_crop_foreground_shrinks_to_body(ct_case):
    full = Compose(ct_preprocessing(crop_foreground=False))(dict(ct_case))["image"]
    crop = Compose(ct_preprocessing())(dict(ct_case))["image"]
    assert all(c <= f for c, f in zip(crop.shape[1:], full.shape[1:]))
    assert np.prod(crop.shape) < np.prod(full.shape)
    assert crop.numpy().sum() == pytest.approx(full.numpy().sum(), rel=1e-5)  # only zeros were removed


def test_tcia_ssl_defaults(ct_case):
    out = Compose(tcia_ssl_preprocessing(keys=("image",), crop_foreground=False))({"image": ct_case["image"]})
    spacing, codes = _spacing_and_codes(out["image"])
    np.testing.assert_allclose(spacing, [2.0, 2.0, 2.0], atol=1e-5)
    assert codes == "RAS"
    arr = out["image"].numpy()
    assert np.isclose(arr, 57 / 221, atol=1e-4).any()  # HU 0 in the -57..164 window


def test_la_mri_zscore_on_foreground(tmp_path):
    rng = np.random.default_rng(0)
    img = np.zeros(SHAPE, dtype=np.float32)
    img[4:26, 4:20, 2:10] = rng.normal(300.0, 40.0, size=(22, 16, 8))
    nib.save(nib.Nifti1Image(img, np.diag([0.625, 0.625, 0.625, 1.0])), tmp_path / "mri.nii.gz")
    out = Compose(la_mri_preprocessing(keys=("image",)))({"image": str(tmp_path / "mri.nii.gz")})["image"].numpy()
    assert out.shape[1:] == SHAPE  # native spacing kept by default
    fg = out != 0
    assert fg.sum() == 22 * 16 * 8
    assert abs(out[fg].mean()) < 1e-3 and abs(out[fg].std() - 1.0) < 1e-2


def test_summary_round_trip_rebuilds_the_same_chain(ct_case, tmp_path):
    kw = dict(spacing=(1.5, 1.5, 2.0), a_min=-175.0, a_max=250.0)
    summary = preprocessing_summary(orientation="RAS", roi_size=(96, 96, 96), **kw)
    json.dumps(summary)  # plain values only
    torch.save({"p": summary}, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["p"] == summary
    a = Compose(ct_preprocessing(**kw))(dict(ct_case))
    b = Compose(preprocessing_from_summary(summary, keys=("image", "label")))(dict(ct_case))
    for k in ("image", "label"):
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
        np.testing.assert_allclose(np.asarray(a[k].affine), np.asarray(b[k].affine))


def test_zscore_summary_round_trip(tmp_path):
    summary = preprocessing_summary(spacing=None, zscore=True)
    assert summary["intensity"] == {"kind": "zscore", "nonzero": True}
    names = [type(t).__name__ for t in preprocessing_from_summary(summary)]
    assert names == [type(t).__name__ for t in la_mri_preprocessing(keys=("image",), crop_foreground=True)]


def test_inference_without_label_key(ct_case):
    chain = preprocessing_from_summary(
        preprocessing_summary(spacing=(2.0, 2.0, 2.0), a_min=-57, a_max=164),
        keys=("image", "label"),
        allow_missing_keys=True,
    )
    out = Compose(chain)({"image": ct_case["image"]})
    assert "label" not in out and out["image"].ndim == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spacing=None), "either a_min/a_max or zscore"),
        (dict(spacing=None, a_min=0.0, a_max=1.0, zscore=True), "either"),
        (dict(spacing=None, a_min=0.0), "both a_min and a_max"),
        (dict(spacing=None, a_min=10.0, a_max=-10.0), "a_min=10.0"),
    ],
)
def test_summary_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preprocessing_summary(**kwargs)


def test_preset_errors():
    with pytest.raises(ValueError, match=r"\(1\.0, 2\.0\)"):
        ct_preprocessing(spacing=(1.0, 2.0))
    with pytest.raises(ValueError, match="'img'"):
        ct_preprocessing(image_key="img")
    with pytest.raises(ValueError, match="'hist'"):
        preprocessing_from_summary({"intensity": {"kind": "hist"}, "spacing": None})
