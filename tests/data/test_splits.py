"""The committed json_splits/: counts, consistency between variants, and sync with the reference files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medssl.data.datalist import load_datalist
from medssl.data.prepare import default_splits_dir, write_json_splits

SPLITS = default_splits_dir()
REFERENCE = SPLITS.parents[1] / "shared" / "reference" / "splits"

# file -> (training, validation, unlabeled)
COUNTS = {
    "btcv/dataset_0.json": (24, 6, 0),
    "btcv/dataset_0_init_12.json": (12, 6, 0),
    "btcv/dataset_0_init_6.json": (6, 6, 0),
    "tcia_covid19/dataset_split.json": (600, 171, 0),
    "la2018/full.json": (80, 20, 0),
    "la2018/labeled_8.json": (8, 20, 72),
    "la2018/labeled_16.json": (16, 20, 64),
}


def _images(items) -> list[str]:
    return [Path(i["image"]).name for i in items]


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_split_counts(name):
    dl = load_datalist(SPLITS / name, check_files=False)
    n_train, n_val, n_unlab = COUNTS[name]
    assert len(dl.items("training")) == n_train
    assert len(dl.items("validation")) == n_val
    assert len(dl.data.get("unlabeled", [])) == n_unlab
    raw = json.loads((SPLITS / name).read_text())
    assert raw["numTraining"] == n_train and raw["tensorImageSize"] == "3D"
    all_images = _images(dl.items("training")) + _images(dl.items("validation")) + _images(dl.data.get("unlabeled", []))
    assert len(set(all_images)) == len(all_images), "a case appears twice"


def test_btcv_variants_share_validation_and_nest():
    full, i12, i6 = (
        load_datalist(SPLITS / f"btcv/{n}.json", check_files=False)
        for n in ("dataset_0", "dataset_0_init_12", "dataset_0_init_6")
    )
    assert _images(full.items("validation")) == _images(i12.items("validation")) == _images(i6.items("validation"))
    assert _images(full.items("validation")) == [f"img{n:04d}.nii.gz" for n in range(35, 41)]
    assert (
        set(_images(i6.items("training")))
        <= set(_images(i12.items("training")))
        <= set(_images(full.items("training")))
    )
    assert len(full.labels) == 14 and full.labels[1] == "spleen"
    assert all("label" in i for i in full.items("training"))


def test_la_variants_partition_the_same_training_ids():
    full = load_datalist(SPLITS / "la2018/full.json", check_files=False)
    train = _images(full.items("training"))
    for k in (8, 16):
        dl = load_datalist(SPLITS / f"la2018/labeled_{k}.json", check_files=False)
        assert _images(dl.items("training")) == train[:k]
        assert _images(dl.items("unlabeled")) == train[k:]
        assert all(set(i) == {"image"} for i in dl.items("unlabeled"))
        assert _images(dl.items("validation")) == _images(full.items("validation"))


def test_tcia_is_images_only():
    dl = load_datalist(SPLITS / "tcia_covid19/dataset_split.json", check_files=False)
    assert all(set(i) == {"image"} for i in dl.items("training") + dl.items("validation"))
    assert dl.labels == {}


def test_committed_files_equal_regenerated(tmp_path):
    if not REFERENCE.is_dir():
        pytest.skip(f"reference splits not found at {REFERENCE} (CI clones the repo with shared/ beside it)")
    written = write_json_splits(REFERENCE, tmp_path)
    assert len(written) == len(COUNTS)
    for path in written:
        rel = path.relative_to(tmp_path).as_posix()
        assert rel in COUNTS
        assert path.read_bytes() == (SPLITS / rel).read_bytes(), f"json_splits/{rel} is stale: rerun write_json_splits"
    # the lists come from the reference files, not from this code
    train_list = (REFERENCE / "la2018_train.list").read_text().split()
    assert _images(json.loads((SPLITS / "la2018/full.json").read_text())["training"]) == [
        f"{i}.nii.gz" for i in train_list
    ]
