"""BTCV (Landman et al., MICCAI 2015 Multi-Atlas Labeling Beyond the Cranial Vault): a datalist for the raw folder.

RawData layout (``Training/img/img0001.nii.gz``, ``Training/label/label0001.nii.gz``, optional ``Testing/img``) or
Decathlon-style ``imagesTr``/``labelsTr``/``imagesTs``. Images and labels pair by case number. Splits ``full``
(``dataset_0``: 24 training + 6 validation, as in UNETR, Hatamizadeh et al., WACV 2022), ``init_12`` and
``init_6`` (the same 6 validation volumes). Files are referenced where they are.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from medssl.data.prepare.common import (
    NII_SUFFIXES,
    decathlon_datalist,
    fallback_validation_count,
    reference_split,
    relative_path,
    split_name,
    strip_nii,
    write_json_atomically,
)
from medssl.errors import ConfigError, DataError, ErrorList

__all__ = ["BTCV_LABELS", "BTCV_SPLITS", "prepare_btcv"]

logger = logging.getLogger(__name__)

BTCV_LABELS = {
    "0": "background",
    "1": "spleen",
    "2": "right kidney",
    "3": "left kidney",
    "4": "gallbladder",
    "5": "esophagus",
    "6": "liver",
    "7": "stomach",
    "8": "aorta",
    "9": "inferior vena cava",
    "10": "portal and splenic veins",
    "11": "pancreas",
    "12": "right adrenal gland",
    "13": "left adrenal gland",
}
BTCV_SPLITS = {"full": "dataset_0.json", "init_12": "dataset_0_init_12.json", "init_6": "dataset_0_init_6.json"}


def _case_number(name: str) -> int | None:
    m = re.search(r"(\d+)$", strip_nii(name))
    return int(m.group(1)) if m else None


def _index_cases(folder: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    if not folder.is_dir():
        return found
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.name.endswith(NII_SUFFIXES):
            continue
        num = _case_number(p.name)
        if num is None:
            logger.warning("%s: no case number in the file name; ignored", p)
        elif num in found:
            raise DataError(p, f"case number {num} also used by {found[num].name}")
        else:
            found[num] = p
    return found


def _btcv_layout(root: Path) -> tuple[Path, Path, Path]:
    for base in (root, root / "RawData"):
        for img, lab, ts in (("Training/img", "Training/label", "Testing/img"), ("imagesTr", "labelsTr", "imagesTs")):
            if (base / img).is_dir():
                return base / img, base / lab, base / ts
    raise DataError(
        root, "no BTCV layout found: expected Training/img + Training/label (RawData) or imagesTr + labelsTr"
    )


def _case_numbers(items: list[dict]) -> list[int]:
    return [_case_number(Path(item["image"]).name) for item in items]


def prepare_btcv(root: str | os.PathLike, out: str | os.PathLike, *, split: str | None = None, splits_dir=None) -> Path:
    """Write a BTCV datalist for a RawData or ``imagesTr``/``labelsTr`` folder.

    Args:
        root: the BTCV folder (``RawData`` itself, its parent, or a Decathlon-style folder).
        out: the datalist JSON to write.
        split: ``full`` (default, 24 + 6), ``init_12`` or ``init_6``.
        splits_dir: ``json_splits`` folder (default: :func:`default_splits_dir`).

    Returns:
        ``out``.

    Raises:
        ConfigError: unknown split, or ``init_*`` requested for cases that are not BTCV's.
        DataError / ErrorList: no layout found; every missing image or label file.
    """
    root, out = Path(root), Path(out)
    name = split_name(split, BTCV_SPLITS, "btcv")
    if not root.is_dir():
        raise DataError(root, "dataset root folder not found")
    img_dir, lab_dir, ts_dir = _btcv_layout(root)
    images, labels, tests = _index_cases(img_dir), _index_cases(lab_dir), _index_cases(ts_dir)
    ref = reference_split(splits_dir, "btcv", BTCV_SPLITS[name])
    ref_train, ref_val = _case_numbers(ref["training"]), _case_numbers(ref["validation"])

    if set(images) & set(ref_train + ref_val):
        train_nums, val_nums, source = ref_train, ref_val, f"reference split {BTCV_SPLITS[name]}"
        extra = sorted(set(images) - set(ref_train + ref_val))
        if extra:
            logger.warning("btcv: %d cases not in split %s left out: %s", len(extra), name, extra)
    elif name != "full":
        raise ConfigError("split", f"split {name!r} names BTCV cases {ref_train[:3]}...; none found in {img_dir}")
    else:
        nums = sorted(set(images) | set(labels))
        if len(nums) < 2:
            raise DataError(
                img_dir, f"need at least 2 labeled cases for a training/validation split, found {len(nums)}"
            )
        n_val = fallback_validation_count(len(nums))
        train_nums, val_nums = nums[:-n_val], nums[-n_val:]
        source = "no case matched the reference split; last 20 % of the sorted cases in validation"
        logger.warning("btcv: %s: validation cases %s", source, val_nums)

    missing = []
    for num in train_nums + val_nums:
        if num not in images:
            missing.append(DataError(img_dir / f"img{num:04d}.nii.gz", f"image of case {num} not found"))
        if num not in labels:
            missing.append(DataError(lab_dir / f"label{num:04d}.nii.gz", f"label of case {num} not found"))
    if missing:
        raise ErrorList(missing)

    base = Path(os.path.abspath(out)).parent

    def pair(num):
        return {"image": relative_path(images[num], base), "label": relative_path(labels[num], base)}

    dl = decathlon_datalist(
        "btcv",
        f"BTCV multi-organ CT, split {name}; source: {source}; root {root.resolve()}",
        BTCV_LABELS,
        "CT",
        [pair(n) for n in train_nums],
        [pair(n) for n in val_nums],
        test=[{"image": relative_path(p, base)} for _, p in sorted(tests.items())],
    )
    logger.info("btcv: %d training, %d validation, %d test -> %s", len(train_nums), len(val_nums), len(tests), out)
    return write_json_atomically(dl, out)
