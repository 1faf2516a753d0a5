"""Checkpoint handlers: what a training run writes to disk to be resumed and deployed, and when.

- :class:`CheckpointHandler` writes ``model.pt`` (best validation metric, self-describing; the final weights when no
  validation ran, ``best.selected_by`` says which) and ``last.pt`` (plus optimizer, scheduler, scaler, extra
  modules such as an EMA teacher, RNG states, engine progress), both atomically, and with ``resume=True``
  restores ``last.pt`` when the trainer starts. It runs on every rank (``last.pt`` gathers every rank's random
  streams) and writes on rank 0 only.
- :class:`BestOfCheckpoint` writes the best of several candidate networks (e.g. the Mean Teacher student and its
  EMA teacher), selected on the validation split only; its ``state_dict`` goes into ``last.pt``
  (``CheckpointHandler(extra_modules=...)``) so a resumed run keeps the best. An output handler: rank 0 only.
- :func:`capture_transform_rng` / :func:`restore_transform_rng`: the random states of MONAI transforms, for exact
  resume.

Checkpoint keys (``medssl.checkpoint`` format): ``model.pt`` = network, state_dict, preprocessing, labels,
stage, progress, ``best``; ``last.pt`` adds ``optimizer``, ``scheduler``, ``scaler``, one key per extra module
(e.g. ``teacher``), ``rng`` (torch / numpy / python / CUDA) and ``transform_rng`` (MONAI random transforms);
a distributed run adds ``rng_ranks`` (every rank's ``rng`` / ``transform_rng``, so each rank resumes its own
streams). Every rank reads ``last.pt`` on resume.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from medssl.config import as_bool
from medssl.dist import get_world_size, resolve_rank, unwrap_model
from medssl.errors import CheckpointError

__all__ = [
    "BestTracker",
    "CheckpointHandler",
    "BestOfCheckpoint",
    "engine_precision",
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


# ---------------------------------------------------------------------------------------------------- transform RNG states


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


# ---------------------------------------------------------------------------------------------------- checkpoints


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


def _state_dict(obj: Any) -> Any:
    module = obj.module if hasattr(obj, "module") and isinstance(obj, torch.nn.Module) else obj  # unwrap DDP
    return module.state_dict()


def _load_state(obj: Any, state: Any) -> None:
    module = obj.module if hasattr(obj, "module") and isinstance(obj, torch.nn.Module) else obj
    module.load_state_dict(state)


class BestTracker:
    """Best-model selection of :class:`CheckpointHandler` and :class:`BestOfCheckpoint`: which validated candidate
    beats the best so far.

    Each watched evaluator reports its ``key_metric`` when it completes (:meth:`watch`); the owning handler calls
    :meth:`take` after the trainer iteration or epoch that ran the validations, which picks the best value of the
    round (ties go to the candidate listed first) and returns it when it beats the best so far. :meth:`forget`
    drops the values of a validation that must select nothing (one run before training, at ``EPOCH_STARTED``).
    Non-finite values never improve.

    Args:
        key_metric: name in each ``evaluator.state.metrics``.
        mode: ``"min"`` (losses) or ``"max"`` (Dice).
        candidates: candidate names in tie-break order (one unnamed candidate by default).

    Raises:
        ValueError: an unknown ``mode``.
    """

    def __init__(self, key_metric: str, mode: str, candidates: Sequence[str | None] = (None,)) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.key_metric = key_metric
        self.mode = mode
        self.candidates = list(candidates)
        self.pending: dict[str | None, float] = {}

    def improves(self, value: float, than: float | None) -> bool:
        """``value`` is finite and better than ``than`` (``None``: nothing to beat)."""
        if not math.isfinite(value):
            return False
        return than is None or (value < than if self.mode == "min" else value > than)

    def watch(self, evaluator: Any, name: str | None = None) -> None:
        """Record ``evaluator``'s ``key_metric`` for candidate ``name`` each time it completes."""
        from ignite.engine import Events

        evaluator.add_event_handler(Events.COMPLETED, functools.partial(self.record, name=name))

    def record(self, evaluator: Any, name: str | None = None) -> None:
        """Keep ``evaluator``'s ``key_metric`` (when it has one) as candidate ``name``'s value of this round."""
        if self.key_metric in evaluator.state.metrics:
            self.pending[name] = float(evaluator.state.metrics[self.key_metric])

    def forget(self) -> None:
        """Drop the values recorded since the last :meth:`take`."""
        self.pending = {}

    def take(self, best: float | None) -> tuple[str | None, float] | None:
        """The round's best ``(candidate, value)`` when it improves on ``best``, else ``None``; clears the round."""
        pending, self.pending = self.pending, {}
        round_best: tuple[str | None, float] | None = None
        for name in self.candidates:
            if name in pending and self.improves(pending[name], None if round_best is None else round_best[1]):
                round_best = (name, pending[name])
        if round_best is None or not self.improves(round_best[1], best):
            return None
        return round_best


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
        self._tracker = BestTracker(key_metric, mode)
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
        self._tracker.record(evaluator)

    def _on_epoch_started(self, engine) -> None:
        # a validation at start measured the weights before this run's training: it selects nothing
        self._tracker.forget()
        # STARTED handlers after the restore (a validation at start creates a DataLoader iterator, which draws
        # from torch's RNG) would shift the random streams; the saved run drew its next epoch from this state
        if self._pending_rng is not None:
            self._restore_rng(self._pending_rng)
            self._pending_rng = None

    def _consider_best(self, engine) -> None:
        selected = self._tracker.take(self.best["value"])
        if selected is not None:
            value = selected[1]
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
        if resolve_rank(self.rank) != 0:
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
        if resolve_rank(self.rank) != 0:
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
        world, rank = get_world_size(), resolve_rank(None)
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
    :class:`~medssl.handlers.CheckpointHandler`. Ties go to the candidate named first. A run that ends
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
        preprocessing, labels: as :class:`~medssl.handlers.CheckpointHandler`.
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

    main_process_only = True  # logs / writes files: attached on rank 0 only (medssl.engines.distributed)

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
        self._tracker = BestTracker(key_metric, mode, list(networks))
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
        self._registered = False

    def attach(self, engine) -> None:
        from ignite.engine import Events

        for name, evaluator in self.evaluators.items():
            self._tracker.watch(evaluator, name)
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

    def _on_epoch_started(self, engine) -> None:
        self._tracker.forget()  # a validation at start measured untrained weights

    def _consider(self, engine) -> None:
        selected = self._tracker.take(self.best["value"])
        if selected is None:
            return
        name, value = selected
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
