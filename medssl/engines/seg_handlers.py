"""Validation handlers of the segmentation bundles: per-class Dice in TensorBoard / CSV / log, best-model overlays.

Both attach to the **trainer** and listen to its evaluator, because validations run every N iterations and are
logged against the trainer's iteration (the evaluator itself only knows the trainer's epoch).

- :class:`PerClassDiceLogger`: the per-class vector of a MONAI ``MeanDice(reduction="mean_batch")`` metric as
  one scalar per class (``val_dice/<class name>``) plus the mean, in TensorBoard, a CSV and one log line; other
  scalar metrics ride along (BTCV: ``val_mean_dice_tutorial``, the MONAI UNETR tutorial's include-background mean,
  beside the foreground mean ``val_mean_dice`` that selects the model).
- :class:`BestOverlaySaver`: a PNG of axial slices of the first validation case (image, reference, prediction
  as coloured overlays) each time the key metric improves, i.e. for the checkpoint saved as ``model.pt``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.atomic import atomic_save_figure
from medssl.engines.handlers import CsvLog

__all__ = ["PerClassDiceLogger", "BestOverlaySaver", "save_overlay_png", "overlay_slices"]

logger = logging.getLogger(__name__)


def _tag(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name.strip()) or "unnamed"


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)


class PerClassDiceLogger:
    """Log a per-class Dice vector of the evaluator after every validation, against the trainer's iteration.

    Args:
        evaluator: the validation engine; its ``state.metrics[metric_name]`` is a vector with one Dice per
            class (``MeanDice(include_background=False, reduction="mean_batch")`` → classes 1..C-1).
        class_names: label index → name (e.g. the datalist's ``labels``).
        metric_name: the per-class metric.
        mean_name: a scalar metric logged alongside (the key metric, e.g. ``val_mean_dice``); skipped if absent.
        extra_names: more scalar metrics of the evaluator logged after the mean (a CSV column, a TensorBoard
            scalar and a log entry each), e.g. ``["val_mean_dice_tutorial"]``: MONAI ``MeanDice(include_background=
            True, reduction="mean")``, the number the MONAI BTCV UNETR tutorial publishes (computed here on the
            bundle's validation inference, i.e. its ``sw_overlap``; the tutorial's is 0.25); skipped if absent.
        include_background: whether the vector starts at class 0.
        log_dir: TensorBoard folder (``None``: no TensorBoard).
        csv_path: CSV with ``iteration, epoch, <mean_name>, <extra_names>..., val_dice/<class>...`` (``None``: no
            CSV).
        append: keep an earlier run's CSV rows (the bundle's ``resume``).
        summary_writer: the run's shared TensorBoard writer (instead of ``log_dir``; not closed here).
        rank: only rank 0 writes.

    Raises:
        ValueError: (at a validation) the vector's length does not match the class names.
    """

    def __init__(
        self,
        evaluator: Any,
        class_names: Mapping[int, str],
        metric_name: str = "val_dice_per_class",
        mean_name: str | None = "val_mean_dice",
        extra_names: Sequence[str] = (),
        include_background: bool = False,
        log_dir: str | os.PathLike | None = None,
        csv_path: str | os.PathLike | None = None,
        append: bool = False,
        rank: int = 0,
        summary_writer: Any = None,
    ) -> None:
        from medssl.engines.utils import as_bool

        self.evaluator = evaluator
        self.class_names = {int(k): str(v) for k, v in class_names.items()}
        self.metric_name = metric_name
        self.mean_name = mean_name
        self.extra_names = [str(n) for n in extra_names]
        self.include_background = as_bool(include_background, "include_background")
        self.log_dir = log_dir
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self._log = CsvLog(csv_path, append, step_column="iteration") if csv_path is not None else None
        self.rank = rank
        # a shared writer (the run's one, see medssl.engines.handlers.RunTensorBoard) is closed by its owner
        self.writer = summary_writer
        self._own_writer = summary_writer is None
        self.history: list[dict[str, float]] = []

    def attach(self, trainer) -> None:
        from ignite.engine import Events

        self.evaluator.add_event_handler(Events.COMPLETED, lambda ev: self.log(trainer, ev))
        trainer.add_event_handler(Events.STARTED, self._on_started)
        trainer.add_event_handler(Events.COMPLETED, self.close)

    def _on_started(self, trainer) -> None:
        # after the checkpoint handler's restore: rows past the resumed iteration would be logged twice
        if self.rank == 0 and self._log is not None:
            self._log.truncate_after("iteration", trainer.state.iteration)

    def per_class(self, evaluator) -> dict[str, float]:
        """``{class name: Dice}`` of the last validation (``nan`` for a class absent from every case)."""
        values = _as_numpy(evaluator.state.metrics[self.metric_name]).reshape(-1)
        first = 0 if self.include_background else 1
        indices = [i for i in sorted(self.class_names) if i >= first]
        if len(values) != len(indices):
            raise ValueError(
                f"{self.metric_name} has {len(values)} values but class_names give {len(indices)} classes "
                f"from index {first}: {[self.class_names[i] for i in indices]}"
            )
        return {self.class_names[i]: float(v) for i, v in zip(indices, values)}

    def log(self, trainer, evaluator) -> None:
        if self.rank != 0:
            return
        dice = self.per_class(evaluator)
        step = int(trainer.state.iteration)
        row: dict[str, float] = {"iteration": step, "epoch": int(trainer.state.epoch)}
        scalars = [self.mean_name] if self.mean_name else []
        scalars += [n for n in self.extra_names if n not in scalars]
        for name in scalars:
            if name in evaluator.state.metrics:
                row[name] = float(evaluator.state.metrics[name])
        row.update({f"val_dice/{_tag(n)}": v for n, v in dice.items()})
        self.history.append(row)
        head = "".join(f"{n} {row[n]:.4f}; " for n in scalars if n in row)
        logger.info(f"validation at iteration {step}: {head}" + ", ".join(f"{n} {v:.4f}" for n, v in dice.items()))
        if self.log_dir is not None or self.writer is not None:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.log_dir))
            for name, value in row.items():
                if name not in ("iteration", "epoch") and math.isfinite(value):
                    self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self._log is not None:
            self._log.append(list(row), list(row.values()))

    def close(self, engine=None) -> None:
        if self.writer is not None and self._own_writer:
            self.writer.close()
            self.writer = None


# ------------------------------------------------------------------------------------------------ overlays


def _label_map(x: Any) -> np.ndarray:
    """(C, H, W, D) one-hot / logits → argmax; (1, H, W, D) or (H, W, D) labels → as integers."""
    v = _as_numpy(x)
    if v.ndim == 4:
        v = v.argmax(0) if v.shape[0] > 1 else v[0]
    if v.ndim != 3:
        raise ValueError(f"expected a (C, H, W, D) or (H, W, D) label volume, got shape {v.shape}")
    return np.rint(v).astype(np.int64)


def overlay_slices(reference: np.ndarray, prediction: np.ndarray, num_slices: int) -> list[int]:
    """Axial (last-axis) slice indices: evenly spaced from the first to the last slice with foreground in either map."""
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    depth = reference.shape[-1]
    present = np.flatnonzero(((reference > 0) | (prediction > 0)).reshape(-1, depth).any(0))
    candidates = present if present.size else np.arange(depth)
    pick = np.unique(np.round(np.linspace(0, candidates.size - 1, min(num_slices, candidates.size))).astype(int))
    return [int(candidates[i]) for i in pick]


def save_overlay_png(
    path: str | os.PathLike,
    image: Any,
    reference: Any,
    prediction: Any,
    class_names: Mapping[int, str] | None = None,
    num_slices: int = 5,
    title: str = "",
    dpi: int = 100,
) -> Path:
    """A PNG of rows image / reference / prediction (labels as coloured overlays) over ``num_slices`` slices.

    Args:
        path: output PNG (written atomically).
        image: (1, H, W, D) or (H, W, D) intensities.
        reference, prediction: label maps, (H, W, D), (1, H, W, D) or one-hot / logits (C, H, W, D).
        class_names: label index → name, for the legend (classes present in either map).
        num_slices: axial slices (columns), chosen by :func:`overlay_slices`.
        title: figure title (e.g. the metric and iteration).

    Raises:
        ValueError: the three volumes differ in spatial shape.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    img = _as_numpy(image)
    img = img[0] if img.ndim == 4 else img
    ref, pred = _label_map(reference), _label_map(prediction)
    if not img.shape == ref.shape == pred.shape:
        raise ValueError(f"shapes differ: image {img.shape}, reference {ref.shape}, prediction {pred.shape}")
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    n_colors = max(int(ref.max()), int(pred.max()), 1)
    colors = plt.get_cmap("tab20")(np.arange(n_colors) % 20)
    cmap = ListedColormap(colors)
    slices = overlay_slices(ref, pred, num_slices)

    rows = {"image": None, "reference": ref, "prediction": pred}
    fig, axes = plt.subplots(
        len(rows), len(slices), figsize=(2.2 * len(slices) + 2.0, 2.2 * len(rows)), dpi=dpi, squeeze=False
    )
    for r, (name, labels) in enumerate(rows.items()):
        for c, z in enumerate(slices):
            ax = axes[r][c]
            ax.imshow(np.rot90(img[..., z]), cmap="gray", vmin=0.0, vmax=1.0)  # anterior up for RAS arrays
            if labels is not None:
                lab = np.rot90(labels[..., z])
                ax.imshow(np.ma.masked_where(lab == 0, lab - 1), cmap=cmap, vmin=0, vmax=n_colors - 1, alpha=0.5,
                          interpolation="nearest")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
            if r == 0:
                ax.set_title(f"z={z}", fontsize=8)
    present = sorted((set(np.unique(ref).tolist()) | set(np.unique(pred).tolist())) - {0})
    if present:
        names = class_names or {}
        handles = [Patch(color=colors[(k - 1) % len(colors)], label=names.get(k, str(k))) for k in present]
        fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.85 if present else 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


class BestOverlaySaver:
    """Write :func:`save_overlay_png` of the first validation case whenever ``key_metric`` improves.

    A validation before the first training step selects nothing (as in
    :class:`medssl.engines.handlers.CheckpointHandler`), so the PNG shows the model saved as ``model.pt``.

    Args:
        evaluator: the validation engine (decollated output items with ``image_key``, ``label_key``, ``pred_key``).
        path: the PNG.
        key_metric: name in ``evaluator.state.metrics``.
        mode: ``"max"`` (Dice) or ``"min"``.
        class_names: label index → name for the legend.
        num_slices: axial slices shown.
        rank: only rank 0 writes.
    """

    def __init__(
        self,
        evaluator: Any,
        path: str | os.PathLike,
        key_metric: str = "val_mean_dice",
        mode: str = "max",
        class_names: Mapping[int, str] | None = None,
        num_slices: int = 5,
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
        rank: int = 0,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.evaluator = evaluator
        self.path = Path(path)
        self.key_metric = key_metric
        self.mode = mode
        self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}
        self.num_slices = int(num_slices)
        self.keys: Sequence[str] = (image_key, label_key, pred_key)
        self.rank = rank
        self.best: float | None = None
        self._case: tuple | None = None

    def attach(self, trainer) -> None:
        from ignite.engine import Events

        self.evaluator.add_event_handler(Events.ITERATION_COMPLETED(once=1), self._keep_first_case)
        self.evaluator.add_event_handler(Events.COMPLETED, lambda ev: self._on_validated(trainer, ev))

    def _keep_first_case(self, evaluator) -> None:
        if self.rank != 0:
            return
        out = evaluator.state.output
        item = out[0] if isinstance(out, (list, tuple)) else {k: out[k][0] for k in self.keys}
        image, label, pred = (item[k] for k in self.keys)
        self._case = (_as_numpy(image), _label_map(label), _label_map(pred))

    def _on_validated(self, trainer, evaluator) -> None:
        value = evaluator.state.metrics.get(self.key_metric)
        if self.rank != 0 or value is None or trainer.state.iteration == 0 or self._case is None:
            return
        value = float(value)
        if not math.isfinite(value):
            return
        if self.best is not None and not (value > self.best if self.mode == "max" else value < self.best):
            return
        self.best = value
        title = f"{self.key_metric} {value:.4f} at iteration {trainer.state.iteration} (first validation case)"
        save_overlay_png(self.path, *self._case, class_names=self.class_names, num_slices=self.num_slices, title=title)
