"""TCIA-COVID19 (unlabeled chest CT used for ViT self-supervised pretraining, Tang et al., CVPR 2022).

A folder (or its ``data/`` subfolder) of ``volume-covid19-*.nii.gz``; split 600 training / 171 validation.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medssl.data.prepare.common import (
    NII_SUFFIXES,
    decathlon_datalist,
    fallback_validation_count,
    reference_split,
    relative_path,
    split_name,
    write_json_atomically,
)
from medssl.errors import DataError, ErrorList

__all__ = ["TCIA_SPLITS", "prepare_tcia"]

logger = logging.getLogger(__name__)

TCIA_SPLITS = {"full": "dataset_split.json"}


def prepare_tcia(root: str | os.PathLike, out: str | os.PathLike, *, split: str | None = None, splits_dir=None) -> Path:
    """Write a TCIA-COVID19 datalist (images only) for a folder of ``volume-covid19-*.nii.gz``.

    Args:
        root: the folder holding the volumes, or its parent when they are in ``root/data``.
        out: the datalist JSON to write.
        split: ``full`` (default; 600 training / 171 validation).
        splits_dir: ``json_splits`` folder (default: :func:`default_splits_dir`).

    Raises:
        ErrorList: every volume named by the reference split that is missing (when any name matches).
    """
    root, out = Path(root), Path(out)
    name = split_name(split, TCIA_SPLITS, "tcia")
    if not root.is_dir():
        raise DataError(root, "dataset root folder not found")
    folder = root / "data" if any((root / "data").glob("volume-covid19-*.nii*")) else root
    found = {p.name: p for p in sorted(folder.glob("volume-covid19-*.nii*")) if p.name.endswith(NII_SUFFIXES)}
    if not found:
        raise DataError(folder, "no volume-covid19-*.nii.gz files found")
    ref = reference_split(splits_dir, "tcia_covid19", TCIA_SPLITS[name])
    ref_train = [Path(d["image"]).name for d in ref["training"]]
    ref_val = [Path(d["image"]).name for d in ref["validation"]]

    if set(found) & set(ref_train + ref_val):
        train, val, source = ref_train, ref_val, "reference split dataset_split.json"
        missing = [
            DataError(folder / n, "volume of the reference split not found") for n in train + val if n not in found
        ]
        if missing:
            raise ErrorList(missing)
        extra = sorted(set(found) - set(ref_train + ref_val))
        if extra:
            logger.warning("tcia: %d volumes not in the reference split left out, e.g. %s", len(extra), extra[:3])
    else:
        names = sorted(found)
        if len(names) < 2:
            raise DataError(folder, f"need at least 2 volumes for a training/validation split, found {len(names)}")
        n_val = fallback_validation_count(len(names))
        train, val = names[:-n_val], names[-n_val:]
        source = "no volume matched the reference split; last 20 % of the sorted names in validation"
        logger.warning("tcia: %s (%d volumes)", source, n_val)

    base = Path(os.path.abspath(out)).parent
    dl = decathlon_datalist(
        "tcia_covid19",
        f"TCIA COVID-19 chest CT, unlabeled, split {name}; source: {source}; root {root.resolve()}",
        {},
        "CT",
        [{"image": relative_path(found[n], base)} for n in train],
        [{"image": relative_path(found[n], base)} for n in val],
    )
    logger.info("tcia: %d training, %d validation -> %s", len(train), len(val), out)
    return write_json_atomically(dl, out)
