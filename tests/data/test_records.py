"""Datalist keys → records: labeled records, image records and class names, with errors naming the datalist."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.data.phantoms import BTCV_LABELS
from medssl.data.records import class_names, image_records, labeled_records
from medssl.errors import ConfigError, DataError, MedsslError


def _write(root: Path, name: str) -> str:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)).to_filename(str(path))
    return name


def _datalist(root: Path, **keys: list[dict]) -> Path:
    """A datalist of the given keys whose files exist (paths relative to ``root``)."""
    for items in keys.values():
        for item in items:
            for field in ("image", "label"):
                if field in item:
                    _write(root, item[field])
    path = root / "datalist.json"
    path.write_text(json.dumps({"labels": {"0": "background", "1": "organ"}, **keys}))
    return path


def _case(i: int, label: bool = True) -> dict:
    return {"image": f"imagesTr/c{i}.nii.gz", **({"label": f"labelsTr/c{i}.nii.gz"} if label else {})}


def test_labeled_records_are_absolute_image_label_pairs_of_the_keys_in_order(tmp_path):
    extra = {**_case(0), "id": "case-0"}  # a stray field does not reach the transforms
    path = _datalist(tmp_path, training=[extra, _case(1)], validation=[_case(2)])
    records = labeled_records(path, ["validation", "training"])
    assert records == [
        {"image": str(tmp_path / f"imagesTr/c{i}.nii.gz"), "label": str(tmp_path / f"labelsTr/c{i}.nii.gz")}
        for i in (2, 0, 1)
    ]
    assert labeled_records(path, "training") == records[1:]


def test_relative_paths_resolve_against_dataset_dir(tmp_path):
    data = tmp_path / "data"
    _datalist(data, training=[_case(0)])
    split = tmp_path / "splits" / "split.json"
    split.parent.mkdir()
    split.write_text((data / "datalist.json").read_text())
    assert labeled_records(split, "training", data)[0]["image"] == str(data / "imagesTr/c0.nii.gz")
    with pytest.raises(MedsslError, match="file not found"):
        labeled_records(split, "training")


def test_one_labeled_item_without_a_label_raises_naming_the_datalist(tmp_path):
    path = _datalist(tmp_path, training=[_case(0), _case(1, label=False), _case(2)])
    with pytest.raises(DataError, match=r"1 'training' item\(s\) have no label, e.g. .*c1.nii.gz") as exc:
        labeled_records(path, "training")
    assert str(path) in str(exc.value)


def test_labeled_records_refuse_an_empty_or_missing_key(tmp_path):
    path = _datalist(tmp_path, training=[_case(0)], validation=[])
    with pytest.raises(DataError, match="the 'validation' key holds no cases") as exc:
        labeled_records(path, ["training", "validation"])
    assert str(path) in str(exc.value)
    with pytest.raises(DataError, match=r"no key \['test'\]"):
        labeled_records(path, ["training", "test"])


def test_image_records_skip_and_log_absent_keys_and_drop_labels(tmp_path, caplog):
    path = _datalist(tmp_path, training=[_case(0)], unlabeled=[{"image": "imagesUn/u0.nii.gz"}])
    with caplog.at_level(logging.INFO, logger="medssl.data.records"):
        records = image_records(path, ["training", "validation", "unlabeled"])
    assert records == [{"image": str(tmp_path / "imagesTr/c0.nii.gz")}, {"image": str(tmp_path / "imagesUn/u0.nii.gz")}]
    assert "no ['validation'] key(s); using ['training', 'unlabeled']" in caplog.text


def test_image_records_without_any_of_the_keys_raise_naming_the_datalist(tmp_path):
    path = _datalist(tmp_path, training=[_case(0)], unlabeled=[])
    with pytest.raises(DataError, match=r"no images under keys \['validation', 'test'\]") as exc:
        image_records(path, ["validation", "test"])
    assert str(path) in str(exc.value)
    with pytest.raises(DataError, match=r"no images under keys \['unlabeled'\]"):
        image_records(path, "unlabeled")  # present but empty


def test_image_records_check_that_the_files_exist(tmp_path):
    path = _datalist(tmp_path, training=[_case(0)])
    (tmp_path / "imagesTr/c0.nii.gz").unlink()
    with pytest.raises(MedsslError, match="c0.nii.gz.*file not found"):
        image_records(path, "training")


def test_labels_and_num_classes_must_agree(ct_phantom):
    assert class_names(ct_phantom, 14) == BTCV_LABELS
    with pytest.raises(ConfigError, match="num_classes"):
        class_names(ct_phantom, 2)


def test_a_datalist_without_labels_names_classes_by_index(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [_case(0)]}))
    assert class_names(path, 3) == {0: "background", 1: "class_1", 2: "class_2"}


def test_items_without_labels_are_an_error(tmp_path, ct_phantom):
    data = json.loads(Path(ct_phantom).read_text())
    data["training"] = data["unlabeled"]
    bad = tmp_path / "datalist.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match="no label"):
        labeled_records(bad, "training", Path(ct_phantom).parent)
    records = labeled_records(ct_phantom, "validation")
    assert records and all(Path(r["image"]).is_file() and Path(r["label"]).is_file() for r in records)
