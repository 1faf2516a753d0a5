"""Preparers on raw layouts built in tmp_path from tiny synthetic volumes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medssl.data.datalist import load_datalist
from medssl.data.prepare import (
    BTCV_LABELS,
    default_splits_dir,
    prepare_btcv,
    prepare_dataset,
    prepare_la2018,
    prepare_tcia,
)
from medssl.errors import ConfigError, DataError, ErrorList

SHAPE = (16, 16, 8)
BTCV_TRAIN = [*range(1, 11), *range(21, 35)]  # dataset_0 training case numbers (validation: 35..40)


def _nifti(path: Path, value: int = 0, dtype=np.int16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full(SHAPE, value, dtype=dtype)
    nib.Nifti1Image(arr, np.diag([0.8, 0.8, 3.0, 1.0])).to_filename(str(path))
    return path


def _btcv_raw(root: Path, cases, layout: str = "raw") -> tuple[Path, Path]:
    img_dir, lab_dir = (
        (root / "Training/img", root / "Training/label")
        if layout == "raw"
        else (
            root / "imagesTr",
            root / "labelsTr",
        )
    )
    for n in cases:
        _nifti(img_dir / f"img{n:04d}.nii.gz", n)
        _nifti(lab_dir / f"label{n:04d}.nii.gz", 1, np.uint8)
    return img_dir, lab_dir


def _case(item: dict) -> int:
    return int(Path(item["image"]).name[3:7])


def test_btcv_reference_cases_match_the_split():
    ref = json.loads((default_splits_dir() / "btcv/dataset_0.json").read_text())
    assert sorted(_case(i) for i in ref["training"]) == BTCV_TRAIN


@pytest.mark.parametrize("layout", ["raw", "decathlon"])
@pytest.mark.parametrize("split,n_train", [(None, 24), ("init_12", 12), ("init_6", 6)])
def test_btcv_reference_split(tmp_path, layout, split, n_train):
    root = tmp_path / "RawData"
    img_dir, lab_dir = _btcv_raw(root, range(1, 41), layout)
    _nifti(root / ("Testing/img" if layout == "raw" else "imagesTs") / "img0061.nii.gz")
    out = prepare_btcv(root, tmp_path / "btcv.json", split=split)
    raw = json.loads(out.read_text())
    assert raw["numTraining"] == n_train and raw["labels"] == BTCV_LABELS and len(raw["test"]) == 1
    assert split or "full" in raw["description"]
    assert not Path(raw["training"][0]["image"]).is_absolute()  # inside the JSON's folder -> relative
    dl = load_datalist(out)
    assert [_case(i) for i in dl.items("validation")] == list(range(35, 41))
    assert {_case(i) for i in dl.items("training")} <= set(BTCV_TRAIN)
    for item in dl.items("training"):
        # image and label of the same case are paired (the image voxel value is its case number)
        assert int(Path(item["label"]).name[5:9]) == _case(item)
        assert np.asarray(nib.load(item["image"]).dataobj)[0, 0, 0] == _case(item)


def test_btcv_paths_outside_json_folder_are_absolute(tmp_path):
    _btcv_raw(tmp_path / "raw", range(1, 41))
    out = prepare_btcv(tmp_path / "raw", tmp_path / "elsewhere" / "btcv.json")
    item = json.loads(out.read_text())["training"][0]
    assert Path(item["image"]).is_absolute() and Path(item["image"]).is_file()


def test_btcv_missing_files_listed_together(tmp_path):
    img_dir, lab_dir = _btcv_raw(tmp_path / "raw", range(1, 41))
    (lab_dir / "label0003.nii.gz").unlink()
    (lab_dir / "label0036.nii.gz").unlink()
    (img_dir / "img0022.nii.gz").unlink()
    out = tmp_path / "btcv.json"
    with pytest.raises(ErrorList) as exc:
        prepare_btcv(tmp_path / "raw", out)
    msg = str(exc.value)
    assert len(exc.value.errors) == 3
    for name in ("label0003.nii.gz", "label0036.nii.gz", "img0022.nii.gz"):
        assert name in msg
    assert "not found" in msg and not out.exists()


def test_btcv_fallback_split_for_unknown_cases(tmp_path, caplog):
    _btcv_raw(tmp_path / "raw", range(101, 111))
    with caplog.at_level("WARNING"):
        dl = load_datalist(prepare_btcv(tmp_path / "raw", tmp_path / "btcv.json"))
    assert [_case(i) for i in dl.items("validation")] == [109, 110]
    assert [_case(i) for i in dl.items("training")] == list(range(101, 109))
    assert "last 20 %" in caplog.text
    with pytest.raises(ConfigError, match="init_6"):
        prepare_btcv(tmp_path / "raw", tmp_path / "b6.json", split="init_6")


def test_btcv_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="'init_7'"):
        prepare_dataset("btcv", tmp_path, tmp_path / "x.json", split="init_7")
    with pytest.raises(ConfigError, match="'kits'"):
        prepare_dataset("kits", tmp_path, tmp_path / "x.json")
    with pytest.raises(DataError, match="no BTCV layout"):
        prepare_btcv(tmp_path, tmp_path / "x.json")


# ------------------------------------------------------------------------------------------------ TCIA


def _tcia_reference_names() -> list[str]:
    ref = json.loads((default_splits_dir() / "tcia_covid19/dataset_split.json").read_text())
    return [Path(d["image"]).name for d in ref["training"] + ref["validation"]]


def test_tcia_reference_split(tmp_path):
    data = tmp_path / "tcia" / "data"
    data.mkdir(parents=True)
    for name in _tcia_reference_names():
        (data / name).touch()  # the preparer only indexes; `medssl check` opens the files
    dl = load_datalist(prepare_dataset("tcia", tmp_path / "tcia", tmp_path / "tcia" / "tcia.json"))
    assert len(dl.items("training")) == 600 and len(dl.items("validation")) == 171
    assert all(set(i) == {"image"} for i in dl.items("training"))


def test_tcia_missing_files_listed_together(tmp_path):
    names = _tcia_reference_names()
    for name in names[:3]:
        (tmp_path / name).touch()
    with pytest.raises(ErrorList) as exc:
        prepare_tcia(tmp_path, tmp_path / "tcia.json")
    assert len(exc.value.errors) == len(names) - 3
    assert names[3] in str(exc.value) and names[-1] in str(exc.value) and names[0] not in str(exc.value)
    assert not (tmp_path / "tcia.json").exists()


def test_tcia_fallback_and_empty(tmp_path):
    for i in range(10):
        (tmp_path / f"volume-covid19-Z-{i:04d}.nii.gz").touch()
    dl = load_datalist(prepare_tcia(tmp_path, tmp_path / "tcia.json"))
    assert [Path(i["image"]).name for i in dl.items("validation")] == [
        "volume-covid19-Z-0008.nii.gz",
        "volume-covid19-Z-0009.nii.gz",
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no volume-covid19"):
        prepare_tcia(tmp_path / "empty", tmp_path / "x.json")


# --------------------------------------------------------------------------------------------- LA 2018


def _itk(arr_zyx: np.ndarray, spacing, origin, direction) -> sitk.Image:
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


# a rotated, anisotropic, shifted grid so that any geometry loss shows
_C, _S = np.cos(0.3), np.sin(0.3)
GEOMETRY = dict(
    spacing=(0.625, 0.7, 2.5),
    origin=(-12.5, 30.25, 7.0),
    direction=(_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0),
)


def _la_case(root: Path, cid: str, labeled: bool = True, label_values=(0, 255), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder = root / cid
    folder.mkdir(parents=True)
    image = rng.integers(0, 200, size=SHAPE[::-1], dtype=np.uint8)
    sitk.WriteImage(_itk(image, **GEOMETRY), str(folder / "lgemri.nrrd"))
    if labeled:
        label = np.zeros(SHAPE[::-1], dtype=np.uint8)
        label[2:5, 4:9, 3:12] = label_values[1]
        label[0, 0, : len(label_values)] = label_values
        sitk.WriteImage(_itk(label, **GEOMETRY), str(folder / "laendo.nrrd"))


def _la_root(tmp_path: Path, ids, unlabeled=()) -> Path:
    root = tmp_path / "raw"
    for k, cid in enumerate(ids):
        _la_case(root, cid, seed=k)
    for cid in unlabeled:
        _la_case(root, cid, labeled=False)
    return root


def test_la_conversion_geometry_and_labels(tmp_path):
    root = _la_root(tmp_path, ["CASE_A", "CASE_B", "CASE_C"], unlabeled=["CASE_U"])
    out = prepare_la2018(root, tmp_path / "la" / "datalist.json", validation_ids=["CASE_B"])
    dl = load_datalist(out)
    assert [Path(i["image"]).name for i in dl.items("training")] == ["CASE_A.nii.gz", "CASE_C.nii.gz"]
    assert [Path(i["image"]).name for i in dl.items("validation")] == ["CASE_B.nii.gz"]
    assert [Path(i["image"]).relative_to(tmp_path / "la").as_posix() for i in dl.items("unlabeled")] == [
        "imagesUn/CASE_U.nii.gz"
    ]
    src_img = sitk.ReadImage(str(root / "CASE_A/lgemri.nrrd"))
    src_lab = sitk.ReadImage(str(root / "CASE_A/laendo.nrrd"))
    item = dl.items("training")[0]
    for path in (item["image"], item["label"]):
        got = sitk.ReadImage(path)
        np.testing.assert_allclose(got.GetOrigin(), GEOMETRY["origin"], atol=1e-4)
        np.testing.assert_allclose(got.GetSpacing(), GEOMETRY["spacing"], atol=1e-6)
        np.testing.assert_allclose(got.GetDirection(), GEOMETRY["direction"], atol=1e-5)
        # nibabel affine: RAS = diag(-1, -1, 1) @ LPS
        affine = nib.load(path).affine
        d = np.asarray(GEOMETRY["direction"]).reshape(3, 3)
        expected = np.diag([-1.0, -1.0, 1.0]) @ d @ np.diag(GEOMETRY["spacing"])
        np.testing.assert_allclose(affine[:3, :3], expected, atol=1e-4)
        np.testing.assert_allclose(affine[:3, 3], np.diag([-1.0, -1.0, 1.0]) @ GEOMETRY["origin"], atol=1e-4)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(item["image"])), sitk.GetArrayFromImage(src_img)
    )
    lab = nib.load(item["label"])
    assert lab.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(lab.dataobj).T, (sitk.GetArrayFromImage(src_lab) == 255).astype(np.uint8))
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) == {0, 1}
    assert not list((tmp_path / "la").glob(".medssl-prepare-*"))


def test_la_fallback_split_and_labeled_variant(tmp_path):
    ids = [f"C{i:02d}" for i in range(10)]
    root = _la_root(tmp_path, ids)
    dl = load_datalist(prepare_la2018(root, tmp_path / "full.json"))
    assert [Path(i["image"]).name for i in dl.items("validation")] == ["C08.nii.gz", "C09.nii.gz"]
    dl = load_datalist(prepare_la2018(root, tmp_path / "l8.json", split="labeled_8"))
    assert len(dl.items("training")) == 8 and "unlabeled" not in dl.keys()
    with pytest.raises(ConfigError, match="labeled_16"):
        prepare_la2018(root, tmp_path / "l16.json", split="labeled_16")
    with pytest.raises(ConfigError, match="NOPE"):
        prepare_la2018(root, tmp_path / "v.json", validation_ids=["NOPE"])


def test_la_reference_split_from_splits_dir(tmp_path):
    # reference list order (T9 first) must be kept, not sorted
    train, val = ["T9"] + [f"T{i}" for i in range(9)], ["V0", "V1"]
    splits = tmp_path / "splits" / "la2018"
    splits.mkdir(parents=True)
    full = {
        "training": [{"image": f"imagesTr/{i}.nii.gz", "label": f"labelsTr/{i}.nii.gz"} for i in train],
        "validation": [{"image": f"imagesTr/{i}.nii.gz", "label": f"labelsTr/{i}.nii.gz"} for i in val],
    }
    (splits / "full.json").write_text(json.dumps(full))
    root = _la_root(tmp_path, train + val + ["EXTRA"], unlabeled=["U0"])
    out = prepare_la2018(root, tmp_path / "la" / "l8.json", split="labeled_8", splits_dir=tmp_path / "splits")
    raw = json.loads(out.read_text())
    names = {k: [Path(i["image"]).name[:-7] for i in raw[k]] for k in ("training", "unlabeled", "validation")}
    assert names == {"training": train[:8], "unlabeled": train[8:] + ["U0"], "validation": val}
    assert raw["unlabeled"][0] == {"image": "imagesTr/T7.nii.gz"}
    assert not (tmp_path / "la" / "imagesTr" / "EXTRA.nii.gz").exists()
    with pytest.raises(ConfigError, match="reference"):
        prepare_la2018(root, tmp_path / "x.json", validation_ids=["V0"], splits_dir=tmp_path / "splits")
    # a missing reference case: every missing file in one error, nothing written
    for f in ("T2/laendo.nrrd", "V1/lgemri.nrrd"):
        (root / f).unlink()
    with pytest.raises(ErrorList) as exc:
        prepare_la2018(root, tmp_path / "la2" / "full.json", splits_dir=tmp_path / "splits")
    assert len(exc.value.errors) == 2
    assert "T2/laendo.nrrd" in str(exc.value) and "V1/lgemri.nrrd" in str(exc.value)
    assert not (tmp_path / "la2").exists()


def test_la_bad_label_values_leave_no_output(tmp_path):
    root = tmp_path / "raw"
    _la_case(root, "GOOD")
    _la_case(root, "BAD1", label_values=(0, 1, 255))
    _la_case(root, "BAD2", label_values=(0, 128))
    out_dir = tmp_path / "la"
    with pytest.raises(ErrorList) as exc:
        prepare_la2018(root, out_dir / "datalist.json")
    msg = str(exc.value)
    assert len(exc.value.errors) == 2
    assert "BAD1/laendo.nrrd" in msg and "[1]" in msg and "BAD2/laendo.nrrd" in msg and "[128]" in msg
    assert not out_dir.exists(), "no partial output may remain"


def test_la_geometry_mismatch_is_reported_before_writing(tmp_path):
    root = tmp_path / "raw"
    _la_case(root, "A")
    _la_case(root, "B")
    label = sitk.ReadImage(str(root / "B/laendo.nrrd"))
    label.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(label, str(root / "B/laendo.nrrd"))
    with pytest.raises(ErrorList) as exc:
        prepare_la2018(root, tmp_path / "la" / "datalist.json")
    assert len(exc.value.errors) == 1
    assert "B/laendo.nrrd: geometry differs from lgemri.nrrd" in str(exc.value)
    assert not (tmp_path / "la").exists()
