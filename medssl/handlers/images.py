"""Image handlers: PNG and TensorBoard pictures of a run's inputs, views and predictions.

- :func:`image_grid` / :func:`save_image_grid`: axial slices of several volumes tiled in rows.
- :class:`ImageGridSaver` (a PNG of the first batch, e.g. clean / view 1 / view 2) and
  :class:`TensorBoardImageGrid` (every N epochs).
- :func:`save_overlay_png` and :class:`BestOverlaySaver`: the first validation case each time the key metric
  improves, i.e. for the checkpoint saved as ``model.pt``: the image, reference and prediction as coloured label
  maps, and the reference and prediction contours (:func:`label_boundaries`) on the same slice.

All are output handlers (``main_process_only``): under torchrun they are attached on rank 0 only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.atomic import atomic_save_figure
from medssl.dist import resolve_rank
from medssl.handlers.checkpoint import BestTracker

__all__ = [
    "image_grid",
    "save_image_grid",
    "ImageGridSaver",
    "TensorBoardImageGrid",
    "label_boundaries",
    "CONTOUR_COLORS",
    "overlay_slices",
    "save_overlay_png",
    "BestOverlaySaver",
]


def image_grid(rows: Mapping[str, torch.Tensor | np.ndarray], num_slices: int = 4) -> np.ndarray:
    """Tile axial slices: one row per entry, ``num_slices`` evenly spaced slices along the last axis.

    Args:
        rows: name → volume of shape (C, H, W, D) or (H, W, D) (first channel shown); all the same shape.
        num_slices: slices per row.

    Returns:
        a float32 array (rows*H, num_slices*W) in [0, 1], each row scaled by its own min/max.
    """
    if not rows:
        raise ValueError("rows must not be empty")
    tiles = []
    for name, vol in rows.items():
        v = vol.detach().float().cpu().numpy() if torch.is_tensor(vol) else np.asarray(vol, dtype=np.float32)
        if v.ndim == 4:
            v = v[0]
        if v.ndim != 3:
            raise ValueError(f"row {name!r}: expected (C, H, W, D) or (H, W, D), got shape {v.shape}")
        depth = v.shape[-1]
        idx = np.linspace(0, depth - 1, num_slices + 2)[1:-1].round().astype(int) if depth > 1 else [0] * num_slices
        lo, hi = float(v.min()), float(v.max())
        v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
        # rotate so anterior is up for RAS volumes
        tiles.append(np.concatenate([np.rot90(v[..., i]) for i in idx], axis=1))
    if len({t.shape for t in tiles}) != 1:
        raise ValueError(f"rows differ in shape: { {k: tuple(np.shape(v)) for k, v in rows.items()} }")
    return np.concatenate(tiles, axis=0).astype(np.float32)


def save_image_grid(path: str | os.PathLike, rows: Mapping[str, Any], num_slices: int = 4, dpi: int = 100) -> Path:
    """Write :func:`image_grid` as a PNG with the row names on the left; returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid = image_grid(rows, num_slices)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 2.0 * num_slices), max(2.0, 2.0 * n)), dpi=dpi)
    ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0)
    h = grid.shape[0] / n
    ax.set_yticks([h * (i + 0.5) for i in range(n)], list(rows))
    ax.set_xticks([])
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


def _first_item(x: Any) -> Any:
    return x[0] if torch.is_tensor(x) or isinstance(x, (list, tuple, np.ndarray)) else x


class ImageGridSaver:
    """Save a PNG of the first batch item's ``keys`` (e.g. clean / view 1 / view 2) at the first iteration.

    Args:
        path: the PNG.
        keys: batch keys, one row each (row label = ``names`` or the key).
        names: row labels.
        num_slices: axial slices per row.
        source: ``"batch"`` (``engine.state.batch``) or ``"output"`` (``engine.state.output``).
    """

    main_process_only = True  # logs / writes files: attached on rank 0 only (medssl.engines.distributed)

    def __init__(
        self,
        path: str | os.PathLike,
        keys: Sequence[str],
        names: Sequence[str] | None = None,
        num_slices: int = 4,
        source: str = "batch",
        rank: int | None = None,
    ) -> None:
        if source not in ("batch", "output"):
            raise ValueError(f"source must be 'batch' or 'output', got {source!r}")
        self.path = Path(path)
        self.keys = list(keys)
        self.names = list(names) if names is not None else self.keys
        if len(self.names) != len(self.keys):
            raise ValueError(f"{len(self.names)} names for {len(self.keys)} keys")
        self.num_slices = num_slices
        self.source = source
        self.rank = rank
        self._done = False

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        if self._done or resolve_rank(self.rank) != 0:
            return
        data = engine.state.batch if self.source == "batch" else engine.state.output
        if isinstance(data, (list, tuple)):  # decollated
            data = data[0]
            rows = {n: data[k] for n, k in zip(self.names, self.keys)}
        else:
            rows = {n: _first_item(data[k]) for n, k in zip(self.names, self.keys)}
        save_image_grid(self.path, rows, self.num_slices)
        self._done = True


class TensorBoardImageGrid:
    """Log :func:`image_grid` of the first output item's ``keys`` to TensorBoard every ``interval`` epochs.

    Args:
        log_dir: TensorBoard folder (a ``SummaryWriter`` is created there), or pass ``summary_writer``.
        keys: ``engine.state.output`` keys, one row each (e.g. ``gt_image``, ``image``, ``image_2``, ``pred``).
        tag: image tag.
        interval: epochs between images.
    """

    main_process_only = True  # logs / writes files: attached on rank 0 only (medssl.engines.distributed)

    def __init__(
        self,
        log_dir: str | os.PathLike | None = None,
        keys: Sequence[str] = ("gt_image", "image", "image_2", "pred"),
        tag: str = "views",
        interval: int = 1,
        num_slices: int = 4,
        summary_writer: Any = None,
        rank: int | None = None,
    ) -> None:
        if log_dir is None and summary_writer is None:
            raise ValueError("give log_dir or summary_writer")
        self.log_dir = log_dir
        self.writer = summary_writer
        self.keys = list(keys)
        self.tag = tag
        self.interval = int(interval)
        self.num_slices = num_slices
        self.rank = rank

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def __call__(self, engine) -> None:
        if resolve_rank(self.rank) != 0:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir))
        out = engine.state.output
        if isinstance(out, (list, tuple)):
            out = out[0]
            rows = {k: out[k] for k in self.keys if k in out}
        else:
            rows = {k: _first_item(out[k]) for k in self.keys if k in out}
        if rows:
            self.writer.add_image(
                self.tag, image_grid(rows, self.num_slices)[None], engine.state.epoch, dataformats="CHW"
            )
            self.writer.flush()

    def close(self, engine=None) -> None:
        if self.writer is not None and self.log_dir is not None:
            self.writer.close()
            self.writer = None


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)


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


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """The contour pixels of a 2D label map: foreground pixels with a 4-neighbour of another label.

    Pixels on the border of the array count as contour when they are foreground (outside is background), and a
    boundary between two touching labels is a contour of both.

    Args:
        labels: (H, W) integer labels, 0 = background.

    Returns:
        a boolean (H, W) mask.

    Raises:
        ValueError: ``labels`` is not 2D.

    Example::

        >>> square = np.zeros((5, 5), int); square[1:4, 1:4] = 1
        >>> int(label_boundaries(square).sum())  # the 3 x 3 square minus its centre
        8
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"expected a 2D label map, got shape {lab.shape}")
    padded = np.pad(lab, 1, constant_values=0)
    centre = padded[1:-1, 1:-1]
    differs = np.zeros(lab.shape, dtype=bool)
    for neighbour in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        differs |= neighbour != centre
    return (lab != 0) & differs


#: colours of the contour row: reference, prediction, and where both contours run through the same pixel
CONTOUR_COLORS = {"reference": (0.0, 0.9, 0.0), "prediction": (1.0, 0.1, 0.9), "both": (1.0, 0.95, 0.0)}


def _contour_rgba(reference: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """(H, W, 4) overlay of the reference and prediction contours in :data:`CONTOUR_COLORS` (transparent elsewhere)."""
    ref, pred = label_boundaries(reference), label_boundaries(prediction)
    rgba = np.zeros((*ref.shape, 4), dtype=np.float32)
    for mask, name in ((ref & ~pred, "reference"), (pred & ~ref, "prediction"), (ref & pred, "both")):
        rgba[mask] = (*CONTOUR_COLORS[name], 1.0)
    return rgba


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
    """A PNG of rows image / reference / prediction / contours over ``num_slices`` slices.

    The reference and prediction rows show the label maps in one colour per class (legend: class names); the
    contours row shows both outlines on the same slice (:func:`label_boundaries`): reference green, prediction
    magenta, yellow where they coincide.

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
    from matplotlib.lines import Line2D
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

    rows = {"image": None, "reference": ref, "prediction": pred, "contours": None}
    fig, axes = plt.subplots(
        len(rows), len(slices), figsize=(2.2 * len(slices) + 2.5, 2.2 * len(rows)), dpi=dpi, squeeze=False
    )
    for r, (name, labels) in enumerate(rows.items()):
        for c, z in enumerate(slices):
            ax = axes[r][c]
            ax.imshow(np.rot90(img[..., z]), cmap="gray", vmin=0.0, vmax=1.0)  # anterior up for RAS arrays
            if labels is not None:
                lab = np.rot90(labels[..., z])
                ax.imshow(np.ma.masked_where(lab == 0, lab - 1), cmap=cmap, vmin=0, vmax=n_colors - 1, alpha=0.5,
                          interpolation="nearest")  # fmt: skip
            elif name == "contours":
                ax.imshow(_contour_rgba(np.rot90(ref[..., z]), np.rot90(pred[..., z])), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
            if r == 0:
                ax.set_title(f"z={z}", fontsize=8)
    present = sorted((set(np.unique(ref).tolist()) | set(np.unique(pred).tolist())) - {0})
    names = class_names or {}
    handles = [Patch(color=colors[(k - 1) % len(colors)], label=names.get(k, str(k))) for k in present]
    contour_labels = {"reference": "reference contour", "prediction": "prediction contour", "both": "both contours"}
    handles += [Line2D([], [], color=CONTOUR_COLORS[k], linewidth=2, label=v) for k, v in contour_labels.items()]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1))  # 2.3 inches on the right for the legend
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
    :class:`medssl.handlers.CheckpointHandler`), so the PNG shows the model saved as ``model.pt``.

    Args:
        evaluator: the validation engine (decollated output items with ``image_key``, ``label_key``, ``pred_key``).
        path: the PNG.
        key_metric: name in ``evaluator.state.metrics``.
        mode: ``"max"`` (Dice) or ``"min"``.
        class_names: label index → name for the legend.
        num_slices: axial slices shown.
        rank: only rank 0 writes.
    """

    main_process_only = True  # logs / writes files: attached on rank 0 only (medssl.engines.distributed)

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
        self._tracker = BestTracker(key_metric, mode)
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
        if not self._tracker.improves(value, self.best):
            return
        self.best = value
        title = f"{self.key_metric} {value:.4f} at iteration {trainer.state.iteration} (first validation case)"
        save_overlay_png(self.path, *self._case, class_names=self.class_names, num_slices=self.num_slices, title=title)
