"""Metric logging handlers: validation results as CSV rows, TensorBoard scalars and log lines.

- :class:`CsvLog`: rows appended to a CSV; a resumed run drops the rows logged after the point it resumes from.
- :class:`MetricHistory`: ``epoch,<metric>...`` of an evaluator after every validation.
- :class:`ValidationLog`: several evaluators' metrics (``<metric>/<name>``) against the trainer's iteration
  (MONAI's stats handlers use the evaluator's epoch, which repeats with iteration-level validation).
- :class:`PerClassDiceLogger`: the per-class vector of a MONAI ``MeanDice(reduction="mean_batch")`` metric as one
  scalar per class (``val_dice/<class name>``) plus the mean and other scalars, in TensorBoard, a CSV and one log
  line (BTCV: ``val_mean_dice_tutorial``, the MONAI UNETR tutorial's include-background mean, beside the
  foreground mean ``val_mean_dice`` that selects the model).
- :class:`RunTensorBoard`: the run's one TensorBoard writer, shared by the handlers above.

The validation loggers attach to the **trainer** and listen to its evaluators, because validations run every N
iterations and are logged against the trainer's iteration. All are output handlers (``main_process_only``):
under torchrun they are attached on rank 0 only.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.atomic import atomic_write_text
from medssl.config import as_bool
from medssl.dist import resolve_rank

__all__ = ["CsvLog", "MetricHistory", "IterationLog", "ValidationLog", "PerClassDiceLogger", "RunTensorBoard"]

logger = logging.getLogger(__name__)


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

    main_process_only = True  # logs / writes files: attached on rank 0 only (medssl.engines.distributed)

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
        if resolve_rank(self.rank) != 0:
            return
        values = [engine.state.epoch, *(engine.state.metrics.get(k, "") for k in self.metric_names)]
        self._log.append(["epoch", *self.metric_names], values)

    read = staticmethod(CsvLog.read)


class IterationLog:
    """What the validation loggers share: results against the trainer's iteration, in a CSV and TensorBoard.

    The CSV (``iteration`` ordered) drops the rows past the resumed iteration when the run starts (attach
    :meth:`_on_started` to the trainer's ``STARTED`` after the checkpoint handler's restore); TensorBoard scalars go
    to the run's shared writer (``summary_writer``, closed by its owner) or to one opened in ``log_dir`` at the first
    write (closed by :meth:`close`). Subclasses decide what a row holds.

    Args:
        log_dir: TensorBoard folder (``None``: no TensorBoard unless ``summary_writer``).
        csv_path: CSV file (``None``: no CSV).
        append: keep an earlier run's rows (pass the bundle's ``resume``); otherwise the file starts afresh.
        rank: only rank 0 writes.
        summary_writer: the run's shared TensorBoard writer (:class:`RunTensorBoard`).
    """

    main_process_only = True  # logs / writes files: attached on rank 0 only (medssl.engines.distributed)

    def __init__(
        self,
        log_dir: str | os.PathLike | None = None,
        csv_path: str | os.PathLike | None = None,
        append: bool = False,
        rank: int = 0,
        summary_writer: Any = None,
    ) -> None:
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.csv_path = None if csv_path is None else Path(csv_path)
        self._log = None if csv_path is None else CsvLog(csv_path, append, step_column="iteration")
        self.rank = int(rank)
        self._writer = summary_writer
        self._own_writer = summary_writer is None

    def _on_started(self, trainer) -> None:
        # after the checkpoint handler's restore: rows past the resumed iteration would be logged twice
        if self.rank == 0 and self._log is not None:
            self._log.truncate_after("iteration", trainer.state.iteration)

    def _add_scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.log_dir is None and self._writer is None:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self, engine=None) -> None:
        if self._writer is not None and self._own_writer:
            self._writer.close()
            self._writer = None


class ValidationLog(IterationLog):
    """Log several evaluators' metrics against the trainer's iteration: TensorBoard ``<metric>/<name>`` and a CSV.

    A CSV row ``iteration,epoch,<metric>/<name>...`` is written once every evaluator of a round has reported
    (rounds are the trainer iterations at which validations ran).

    Args:
        evaluators: name → evaluator (e.g. ``{"student": ..., "teacher": ...}``).
        metric_names: metrics of each ``evaluator.state.metrics`` to log.
        log_dir: TensorBoard folder (``None``: no TensorBoard).
        csv_path: CSV file (``None``: no CSV).
        append: keep an earlier run's rows (pass the bundle's ``resume``); otherwise the file starts afresh.
        summary_writer: the run's shared TensorBoard writer (instead of ``log_dir``; not closed here).
        rank: only rank 0 writes.
    """

    def __init__(
        self,
        evaluators: Mapping[str, Any],
        metric_names: Sequence[str] = ("val_mean_dice",),
        *,
        log_dir: str | os.PathLike | None = None,
        csv_path: str | os.PathLike | None = None,
        append: bool = False,
        rank: int = 0,
        summary_writer: Any = None,
    ) -> None:
        if not evaluators:
            raise ValueError("evaluators must name at least one evaluator")
        super().__init__(log_dir, csv_path, append, rank, summary_writer)
        self.evaluators = dict(evaluators)
        self.metric_names = [metric_names] if isinstance(metric_names, str) else list(metric_names)
        self.columns = [f"{m}/{n}" for n in self.evaluators for m in self.metric_names]
        self._trainer = None
        self._row: dict[str, float] = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        self._trainer = engine
        for name, evaluator in self.evaluators.items():
            evaluator.add_event_handler(Events.COMPLETED, functools.partial(self._on_validated, name))
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def _on_validated(self, name: str, evaluator) -> None:
        if self.rank != 0 or self._trainer is None:
            return
        step = int(self._trainer.state.iteration)
        values = {
            f"{m}/{name}": float(evaluator.state.metrics[m]) for m in self.metric_names if m in evaluator.state.metrics
        }
        self._add_scalars(values, step)
        self._row.update(values)
        if all(c in self._row for c in self.columns):
            self._write_row(step, int(self._trainer.state.epoch))
            self._row = {}

    def _write_row(self, iteration: int, epoch: int) -> None:
        if self._log is not None:
            self._log.append(
                ["iteration", "epoch", *self.columns], [iteration, epoch, *(self._row[c] for c in self.columns)]
            )

    read = staticmethod(CsvLog.read)


def _tag(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name.strip()) or "unnamed"


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)


class PerClassDiceLogger(IterationLog):
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
        super().__init__(log_dir, csv_path, append, rank, summary_writer)
        self.evaluator = evaluator
        self.class_names = {int(k): str(v) for k, v in class_names.items()}
        self.metric_name = metric_name
        self.mean_name = mean_name
        self.extra_names = [str(n) for n in extra_names]
        self.include_background = as_bool(include_background, "include_background")
        self.history: list[dict[str, float]] = []

    def attach(self, trainer) -> None:
        from ignite.engine import Events

        self.evaluator.add_event_handler(Events.COMPLETED, lambda ev: self.log(trainer, ev))
        trainer.add_event_handler(Events.STARTED, self._on_started)
        trainer.add_event_handler(Events.COMPLETED, self.close)

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
        finite = {k: v for k, v in row.items() if k not in ("iteration", "epoch") and math.isfinite(v)}
        self._add_scalars(finite, step)
        if self._log is not None:
            self._log.append(list(row), list(row.values()))


class RunTensorBoard:
    """The run's one TensorBoard writer, shared by every handler that logs to TensorBoard, closed at the end.

    One writer means one event file per run (per process) instead of one per handler. Handlers take
    ``summary_writer: "$@tensorboard.writer"``; list the object itself in the trainer's handlers so that it
    closes the writer when the run completes, after every other ``COMPLETED`` handler.

    Args:
        log_dir: TensorBoard folder (the run's ``output_dir``).
    """

    main_process_only = True  # logs / writes files: attached on rank 0 only (medssl.engines.distributed)

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
