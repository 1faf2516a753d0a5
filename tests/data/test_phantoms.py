"""Phantom generators: determinism, labels, geometry, intensity overlap, threshold baseline, datasets on disk."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.data.phantoms import (
    BTCV_LABELS,
    LA_LABELS,
    ensure_phantom,
    generate_phantom_dataset,
    intensity_threshold_baseline,
    la_case_id,
    make_ct_abdomen,
    make_la_mri,
)
from medssl.errors import ConfigError, DataError

SMALL = (64, 64, 32)


@pytest.mark.parametrize("make, shape", [(make_ct_abdomen, SMALL), (make_la_mri, (48, 48, 40))])
def test_phantom_determinism(make, shape):
    a, b, c = make(3, shape, case=1), make(3, shape, case=1), make(4, shape, case=1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    assert not np.array_equal(a[1], make(3, shape, case=2)[1])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ct_labels_dtype_geometry(seed):
    image, label, affine = make_ct_abdomen(seed, SMALL)
    assert image.shape == label.shape == SMALL
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == set(range(14))
    spacing = np.diag(affine)[:3]
    assert 0.6 <= spacing[0] == spacing[1] <= 0.9 and 2.5 <= spacing[2] <= 5.0
    np.testing.assert_array_equal(affine[:3, :3], np.diag(spacing))
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert image.min() >= -1024 and (image[label > 0] > -1000).all()
    # outside air corner, organs inside the body (no organ voxel on the volume border)
    assert image[:3, :3].mean() < -900
    assert not label[[0, -1]].any() and not label[:, [0, -1]].any()


def _centroid(label, k):
    return np.argwhere(label == k).mean(axis=0)


def test_ct_anatomy_and_intensity_overlap():
    image, label, _ = make_ct_abdomen(0)  # the default shape
    assert set(np.unique(label).tolist()) == set(range(14))
    counts = np.bincount(label.ravel(), minlength=14)
    assert counts[12] > 20 and counts[13] > 20  # adrenals exist with some volume
    cen = {k: _centroid(label, k) for k in range(1, 14)}
    # axis 0 -> patient right, axis 1 -> anterior, axis 2 -> superior
    assert cen[6][0] > cen[1][0] and cen[6][1] > cen[1][1]  # liver right/anterior of spleen
    assert cen[2][0] > cen[8][0] > cen[3][0]  # kidneys either side of the aorta
    assert cen[9][0] > cen[8][0]  # IVC right of aorta
    assert cen[7][0] < cen[6][0] and cen[7][1] > cen[8][1]  # stomach left of liver, anterior of aorta
    assert cen[5][2] > cen[11][2] and cen[12][2] > cen[2][2] and cen[13][2] > cen[3][2]
    means = {k: float(image[label == k].mean()) for k in range(1, 14)}
    for k in (1, 2, 3, 6, 11):  # spleen, kidneys, liver, pancreas
        assert 40 <= means[k] <= 160, (BTCV_LABELS[k], means[k])
    q = {k: np.percentile(image[label == k], [10, 90]) for k in (1, 6, 8, 10)}
    assert q[1][0] < q[6][1] and q[6][0] < q[1][1]  # spleen and liver ranges overlap
    assert q[8][0] < q[10][1] and q[10][0] < q[8][1]  # aorta and portal vein ranges overlap


def _naive_best_dice(image, organ, edges):
    best = 0.0
    for lo in edges:
        for hi in edges:
            if lo <= hi:
                m = (image >= lo) & (image <= hi)
                best = max(best, 2 * (m & organ).sum() / (m.sum() + organ.sum()))
    return best


def test_threshold_baseline_matches_naive_and_is_low():
    image, label, _ = make_ct_abdomen(1, SMALL)
    scores = intensity_threshold_baseline(image, label, BTCV_LABELS, n_quantiles=9)
    for k in (1, 6, 8):
        organ = label == k
        edges = np.unique(np.percentile(image[organ], np.linspace(0, 100, 9), method="nearest"))
        assert scores[k] == pytest.approx(_naive_best_dice(image, organ, edges))
    # a perfectly separable toy image scores 1
    toy_label = np.zeros((10, 10), np.uint8)
    toy_label[2:5] = 1
    assert intensity_threshold_baseline(toy_label * 100, toy_label, [0, 1]) == {1: 1.0}
    assert np.nanmean(list(intensity_threshold_baseline(image, label, BTCV_LABELS).values())) < 0.5


def test_threshold_baseline_default_shape_below_half():
    image, label, _ = make_ct_abdomen(0)
    scores = intensity_threshold_baseline(image, label, BTCV_LABELS)
    assert set(scores) == set(range(1, 14))
    assert np.mean(list(scores.values())) < 0.5


def test_ct_dataset_loads_with_monai(tmp_path):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    path = generate_phantom_dataset("ct-abdomen", tmp_path / "ct", cases=6, unlabeled=4, shape=SMALL)
    data = json.loads(path.read_text())
    assert len(data["training"]) == 5 and len(data["validation"]) == 1 and len(data["unlabeled"]) == 4
    assert {d["image"] for d in data["training"]}.isdisjoint(d["image"] for d in data["validation"])
    assert data["labels"]["6"] == "liver" and "seed 0" in data["description"]
    train = load_decathlon_datalist(str(path), True, "training")
    item = LoadImaged(keys=["image", "label"])(train[0])
    _, _, affine = make_ct_abdomen(0, SMALL, case=0)
    np.testing.assert_allclose(item["image"].affine.numpy(), affine, atol=1e-4)
    np.testing.assert_allclose(item["image"].pixdim.numpy(), np.diag(affine)[:3], atol=1e-5)
    assert tuple(item["label"].shape) == SMALL
    unl = load_decathlon_datalist(str(path), False, "unlabeled")
    assert all(Path(d["image"]).is_file() for d in unl)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary folder was renamed away


@pytest.mark.parametrize("cases", [0, 1])
def test_too_few_cases_rejected(tmp_path, cases):
    with pytest.raises(ConfigError, match=str(cases)):
        generate_phantom_dataset("ct-abdomen", tmp_path / "x", cases=cases, shape=SMALL)
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_existing_folder_refused_and_ensure_reuses(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        generate_phantom_dataset("ct-abdomen", tmp_path / "junk", cases=2, unlabeled=0, shape=SMALL)
    with pytest.raises(DataError, match="junk"):
        ensure_phantom("ct-abdomen", tmp_path / "junk", cases=2, unlabeled=0, shape=SMALL)
    out = tmp_path / "ds"
    path = ensure_phantom("ct-abdomen", out, cases=2, unlabeled=0, shape=SMALL)
    stamp = path.stat().st_mtime_ns
    image_file = out / "imagesTr" / "ct_0000.nii.gz"
    image_stamp = image_file.stat().st_mtime_ns
    assert ensure_phantom("ct-abdomen", out, cases=2, unlabeled=0, shape=SMALL) == path
    assert path.stat().st_mtime_ns == stamp and image_file.stat().st_mtime_ns == image_stamp
    with pytest.raises(DataError, match="already holds"):
        generate_phantom_dataset("ct-abdomen", out, cases=2, unlabeled=0, shape=SMALL)


def test_la_raw_nrrd_and_dataset(tmp_path):
    import SimpleITK as sitk

    assert la_case_id(0, 0) == la_case_id(0, 0) != la_case_id(0, 1)
    assert len(la_case_id(5, 3)) == 20 and la_case_id(5, 3).isalnum() and la_case_id(5, 3).isupper()
    path = generate_phantom_dataset("la-mri", tmp_path / "la", cases=3, unlabeled=1, shape=(48, 48, 40))
    raw = tmp_path / "la" / "raw"
    ids = [la_case_id(0, i) for i in range(4)]
    assert sorted(p.name for p in raw.iterdir()) == sorted(ids)
    assert not (raw / ids[3] / "laendo.nrrd").exists()
    image, label, affine = make_la_mri(0, (48, 48, 40), case=0)
    lab = sitk.ReadImage(str(raw / ids[0] / "laendo.nrrd"))
    img = sitk.ReadImage(str(raw / ids[0] / "lgemri.nrrd"))
    assert lab.GetSpacing() == pytest.approx((0.625,) * 3) and img.GetSpacing() == pytest.approx((0.625,) * 3)
    assert set(np.unique(sitk.GetArrayFromImage(lab)).tolist()) == {0, 255}
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), image)
    # LPS origin of the RAS affine
    assert img.GetOrigin() == pytest.approx((-affine[0, 3], -affine[1, 3], affine[2, 3]))
    data = json.loads(path.read_text())
    assert len(data["validation"]) == 1 and len(data["training"]) == 2 and len(data["unlabeled"]) == 1
    nii = nib.load(str(path.parent / data["validation"][0]["label"]))
    np.testing.assert_allclose(nii.affine, affine, atol=1e-4)
    assert set(np.unique(np.asarray(nii.dataobj)).tolist()) == {0, 1}
    assert LA_LABELS[1] == "left atrium"


def test_organ_subset_relabels_in_btcv_order_and_keeps_the_image(tmp_path):
    import json

    import nibabel as nib

    from medssl.data.phantoms import generate_phantom_dataset, make_ct_abdomen, organ_subset

    assert organ_subset(["liver", "spleen", "right_kidney"]) == {0: "background", 1: "spleen", 2: "right kidney",
                                                                 3: "liver"}  # fmt: skip
    assert organ_subset(None)[13] == "left adrenal gland"
    datalist = generate_phantom_dataset("ct-abdomen", tmp_path / "ds", cases=2, unlabeled=0, seed=0,
                                        shape=(64, 64, 32), organs=["liver", "spleen", "right_kidney"])  # fmt: skip
    dl = json.loads(datalist.read_text())
    assert dl["labels"] == {"0": "background", "1": "spleen", "2": "right kidney", "3": "liver"}
    assert dl["phantom"]["organs"] == ["spleen", "right kidney", "liver"]
    image, label, _ = make_ct_abdomen(0, (64, 64, 32), case=0)
    item = dl["training"][0]
    written = np.asarray(nib.load(datalist.parent / item["label"]).dataobj)
    expected = np.select([label == 1, label == 2, label == 6], [1, 2, 3], 0)
    np.testing.assert_array_equal(written, expected)  # other organs are background, the image is unchanged
    np.testing.assert_array_equal(np.asarray(nib.load(datalist.parent / item["image"]).dataobj), image)


@pytest.mark.parametrize("kind, organs, words", [("ct-abdomen", ["lung"], "unknown organ 'lung'"),
                                                 ("ct-abdomen", ["liver", "6"], "listed twice"),
                                                 ("la-mri", ["liver"], "only the ct-abdomen")])  # fmt: skip
def test_bad_organ_sets_are_refused_before_writing(tmp_path, kind, organs, words):
    from medssl.data.phantoms import generate_phantom_dataset

    with pytest.raises(ConfigError, match=words):
        generate_phantom_dataset(kind, tmp_path / "ds", cases=2, unlabeled=0, organs=organs)
    assert not (tmp_path / "ds").exists()
