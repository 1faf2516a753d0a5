"""Datalist loading and validation: path resolution, and one clear error per broken file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medssl.data.datalist import check_datalist, load_datalist
from medssl.data.io import read_image_info
from medssl.errors import DataError, ErrorList, MedsslError

SHAPE = (16, 16, 8)
AFFINE = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, 5.0], [0, 0, 3.0, 2.0], [0, 0, 0, 1]])
LABELS = {"0": "background", "1": "organ", "2": "tumour"}


def _nii(path: Path, arr: np.ndarray, affine=AFFINE) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(arr, affine).to_filename(str(path))
    return path.name


def _label(value_block=2, dtype=np.uint8) -> np.ndarray:
    lab = np.zeros(SHAPE, dtype=dtype)
    lab[2:6, 3:9, 1:4] = 1
    lab[8:10, 8:12, 5:7] = value_block
    return lab


def _image() -> np.ndarray:
    return np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)


def _dataset(root: Path, n: int = 3, labels=LABELS, extra=None) -> Path:
    """A good datalist with ``n`` labeled training cases, one validation case and one unlabeled case."""
    items = []
    for i in range(n + 1):
        _nii(root / "imagesTr" / f"c{i}.nii.gz", _image())
        _nii(root / "labelsTr" / f"c{i}.nii.gz", _label())
        items.append({"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"})
    _nii(root / "imagesUn" / "u0.nii.gz", _image())
    dl = {
        "labels": labels,
        "training": items[:n],
        "validation": items[n:],
        "unlabeled": [{"image": "imagesUn/u0.nii.gz"}],
    }
    dl.update(extra or {})
    path = root / "datalist.json"
    path.write_text(json.dumps(dl))
    return path


def _fails(path, match_file: str, *problem: str, dataset_dir=None) -> MedsslError:
    with pytest.raises(MedsslError) as exc:
        check_datalist(path, dataset_dir=dataset_dir)
    msg = str(exc.value)
    assert match_file in msg, msg
    for p in problem:
        assert p in msg, msg
    return exc.value


# ------------------------------------------------------------------------------------------------ loading


def test_load_resolves_relative_paths(tmp_path):
    path = _dataset(tmp_path / "ds")
    dl = load_datalist(path)
    assert dl.keys() == ("training", "validation", "unlabeled")
    assert dl.labels == {0: "background", 1: "organ", 2: "tumour"} and dl.dataset_dir == (tmp_path / "ds").resolve()
    item = dl.items("training")[0]
    assert item == {
        "image": str((tmp_path / "ds/imagesTr/c0.nii.gz").resolve()),
        "label": str((tmp_path / "ds/labelsTr/c0.nii.gz").resolve()),
    }
    item["image"] = "changed"
    assert dl.items("training")[0]["image"] != "changed", "items() must return copies"
    with pytest.raises(DataError, match="no 'test' key"):
        dl.items("test")


def test_load_with_dataset_dir_and_bare_test_strings(tmp_path):
    root = tmp_path / "data"
    _nii(root / "imagesTs" / "t0.nii.gz", _image())
    path = tmp_path / "lists" / "dl.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"test": ["imagesTs/t0.nii.gz"]}))
    with pytest.raises(ErrorList, match="t0.nii.gz: file not found"):
        load_datalist(path)  # resolved against the JSON's folder by default
    dl = load_datalist(path, dataset_dir=root)
    assert dl.items("test") == [{"image": str((root / "imagesTs/t0.nii.gz").resolve())}]


def test_load_lists_every_missing_file(tmp_path):
    path = _dataset(tmp_path)
    (tmp_path / "labelsTr/c1.nii.gz").unlink()
    (tmp_path / "imagesUn/u0.nii.gz").unlink()
    with pytest.raises(ErrorList) as exc:
        load_datalist(path)
    assert len(exc.value.errors) == 2
    assert "c1.nii.gz: file not found" in str(exc.value) and "u0.nii.gz: file not found" in str(exc.value)
    assert load_datalist(path, check_files=False).items("unlabeled")
    with pytest.raises(DataError, match="no key \\['test'\\]"):
        load_datalist(path, keys=["training", "test"])
    assert load_datalist(path, keys="validation").keys() == ("validation",)


# ------------------------------------------------------------------------------------------------- checks


def test_good_datalist_passes_with_report(tmp_path):
    path = _dataset(tmp_path)
    report = check_datalist(path)
    assert "training: 3 items (3 with label)" in report
    assert "validation: 1 items" in report and "unlabeled: 1 items (0 with label)" in report
    assert "label values found: [0, 1, 2]" in report
    assert "x: 0.8-0.8" in report and "z: 3-3" in report


def test_float_integer_labels_singleton_4d_and_nrrd_image_pass(tmp_path):
    path = _dataset(tmp_path, n=1)
    _nii(tmp_path / "labelsTr/c0.nii.gz", _label(dtype=np.float32))
    _nii(tmp_path / "imagesTr/c0.nii.gz", _image()[..., None])
    # NRRD image beside a NIfTI label: same world geometry once LPS is flipped to RAS
    itk = sitk.GetImageFromArray(_image().T.copy())
    itk.SetSpacing((0.8, 0.8, 3.0))
    itk.SetOrigin((10.0, -5.0, 2.0))
    itk.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(itk, str(tmp_path / "imagesTr/c1.nrrd"))
    raw = json.loads(path.read_text())
    raw["validation"][0]["image"] = "imagesTr/c1.nrrd"
    path.write_text(json.dumps(raw))
    np.testing.assert_allclose(read_image_info(tmp_path / "imagesTr/c1.nrrd").affine, AFFINE, atol=1e-6)
    assert "OK" in check_datalist(path)


@pytest.mark.parametrize(
    "breakage,file,problem",
    [
        ("missing", "labelsTr/c1.nii.gz", ["file not found"]),
        ("shape", "labelsTr/c1.nii.gz", ["shape (16, 16, 9) differs from image c1.nii.gz (16, 16, 8)"]),
        ("affine", "labelsTr/c1.nii.gz", ["affine differs from image c1.nii.gz", "0.5 mm"]),
        ("float", "labelsTr/c1.nii.gz", ["label values must be integers", "0.5"]),
        ("range", "labelsTr/c1.nii.gz", ["label values [7] are not declared", "0..2"]),
        ("negative", "labelsTr/c1.nii.gz", ["negative label values [-3]"]),
        ("2d", "imagesTr/c1.nii.gz", ["is 2D", "expected a 3D volume"]),
        ("4d", "imagesTr/c1.nii.gz", ["is 4D", "(16, 16, 8, 2)"]),
        ("corrupt_gzip", "imagesTr/c1.nii.gz", ["corrupt or truncated"]),
        ("truncated_gzip", "labelsTr/c1.nii.gz", ["corrupt or truncated"]),
        ("not_gzip", "imagesTr/c1.nii.gz", ["not gzip-compressed"]),
        ("zero_bytes", "imagesTr/c1.nii.gz", ["empty (0 bytes)"]),
        ("nan", "imagesTr/c1.nii.gz", ["1 voxels are NaN or infinite"]),
        ("spacing", "imagesTr/c1.nii.gz", ["spacing must be finite and > 0"]),
        ("extension", "imagesTr/c1.png", ["unsupported file type"]),
    ],
)
def test_broken_file_is_named(tmp_path, breakage, file, problem):
    path = _dataset(tmp_path)
    target = tmp_path / file
    if breakage == "missing":
        target.unlink()
    elif breakage == "shape":
        _nii(target, np.zeros((16, 16, 9), np.uint8))
    elif breakage == "affine":
        shifted = AFFINE.copy()
        shifted[0, 3] += 0.5
        _nii(target, _label(), shifted)
    elif breakage == "float":
        lab = _label(dtype=np.float32)
        lab[0, 0, 0] = 0.5
        _nii(target, lab)
    elif breakage == "range":
        _nii(target, _label(value_block=7))
    elif breakage == "negative":
        _nii(target, _label(value_block=-3, dtype=np.int16))
    elif breakage == "2d":
        _nii(target, _image()[..., 0])
    elif breakage == "4d":
        _nii(target, np.stack([_image(), _image()], -1))
    elif breakage == "corrupt_gzip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        target.write_bytes(bytes(data))
    elif breakage == "truncated_gzip":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif breakage == "not_gzip":
        target.write_bytes(gzip.decompress(target.read_bytes()))
    elif breakage == "zero_bytes":
        target.write_bytes(b"")
    elif breakage == "nan":
        img = _image()
        img[3, 3, 3] = np.nan
        _nii(target, img)
    elif breakage == "spacing":
        hdr = nib.Nifti1Header()
        hdr.set_data_dtype(np.float32)
        hdr.set_sform(np.diag([0.8, 0.0, 3.0, 1.0]), code=1)  # a degenerate grid: zero extent along y
        nib.Nifti1Image(_image(), None, header=hdr).to_filename(str(target))
    elif breakage == "extension":
        target.write_bytes(b"\x89PNG")
        raw = json.loads(path.read_text())
        raw["training"][1]["image"] = "imagesTr/c1.png"
        path.write_text(json.dumps(raw))
    err = _fails(path, str(target.resolve()), *problem)
    assert isinstance(err, ErrorList) and len(err.errors) == 1, str(err)


def test_all_problems_collected(tmp_path):
    path = _dataset(tmp_path)
    (tmp_path / "imagesTr/c0.nii.gz").unlink()
    _nii(tmp_path / "labelsTr/c1.nii.gz", _label(value_block=9))
    (tmp_path / "imagesUn/u0.nii.gz").write_bytes(b"")
    err = _fails(path, "c0.nii.gz", "label values [9]", "u0.nii.gz")
    assert len(err.errors) == 3


def test_undeclared_labels_only_checked_for_integers(tmp_path):
    path = _dataset(tmp_path, labels={})
    _nii(tmp_path / "labelsTr/c1.nii.gz", _label(value_block=7))
    assert "labels declared: none" in check_datalist(path)


@pytest.mark.parametrize(
    "content,problem",
    [
        ("{not json", "not valid JSON"),
        ('["a.nii.gz"]', "must be a JSON object"),
        ('{"labels": {"0": "bg"}, "name": "x"}', "has none of the keys"),
        ('{"training": [{"label": "l.nii.gz"}]}', "training[0] has no 'image' path"),
        ('{"training": {"image": "a.nii.gz"}}', "'training' must be a list"),
    ],
)
def test_bad_datalist_is_named(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    _fails(path, "bad.json", problem)


def test_missing_datalist_and_requested_key(tmp_path):
    _fails(tmp_path / "nope.json", "nope.json", "datalist not found")
    path = _dataset(tmp_path)
    with pytest.raises(DataError, match="no key \\['test'\\]") as exc:
        check_datalist(path, keys=["test"])
    assert "datalist.json" in str(exc.value)


# ------------------------------------------------------------------------------------- repeats and leakage


def _rewrite(path: Path, edit) -> Path:
    dl = json.loads(path.read_text())
    edit(dl)
    path.write_text(json.dumps(dl))
    return path


@pytest.mark.parametrize("spelling", ["imagesTr/c1.nii.gz", "./imagesTr/../imagesTr/c1.nii.gz"])
def test_case_listed_twice_in_one_key_is_refused_naming_both_entries(tmp_path, spelling):
    path = _rewrite(
        _dataset(tmp_path), lambda dl: dl["training"].append({"image": spelling, "label": "labelsTr/c1.nii.gz"})
    )
    for call in (check_datalist, load_datalist, lambda p: load_datalist(p, keys="training", check_files=False)):
        with pytest.raises(MedsslError, match=r"training\[3\] repeats training\[1\]: image imagesTr/c1.nii.gz"):
            call(path)


def test_unlabeled_case_listed_twice_is_refused(tmp_path):
    path = _rewrite(_dataset(tmp_path), lambda dl: dl["unlabeled"].append("imagesUn/u0.nii.gz"))
    with pytest.raises(MedsslError, match=r"unlabeled\[1\] repeats unlabeled\[0\]"):
        load_datalist(path)


def test_validation_image_in_training_is_refused_as_leakage(tmp_path):
    path = _rewrite(_dataset(tmp_path), lambda dl: dl["training"].append(dict(dl["validation"][0])))
    leak = r"validation\[0\] and training\[3\] share image imagesTr/c3.nii.gz \(leakage"
    with pytest.raises(MedsslError, match=leak):
        check_datalist(path)
    # a bundle that loads only one key still refuses the file
    from medssl.data.records import image_records

    with pytest.raises(MedsslError, match=leak):
        image_records(path, ["training"])


def test_check_cli_refuses_a_duplicated_case_with_exit_2(tmp_path, capsys):
    from medssl.cli import main

    path = _rewrite(_dataset(tmp_path), lambda dl: dl["training"].append(dict(dl["training"][0])))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"medssl: error: {path}: training[3] repeats training[0]" in err


def test_same_image_in_training_and_unlabeled_is_allowed(tmp_path):
    # SSL may use a labeled image as unlabeled data too: that is no leakage into validation
    path = _rewrite(_dataset(tmp_path), lambda dl: dl["unlabeled"].append("imagesTr/c0.nii.gz"))
    assert "unlabeled: 2 items (0 with label)" in check_datalist(path)
