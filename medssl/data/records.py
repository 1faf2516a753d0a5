"""Datalist keys → the record lists MONAI datasets take: the one place a bundle or trainer turns a datalist into data.

Every function reads the datalist through :func:`medssl.data.datalist.load_datalist`, so every bundle gets the same
checks (files exist, no case listed twice, no validation case in training) and the same errors naming the
datalist. Records hold absolute path strings and nothing else, so no stray datalist field reaches a transform.

Example::

    records = labeled_records("json_splits/la2018/labeled_8.json", "training", dataset_dir="/data/la2018")
    # [{"image": "/data/la2018/.../image.nrrd", "label": "/data/la2018/.../label.nrrd"}, ...]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from medssl.data.datalist import load_datalist
from medssl.errors import ConfigError, DataError

__all__ = ["labeled_records", "image_records", "class_names"]

logger = logging.getLogger(__name__)


def _key_list(keys: Sequence[str] | str) -> list[str]:
    return [keys] if isinstance(keys, str) else list(keys)


def labeled_records(
    datalist: str | os.PathLike,
    keys: Sequence[str] | str,
    dataset_dir: str | os.PathLike | None = None,
) -> list[dict[str, str]]:
    """``[{"image": path, "label": path}, ...]`` (absolute paths) of datalist keys whose every item has a label.

    Args:
        datalist: the datalist JSON.
        keys: one key (``"training"``) or several, concatenated in the given order; each must be present.
        dataset_dir: base of relative paths (default: the datalist's folder).

    Raises:
        DataError: naming the datalist: a key is missing or holds no cases, or an item has no ``label``
            (missing files, repeated cases: see :func:`medssl.data.datalist.load_datalist`).
    """
    keys = _key_list(keys)
    loaded = load_datalist(datalist, dataset_dir=dataset_dir, keys=keys)
    records = []
    for key in keys:
        items = loaded.items(key)
        if not items:
            raise DataError(datalist, f"the {key!r} key holds no cases")
        unlabeled = [str(item.get("image")) for item in items if not item.get("label")]
        if unlabeled:
            raise DataError(datalist, f"{len(unlabeled)} {key!r} item(s) have no label, e.g. {unlabeled[0]}")
        records += [{"image": str(item["image"]), "label": str(item["label"])} for item in items]
    return records


def image_records(
    datalist: str | os.PathLike,
    keys: Sequence[str] | str,
    dataset_dir: str | os.PathLike | None = None,
    image_key: str = "image",
) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` (absolute paths) from the datalist keys that exist; labels are dropped.

    For images without supervision (SSL pretraining, the unlabeled stream of semi-supervised training). A key
    the datalist lacks is skipped with a log line (TCIA's split has no ``unlabeled`` key); no key at all is an
    error.

    Args:
        datalist: the datalist JSON.
        keys: one key or several, concatenated in the given order.
        dataset_dir: base of relative paths (default: the datalist's folder).
        image_key: the image field, in the datalist items and in the records.

    Raises:
        DataError: naming the datalist: none of ``keys`` is in it, or they hold no images (missing files,
            repeated cases: see :func:`medssl.data.datalist.load_datalist`).
    """
    datalist = Path(datalist)
    base = Path(dataset_dir) if dataset_dir is not None else datalist.parent
    keys = _key_list(keys)
    present = [k for k in keys if k in load_datalist(datalist, dataset_dir=base, check_files=False).keys()]
    records = []
    if present:
        loaded = load_datalist(datalist, dataset_dir=base, keys=present)  # checks that the files exist
        absent = [k for k in keys if k not in present]
        if absent:
            logger.info(f"{datalist}: no {absent} key(s); using {present}")
        records = [{image_key: str(item[image_key])} for key in present for item in loaded.items(key)]
    if not records:
        raise DataError(datalist, f"no images under keys {keys}")
    return records


def class_names(
    datalist: str | os.PathLike, num_classes: int, dataset_dir: str | os.PathLike | None = None
) -> dict[int, str]:
    """Label index → name for ``0 .. num_classes - 1`` from the datalist's ``labels``.

    A datalist without ``labels`` gets ``{0: "background", 1: "class_1", ...}`` (logged).

    Raises:
        ConfigError: the datalist declares labels whose indices are not exactly ``0 .. num_classes - 1`` (set the
            bundle's ``num_classes`` to match the data).
    """
    declared = load_datalist(datalist, dataset_dir=dataset_dir, check_files=False).labels
    if not declared:
        logger.info(f"{datalist} declares no labels: naming {num_classes} classes by index")
        return {0: "background", **{i: f"class_{i}" for i in range(1, int(num_classes))}}
    indices = sorted(int(k) for k in declared)
    if indices != list(range(int(num_classes))):
        raise ConfigError(
            "num_classes", f"is {num_classes} but {datalist} declares labels {indices}; set num_classes to match"
        )
    return {int(k): str(v) for k, v in sorted(declared.items(), key=lambda kv: int(kv[0]))}
