"""``json_splits/``: the reference splits of every dataset, regenerated from the published split files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from medssl.data.prepare.btcv import BTCV_LABELS, BTCV_SPLITS
from medssl.data.prepare.common import decathlon_datalist, write_json_atomically
from medssl.data.prepare.la2018 import LA_LABELS, LA_SPLITS, la_items, la_partition
from medssl.errors import DataError, ErrorList

__all__ = ["write_json_splits"]


def write_json_splits(reference_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Regenerate ``json_splits/`` from the published reference split files.

    Args:
        reference_dir: folder with ``btcv_dataset_0*.json``, ``tcia_covid19_dataset_split.json``,
            ``la2018_train.list`` and ``la2018_test.list``.
        out_dir: the ``json_splits`` folder to write (``btcv/``, ``tcia_covid19/``, ``la2018/``).

    Returns:
        The files written, in a fixed order.

    Raises:
        ErrorList: one :class:`DataError` per missing reference file.
    """
    ref, out = Path(reference_dir), Path(out_dir)
    needed = [f"btcv_{f}" for f in BTCV_SPLITS.values()]
    needed += ["tcia_covid19_dataset_split.json", "la2018_train.list", "la2018_test.list"]
    missing = [DataError(ref / f, "reference split file not found") for f in needed if not (ref / f).is_file()]
    if missing:
        raise ErrorList(missing)
    written = []

    for split, filename in BTCV_SPLITS.items():
        src = json.loads((ref / f"btcv_{filename}").read_text(encoding="utf-8"))
        test = [{"image": t} if isinstance(t, str) else t for t in src.get("test", [])]
        dl = decathlon_datalist(
            "btcv",
            f"BTCV multi-organ CT, split {split} ({Path(filename).stem}: {len(src['training'])} training, "
            f"{len(src['validation'])} validation); source: reference split {ref.name}/btcv_{filename}. "
            "Paths relative to a dataset_dir holding imagesTr/labelsTr/imagesTs.",
            BTCV_LABELS,
            "CT",
            src["training"],
            src["validation"],
            test=test,
        )
        written.append(write_json_atomically(dl, out / "btcv" / filename))

    src = json.loads((ref / "tcia_covid19_dataset_split.json").read_text(encoding="utf-8"))
    dl = decathlon_datalist(
        "tcia_covid19",
        f"TCIA COVID-19 chest CT, unlabeled, for self-supervised pretraining; split full ({len(src['training'])} "
        f"training, {len(src['validation'])} validation); source: reference split "
        f"{ref.name}/tcia_covid19_dataset_split.json. Paths relative to a dataset_dir holding data/.",
        {},
        "CT",
        [{"image": d["image"]} for d in src["training"]],
        [{"image": d["image"]} for d in src["validation"]],
    )
    written.append(write_json_atomically(dl, out / "tcia_covid19" / "dataset_split.json"))

    train_ids = [s.strip() for s in (ref / "la2018_train.list").read_text().splitlines() if s.strip()]
    val_ids = [s.strip() for s in (ref / "la2018_test.list").read_text().splitlines() if s.strip()]
    for split, labeled in LA_SPLITS.items():
        lab, unlab = la_partition(train_ids, labeled)
        training, unlabeled, validation = la_items(lab, unlab, val_ids)
        dl = decathlon_datalist(
            "la2018",
            f"2018 Atrial Segmentation Challenge LGE-MRI, split {split} ({len(training)} labeled training, "
            f"{len(unlabeled)} unlabeled, {len(validation)} validation = the UA-MT test set); source: reference "
            f"split {ref.name}/la2018_train.list + la2018_test.list. Paths in the layout of `medssl prepare la2018`.",
            LA_LABELS,
            "MRI",
            training,
            validation,
            unlabeled=unlabeled,
        )
        written.append(write_json_atomically(dl, out / "la2018" / f"{split}.json"))
    return written
