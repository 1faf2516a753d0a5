"""LA 2018 (Xiong et al., MedIA 2021, 2018 Atrial Segmentation Challenge): NRRD case folders → NIfTI + datalist.

Case folders ``<ID>/lgemri.nrrd`` + ``<ID>/laendo.nrrd`` (0/255). Each case is converted with SimpleITK (geometry
kept exactly) to ``imagesTr/<ID>.nii.gz`` and ``labelsTr/<ID>.nii.gz`` (255 → 1, uint8) beside the output JSON;
folders without ``laendo.nrrd`` become ``imagesUn/<ID>.nii.gz`` under ``unlabeled``. The reference split is UA-MT's
80/20 (Yu et al., MICCAI 2019); UA-MT reports its 20 cases as a test set, here they are the ``validation`` key.
``labeled_8`` / ``labeled_16`` keep the first 8 / 16 training ids of the list labeled and move the others (image
only) to ``unlabeled``. Everything is checked before anything is written, then converted into a temporary folder
and moved into place, so an error leaves no partial output. Protocol ``full`` (default) keeps whole scans;
``uamt`` writes UA-MT's published preprocessing, cropped around each case's own ground truth (optimistic;
:mod:`medssl.data.prepare.la_protocols`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medssl.atomic import atomic_write_text
from medssl.data.datalist import AFFINE_TOLERANCE_MM
from medssl.data.io import read_image_info
from medssl.data.prepare.common import (
    decathlon_datalist,
    fallback_validation_count,
    reference_split,
    split_name,
    write_json_atomically,
)
from medssl.data.prepare.la_protocols import check_protocol, uamt_case
from medssl.errors import ConfigError, DataError, ErrorList

__all__ = ["LA_LABELS", "LA_SPLITS", "PROTOCOL_MARKER", "la_partition", "la_items", "prepare_la2018"]

logger = logging.getLogger(__name__)

LA_LABELS = {"0": "background", "1": "left atrium"}
LA_SPLITS = {"full": None, "labeled_8": 8, "labeled_16": 16}
# which la2018 protocol wrote the volumes of a folder (see _check_protocol_folder)
PROTOCOL_MARKER = ".medssl-la2018-protocol"


def la_partition(train_ids: Sequence[str], labeled: int | None) -> tuple[list[str], list[str]]:
    """(labeled training ids, ids moved to ``unlabeled``): the first ``labeled`` ids of the list stay labeled."""
    train_ids = list(train_ids)
    if labeled is None:
        return train_ids, []
    if labeled > len(train_ids):
        raise ConfigError("split", f"labeled_{labeled} needs at least {labeled} training cases, found {len(train_ids)}")
    return train_ids[:labeled], train_ids[labeled:]


def la_items(train, unlabeled, validation, unlabeled_dir_ids=()) -> tuple[list, list, list]:
    """Items in the layout :func:`prepare_la2018` writes, relative to the JSON's folder."""

    def pair(i):
        return {"image": f"imagesTr/{i}.nii.gz", "label": f"labelsTr/{i}.nii.gz"}

    un = [{"image": f"imagesTr/{i}.nii.gz"} for i in unlabeled]
    un += [{"image": f"imagesUn/{i}.nii.gz"} for i in unlabeled_dir_ids]
    return [pair(i) for i in train], un, [pair(i) for i in validation]


def _la_cases(root: Path) -> dict[str, Path]:
    """Case id -> folder, for folders holding ``lgemri.nrrd`` at depth 1 or 2 (e.g. ``Training Set/<ID>``)."""
    cases: dict[str, Path] = {}
    for image in sorted(list(root.glob("*/lgemri.nrrd")) + list(root.glob("*/*/lgemri.nrrd"))):
        cid = image.parent.name
        if cid in cases:
            raise DataError(image.parent, f"case id {cid} also found at {cases[cid]}")
        cases[cid] = image.parent
    return cases


def _convert_la_case(folder: Path, cid: str, stage: Path, labeled: bool, protocol: str, seed: int) -> dict | None:
    """Write one case into ``stage``; returns the crop record of the ``uamt`` protocol (``None`` for ``full``)."""
    import SimpleITK as sitk

    image_path, label_path = folder / "lgemri.nrrd", folder / "laendo.nrrd"
    try:
        image = sitk.ReadImage(str(image_path))
    except RuntimeError as exc:
        raise DataError(image_path, f"cannot read image: {str(exc).strip().splitlines()[-1]}") from exc
    crop = None
    if labeled:
        try:
            label = sitk.ReadImage(str(label_path))
        except RuntimeError as exc:
            raise DataError(label_path, f"cannot read label: {str(exc).strip().splitlines()[-1]}") from exc
        arr = sitk.GetArrayViewFromImage(label)
        values = np.unique(arr)
        bad = [v.item() for v in values if v not in (0, 255)]
        if bad:
            raise DataError(label_path, f"label values must be 0 or 255, found {bad[:10]}")
        if protocol == "uamt":
            try:
                image, out, crop = uamt_case(image, label, cid, seed)
            except ValueError as exc:
                raise DataError(image_path if "z-score" in str(exc) else label_path, f"protocol uamt: {exc}") from exc
        else:
            out = sitk.GetImageFromArray((arr == 255).astype(np.uint8))
            out.CopyInformation(label)
        sitk.WriteImage(out, str(stage / "labelsTr" / f"{cid}.nii.gz"), useCompression=True)
    sub = "imagesTr" if labeled else "imagesUn"
    sitk.WriteImage(image, str(stage / sub / f"{cid}.nii.gz"), useCompression=True)
    return crop


def _check_protocol_folder(base: Path, protocol: str) -> None:
    """Refuse to mix the volumes of two protocols in one folder (a datalist of one would read the other's).

    Only ``uamt`` leaves a marker file, so the default protocol's output is what it always was; volumes without
    a marker are ``full`` ones."""
    marker = base / PROTOCOL_MARKER
    if marker.is_file():
        found = marker.read_text(encoding="utf-8").strip()
    elif any((base / "imagesTr").glob("*.nii.gz")):
        found = "full"
    else:
        return
    if found != protocol:
        raise ConfigError(
            "protocol",
            f"{base} holds la2018 volumes of protocol {found!r}; write protocol {protocol!r} into another folder",
        )


def prepare_la2018(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | None = None,
    validation_ids: Sequence[str] | None = None,
    splits_dir=None,
    protocol: str | None = None,
    crop_seed: int = 0,
) -> Path:
    """Convert LA 2018 case folders to NIfTI beside ``out`` and write the datalist.

    Split rule: when any labeled case id is in the UA-MT reference split, that split is used (every case it
    names must be present with image and label). Otherwise ``validation_ids`` if given, else the last 20 %
    (at least one) of the sorted labeled ids go to ``validation`` (logged). ``labeled_8``/``labeled_16`` keep
    the first 8/16 training ids (reference list order, or sorted order in the fallback) labeled and list the
    other training images under ``unlabeled``. Folders without ``laendo.nrrd`` are always ``unlabeled``.

    Protocol ``full`` (default) writes every scan whole, as stored. Protocol ``uamt`` writes what UA-MT (Yu et al.,
    MICCAI 2019) trained and tested on (:mod:`medssl.data.prepare.la_protocols`): each labeled volume z-scored over the
    whole scan, as float32, and cropped in-plane to the bounding box of its **own ground-truth** atrium plus random
    margins (slices all kept), with the affine moved so world coordinates are kept. That is optimistic: test inputs
    are cropped with their answer. Folders without ``laendo.nrrd`` cannot be cropped and are left out (logged);
    the datalist records the protocol and every case's crop (``"protocol"``, ``"crops"``).

    Args:
        root: folder of case folders ``<ID>/lgemri.nrrd`` (+ ``laendo.nrrd``), at depth 1 or 2.
        out: the datalist JSON; ``imagesTr``, ``labelsTr``, ``imagesUn`` are written in its folder.
        split: ``full`` (default), ``labeled_8`` or ``labeled_16``.
        validation_ids: validation case ids when the reference split does not apply.
        splits_dir: ``json_splits`` folder (default: :func:`default_splits_dir`).
        protocol: ``full`` (default) or ``uamt`` (optimistic, see above).
        crop_seed: seed of the ``uamt`` margins (each case draws from ``(crop_seed, crc32(case id))``).

    Raises:
        ConfigError: unknown split or protocol, unknown ``validation_ids``, ``validation_ids`` for reference
            cases, or an output folder that holds the volumes of the other protocol.
        ErrorList: every missing file, unreadable header, label value other than 0/255, image/label geometry
            mismatch or (``uamt``) empty label, found before anything is kept on disk.
    """
    root, out = Path(root), Path(out)
    protocol = check_protocol(protocol)
    name = split_name(split, LA_SPLITS, "la2018")
    if not root.is_dir():
        raise DataError(root, "dataset root folder not found")
    cases = _la_cases(root)
    if not cases:
        raise DataError(root, "no case folders with lgemri.nrrd found")
    labeled_ids = sorted(c for c, d in cases.items() if (d / "laendo.nrrd").is_file())
    unlabeled_ids = sorted(c for c in cases if c not in set(labeled_ids))
    ref = reference_split(splits_dir, "la2018", "full.json")
    ref_train = [Path(d["image"]).name[: -len(".nii.gz")] for d in ref["training"]]
    ref_val = [Path(d["image"]).name[: -len(".nii.gz")] for d in ref["validation"]]

    problems: list[DataError] = []
    if set(cases) & set(ref_train + ref_val):
        if validation_ids is not None:
            raise ConfigError("validation_ids", "the case ids match the reference split, which fixes validation")
        train_ids, val_ids, source = ref_train, ref_val, "UA-MT reference split (la2018_train/test.list)"
        for cid in ref_train + ref_val:
            folder = cases.get(cid, root / cid)
            for f in ("lgemri.nrrd", "laendo.nrrd"):
                if not (folder / f).is_file():
                    problems.append(DataError(folder / f, f"file of reference case {cid} not found"))
        extra = sorted(set(labeled_ids) - set(ref_train + ref_val))
        if extra:
            logger.warning("la2018: %d labeled cases not in the reference split left out: %s", len(extra), extra)
        unlabeled_ids = [c for c in unlabeled_ids if c not in set(ref_train + ref_val)]
    else:
        if validation_ids is not None:
            val_ids = list(validation_ids)
            unknown = [v for v in val_ids if v not in labeled_ids]
            if unknown:
                raise ConfigError("validation_ids", f"{unknown} are not labeled case ids under {root}")
            source = f"validation_ids given ({len(val_ids)})"
        else:
            if len(labeled_ids) < 2:
                raise DataError(
                    root, f"need at least 2 labeled cases for training/validation, found {len(labeled_ids)}"
                )
            val_ids = labeled_ids[-fallback_validation_count(len(labeled_ids)) :]
            source = "no case matched the reference split; last 20 % of the sorted labeled ids in validation"
            logger.warning("la2018: %s: %s", source, val_ids)
        train_ids = [c for c in labeled_ids if c not in set(val_ids)]
    labeled_train, moved = la_partition(train_ids, LA_SPLITS[name])
    if problems:
        raise ErrorList(problems)
    if protocol == "uamt" and unlabeled_ids:
        logger.warning(
            "la2018: protocol uamt crops around the label; %d folders without one left out: %s",
            len(unlabeled_ids),
            unlabeled_ids,
        )
        unlabeled_ids = []

    jobs = [(cid, True) for cid in train_ids + val_ids] + [(cid, False) for cid in unlabeled_ids]
    for cid, labeled in jobs:
        try:
            image = read_image_info(cases[cid] / "lgemri.nrrd")
            if labeled:
                label = read_image_info(cases[cid] / "laendo.nrrd")
                diff = float(np.abs(label.affine - image.affine).max())
                if label.shape != image.shape or diff > AFFINE_TOLERANCE_MM:
                    problems.append(
                        DataError(
                            label.path,
                            f"geometry differs from lgemri.nrrd: shape {label.shape} vs {image.shape}, "
                            f"affine differs by up to {diff:.4g} mm",
                        )
                    )
        except DataError as exc:
            problems.append(exc)
    if problems:
        raise ErrorList(problems)

    base = Path(os.path.abspath(out)).parent
    _check_protocol_folder(base, protocol)
    created = [p for p in (base, *base.parents) if not p.exists()]
    base.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".medssl-prepare-", dir=base))
    crops: dict[str, dict] = {}
    try:
        for sub in ("imagesTr", "labelsTr", "imagesUn"):
            (stage / sub).mkdir()
        for cid, labeled in jobs:
            try:
                crop = _convert_la_case(cases[cid], cid, stage, labeled, protocol, crop_seed)
            except DataError as exc:
                problems.append(exc)
            else:
                if crop is not None:
                    crops[cid] = crop
        if problems:
            raise ErrorList(problems)
        for sub in ("imagesTr", "labelsTr", "imagesUn"):
            files = sorted((stage / sub).iterdir())
            if files:
                (base / sub).mkdir(exist_ok=True)
            for f in files:
                os.replace(f, base / sub / f.name)
        if protocol != "full":
            atomic_write_text(base / PROTOCOL_MARKER, protocol + "\n")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:  # deepest first; only the folders this call created, and only if still empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)

    training, unlabeled, validation = la_items(labeled_train, moved, val_ids, unlabeled_ids)
    description = (
        f"2018 Atrial Segmentation Challenge LGE-MRI, split {name} ({len(training)} labeled training, "
        f"{len(unlabeled)} unlabeled, {len(validation)} validation); source: {source}; root {root.resolve()}"
    )
    if protocol == "uamt":
        description += (
            f"; protocol uamt (OPTIMISTIC: every volume, validation included, cropped in-plane around its own "
            f"ground-truth atrium as UA-MT's la_heart_processing.py does, z-scored over the whole scan; margin "
            f"seed {crop_seed})"
        )
    dl = decathlon_datalist("la2018", description, LA_LABELS, "MRI", training, validation, unlabeled=unlabeled)
    if protocol == "uamt":
        dl["protocol"] = protocol
        dl["crops"] = {cid: crops[cid] for cid in sorted(crops)}
    logger.info(
        "la2018: %d training, %d unlabeled, %d validation -> %s", len(training), len(unlabeled), len(validation), out
    )
    return write_json_atomically(dl, out)
