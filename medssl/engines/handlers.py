"""Ignite handlers shared by every medssl training bundle: checkpoints with exact resume, image grids, progress.

- :class:`CheckpointHandler` writes ``model.pt`` (best validation metric, self-describing; the final weights when no
  validation ran, ``best.selected_by`` says which) and ``last.pt``
  (plus optimizer, scheduler, scaler, extra modules such as an EMA teacher, RNG states, engine progress), both
  atomically, and with ``resume=True`` restores ``last.pt`` when the trainer starts.
- :class:`MetricHistory` appends every validation result to a CSV.
- :func:`image_grid` / :func:`save_image_grid`, :class:`ImageGridSaver` (PNG once, at the first iteration) and
  :class:`TensorBoardImageGrid` (every N epochs).
- :class:`ProgressBar`: ignite's tqdm bar with chosen output scalars.

Checkpoint keys (``medssl.checkpoint`` format): ``model.pt`` = network, state_dict, preprocessing, labels,
stage, progress, ``best``; ``last.pt`` adds ``optimizer``, ``scheduler``, ``scaler``, one key per extra module
(e.g. ``teacher``), ``rng`` (torch / numpy / python / CUDA) and ``transform_rng`` (MONAI random transforms);
a distributed run adds ``rng_ranks`` (every rank's ``rng`` / ``transform_rng``, so each rank resumes its own
streams). Under torchrun every handler writes on rank 0 only; every rank reads ``last.pt`` on resume.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.atomic import atomic_save_figure, atomic_write_text
from medssl.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from medssl.engines.distributed import get_rank, get_world_size
from medssl.engines.utils import as_bool
from medssl.errors import CheckpointError

__all__ = [
    "CheckpointHandler",
    "engine_precision",
    "CsvLog",
    "MetricHistory",
    "image_grid",
    "save_image_grid",
    "ImageGridSaver",
    "TensorBoardImageGrid",
    "RunTensorBoard",
    "ProgressBar",
    "random_transforms",
    "capture_transform_rng",
    "restore_transform_rng",
]

logger = logging.getLogger(__name__)

_RESERVED = {
    "format",
    "network",
    "state_dict",
    "preprocessing",
    "labels",
    "stage",
    "progress",
    "versions",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "transform_rng",
    "rng_ranks",
    "best",
    "precision",
}


# ------------------------------------------------------------------------------------ transform RNG states


def random_transforms(transform: Any) -> list:
    """Every MONAI ``Randomizable`` inside ``transform`` in a stable (structural) order.

    Looks through ``Compose`` / ``OneOf`` lists and through attributes, because dictionary transforms such as
    ``RandSpatialCropSamplesd`` or ``RandCoarseShuffled`` hold an array transform with a generator of its own.
    """
    from monai.transforms import Randomizable

    found: list = []
    seen: set[int] = set()

    def visit(t: Any, depth: int) -> None:
        if id(t) in seen or depth > 8:
            return
        seen.add(id(t))
        if isinstance(t, Randomizable):
            found.append(t)
        children = getattr(t, "transforms", None)
        if isinstance(children, (list, tuple)):
            for c in children:
                visit(c, depth + 1)
        for value in vars(t).values() if hasattr(t, "__dict__") else ():
            if isinstance(value, Randomizable) or hasattr(value, "transforms"):
                visit(value, depth + 1)

    visit(transform, 0)
    return found


def capture_transform_rng(transform: Any) -> dict[str, Any]:
    """The numpy generator states of every random transform (``weights_only``-safe), for exact resume.

    Transforms may share a generator (and MONAI re-creates some per call), so the states are stored once per
    distinct generator together with which transform owned which one.
    """
    owners, states, index = [], [], {}
    for t in random_transforms(transform):
        if id(t.R) not in index:
            index[id(t.R)] = len(states)
            _, keys, pos, has_gauss, cached = t.R.get_state()
            keys = torch.from_numpy(keys.astype(np.int64))
            states.append({"keys": keys, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)})
        owners.append(index[id(t.R)])
    return {"owners": owners, "states": states}


def restore_transform_rng(transform: Any, saved: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_transform_rng`, including which transforms share a generator.

    Raises:
        CheckpointError: the transform chain has a different number of random transforms than the saved one.
    """
    targets = random_transforms(transform)
    owners = list(saved["owners"])
    if len(targets) != len(owners):
        raise CheckpointError(None, f"saved {len(owners)} random transform states but the chain has {len(targets)}")
    generators = []
    for s in saved["states"]:
        g = np.random.RandomState()
        g.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))
        generators.append(g)
    for t, owner in zip(targets, owners):
        t.R = generators[owner]


# -------------------------------------------------------------------------------------------- checkpoints


def engine_precision(engine) -> dict[str, Any]:
    """``{"precision": record}`` of the precision a medssl trainer ran in (``{}`` for engines without one).

    The record (:func:`medssl.precision.precision_record`) says what was requested, what ran and why, so a
    checkpoint trained under ``auto`` tells which precision its numbers came from.
    """
    from medssl.precision import precision_record

    precision = getattr(engine, "precision", None)
    if precision is None:
        return {}
    return {"precision": precision_record(precision, getattr(engine.state, "device", None) or "cpu")}


def _rank(rank: int | None) -> int:
    """``rank``, or this process's rank in the initialised process group (0 without one) when ``None``."""
    return get_rank() if rank is None else rank


def _state_dict(obj: Any) -> Any:
    module = obj.module if hasattr(obj, "module") and isinstance(obj, torch.nn.Module) else obj  # unwrap DDP
    return module.state_dict()


def _load_state(obj: Any, state: Any) -> None:
    module = obj.module if hasattr(obj, "module") and isinstance(obj, torch.nn.Module) else obj
    module.load_state_dict(state)


class CheckpointHandler:
    """Best and last checkpoints of a trainer, and exact resume from the last one.

    Attach it to the trainer **first** in ``train_handlers`` (so the restore runs before other ``STARTED``
    handlers, such as a validation at start). The epoch-end save is registered when the run starts, i.e. after
    every handler attached in the bundle, so it sees the validation result of the same epoch.

    Args:
        output_dir: folder of ``model.pt`` / ``last.pt``.
        network: the trained network (DDP-wrapped is fine).
        network_config: the plain ``_target_`` dict that rebuilds ``network`` (see
            :func:`medssl.engines.utils.network_config`).
        stage: e.g. ``"ssl_pretrain"``, ``"finetune"``, ``"mean_teacher"``.
        preprocessing: :func:`medssl.transforms.presets.preprocessing_summary` dict.
        labels: label index → name.
        optimizer, scheduler: saved in / restored from ``last.pt``.
        extra_modules: more objects with ``state_dict``/``load_state_dict`` saved in ``last.pt`` under their name
            (e.g. ``{"teacher": ema_model}``).
        evaluator: the validation engine (epoch- or iteration-level ``ValidationHandler``); ``model.pt`` is written
            when its ``key_metric`` improves (``best.selected_by = "best"``). A validation at start selects
            nothing. Without an evaluator, or when no validation ran before the end of the run, ``model.pt`` holds
            the final weights (``best.selected_by = "final"``, logged), written every epoch and at the end.
        key_metric: name in ``evaluator.state.metrics``.
        mode: ``"min"`` (losses) or ``"max"`` (Dice).
        train_transform: the training transform chain whose random states are saved for exact resume.
        resume: restore ``output_dir/last.pt`` at start when it exists (a fresh start otherwise, logged).
        save_interval: write ``last.pt`` every N epochs, and at the end of the run (also one stopped by
            ``max_iterations`` mid-epoch).
        rank: only rank 0 writes; ``None``: this process's rank in the process group (0 without one).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        network: torch.nn.Module,
        network_config: Mapping[str, Any],
        stage: str,
        *,
        preprocessing: Mapping[str, Any] | None = None,
        labels: Mapping[Any, str] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        extra_modules: Mapping[str, Any] | None = None,
        evaluator: Any = None,
        key_metric: str = "val_loss",
        mode: str = "min",
        train_transform: Any = None,
        resume: bool = False,
        save_interval: int = 1,
        rank: int | None = None,
        best_name: str = "model.pt",
        last_name: str = "last.pt",
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if save_interval < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}")
        clash = sorted(set(extra_modules or {}) & _RESERVED)
        if clash:
            raise ValueError(f"extra_modules names {clash} clash with checkpoint keys {sorted(_RESERVED)}")
        self.output_dir = Path(output_dir)
        self.network = network
        self.network_config = dict(network_config)
        self.stage = stage
        self.preprocessing = dict(preprocessing or {})
        self.labels = dict(labels or {})
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.extra_modules = dict(extra_modules or {})
        self.evaluator = evaluator
        self.key_metric = key_metric
        self.mode = mode
        self.train_transform = train_transform
        self.resume = as_bool(resume, "resume")
        self.save_interval = int(save_interval)
        self.rank = None if rank is None else int(rank)
        self.best_path = self.output_dir / best_name
        self.last_path = self.output_dir / last_name
        self.best: dict[str, Any] = {"metric": key_metric, "value": None, "epoch": None}
        self._pending_metric: float | None = None
        self._last_saved_iteration: int | None = None
        self._registered = False
        self._pending_rng: dict[str, Any] | None = None

    # -------------------------------------------------------------------------------------- ignite hooks

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._on_epoch_started)
        engine.add_event_handler(Events.COMPLETED, self._on_completed)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._on_validated)

    def _on_started(self, engine) -> None:
        from ignite.engine import Events

        if self.resume:
            self.restore(engine)
        if not self._registered:
            # registered now, i.e. after every handler attached at build time (validation included), so a
            # validation triggered by the same event has finished when these run
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._consider_best)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
            self._registered = True

    def _on_validated(self, evaluator) -> None:
        if self.key_metric in evaluator.state.metrics:
            self._pending_metric = float(evaluator.state.metrics[self.key_metric])

    def _on_epoch_started(self, engine) -> None:
        # a validation at start measured the weights before this run's training: it selects nothing
        self._pending_metric = None
        # STARTED handlers after the restore (a validation at start creates a DataLoader iterator, which draws
        # from torch's RNG) would shift the random streams; the saved run drew its next epoch from this state
        if self._pending_rng is not None:
            self._restore_rng(self._pending_rng)
            self._pending_rng = None

    def _consider_best(self, engine) -> None:
        value, self._pending_metric = self._pending_metric, None
        if value is not None and self._improves(value):
            self.best = {
                "metric": self.key_metric,
                "value": value,
                "epoch": int(engine.state.epoch),
                "iteration": int(engine.state.iteration),
                "selected_by": "best",
            }
            self.save_best(engine)
            logger.info(f"{self.key_metric} {value:.6f} is the best so far (iteration {engine.state.iteration})")

    def _on_epoch_completed(self, engine) -> None:
        self._consider_best(engine)
        if self.evaluator is None:
            self.save_final(engine)
        if engine.state.epoch % self.save_interval == 0:
            self.save_last(engine)

    def _on_completed(self, engine) -> None:
        if self.best.get("value") is None:
            # no validation selected weights (val_interval beyond the budget, or no evaluator): model.pt must
            # still exist after a successful run, so it holds the final weights and says so
            if self.evaluator is not None:
                logger.warning(
                    f"no validation selected a model in this run (is val_interval larger than the budget?): "
                    f"{self.best_path} holds the final weights (selected_by: final)"
                )
            self.save_final(engine)
        if self._last_saved_iteration != engine.state.iteration:
            self.save_last(engine)

    def _improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        old = self.best["value"]
        return old is None or (value < old if self.mode == "min" else value > old)

    # ---------------------------------------------------------------------------------------------- save

    def _common(self, engine) -> dict[str, Any]:
        return {
            "network": self.network_config,
            "state_dict": _state_dict(self.network),
            "stage": self.stage,
            "preprocessing": self.preprocessing,
            "labels": self.labels,
            "progress": {"epoch": engine.state.epoch, "iteration": engine.state.iteration},
            "best": dict(self.best),
            **engine_precision(engine),
        }

    def save_best(self, engine) -> Path | None:
        if _rank(self.rank) != 0:
            return None
        return save_checkpoint(self.best_path, **self._common(engine))

    def save_final(self, engine) -> Path | None:
        """Write ``model.pt`` with the current weights and ``best.selected_by = "final"`` (rank 0)."""
        self.best = {
            "metric": self.key_metric,
            "value": None,
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "selected_by": "final",
        }
        return self.save_best(engine)

    def _rng_states(self) -> dict[str, Any]:
        state = {"rng": capture_rng_state()}
        if self.train_transform is not None:
            state["transform_rng"] = capture_transform_rng(self.train_transform)
        return state

    def save_last(self, engine) -> Path | None:
        """Write ``last.pt`` (rank 0). In a process group every rank must call it: the ranks' RNG states are
        gathered into ``rng_ranks`` so that each rank resumes its own augmentation stream."""
        self._last_saved_iteration = engine.state.iteration
        own = self._rng_states()
        per_rank = None
        if get_world_size() > 1:
            per_rank = [None] * get_world_size()
            torch.distributed.all_gather_object(per_rank, own)
        if _rank(self.rank) != 0:
            return None
        extra: dict[str, Any] = dict(own)
        if per_rank is not None:
            extra["rng_ranks"] = per_rank
        if self.optimizer is not None:
            extra["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            extra["scheduler"] = self.scheduler.state_dict()
        scaler = getattr(engine, "scaler", None)
        if scaler is not None:
            extra["scaler"] = scaler.state_dict()
        for name, obj in self.extra_modules.items():
            extra[name] = _state_dict(obj)
        return save_checkpoint(self.last_path, **self._common(engine), **extra)

    # ------------------------------------------------------------------------------------------- restore

    def restore(self, engine, path: str | os.PathLike | None = None) -> bool:
        """Load ``last.pt`` into the network, optimizer, scheduler, scaler, extra modules, RNGs and the engine.

        Returns:
            ``False`` (and logs) when there is nothing to resume from.

        Raises:
            CheckpointError: the file is corrupt, was written by another stage, or lacks a state to restore.
        """
        path = Path(path) if path is not None else self.last_path
        if not path.is_file():
            logger.info(f"resume requested but {path} does not exist: starting from scratch")
            return False
        try:
            ckpt = load_checkpoint(path, map_location="cpu")
        except CheckpointError as e:
            fallback = f"; the best weights are in {self.best_path}" if self.best_path.is_file() else ""
            raise CheckpointError(
                path, f"{e.problem}{fallback}; move {path.name} away to start this run from scratch"
            ) from e
        if ckpt["stage"] != self.stage:
            raise CheckpointError(path, f"stage is {ckpt['stage']!r}, this run resumes {self.stage!r}")
        wanted = {"optimizer": self.optimizer, "scheduler": self.scheduler, **self.extra_modules}
        missing = [k for k, v in wanted.items() if v is not None and k not in ckpt]
        if missing:
            raise CheckpointError(path, f"cannot resume: the checkpoint lacks {missing}")
        try:
            _load_state(self.network, ckpt["state_dict"])
            for key, obj in wanted.items():
                if obj is not None:
                    _load_state(obj, ckpt[key]) if isinstance(obj, torch.nn.Module) else obj.load_state_dict(ckpt[key])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(path, f"does not fit this run ({str(e).splitlines()[0][:200]})") from e
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        self._pending_rng = self._saved_rng(ckpt, path)
        self._restore_rng(self._pending_rng)
        self.best = dict(ckpt.get("best") or self.best)
        epoch, iteration = int(ckpt["progress"]["epoch"]), int(ckpt["progress"]["iteration"])
        engine.state.epoch, engine.state.iteration = epoch, iteration
        # a resume that trains nothing (killed after the last save) must not re-save last.pt with a moved RNG
        self._last_saved_iteration = iteration
        if engine.state.max_epochs is not None and epoch >= engine.state.max_epochs:
            logger.info(f"{path} is at epoch {epoch} >= max_epochs {engine.state.max_epochs}: nothing left to train")
        logger.info(f"resumed from {path} at epoch {epoch}, iteration {iteration}")
        return True

    def _saved_rng(self, ckpt: Mapping[str, Any], path: Path) -> dict[str, Any]:
        """This rank's RNG states from the checkpoint (rank 0's when it was written by another world size)."""
        per_rank = ckpt.get("rng_ranks")
        world, rank = get_world_size(), _rank(None)
        if per_rank is not None and len(per_rank) == world:
            return dict(per_rank[rank])
        if world > 1:
            saved = "one process" if per_rank is None else f"{len(per_rank)} ranks"
            logger.warning(
                f"{path} was written by {saved}, this run has {world}: every rank resumes rank 0's random streams"
            )
        return {k: ckpt[k] for k in ("rng", "transform_rng") if k in ckpt}

    def _restore_rng(self, saved: Mapping[str, Any]) -> None:
        restore_rng_state(saved["rng"])
        if self.train_transform is not None and "transform_rng" in saved:
            restore_transform_rng(self.train_transform, saved["transform_rng"])


class CsvLog:
    """Rows appended to a CSV file, header first; a fresh log replaces a file an earlier run left there.

    A resumed run (``append``) first drops the rows the interrupted run wrote after the checkpoint it resumes from
    (:meth:`truncate_after`), so no step is logged twice: handlers that know the trainer call it when the run
    starts; otherwise, with ``step_column``, the first row appended by this process drops every earlier row at
    the same or a later step.

    Args:
        path: the CSV file.
        append: keep an existing file (a resumed run continues its log).
        step_column: column that orders the rows (e.g. ``epoch``), for the first-row rule above.
    """

    def __init__(self, path: str | os.PathLike, append: bool = False, step_column: str | None = None) -> None:
        self.path = Path(path)
        self._fresh = not as_bool(append, "append")
        self.step_column = step_column
        self._first = True

    def truncate_after(self, column: str, value: float) -> int:
        """Drop the rows whose ``column`` is greater than ``value`` (atomically); returns how many were dropped."""
        if self._fresh or not self.path.is_file():
            return 0
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or column not in rows[0]:
            return 0
        col = rows[0].index(column)
        kept = [rows[0]] + [r for r in rows[1:] if not (len(r) > col and r[col] != "" and float(r[col]) > value)]
        dropped = len(rows) - len(kept)
        if dropped:
            buf = io.StringIO()
            csv.writer(buf).writerows(kept)
            atomic_write_text(self.path, buf.getvalue())
            logger.info(f"{self.path.name}: dropped {dropped} row(s) after {column} {value:g}, the resumed point")
        return dropped

    def append(self, header: Sequence[str], values: Sequence[Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._fresh:
            self.path.unlink(missing_ok=True)
            self._fresh = False
        elif self._first and self.step_column in header:
            self.truncate_after(self.step_column, float(values[list(header).index(self.step_column)]) - 1e-9)
        self._first = False
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(list(header))
            writer.writerow(list(values))

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict[str, float]]:
        """The rows as dicts of floats (empty cells left out)."""
        with open(path, newline="") as f:
            return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


class MetricHistory:
    """Append ``epoch,<metric>...`` to a CSV each time the attached evaluator completes (one line per run).

    Args:
        path: the CSV (its folder is created).
        metric_names: metrics of ``engine.state.metrics`` to write.
        append: keep the rows of an earlier run (set it to the bundle's ``resume``); otherwise the first write
            of this process starts the file afresh. A resumed log drops the rows of epochs it logs again.
        rank: only rank 0 writes; ``None``: this process's rank in the process group (0 without one).
    """

    def __init__(
        self, path: str | os.PathLike, metric_names: Sequence[str], append: bool = False, rank: int | None = None
    ) -> None:
        self.path = Path(path)
        self.metric_names = list(metric_names)
        self._log = CsvLog(path, append, step_column="epoch")
        self.rank = rank

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        if _rank(self.rank) != 0:
            return
        values = [engine.state.epoch, *(engine.state.metrics.get(k, "") for k in self.metric_names)]
        self._log.append(["epoch", *self.metric_names], values)

    read = staticmethod(CsvLog.read)


# -------------------------------------------------------------------------------------------- image grids


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
        if self._done or _rank(self.rank) != 0:
            return
        data = engine.state.batch if self.source == "batch" else engine.state.output
        if isinstance(data, (list, tuple)):  # decollated
            data = data[0]
            rows = {n: data[k] for n, k in zip(self.names, self.keys)}
        else:
            rows = {n: _first_item(data[k]) for n, k in zip(self.names, self.keys)}
        save_image_grid(self.path, rows, self.num_slices)
        self._done = True


class RunTensorBoard:
    """The run's one TensorBoard writer, shared by every handler that logs to TensorBoard, closed at the end.

    One writer means one event file per run (per process) instead of one per handler. Handlers take
    ``summary_writer: "$@tensorboard.writer"``; list the object itself in the trainer's handlers so that it
    closes the writer when the run completes, after every other ``COMPLETED`` handler.

    Args:
        log_dir: TensorBoard folder (the run's ``output_dir``).
    """

    def __init__(self, log_dir: str | os.PathLike) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    @property
    def writer(self) -> Any:
        return self._writer

    def attach(self, engine) -> None:
        from ignite.engine import Events

        # registered at run start, i.e. after the COMPLETED handlers attached at build time, which may still log
        engine.add_event_handler(Events.STARTED, lambda e: e.add_event_handler(Events.COMPLETED, self.close))

    def close(self, engine=None) -> None:
        self._writer.close()


class TensorBoardImageGrid:
    """Log :func:`image_grid` of the first output item's ``keys`` to TensorBoard every ``interval`` epochs.

    Args:
        log_dir: TensorBoard folder (a ``SummaryWriter`` is created there), or pass ``summary_writer``.
        keys: ``engine.state.output`` keys, one row each (e.g. ``gt_image``, ``image``, ``image_2``, ``pred``).
        tag: image tag.
        interval: epochs between images.
    """

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
        if _rank(self.rank) != 0:
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


class ProgressBar:
    """ignite's tqdm progress bar on a terminal; plain status lines when the output goes to a file or a pipe.

    A run started by ``medssl study`` (or with its output redirected) writes one line every ``status_interval``
    seconds instead of a bar redrawn per iteration, ``medssl-progress iteration 120/250 loss=0.41``, which the
    study reads to show the running cell's progress (a bar in a log file is megabytes of carriage returns).

    Args:
        output_transform: e.g. :func:`medssl.engines.utils.pick_scalars` of the loss keys.
        persist: keep each epoch's bar on screen.
        rank: only rank 0 shows a bar; ``None``: this process's rank in the process group (0 without one).
        plain: ``True`` status lines, ``False`` the bar, ``None`` (default) the bar only when stderr is a terminal.
        status_interval: seconds between status lines (the last iteration always gets one).
    """

    PREFIX = "medssl-progress"

    def __init__(
        self,
        output_transform: Callable | None = None,
        persist: bool = False,
        rank: int | None = None,
        plain: bool | None = None,
        status_interval: float = 5.0,
    ) -> None:
        self.output_transform = output_transform
        self.persist = persist
        self.rank = rank
        self.plain = plain
        self.status_interval = float(status_interval)
        self._last = -math.inf

    def attach(self, engine) -> None:
        if _rank(self.rank) != 0:
            return
        plain = self.plain if self.plain is not None else not sys.stderr.isatty()
        if plain:
            from ignite.engine import Events

            engine.add_event_handler(Events.ITERATION_COMPLETED, self.status)
            return
        from ignite.handlers import ProgressBar as _IgniteBar

        _IgniteBar(persist=self.persist).attach(engine, output_transform=self.output_transform)

    @staticmethod
    def total_iterations(engine) -> int | None:
        """The run's iteration budget: the trainer's ``max_iterations`` where it has one, else epochs × length."""
        budget = getattr(engine, "max_iterations", None)
        if budget:
            return int(budget)
        epochs, length = engine.state.max_epochs, engine.state.epoch_length
        return int(epochs * length) if epochs and length else None

    def status(self, engine) -> None:
        now = time.monotonic()
        total = self.total_iterations(engine)
        it = int(engine.state.iteration)
        if now - self._last < self.status_interval and (total is None or it < total):
            return
        self._last = now
        scalars = {}
        if self.output_transform is not None and engine.state.output is not None:
            try:
                scalars = dict(self.output_transform(engine.state.output))
            except (KeyError, TypeError, ValueError):
                scalars = {}
        text = " ".join(f"{k}={float(v):.4g}" for k, v in scalars.items())
        print(f"{self.PREFIX} iteration {it}/{total if total else '?'} {text}".rstrip(), flush=True)
