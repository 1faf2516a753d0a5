"""Segmentation metrics per case and class, distances in millimetres: Dice, Jaccard, HD95, ASD.

Conventions (also written into every Markdown summary):

* **Classes.** Every label of the label map except background (0) is scored, per case.
* **Distances** use the image spacing, so they are in mm: HD95 is MONAI's
  :func:`~monai.metrics.compute_hausdorff_distance` with ``percentile=95`` (the larger of the two directed
  95th-percentile surface distances); ASD is :func:`~monai.metrics.compute_average_surface_distance` with
  ``symmetric=True`` (the mean over the surface points of both masks).
* **Empty masks** (MONAI would return inf / nan with a warning, so they never reach it):

  ==========================  =====  =======  ======  =====
  reference / prediction      Dice   Jaccard  HD95    ASD
  ==========================  =====  =======  ======  =====
  both empty                  1      1        0       0
  exactly one empty           0      0        NaN     NaN
  ==========================  =====  =======  ======  =====

  A distance to nothing is undefined: it is written as ``nan`` in the CSV, left out of the means, and the
  number of left-out cases is shown next to each mean.
* **Summaries** are mean ± sample standard deviation over cases per class; the ``overall`` row pools all
  (case, class) rows. This per-organ mean is medssl's primary number (convention ``organs``).
* **Tutorial convention** (``medssl evaluate --convention tutorial``, reported beside the primary number, never
  instead of it): the number the MONAI BTCV UNETR tutorial and its SSL fine-tuning notebook publish,
  ``DiceMetric(include_background=True, reduction="mean")`` over all classes, background included. Per case, a
  class absent from the reference is NaN (MONAI's ``ignore_empty=True``) and skipped, **even when it is
  predicted**; the case's score is the mean over the remaining classes (background counts like an organ); the
  result is the mean over cases. The CSV carries the case score as ``case_dice_tutorial`` on every row of the case.
  Those notebooks validate with ``sliding_window_inference(image, (96, 96, 96), 4, model)``, i.e. MONAI's default
  overlap 0.25 (``medssl infer``'s default too); the segmentation bundles validate with ``sw_overlap`` 0.5.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medssl.atomic import atomic_write_all
from medssl.errors import DataError, ErrorList
from medssl.progress import track

__all__ = [
    "METRICS",
    "COLUMNS",
    "CONVENTIONS",
    "TUTORIAL_COLUMN",
    "evaluate_case",
    "evaluate_folder",
    "summarize",
    "binary_metrics",
    "tutorial_dice",
    "tutorial_case_dice",
    "tutorial_mean",
    "tutorial_running_mean",
]

logger = logging.getLogger(__name__)

METRICS = ("dice", "jaccard", "hd95_mm", "asd_mm")
TUTORIAL_COLUMN = "case_dice_tutorial"
COLUMNS = ("case", "label", "name", *METRICS, "ref_voxels", "pred_voxels", TUTORIAL_COLUMN)
CONVENTIONS = ("organs", "tutorial")
TUTORIAL_OVERLAP = 0.25  # MONAI's sliding_window_inference default, used by the tutorials' validation loops
PREDICTION_SUFFIX = "_seg.nii.gz"
_IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
CONVENTION = (
    "Background (label 0) excluded. HD95 = max of the two directed 95th-percentile surface distances, "
    "ASD = symmetric average surface distance, both in mm from the image spacing (MONAI). "
    "Both masks empty: Dice 1, Jaccard 1, HD95 0, ASD 0; exactly one empty: Dice 0, Jaccard 0, HD95/ASD "
    "undefined (nan in the CSV, excluded from the means; the count is shown as 'excl.'). "
    "Mean ± sample sd over cases; 'overall' pools all case × class rows."
)
TUTORIAL_CONVENTION = (
    "MONAI BTCV UNETR tutorial: DiceMetric(include_background=True, reduction='mean'). Per case, the mean Dice "
    "over the classes present in the reference, background included; a class absent from the reference is "
    "skipped even when predicted (MONAI's ignore_empty). Then the mean over cases. The tutorial's validation uses "
    f"sliding-window overlap {TUTORIAL_OVERLAP} (MONAI's default; `medssl infer --overlap` defaults to it too)."
)


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float | int]:
    """Dice, Jaccard, HD95 (mm), ASD (mm) and voxel counts of one binary prediction against its reference."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    counts = {"ref_voxels": n_ref, "pred_voxels": n_pred}
    if n_pred == 0 and n_ref == 0:
        return {"dice": 1.0, "jaccard": 1.0, "hd95_mm": 0.0, "asd_mm": 0.0, **counts}
    if n_pred == 0 or n_ref == 0:
        return {"dice": 0.0, "jaccard": 0.0, "hd95_mm": math.nan, "asd_mm": math.nan, **counts}
    inter = int(np.logical_and(pred, ref).sum())
    p = torch.from_numpy(pred)[None, None]
    r = torch.from_numpy(ref)[None, None]
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
        warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
        hd95 = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)
        asd = compute_average_surface_distance(p, r, include_background=True, symmetric=True, spacing=spacing)
    return {
        "dice": 2.0 * inter / (n_pred + n_ref),
        "jaccard": inter / (n_pred + n_ref - inter),
        "hd95_mm": float(hd95.item()),
        "asd_mm": float(asd.item()),
        **counts,
    }


def evaluate_case(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: Mapping[int, str]
) -> list[dict[str, Any]]:
    """Score one case: one row per foreground label.

    Args:
        pred: predicted label map, integer values, same shape as ``ref``.
        ref: reference label map.
        spacing: voxel size in mm along each array axis (``len == pred.ndim``).
        labels: ``{label value: name}``; label 0 (background) is skipped.

    Returns:
        rows ``{"label", "name", "dice", "jaccard", "hd95_mm", "asd_mm", "ref_voxels", "pred_voxels"}`` in label
        order; see the module docstring for empty masks.

    Raises:
        ValueError: shapes differ, or the spacing does not fit the array.

    Example::

        rows = evaluate_case(pred, ref, spacing=(0.8, 0.8, 2.5), labels={1: "spleen", 2: "kidney_r"})
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ref.ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing must be {ref.ndim} positive numbers (mm), got {spacing}")
    rows = []
    for label, name in sorted((int(k), str(v)) for k, v in labels.items()):
        if label == 0:
            continue
        rows.append({"label": label, "name": name, **binary_metrics(pred == label, ref == label, spacing)})
    return rows


# ------------------------------------------------------------------------------------------------ tutorial


def tutorial_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class Dice of one case as MONAI's ``DiceMetric(include_background=True)`` computes it (no reduction).

    The MONAI BTCV UNETR tutorial one-hot encodes both label maps into ``num_classes`` channels and scores every
    channel, background included; a class without reference voxels is NaN (``ignore_empty=True``), whether or not
    it was predicted.

    Args:
        pred: predicted label map, integer values in ``[0, num_classes)``, same shape as ``ref``.
        ref: reference label map.
        num_classes: number of classes including background (BTCV: 14).

    Returns:
        float64 array of shape ``(num_classes,)``: Dice of class ``c`` at index ``c``, NaN where ``ref`` has none.

    Raises:
        ValueError: shapes differ, ``num_classes < 1``, or a label value lies outside ``[0, num_classes)``.

    Example::

        tutorial_dice(pred, ref, num_classes=14)  # array([0.98, 0.91, nan, ...])
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for what, arr in (("prediction", pred), ("reference", ref)):
        if arr.size and (arr.min() < 0 or arr.max() >= int(num_classes)):  # min/max: no sort of a large volume
            outside = sorted({int(v) for v in np.unique(arr)} - set(range(int(num_classes))))
            raise ValueError(f"{what} label values {outside} lie outside [0, {int(num_classes)})")
    out = np.full(int(num_classes), math.nan)
    for c in range(int(num_classes)):
        r = ref == c
        n_ref = int(r.sum())
        if n_ref:
            p = pred == c
            out[c] = 2.0 * int(np.logical_and(p, r).sum()) / (n_ref + int(p.sum()))
    return out


def tutorial_case_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> float:
    """One case's score in the tutorial convention: the mean of :func:`tutorial_dice` over its non-NaN classes.

    This is the per-case step of MONAI's ``reduction="mean"`` (channel mean over not-NaN values); NaN when the
    reference holds no class at all (an empty array).
    """
    values = tutorial_dice(pred, ref, num_classes)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def tutorial_mean(case_dice: Sequence[float]) -> float:
    """The tutorial's ``dice_metric.aggregate()`` over all cases: the mean of the per-case scores (NaN ones skipped).

    Args:
        case_dice: :func:`tutorial_case_dice` of each validation case.

    Returns:
        the mean; 0.0 when no case has a score (MONAI's value for an all-NaN buffer).
    """
    values = [float(v) for v in case_dice if not math.isnan(float(v))]
    return float(np.mean(values)) if values else 0.0


def tutorial_running_mean(case_dice: Sequence[float]) -> float:
    """The SSL fine-tuning notebook's number: the mean, over cases in order, of ``aggregate()`` after each case.

    ``self_supervised_pretraining/vit_unetr_ssl/ssl_finetune.ipynb`` (the source of the published BTCV numbers)
    calls ``dice_metric.aggregate()`` after every validation case without resetting and averages those running
    values, so early cases weigh more: case ``i`` of ``n`` gets weight ``(1/n) * sum_{k>=i} 1/k``.
    """
    running, valid = [], []
    for v in case_dice:
        if not math.isnan(float(v)):
            valid.append(float(v))
        running.append(float(np.mean(valid)) if valid else 0.0)
    return float(np.mean(running)) if running else 0.0


# ------------------------------------------------------------------------------------------------ reading


def _case_name(path: str | os.PathLike) -> str:
    name = Path(path).name
    for ext in _IMAGE_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _prediction_name(case: str) -> str:
    # a reference folder may already use the prediction naming; do not double the suffix
    return f"{case}.nii.gz" if case.endswith("_seg") else f"{case}{PREDICTION_SUFFIX}"


# how a prediction may be named after its case: medssl's ``medssl infer`` output, or nnU-Net's (same as the reference)
NAMINGS = {"medssl": "<name>_seg.nii.gz", "nnU-Net": "<name>.nii.gz"}


def _match_predictions(pred_dir: Path, cases: Sequence[tuple[str, Path]]) -> tuple[dict[str, Path], list[str]]:
    """Each case's prediction file and the namings matched; every missing or ambiguous case is one error.

    Raises:
        ErrorList: cases without a prediction (both names looked for) or with one under both names.
    """
    matched: dict[str, Path] = {}
    used: list[str] = []
    problems: list[DataError] = []
    for name, _ in cases:
        candidates = {"medssl": _prediction_name(name), "nnU-Net": f"{name}.nii.gz"}
        found = {k: pred_dir / v for k, v in candidates.items() if (pred_dir / v).is_file()}
        if len(set(found.values())) > 1:
            a, b = found["medssl"].name, found["nnU-Net"].name
            problems.append(DataError(pred_dir, f"case '{name}' has two predictions, {a} and {b}: keep one"))
        elif not found:
            looked = " or ".join(dict.fromkeys(candidates.values()))
            problems.append(DataError(pred_dir / candidates["medssl"], f"prediction for case '{name}' is missing "
                                      f"(looked for {looked})"))  # fmt: skip
        else:
            kind = next(iter(found))
            matched[name] = found[kind]
            if kind not in used:
                used.append(kind)
    if problems:
        raise ErrorList(problems)
    return matched, used


def _reference_cases(
    ref: str | os.PathLike, dataset_dir: str | os.PathLike | None, key: str
) -> tuple[list[tuple[str, Path]], dict[int, str] | None]:
    """``([(case name, reference label path)], labels from the datalist or None)``."""
    ref = Path(ref)
    if ref.is_dir():
        files = sorted(p for p in ref.iterdir() if p.is_file() and p.name.lower().endswith(_IMAGE_EXTENSIONS))
        if not files:
            raise DataError(ref, f"reference folder holds no label maps ({', '.join(_IMAGE_EXTENSIONS)})")
        cases, labels = [(_case_name(p), p) for p in files], None
    elif ref.is_file():
        try:
            data = json.loads(ref.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(ref, f"cannot read the datalist as JSON ({e})") from e
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise DataError(ref, f"datalist has no '{key}' list of cases (found: {found})")
        base = Path(dataset_dir) if dataset_dir is not None else ref.parent
        cases = []
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
                raise DataError(ref, f"{key}[{i}] has no 'label' path: {entry!r:.120}")
            image = entry.get("image", entry["label"])
            image = image[0] if isinstance(image, list) and image else image
            cases.append((_case_name(str(image)), base / entry["label"]))
        if not cases:
            raise DataError(ref, f"datalist '{key}' list is empty")
        labels = None
        if isinstance(data.get("labels"), dict):
            try:
                labels = {int(k): str(v) for k, v in data["labels"].items()}
            except ValueError as e:
                raise DataError(ref, f"datalist 'labels' keys must be integers, got {sorted(data['labels'])}") from e
    else:
        raise DataError(ref, "reference is neither a datalist JSON file nor a folder")
    names = [c for c, _ in cases]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(ref, f"case names are not unique (image file names without extension): {dup[:10]}")
    return cases, labels


def _read_label(path: Path) -> tuple[np.ndarray, dict[str, tuple]]:
    import SimpleITK as sitk

    if not path.is_file():
        raise DataError(path, "label map does not exist")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(path, f"cannot read image ({str(e).strip().splitlines()[-1][:200]})") from e
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            path, f"expected a single-channel label map, got {img.GetNumberOfComponentsPerPixel()} channels"
        )
    arr = sitk.GetArrayFromImage(img)  # axes reversed: (z, y, x)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DataError(path, f"label map has non-integer values (dtype {arr.dtype})")
        arr = arr.astype(np.int64)
    geometry = {
        "size": tuple(img.GetSize()),
        "spacing": tuple(img.GetSpacing()),
        "origin": tuple(img.GetOrigin()),
        "direction": tuple(img.GetDirection()),
    }
    return arr, geometry


def _check_geometry(pred_path: Path, ref_path: Path, pg: dict[str, tuple], rg: dict[str, tuple]) -> None:
    tolerances = {"spacing": 1e-4, "origin": 1e-3, "direction": 1e-4}
    bad = []
    if pg["size"] != rg["size"]:
        bad.append(f"size {pg['size']} vs {rg['size']}")
    for what, atol in tolerances.items():
        if len(pg[what]) != len(rg[what]) or not np.allclose(pg[what], rg[what], rtol=1e-5, atol=atol):
            fmt = lambda v: tuple(round(float(x), 4) for x in v)  # noqa: E731
            bad.append(f"{what} {fmt(pg[what])} vs {fmt(rg[what])}")
    if bad:
        raise DataError(pred_path, f"geometry differs from the reference {ref_path}: " + "; ".join(bad))


# ------------------------------------------------------------------------------------------------ summary


def _fmt(values: list[float], digits: int) -> str:
    finite = [v for v in values if not math.isnan(v)]
    excluded = len(values) - len(finite)
    if not finite:
        text = "n/a"
    elif len(finite) == 1:
        text = f"{finite[0]:.{digits}f}"
    else:
        text = f"{np.mean(finite):.{digits}f} ± {np.std(finite, ddof=1):.{digits}f}"
    return text + (f" ({excluded} excl.)" if excluded else "")


def _tutorial_section(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: each case's tutorial-convention score, their mean and the SSL notebook's running mean."""
    per_case: dict[str, float] = {}
    for row in rows:
        if "case" not in row or TUTORIAL_COLUMN not in row:
            raise ValueError(
                f"the tutorial convention needs 'case' and '{TUTORIAL_COLUMN}' in every row, got {sorted(row)}"
            )
        per_case.setdefault(str(row["case"]), float(row[TUTORIAL_COLUMN]))
    lines = [
        "## Tutorial convention (beside the primary per-organ numbers above)",
        "",
        f"Convention (tutorial): {TUTORIAL_CONVENTION}",
        "",
        "| case | Dice, all classes incl. background |",
        "|---|---|",
    ]
    lines += [f"| {case} | {value:.3f} |" for case, value in per_case.items()]
    lines.append(f"| mean | {tutorial_mean(list(per_case.values())):.3f} |")
    lines += [
        "",
        "As `ssl_finetune.ipynb` (the source of the published BTCV numbers) averages it, the mean of the running "
        f"aggregates over the cases in this order: {tutorial_running_mean(list(per_case.values())):.3f}.",
    ]
    return "\n".join(lines) + "\n"


def summarize(
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str = "Segmentation metrics",
    header: str = "",
    convention: str = "organs",
) -> str:
    """Markdown table: mean ± sd per class and overall (see :data:`CONVENTION`).

    Args:
        rows: per case × foreground class rows (:func:`evaluate_case`, plus ``case`` and ``case_dice_tutorial``
            for the tutorial convention).
        title: the heading.
        header: a paragraph under the heading.
        convention: ``"organs"`` (the per-organ table) or ``"tutorial"`` (the same table, then the tutorial
            convention's per-case scores and mean beside it; see the module docstring).

    Raises:
        ValueError: an unknown convention, or tutorial rows without ``case`` / ``case_dice_tutorial``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    by_label: dict[int, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(int(row["label"]), []).append(row)
    digits = {"dice": 3, "jaccard": 3, "hd95_mm": 2, "asd_mm": 2}
    lines = [f"# {title}", ""]
    if header:
        lines += [header, ""]
    lines += [
        f"Convention (organs, the primary number): {CONVENTION}",
        "",
        "| label | name | cases | Dice | Jaccard | HD95 (mm) | ASD (mm) |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = [(str(k), str(v[0]["name"]), v) for k, v in sorted(by_label.items())]
    groups.append(("overall", "", list(rows)))
    for label, name, group in groups:
        cells = [_fmt([float(r[m]) for r in group], digits[m]) for m in METRICS]
        lines.append(f"| {label} | {name} | {len(group)} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if convention == "tutorial":
        text += "\n" + _tutorial_section(rows)
    return text


def _bytes_writer(text: str):
    data = text.encode("utf-8")
    return lambda f: f.write(data)


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.6f}" if isinstance(row[k], float) else row[k]) for k in COLUMNS})
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ folder


def evaluate_folder(
    pred: str | os.PathLike,
    ref: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dataset_dir: str | os.PathLike | None = None,
    key: str = "validation",
    convention: str = "organs",
) -> str:
    """Score a folder of predictions against a datalist or a folder of references (``medssl evaluate``).

    Args:
        pred: folder of predictions named ``<name>_seg.nii.gz`` (medssl's) or ``<name>.nii.gz`` (nnU-Net's, the
            reference's own name); the summary says which naming matched.
        ref: a Decathlon datalist JSON (cases under ``key``; ``<name>`` is the image file name without
            extension; its optional top-level ``labels`` map names the classes) or a folder of reference label
            maps ``<name>.nii.gz`` (any ITK-readable format).
        out: CSV to write, one row per case × foreground class; the Markdown summary goes beside it (``.md``).
        dataset_dir: base of the datalist's relative paths (default: the datalist's folder).
        key: datalist key listing the reference cases.
        convention: ``"organs"`` (the per-organ summary, medssl's primary number) or ``"tutorial"`` (the same,
            with the MONAI BTCV tutorial's include-background mean beside it). The CSV is the same for both: every
            row carries its case's tutorial score (``case_dice_tutorial``).

    Returns:
        the Markdown summary.

    Raises:
        ValueError: an unknown convention.
        DataError: unreadable inputs, a prediction whose size / spacing / origin / direction differs from its
            reference (naming both files), label values outside the datalist's ``labels``, negative label values.
        ErrorList: predictions missing or present under both names (all of them listed). Nothing is written when
            anything fails.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    pred_dir, out = Path(pred), Path(out)
    if not pred_dir.is_dir():
        raise DataError(pred_dir, "prediction folder does not exist")
    cases, labels = _reference_cases(ref, dataset_dir, key)
    matched, namings = _match_predictions(pred_dir, cases)
    logger.info("predictions matched by %s naming", " and ".join(f"{k} ({NAMINGS[k]})" for k in namings))
    expected = {p.name for p in matched.values()}
    extra = sorted(p.name for p in pred_dir.glob(f"*{PREDICTION_SUFFIX}") if p.name not in expected)
    if extra:
        logger.info("%d predictions in %s have no reference and are not scored: %s", len(extra), pred_dir, extra[:5])

    per_case: list[tuple[str, list[dict[str, Any]], float]] = []
    seen_labels: set[int] = set()
    for name, ref_path in track(cases, "evaluate", unit="case", describe=lambda case: case[0]):
        pred_path = matched[name]
        p, pg = _read_label(pred_path)
        r, rg = _read_label(ref_path)
        _check_geometry(pred_path, ref_path, pg, rg)
        values = {int(v) for v in np.unique(p)} | {int(v) for v in np.unique(r)}
        if labels is not None:
            for path, arr in ((pred_path, p), (ref_path, r)):
                unknown = sorted({int(v) for v in np.unique(arr)} - set(labels))
                if unknown:
                    raise DataError(path, f"label values {unknown} are not in the datalist's labels {sorted(labels)}")
            case_labels = labels
        else:
            case_labels = {v: f"label_{v}" for v in values}
            seen_labels |= values
        if min(values) < 0:
            raise DataError(pred_path if int(p.min()) < 0 else ref_path, f"negative label values {sorted(values)[:5]}")
        spacing = rg["spacing"][::-1]  # the array axes are reversed relative to ITK's (x, y, z)
        # the tutorial convention skips classes the reference lacks, so any class count covering the values fits
        tutorial = tutorial_case_dice(p, r, max(values | set(case_labels)) + 1)
        per_case.append((name, [{"case": name, **row} for row in evaluate_case(p, r, spacing, case_labels)], tutorial))

    rows: list[dict[str, Any]] = []
    for name, case_rows, tutorial in per_case:
        if labels is None:  # a label absent from both masks of this case: scored by the both-empty rule
            present = {row["label"] for row in case_rows}
            for v in sorted(seen_labels - present - {0}):
                empty = np.zeros((1, 1, 1), dtype=bool)
                case_rows.append(
                    {"case": name, "label": v, "name": f"label_{v}", **binary_metrics(empty, empty, (1, 1, 1))}
                )
            case_rows.sort(key=lambda row: row["label"])
        rows += [{**row, TUTORIAL_COLUMN: tutorial} for row in case_rows]
    if not rows:
        raise DataError(ref, "no foreground labels to score (every label map is background only and no labels given)")

    md_path = out.with_suffix(".md")
    header = (
        f"Predictions: `{pred_dir}`; references: `{ref}`"
        + (f" (key `{key}`)" if Path(ref).is_file() else "")
        + f"; {len(cases)} cases; per-case rows: `{out.name}`; predictions matched by "
        + " and ".join(f"{k} naming (`{NAMINGS[k]}`)" for k in namings)
        + "."
    )
    markdown = summarize(rows, header=header, convention=convention)
    # both or neither, through medssl.atomic: temporary files cleaned up, results readable under the umask
    atomic_write_all({out: _bytes_writer(_csv_text(rows)), md_path: _bytes_writer(markdown)})
    logger.info("wrote %s (%d rows) and %s", out, len(rows), md_path)
    return markdown
