"""Handlers the Mean Teacher bundle adds to the shared ones: pick the best of student and teacher, log both
validation curves against the trainer's iteration, and stop an epoch-based engine at an iteration budget.

- :class:`BestOfCheckpoint` writes a self-describing checkpoint of whichever candidate network (e.g. the student
  or the EMA teacher) reached the best validation metric so far, selected on the validation split only. Its
  ``state_dict`` goes into ``last.pt`` (``CheckpointHandler(extra_modules=...)``) so a resumed run keeps the best.
- :class:`ValidationLog` writes every evaluator's metrics to TensorBoard as ``<metric>/<name>`` at the trainer's
  iteration (MONAI's stats handlers use the evaluator's epoch, which repeats with iteration-level validation)
  and one CSV row per validation round.
- :class:`StopAtIteration` terminates a run after ``max_iterations`` optimizer steps (recipes counted in
  iterations, engines counted in epochs).
- :class:`BatchNormRecalibration` keeps an evaluation copy of the EMA teacher whose BatchNorm statistics are
  re-estimated on training crops before each validation ("precise BN"): an average of weights does not produce
  the average of the student's activation statistics, so the EMA'd running statistics can be far off the
  teacher's own while the learning rate is high (observed: teacher Dice 0.07 with them, 0.67 re-estimated, at
  iteration 300 of a phantom run). Training is unchanged: the copy only serves validation and ``model_teacher.pt``.

The Mean Teacher method: Tarvainen & Valpola, NeurIPS 2017 (https://arxiv.org/abs/1703.01780); its reuse for
the left atrium: Yu et al., UA-MT, MICCAI 2019 (https://arxiv.org/abs/1907.07034).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medssl.checkpoint import save_checkpoint
from medssl.engines.ema import unwrap_model
from medssl.engines.handlers import CsvLog, engine_precision
from medssl.engines.utils import as_bool

__all__ = ["BestOfCheckpoint", "ValidationLog", "StopAtIteration", "BatchNormRecalibration"]

logger = logging.getLogger(__name__)


def _check_names(networks: Mapping[str, Any], evaluators: Mapping[str, Any]) -> None:
    if not networks:
        raise ValueError("networks must name at least one candidate")
    if set(networks) != set(evaluators):
        raise ValueError(f"networks {sorted(networks)} and evaluators {sorted(evaluators)} must have the same names")


class BestOfCheckpoint:
    """Save the candidate network with the best validation metric so far (e.g. ``model.pt`` = student or teacher).

    Every evaluator reports its ``key_metric`` when it completes; after the trainer's iteration (or epoch) that
    ran the validations, the best value of the round is compared with the best so far and, when it improves,
    that candidate is written with ``best = {metric, value, epoch, iteration, network: <name>}``. A validation
    run before training (``exec_at_start``) selects nothing, as in
    :class:`~medssl.engines.handlers.CheckpointHandler`. Ties go to the candidate named first. A run that ends
    without any validation writes final weights with ``best.selected_by = "final"`` (logged): those of ``final``
    (default: the first candidate), or of ``final_network`` when given; a selected one has ``selected_by = "best"``.

    Args:
        path: checkpoint to write (atomically, ``medssl.checkpoint`` format).
        networks: name → network; all share ``network_config`` (student and EMA teacher do).
        evaluators: name → evaluator of that network (same names as ``networks``).
        network_config: the ``_target_`` dict that rebuilds every candidate.
        stage: checkpoint stage, e.g. ``"mean_teacher"``.
        key_metric: name in each ``evaluator.state.metrics``.
        mode: ``"max"`` (Dice) or ``"min"``.
        preprocessing, labels: as :class:`~medssl.engines.handlers.CheckpointHandler`.
        rank: only rank 0 writes.
        final: the candidate whose weights a run without validation writes (default: the first).
        final_network: a module to write instead of the ``final`` candidate when no validation ran: a candidate
            that only validation refreshes (Mean Teacher's BatchNorm-recalibrated ``teacher_eval`` copy) would
            otherwise hold the weights it was built with.

    Raises:
        ValueError: different names in ``networks`` and ``evaluators``, an unknown ``mode``, or a ``final`` that
            is not a candidate.

    Example::

        best = BestOfCheckpoint("out/model.pt", {"teacher": teacher, "student": net}, evaluators, cfg, "mean_teacher")
        best.attach(trainer)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        networks: Mapping[str, torch.nn.Module],
        evaluators: Mapping[str, Any],
        network_config: Mapping[str, Any],
        stage: str,
        *,
        key_metric: str = "val_mean_dice",
        mode: str = "max",
        preprocessing: Mapping[str, Any] | None = None,
        labels: Mapping[Any, str] | None = None,
        rank: int = 0,
        final: str | None = None,
        final_network: torch.nn.Module | None = None,
    ) -> None:
        _check_names(networks, evaluators)
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if final is not None and final not in networks:
            raise ValueError(f"final must name a candidate ({', '.join(networks)}), got {final!r}")
        self.final = final if final is not None else next(iter(networks))
        self.final_network = final_network
        self.path = Path(path)
        self.networks = dict(networks)
        self.evaluators = dict(evaluators)
        self.network_config = dict(network_config)
        self.stage = stage
        self.key_metric = key_metric
        self.mode = mode
        self.preprocessing = dict(preprocessing or {})
        self.labels = dict(labels or {})
        self.rank = int(rank)
        self.best: dict[str, Any] = {"metric": key_metric, "value": None, "epoch": None, "network": None}
        self._pending: dict[str, float] = {}
        self._registered = False

    def attach(self, engine) -> None:
        from ignite.engine import Events

        for name, evaluator in self.evaluators.items():
            evaluator.add_event_handler(Events.COMPLETED, functools.partial(self._on_validated, name))
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._on_epoch_started)
        engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def _on_completed(self, engine) -> None:
        if self.best.get("value") is not None:
            return
        # no validation selected a candidate (val_interval beyond the budget): a successful run still leaves a
        # loadable model, the first candidate's final weights, and says so
        name = self.final
        logger.warning(
            f"no validation selected a model in this run (is val_interval larger than the budget?): {self.path} "
            f"holds the final weights of the {name} (selected_by: final)"
        )
        self.best = {
            "metric": self.key_metric,
            "value": None,
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "network": name,
            "selected_by": "final",
        }
        self._save(engine, name, self.final_network)

    def _on_started(self, engine) -> None:
        from ignite.engine import Events

        if not self._registered:
            # registered at run start, after the validation handlers attached at build time
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._consider)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._consider)
            self._registered = True

    def _on_validated(self, name: str, evaluator) -> None:
        if self.key_metric in evaluator.state.metrics:
            self._pending[name] = float(evaluator.state.metrics[self.key_metric])

    def _on_epoch_started(self, engine) -> None:
        self._pending = {}  # a validation at start measured untrained weights

    def _better(self, value: float, than: float | None) -> bool:
        if not math.isfinite(value):
            return False
        return than is None or (value > than if self.mode == "max" else value < than)

    def _consider(self, engine) -> None:
        pending, self._pending = self._pending, {}
        round_best: tuple[str, float] | None = None
        for name in self.networks:  # candidate order breaks ties
            if name in pending and self._better(pending[name], None if round_best is None else round_best[1]):
                round_best = (name, pending[name])
        if round_best is None or not self._better(round_best[1], self.best["value"]):
            return
        name, value = round_best
        self.best = {
            "metric": self.key_metric,
            "value": value,
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "network": name,
            "selected_by": "best",
        }
        self._save(engine, name)
        logger.info(f"{self.path.name}: {name} {self.key_metric} {value:.4f} (iteration {engine.state.iteration})")

    def _save(self, engine, name: str, network: torch.nn.Module | None = None) -> None:
        if self.rank == 0:
            save_checkpoint(
                self.path,
                network=self.network_config,
                state_dict=unwrap_model(network if network is not None else self.networks[name]).state_dict(),
                stage=self.stage,
                preprocessing=self.preprocessing,
                labels=self.labels,
                progress={"epoch": int(engine.state.epoch), "iteration": int(engine.state.iteration)},
                best=dict(self.best),
                **engine_precision(engine),
            )

    def state_dict(self) -> dict[str, Any]:
        """The best so far (plain values), for ``last.pt``."""
        return dict(self.best)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "value" not in state:
            raise ValueError(f"expected a saved best with a 'value', got keys {sorted(state)}")
        self.best = dict(state)


class ValidationLog:
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
        self.evaluators = dict(evaluators)
        self.metric_names = [metric_names] if isinstance(metric_names, str) else list(metric_names)
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.csv_path = None if csv_path is None else Path(csv_path)
        self._log = None if csv_path is None else CsvLog(csv_path, append, step_column="iteration")
        self.rank = int(rank)
        self.columns = [f"{m}/{n}" for n in self.evaluators for m in self.metric_names]
        self._trainer = None
        # a shared writer (the run's one, see medssl.engines.handlers.RunTensorBoard) is closed by its owner
        self._writer = summary_writer
        self._own_writer = summary_writer is None
        self._row: dict[str, float] = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        self._trainer = engine
        for name, evaluator in self.evaluators.items():
            evaluator.add_event_handler(Events.COMPLETED, functools.partial(self._on_validated, name))
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def _on_started(self, engine) -> None:
        # after the checkpoint handler's restore: rows past the resumed iteration would be logged twice
        if self.rank == 0 and self._log is not None:
            self._log.truncate_after("iteration", engine.state.iteration)

    def _on_validated(self, name: str, evaluator) -> None:
        if self.rank != 0 or self._trainer is None:
            return
        step = int(self._trainer.state.iteration)
        values = {
            f"{m}/{name}": float(evaluator.state.metrics[m]) for m in self.metric_names if m in evaluator.state.metrics
        }
        if self.log_dir is not None or self._writer is not None:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.log_dir))
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()
        self._row.update(values)
        if all(c in self._row for c in self.columns):
            self._write_row(step, int(self._trainer.state.epoch))
            self._row = {}

    def _write_row(self, iteration: int, epoch: int) -> None:
        if self._log is not None:
            self._log.append(
                ["iteration", "epoch", *self.columns], [iteration, epoch, *(self._row[c] for c in self.columns)]
            )

    def close(self, engine=None) -> None:
        if self._writer is not None and self._own_writer:
            self._writer.close()
            self._writer = None

    read = staticmethod(CsvLog.read)


class StopAtIteration:
    """Terminate the engine once ``engine.state.iteration >= max_iterations`` (checked after every iteration and
    at the start of every epoch, so a run resumed at the budget does no further step).

    ``COMPLETED`` still fires, so a checkpoint handler writes ``last.pt`` of the final iteration.

    Raises:
        ValueError: ``max_iterations < 1``.
    """

    def __init__(self, max_iterations: int) -> None:
        if int(max_iterations) != max_iterations or max_iterations < 1:
            raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}")
        self.max_iterations = int(max_iterations)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        if engine.state.iteration >= self.max_iterations:
            engine.terminate()


class BatchNormRecalibration:
    """Copy ``source``'s weights into ``target`` and re-estimate ``target``'s BatchNorm statistics on training data.

    Runs every ``interval`` iterations (list it before the validation handlers so it runs first at the same
    iteration) and, with ``at_start``, when the run starts. Only the BatchNorm layers are put in train mode
    (dropout stays off); their statistics become the plain average over ``num_batches`` batches
    (``momentum=None``), as in Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021 (https://arxiv.org/abs/2105.07576).
    ``source`` is only read, so training and exact resume are unaffected; use a loader whose crops do not draw
    from the training transforms' random states (e.g. :class:`~medssl.engines.utils.FixedRandomDataset` over its
    own transform chain).

    Args:
        source: the EMA teacher (or any network); DDP / compile wrappers are unwrapped.
        target: a network of the same architecture that validation and checkpoints use.
        data_loader: batches of dicts holding ``image_key``, e.g. training images with training crops.
        num_batches: batches to average over (``None``: the whole loader).
        interval: iterations between recalibrations (the validation interval).
        image_key: input key of a batch.
        device: where the batches go; default the device of ``target``'s first parameter.
        precision: autocast as in training (see :func:`medssl.engines.utils.autocast`).
        at_start: also recalibrate on ``STARTED`` (when validation runs at start).

    Raises:
        ValueError: ``interval < 1`` or ``num_batches < 1``.
    """

    def __init__(
        self,
        source: torch.nn.Module,
        target: torch.nn.Module,
        data_loader: Any,
        *,
        num_batches: int | None = None,
        interval: int = 1,
        image_key: str = "image",
        device: str | torch.device | None = None,
        precision: str = "fp32",
        at_start: bool = False,
    ) -> None:
        if int(interval) != interval or interval < 1:
            raise ValueError(f"interval must be a positive integer, got {interval!r}")
        if num_batches is not None and (int(num_batches) != num_batches or num_batches < 1):
            raise ValueError(f"num_batches must be a positive integer or None, got {num_batches!r}")
        self.source = source
        self.target = target
        self.data_loader = data_loader
        self.num_batches = None if num_batches is None else int(num_batches)
        self.interval = int(interval)
        self.image_key = image_key
        self.device = device
        self.precision = precision
        self.at_start = as_bool(at_start, "at_start")

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        if self.at_start:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine=None) -> int:
        """Recalibrate now; returns the number of batches seen."""
        from medssl.engines.utils import autocast

        target = unwrap_model(self.target)
        target.load_state_dict(unwrap_model(self.source).state_dict())
        norms = [m for m in target.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        target.eval()
        if not norms:
            return 0
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
            m.train()
        device = self.device if self.device is not None else next(target.parameters()).device
        seen = 0
        try:
            with torch.no_grad(), autocast(device, self.precision):
                for batch in self.data_loader:
                    if self.num_batches is not None and seen >= self.num_batches:
                        break
                    target(batch[self.image_key].to(device))
                    seen += 1
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            target.eval()
        if seen == 0:
            raise ValueError("the recalibration loader yielded no batch")
        return seen
