"""Load and validate Decathlon-format datalists.

A datalist is a JSON file with item lists under ``training``, ``validation``, ``unlabeled`` and ``test``, each
item a dict with an ``image`` path and, for labeled items, a ``label`` path (``test`` items may also be bare
path strings, as in the Medical Segmentation Decathlon), plus a ``labels`` dict ``{"0": "background", ...}``.
Relative paths resolve against ``dataset_dir``, which defaults to the datalist's own folder.

:func:`load_datalist` is what bundles and engines call to get absolute file lists for a key;
:func:`check_datalist` (behind ``medssl check``) additionally opens every file and checks that it is a 3D
volume with positive spacing and finite voxels, that image and label agree in shape and affine, and that
label values are integers within the declared labels. It collects every problem before raising.

Example::

    dl = load_datalist("json_splits/la2018/labeled_8.json", dataset_dir="/data/la2018")
    train_files = dl.items("training")  # [{"image": "/data/la2018/imagesTr/....nii.gz", "label": ...}, ...]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data.io import ImageInfo, read_image_data, read_image_info
from medssl.errors import DataError, ErrorList, MedsslError
from medssl.progress import Progress

__all__ = ["DATALIST_KEYS", "PATH_FIELDS", "AFFINE_TOLERANCE_MM", "Datalist", "load_datalist", "check_datalist"]

DATALIST_KEYS = ("training", "validation", "unlabeled", "test")
PATH_FIELDS = ("image", "label")
AFFINE_TOLERANCE_MM = 1e-3
LABELED_KEYS = ("training", "validation")


@dataclass(frozen=True)
class Datalist:
    """A loaded datalist with absolute paths.

    Attributes:
        path: the datalist JSON.
        dataset_dir: the folder relative paths were resolved against.
        data: ``key -> list of items``; every ``image``/``label`` value is an absolute path string.
        labels: declared label index → name (empty when the datalist declares none).
        meta: the remaining top-level fields (``name``, ``modality``, ``description``, ...).
    """

    path: Path
    dataset_dir: Path
    data: dict[str, list[dict[str, Any]]]
    labels: dict[int, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def keys(self) -> tuple[str, ...]:
        """The item keys present, in :data:`DATALIST_KEYS` order."""
        return tuple(self.data)

    def items(self, key: str) -> list[dict[str, Any]]:
        """A copy of the items under ``key`` (absolute paths), ready for MONAI dictionary transforms.

        Raises:
            DataError: ``key`` is not in the datalist (names the datalist and the keys it has).
        """
        if key not in self.data:
            raise DataError(self.path, f"no {key!r} key; the datalist has {list(self.data)}")
        return [dict(item) for item in self.data[key]]


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, str):
        # normpath, not resolve(): a symlinked file must keep its own name (outputs are named after inputs)
        return os.path.normpath(base / Path(value).expanduser())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [_resolve(v, base) for v in value]
    return value


def _parse(path: Path, dataset_dir, keys) -> tuple[Datalist, list[MedsslError]]:
    """Parse and resolve; fatal problems raise, per-item problems are returned."""
    if not path.is_file():
        raise DataError(path, "datalist not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"datalist is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise DataError(
            path, f"datalist must be a JSON object with keys {list(DATALIST_KEYS)}, got {type(raw).__name__}"
        )
    present = [k for k in DATALIST_KEYS if k in raw]
    if keys is None:
        if not present:
            raise DataError(path, f"datalist has none of the keys {list(DATALIST_KEYS)} (found {sorted(raw)})")
        keys = present
    else:
        keys = [keys] if isinstance(keys, str) else list(keys)
        missing = [k for k in keys if k not in raw]
        if missing:
            raise DataError(path, f"datalist has no key {missing} (present: {present})")
    base = Path(os.path.abspath(Path(dataset_dir).expanduser() if dataset_dir is not None else path.parent))
    if not base.is_dir():
        raise DataError(base, "dataset_dir is not a folder")

    problems: list[MedsslError] = []
    data: dict[str, list[dict[str, Any]]] = {}
    for key in keys:
        entries = raw[key]
        if not isinstance(entries, list):
            problems.append(DataError(path, f"{key!r} must be a list of items, got {type(entries).__name__}"))
            continue
        items = []
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"image": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), (str, list)):
                problems.append(DataError(path, f"{key}[{i}] has no 'image' path: {entry!r}"))
                continue
            items.append({k: _resolve(v, base) if k in PATH_FIELDS else v for k, v in entry.items()})
        data[key] = items

    labels: dict[int, str] = {}
    raw_labels = raw.get("labels") or {}
    if not isinstance(raw_labels, dict):
        problems.append(DataError(path, f"'labels' must be an object index -> name, got {raw_labels!r}"))
    else:
        for k, v in raw_labels.items():
            try:
                labels[int(k)] = str(v)
            except ValueError:
                problems.append(DataError(path, f"label index {k!r} in 'labels' is not an integer"))
    meta = {k: v for k, v in raw.items() if k not in DATALIST_KEYS and k != "labels"}
    problems += _repeated_cases(path, raw, base)
    return Datalist(path, base, data, dict(sorted(labels.items())), meta), problems


def _repeated_cases(path: Path, raw: dict[str, Any], base: Path) -> list[MedsslError]:
    """A case listed twice under one key, and an image both under ``training`` and ``validation`` (leakage).

    Checked on every key of the file, not only the keys a caller loads: a bundle that reads only ``training``
    must still refuse a datalist whose validation images leak into it.
    """
    first: dict[str, dict[tuple[str, ...], int]] = {}
    problems: list[MedsslError] = []
    for key in DATALIST_KEYS:
        entries = raw.get(key)
        if not isinstance(entries, list):
            continue
        seen = first.setdefault(key, {})
        for i, entry in enumerate(entries):
            image = entry if isinstance(entry, str) else entry.get("image") if isinstance(entry, dict) else None
            if not isinstance(image, (str, list)) or not all(
                isinstance(v, str) for v in _paths({"image": image}, "image")
            ):
                continue  # reported by the item checks
            case = tuple(_resolve(v, base) for v in _paths({"image": image}, "image"))
            if case in seen:
                problems.append(
                    DataError(path, f"{key}[{i}] repeats {key}[{seen[case]}]: image {_shown(case, base)} listed twice")
                )
            else:
                seen[case] = i
    training, validation = first.get("training", {}), first.get("validation", {})
    for case, j in validation.items():
        if case in training:
            problems.append(
                DataError(
                    path,
                    f"validation[{j}] and training[{training[case]}] share image {_shown(case, base)} "
                    "(leakage: a validation case must not be trained on)",
                )
            )
    return problems


def _shown(case: tuple[str, ...], base: Path) -> str:
    return ", ".join(os.path.relpath(p, base) for p in case)


def _paths(item: dict[str, Any], fieldname: str) -> list[str]:
    value = item.get(fieldname)
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def load_datalist(
    path: str | os.PathLike,
    *,
    dataset_dir: str | os.PathLike | None = None,
    keys: str | list[str] | None = None,
    check_files: bool = True,
) -> Datalist:
    """Load a Decathlon-format datalist and resolve its paths.

    Args:
        path: the datalist JSON.
        dataset_dir: base of relative paths (default: the datalist's folder).
        keys: keys to load; each must be present. Default: every key of :data:`DATALIST_KEYS` present.
        check_files: check that every ``image``/``label`` file exists (cheap; contents are not opened).

    Returns:
        A :class:`Datalist`; ``dl.items("training")`` gives absolute-path dicts.

    Raises:
        DataError: the datalist is missing, not JSON, or lacks the requested keys.
        ErrorList: malformed items or (with ``check_files``) missing files, all of them, one per line.
    """
    path = Path(path)
    dl, problems = _parse(path, dataset_dir, keys)
    if check_files:
        seen: set[str] = set()
        for key, items in dl.data.items():
            for item in items:
                for fieldname in PATH_FIELDS:
                    for p in _paths(item, fieldname):
                        if p not in seen and not Path(p).is_file():
                            problems.append(DataError(p, f"file not found (datalist {path.name}, key {key!r})"))
                        seen.add(p)
    if problems:
        raise ErrorList(problems)
    return dl


def _label_values(path: str, data: np.ndarray) -> np.ndarray:
    """Distinct label values; raises when they are not integers."""
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise DataError(path, "label map holds NaN or infinite values")
        if not np.array_equal(data, np.round(data)):
            frac = data[data != np.round(data)]
            raise DataError(path, f"label values must be integers, found non-integer values e.g. {frac[:3].tolist()}")
        data = data.astype(np.int64)
    elif data.dtype.kind not in "iub":
        raise DataError(path, f"label map has unsupported voxel type {data.dtype}")
    lo, hi = int(data.min()), int(data.max())
    if lo >= 0 and hi < 2**16:
        # bincount is a single pass; np.unique would sort the whole volume.
        return np.flatnonzero(np.bincount(data.ravel().astype(np.int64, copy=False), minlength=hi + 1))
    return np.unique(data)


def _fmt_values(values) -> str:
    values = [int(v) for v in values]
    return str(values) if len(values) <= 20 else f"{values[:20]} ... ({len(values)} values)"


def check_datalist(
    path: str | os.PathLike,
    *,
    dataset_dir: str | os.PathLike | None = None,
    keys: str | list[str] | None = None,
) -> str:
    """Validate a datalist and every file it lists (the function behind ``medssl check``).

    Checks, per file: exists, non-empty, parses (nibabel for NIfTI, SimpleITK for NRRD/MetaImage; a ``.gz``
    that is not gzip or whose stream is corrupt or truncated is reported as such), is 3D (a trailing
    singleton 4th dimension is accepted), spacing > 0, voxels finite. Per item with a label: image and label
    have the same shape and affines equal within :data:`AFFINE_TOLERANCE_MM`; label values are integers
    (a float label map holding integers is accepted) and, when the datalist declares ``labels``, each value
    found is a declared index (negative or undeclared values are named).

    Args:
        path: the datalist JSON.
        dataset_dir: base of relative paths (default: the datalist's folder).
        keys: keys to check (default: every key present).

    Returns:
        A short report: items per key, label values found, spacing range.

    Raises:
        DataError: the datalist itself is missing, not JSON, or lacks the requested keys.
        ErrorList: one :class:`DataError` per problem found in the files.
    """
    path = Path(path)
    dl, problems = _parse(path, dataset_dir, keys)
    declared = set(dl.labels)
    infos: dict[str, ImageInfo | None] = {}
    checked_data: set[str] = set()
    failed: set[str] = set()  # files with a problem: no derived pair checks (one line per defect)
    empty: set[str] = set()  # label maps of labeled keys without foreground
    found_labels: set[int] = set()

    def info_of(p: str) -> ImageInfo | None:
        if p not in infos:
            try:
                infos[p] = read_image_info(p)
            except DataError as exc:
                infos[p] = None
                problems.append(exc)
        return infos[p]

    def check_image_data(p: str) -> None:
        if p in checked_data or info_of(p) is None:
            return
        checked_data.add(p)
        try:
            data = read_image_data(p)
            if data.dtype.kind == "f" and not np.isfinite(data).all():
                raise DataError(p, f"{int(np.size(data) - np.isfinite(data).sum())} voxels are NaN or infinite")
        except DataError as exc:
            failed.add(p)
            problems.append(exc)

    def check_label_data(p: str, key: str) -> None:
        if p in checked_data or info_of(p) is None:
            return
        checked_data.add(p)
        try:
            values = _label_values(p, read_image_data(p))
        except DataError as exc:
            failed.add(p)
            problems.append(exc)
            return
        if key in LABELED_KEYS and not (values > 0).any():
            empty.add(p)  # reported once the pair's geometry is known to be right (one line per defect)
        found_labels.update(int(v) for v in values)
        negative = [v for v in values if v < 0]
        if negative:
            problems.append(DataError(p, f"negative label values {_fmt_values(negative)}"))
        if declared:
            undeclared = [v for v in values if v >= 0 and int(v) not in declared]
            if undeclared:
                problems.append(
                    DataError(
                        p,
                        f"label values {_fmt_values(undeclared)} are not declared in the datalist "
                        f"(declared {min(declared)}..{max(declared)})",
                    )
                )

    counts: dict[str, tuple[int, int]] = {}
    progress = Progress(sum(len(items) for items in dl.data.values()), "check", unit="item")
    for key, items in dl.data.items():
        n_labeled = n_items = 0
        for item in items:
            note = f"{key}[{n_items}]"
            try:
                images, labels = _paths(item, "image"), _paths(item, "label")
                n_labeled += bool(labels)
                if key in LABELED_KEYS and not labels:
                    problems.append(DataError(path, f"{key}[{n_items}] has no 'label' ({key!r} items must be labeled)"))
                n_items += 1
                for p in images + labels:
                    rel = os.path.relpath(p, dl.dataset_dir)
                    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
                        problems.append(DataError(path, f"{key}: {p} lies outside dataset_dir {dl.dataset_dir}"))
                for p in images:
                    check_image_data(p)
                for p in labels:
                    check_label_data(p, key)
                if not images or not labels or info_of(images[0]) is None or images[0] in failed:
                    continue
                ref = infos[images[0]]
                for p in labels:
                    lab = infos.get(p)
                    if lab is None:
                        continue
                    if lab.shape != ref.shape:
                        problems.append(DataError(p, f"shape {lab.shape} differs from image {ref.path.name} {ref.shape}"))
                        continue
                    diff = float(np.abs(lab.affine - ref.affine).max())
                    if diff > AFFINE_TOLERANCE_MM:
                        problems.append(
                            DataError(
                                p,
                                f"affine differs from image {ref.path.name} by up to {diff:.4g} mm "
                                f"(tolerance {AFFINE_TOLERANCE_MM} mm): label origin "
                                f"{np.round(lab.affine[:3, 3], 3).tolist()} spacing {np.round(lab.spacing, 4).tolist()}"
                                f" vs image origin {np.round(ref.affine[:3, 3], 3).tolist()} "
                                f"spacing {np.round(ref.spacing, 4).tolist()}",
                            )
                        )
                    elif p in empty:
                        problems.append(DataError(p, f"label map of a {key!r} item has no foreground (all voxels are 0)"))
            finally:  # a `continue` above still counts the item
                progress.advance(note)
        counts[key] = (len(items), n_labeled)
    progress.close()

    if problems:
        raise ErrorList(problems)

    spacings = np.array([i.spacing for i in infos.values() if i is not None]).reshape(-1, 3)
    lines = [f"{path}: OK ({len(infos)} files checked; dataset_dir {dl.dataset_dir})"]
    for key, (n, n_labeled) in counts.items():
        lines.append(f"  {key}: {n} items ({n_labeled} with label)")
    if declared:
        lines.append(f"  labels declared: {len(declared)} ({min(declared)}..{max(declared)})")
    else:
        lines.append("  labels declared: none (label values checked for integers only)")
    if found_labels:
        lines.append(f"  label values found: {_fmt_values(sorted(found_labels))}")
    if len(spacings):
        lo, hi = spacings.min(0), spacings.max(0)
        rng = ", ".join(f"{a}: {lo[i]:.3g}-{hi[i]:.3g}" for i, a in enumerate("xyz"))
        lines.append(f"  spacing (mm): {rng}")
    return "\n".join(lines)
