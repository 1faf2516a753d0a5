"""What every preparer shares: reference splits, the Decathlon datalist layout, paths and atomic JSON writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medssl import resources
from medssl.atomic import atomic_write_text
from medssl.errors import ConfigError, DataError

__all__ = [
    "VALIDATION_FRACTION",
    "NII_SUFFIXES",
    "default_splits_dir",
    "reference_split",
    "split_name",
    "relative_path",
    "strip_nii",
    "fallback_validation_count",
    "write_json_atomically",
    "decathlon_datalist",
]

VALIDATION_FRACTION = 0.2
NII_SUFFIXES = (".nii.gz", ".nii")


def default_splits_dir() -> Path:
    """``json_splits/`` of the medssl home (see :mod:`medssl.resources`)."""
    return resources.splits_dir()


def reference_split(splits_dir, dataset: str, filename: str) -> dict[str, Any]:
    """The reference split ``<splits_dir>/<dataset>/<filename>`` as loaded JSON.

    Raises:
        DataError: the file is not there.
    """
    path = Path(splits_dir if splits_dir is not None else default_splits_dir()) / dataset / filename
    if not path.is_file():
        raise DataError(path, "reference split not found (is medssl installed from a source checkout?)")
    return json.loads(path.read_text(encoding="utf-8"))


def split_name(split: str | None, known: dict, dataset: str) -> str:
    """``split`` checked against the ``known`` splits of ``dataset`` (``None`` or empty: ``full``).

    Raises:
        ConfigError: an unknown split, naming the known ones.
    """
    name = "full" if split in (None, "") else split
    if name not in known:
        raise ConfigError("split", f"unknown {dataset} split {split!r}; choose one of {sorted(known)}")
    return name


def relative_path(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when it lies inside it, else absolute (POSIX separators)."""
    # abspath, not resolve(): a symlinked case file must keep its own name
    path, base = Path(os.path.abspath(path)), Path(os.path.abspath(base))
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def strip_nii(name: str) -> str:
    """A file name without its ``.nii.gz`` / ``.nii`` suffix."""
    for suffix in NII_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def fallback_validation_count(n: int) -> int:
    """Validation cases of ``n`` when no reference split applies: 20 %, at least one."""
    return max(1, int(round(VALIDATION_FRACTION * n)))


def write_json_atomically(obj: dict, path: Path) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically; returns ``path``."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def decathlon_datalist(
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
