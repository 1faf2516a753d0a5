"""Turn the raw folders of BTCV, TCIA-COVID19 and LA 2018 into Decathlon-format datalists (``medssl prepare``).

Reference splits live in ``json_splits/`` (generated from the published split files by
:func:`write_json_splits`). A preparer applies a reference split when the case names in the raw folder match it:
every file the split names must then exist (all missing files are reported in one :class:`ErrorList`), and
cases outside the split are left out with a warning. When no name matches (a different or synthetic dataset),
the fallback is logged: cases sorted by name, the last 20 % (at least one) go to ``validation``.

* **BTCV** (Landman et al., MICCAI 2015 Multi-Atlas Labeling Beyond the Cranial Vault): RawData layout
  (``Training/img/img0001.nii.gz``, ``Training/label/label0001.nii.gz``, optional ``Testing/img``) or
  Decathlon-style ``imagesTr``/``labelsTr``/``imagesTs``. Images and labels pair by case number. Splits
  ``full`` (``dataset_0``: 24 training + 6 validation, as in UNETR, Hatamizadeh et al., WACV 2022),
  ``init_12`` and ``init_6`` (the same 6 validation volumes). Files are referenced where they are.
* **TCIA-COVID19** (unlabeled chest CT used for ViT self-supervised pretraining, Tang et al., CVPR 2022):
  a folder (or its ``data/`` subfolder) of ``volume-covid19-*.nii.gz``; split 600 training / 171 validation.
* **LA 2018** (Xiong et al., MedIA 2021, 2018 Atrial Segmentation Challenge): case folders
  ``<ID>/lgemri.nrrd`` + ``<ID>/laendo.nrrd`` (0/255). Each case is converted with SimpleITK (geometry kept
  exactly) to ``imagesTr/<ID>.nii.gz`` and ``labelsTr/<ID>.nii.gz`` (255 → 1, uint8) beside the output JSON;
  folders without ``laendo.nrrd`` become ``imagesUn/<ID>.nii.gz`` under ``unlabeled``. The reference split
  is UA-MT's 80/20 (Yu et al., MICCAI 2019); UA-MT reports its 20 cases as a test set, here they are the
  ``validation`` key. ``labeled_8`` / ``labeled_16`` keep the first 8 / 16 training ids of the list labeled
  and move the others (image only) to ``unlabeled``. Everything is checked before anything is written, then
  converted into a temporary folder and moved into place, so an error leaves no partial output.
  Protocol ``full`` (default) keeps whole scans; ``uamt`` writes UA-MT's published preprocessing, cropped around
  each case's own ground truth (optimistic; :mod:`medssl.data.la_protocols`).

Output paths are relative to the JSON's folder when the file lies inside it, else absolute.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medssl import resources
from medssl.atomic import atomic_write_text
from medssl.data.datalist import AFFINE_TOLERANCE_MM
from medssl.data.io import read_image_info
from medssl.data.la_protocols import check_protocol, uamt_case
from medssl.errors import ConfigError, DataError, ErrorList

__all__ = [
    "BTCV_LABELS",
    "LA_LABELS",
    "default_splits_dir",
    "prepare_dataset",
    "prepare_btcv",
    "prepare_tcia",
    "prepare_la2018",
    "write_json_splits",
]

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
LA_LABELS = {"0": "background", "1": "left atrium"}
VALIDATION_FRACTION = 0.2

_BTCV_SPLITS = {"full": "dataset_0.json", "init_12": "dataset_0_init_12.json", "init_6": "dataset_0_init_6.json"}
_TCIA_SPLITS = {"full": "dataset_split.json"}
_LA_SPLITS = {"full": None, "labeled_8": 8, "labeled_16": 16}
_NII = (".nii.gz", ".nii")
# which la2018 protocol wrote the volumes of a folder (see _check_protocol_folder)
PROTOCOL_MARKER = ".medssl-la2018-protocol"


# ------------------------------------------------------------------------------------------------ helpers


def default_splits_dir() -> Path:
    """``json_splits/`` of the medssl home (see :mod:`medssl.resources`)."""
    return resources.splits_dir()


def _reference(splits_dir, dataset: str, filename: str) -> dict[str, Any]:
    path = Path(splits_dir if splits_dir is not None else default_splits_dir()) / dataset / filename
    if not path.is_file():
        raise DataError(path, "reference split not found (is medssl installed from a source checkout?)")
    return json.loads(path.read_text(encoding="utf-8"))


def _split_name(split: str | None, known: dict, dataset: str) -> str:
    name = "full" if split in (None, "") else split
    if name not in known:
        raise ConfigError("split", f"unknown {dataset} split {split!r}; choose one of {sorted(known)}")
    return name


def _relpath(path: Path, base: Path) -> str:
    # abspath, not resolve(): a symlinked case file must keep its own name
    path, base = Path(os.path.abspath(path)), Path(os.path.abspath(base))
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _strip_nii(name: str) -> str:
    for suffix in _NII:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _fallback_validation_count(n: int) -> int:
    return max(1, int(round(VALIDATION_FRACTION * n)))


def _atomic_write_json(obj: dict, path: Path) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _decathlon(
    name: str,
    description: str,
    labels: dict[str, str],
    modality: str,
    training: list[dict],
    validation: list[dict],
    unlabeled: list[dict] | None = None,
    test: list[dict] | None = None,
) -> dict[str, Any]:
    """A Decathlon-format datalist; ``unlabeled``/``test`` are written only when non-empty."""
    out: dict[str, Any] = {
        "name": name,
        "description": description,
        "modality": {"0": modality},
        "tensorImageSize": "3D",
        "labels": dict(labels),
        "numTraining": len(training),
    }
    if test:
        out["numTest"] = len(test)
    out["training"] = training
    out["validation"] = validation
    if unlabeled:
        out["unlabeled"] = unlabeled
    if test:
        out["test"] = test
    return out


def _la_partition(train_ids: Sequence[str], labeled: int | None) -> tuple[list[str], list[str]]:
    """(labeled training ids, ids moved to ``unlabeled``): the first ``labeled`` ids of the list stay labeled."""
    train_ids = list(train_ids)
    if labeled is None:
        return train_ids, []
    if labeled > len(train_ids):
        raise ConfigError("split", f"labeled_{labeled} needs at least {labeled} training cases, found {len(train_ids)}")
    return train_ids[:labeled], train_ids[labeled:]


def _la_items(train, unlabeled, validation, unlabeled_dir_ids=()) -> tuple[list, list, list]:
    """Items in the layout :func:`prepare_la2018` writes, relative to the JSON's folder."""

    def pair(i):
        return {"image": f"imagesTr/{i}.nii.gz", "label": f"labelsTr/{i}.nii.gz"}

    un = [{"image": f"imagesTr/{i}.nii.gz"} for i in unlabeled]
    un += [{"image": f"imagesUn/{i}.nii.gz"} for i in unlabeled_dir_ids]
    return [pair(i) for i in train], un, [pair(i) for i in validation]


# ------------------------------------------------------------------------------------------- json_splits


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
    needed = [f"btcv_{f}" for f in _BTCV_SPLITS.values()]
    needed += ["tcia_covid19_dataset_split.json", "la2018_train.list", "la2018_test.list"]
    missing = [DataError(ref / f, "reference split file not found") for f in needed if not (ref / f).is_file()]
    if missing:
        raise ErrorList(missing)
    written = []

    for split, filename in _BTCV_SPLITS.items():
        src = json.loads((ref / f"btcv_{filename}").read_text(encoding="utf-8"))
        test = [{"image": t} if isinstance(t, str) else t for t in src.get("test", [])]
        dl = _decathlon(
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
        written.append(_atomic_write_json(dl, out / "btcv" / filename))

    src = json.loads((ref / "tcia_covid19_dataset_split.json").read_text(encoding="utf-8"))
    dl = _decathlon(
        "tcia_covid19",
        f"TCIA COVID-19 chest CT, unlabeled, for self-supervised pretraining; split full ({len(src['training'])} "
        f"training, {len(src['validation'])} validation); source: reference split "
        f"{ref.name}/tcia_covid19_dataset_split.json. Paths relative to a dataset_dir holding data/.",
        {},
        "CT",
        [{"image": d["image"]} for d in src["training"]],
        [{"image": d["image"]} for d in src["validation"]],
    )
    written.append(_atomic_write_json(dl, out / "tcia_covid19" / "dataset_split.json"))

    train_ids = [s.strip() for s in (ref / "la2018_train.list").read_text().splitlines() if s.strip()]
    val_ids = [s.strip() for s in (ref / "la2018_test.list").read_text().splitlines() if s.strip()]
    for split, labeled in _LA_SPLITS.items():
        lab, unlab = _la_partition(train_ids, labeled)
        training, unlabeled, validation = _la_items(lab, unlab, val_ids)
        dl = _decathlon(
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
        written.append(_atomic_write_json(dl, out / "la2018" / f"{split}.json"))
    return written


# -------------------------------------------------------------------------------------------------- BTCV


def _case_number(name: str) -> int | None:
    m = re.search(r"(\d+)$", _strip_nii(name))
    return int(m.group(1)) if m else None


def _index_cases(folder: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    if not folder.is_dir():
        return found
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.name.endswith(_NII):
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
    name = _split_name(split, _BTCV_SPLITS, "btcv")
    if not root.is_dir():
        raise DataError(root, "dataset root folder not found")
    img_dir, lab_dir, ts_dir = _btcv_layout(root)
    images, labels, tests = _index_cases(img_dir), _index_cases(lab_dir), _index_cases(ts_dir)
    ref = _reference(splits_dir, "btcv", _BTCV_SPLITS[name])
    ref_train, ref_val = _case_numbers(ref["training"]), _case_numbers(ref["validation"])

    if set(images) & set(ref_train + ref_val):
        train_nums, val_nums, source = ref_train, ref_val, f"reference split {_BTCV_SPLITS[name]}"
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
        n_val = _fallback_validation_count(len(nums))
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
        return {"image": _relpath(images[num], base), "label": _relpath(labels[num], base)}

    dl = _decathlon(
        "btcv",
        f"BTCV multi-organ CT, split {name}; source: {source}; root {root.resolve()}",
        BTCV_LABELS,
        "CT",
        [pair(n) for n in train_nums],
        [pair(n) for n in val_nums],
        test=[{"image": _relpath(p, base)} for _, p in sorted(tests.items())],
    )
    logger.info("btcv: %d training, %d validation, %d test -> %s", len(train_nums), len(val_nums), len(tests), out)
    return _atomic_write_json(dl, out)


# -------------------------------------------------------------------------------------------------- TCIA


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
    name = _split_name(split, _TCIA_SPLITS, "tcia")
    if not root.is_dir():
        raise DataError(root, "dataset root folder not found")
    folder = root / "data" if any((root / "data").glob("volume-covid19-*.nii*")) else root
    found = {p.name: p for p in sorted(folder.glob("volume-covid19-*.nii*")) if p.name.endswith(_NII)}
    if not found:
        raise DataError(folder, "no volume-covid19-*.nii.gz files found")
    ref = _reference(splits_dir, "tcia_covid19", _TCIA_SPLITS[name])
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
        n_val = _fallback_validation_count(len(names))
        train, val = names[:-n_val], names[-n_val:]
        source = "no volume matched the reference split; last 20 % of the sorted names in validation"
        logger.warning("tcia: %s (%d volumes)", source, n_val)

    base = Path(os.path.abspath(out)).parent
    dl = _decathlon(
        "tcia_covid19",
        f"TCIA COVID-19 chest CT, unlabeled, split {name}; source: {source}; root {root.resolve()}",
        {},
        "CT",
        [{"image": _relpath(found[n], base)} for n in train],
        [{"image": _relpath(found[n], base)} for n in val],
    )
    logger.info("tcia: %d training, %d validation -> %s", len(train), len(val), out)
    return _atomic_write_json(dl, out)


# ----------------------------------------------------------------------------------------------- LA 2018


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
    MICCAI 2019) trained and tested on (:mod:`medssl.data.la_protocols`): each labeled volume z-scored over the
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
    name = _split_name(split, _LA_SPLITS, "la2018")
    if not root.is_dir():
        raise DataError(root, "dataset root folder not found")
    cases = _la_cases(root)
    if not cases:
        raise DataError(root, "no case folders with lgemri.nrrd found")
    labeled_ids = sorted(c for c, d in cases.items() if (d / "laendo.nrrd").is_file())
    unlabeled_ids = sorted(c for c in cases if c not in set(labeled_ids))
    ref = _reference(splits_dir, "la2018", "full.json")
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
            val_ids = labeled_ids[-_fallback_validation_count(len(labeled_ids)) :]
            source = "no case matched the reference split; last 20 % of the sorted labeled ids in validation"
            logger.warning("la2018: %s: %s", source, val_ids)
        train_ids = [c for c in labeled_ids if c not in set(val_ids)]
    labeled_train, moved = _la_partition(train_ids, _LA_SPLITS[name])
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

    training, unlabeled, validation = _la_items(labeled_train, moved, val_ids, unlabeled_ids)
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
    dl = _decathlon("la2018", description, LA_LABELS, "MRI", training, validation, unlabeled=unlabeled)
    if protocol == "uamt":
        dl["protocol"] = protocol
        dl["crops"] = {cid: crops[cid] for cid in sorted(crops)}
    logger.info(
        "la2018: %d training, %d unlabeled, %d validation -> %s", len(training), len(unlabeled), len(validation), out
    )
    return _atomic_write_json(dl, out)


# -------------------------------------------------------------------------------------------------- entry


_PREPARERS = {"btcv": prepare_btcv, "tcia": prepare_tcia, "la2018": prepare_la2018}


def prepare_dataset(
    name: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | None = None,
    protocol: str | None = None,
    crop_seed: int = 0,
) -> Path:
    """Dispatch to :func:`prepare_btcv`, :func:`prepare_tcia` or :func:`prepare_la2018` (``medssl prepare``).

    ``protocol`` (``full`` by default) and ``crop_seed`` apply to ``la2018`` only, which also has ``uamt``.

    Raises:
        ConfigError: an unknown dataset or protocol, or a protocol other than ``full`` for BTCV / TCIA.

    Example::

        prepare_dataset("btcv", "/data/RawData", "data/btcv.json", split="init_6")
        prepare_dataset("la2018", "/data/2018LA/Training Set", "data/la_uamt/datalist.json", protocol="uamt")
    """
    if name not in _PREPARERS:
        raise ConfigError("dataset", f"unknown dataset {name!r}; choose one of {sorted(_PREPARERS)}")
    if name == "la2018":
        return prepare_la2018(root, out, split=split, protocol=protocol, crop_seed=crop_seed)
    if protocol not in (None, "", "full"):
        raise ConfigError("protocol", f"{name} has only the 'full' protocol, got {protocol!r}")
    return _PREPARERS[name](root, out, split=split)
