"""The training budget of every medssl trainer: ``max_iterations`` optimizer steps and/or ``max_epochs`` epochs.

Recipes count either (UNETR on BTCV: 30000 iterations; the SSL pretraining: 500 epochs). Every medssl trainer
takes both as constructor arguments and attaches one :class:`IterationBudget`, so ``--max_iterations`` means the
same thing in every bundle. ignite needs ``max_epochs`` at construction: :func:`initial_max_epochs` derives it
from the iterations and the epoch length; the handler refits it at ``STARTED``, after a resume restored the
counters.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["IterationBudget", "attach_budget", "initial_max_epochs"]

# ignite's max_epochs when only max_iterations is given and the epoch length is unknown (a loader without len):
# the budget handler stops the run long before
UNBOUNDED_EPOCHS = 2**31 - 1


def _positive(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def _loader_length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def initial_max_epochs(
    max_iterations: int | None, max_epochs: int | None, train_data_loader: Any, epoch_length: int | None = None
) -> int:
    """The ``max_epochs`` to construct an ignite engine with, for a budget of either or both limits.

    Args:
        max_iterations: optimizer steps, or ``None``.
        max_epochs: epochs, or ``None``.
        train_data_loader: the training loader (its length is the epoch length unless ``epoch_length`` is given).
        epoch_length: iterations per epoch, when not the loader's length.

    Returns:
        ``max_epochs``, capped by the epochs ``max_iterations`` needs when the epoch length is known; a very large
        number when only ``max_iterations`` is given and the epoch length is not known.

    Raises:
        ValueError: neither limit given, a limit that is not a positive integer, or an empty loader.
    """
    max_iterations = _positive("max_iterations", max_iterations)
    max_epochs = _positive("max_epochs", max_epochs)
    if max_iterations is None and max_epochs is None:
        raise ValueError("give max_iterations and/or max_epochs, got None for both")
    length = epoch_length or _loader_length(train_data_loader)
    if length is not None and length < 1:
        raise ValueError("the training data loader is empty")
    if max_iterations is None:
        return max_epochs
    needed = math.ceil(max_iterations / length) if length else UNBOUNDED_EPOCHS
    return needed if max_epochs is None else min(max_epochs, needed)


class IterationBudget:
    """Stop training after ``max_iterations`` optimizer steps or ``max_epochs`` epochs, whichever comes first.

    * ``STARTED`` (after a resume restored ``epoch`` / ``iteration``: attach it after the checkpoint handler):
      ``state.max_epochs`` becomes the epochs left to reach ``max_iterations`` (capped by ``max_epochs``), so
      ignite's own loop ends the run; a run restored at or past the budget trains nothing.
    * ``ITERATION_COMPLETED``: at ``max_iterations`` inside an epoch, ``engine.terminate()`` (``COMPLETED`` still
      fires, so ``last.pt`` holds that iteration). At an epoch's last iteration the run ends with the epoch, so
      ``EPOCH_COMPLETED`` handlers (epoch-level validation, checkpoints) still run.

    Epoch ends are where ``iteration`` is a multiple of the epoch length (ignite resumes a broken epoch up to
    there).

    Args:
        max_iterations: optimizer steps (``None``: no iteration limit).
        max_epochs: epochs (``None``: no epoch limit).

    Raises:
        ValueError: neither limit given, or a limit that is not a positive integer.

    Example::

        trainer = SupervisedTrainer(..., max_epochs=initial_max_epochs(300, None, loader))
        IterationBudget(max_iterations=300).attach(trainer)
    """

    def __init__(self, max_iterations: int | None = None, max_epochs: int | None = None) -> None:
        self.max_iterations = _positive("max_iterations", max_iterations)
        self.max_epochs = _positive("max_epochs", max_epochs)
        if self.max_iterations is None and self.max_epochs is None:
            raise ValueError("give max_iterations and/or max_epochs, got None for both")

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.fit_epochs)
        if self.max_iterations is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.stop_at_budget)

    def total_iterations(self, engine) -> int | None:
        """The run's optimizer steps: ``max_iterations``, or epochs × length, or the smaller of both."""
        length = engine.state.epoch_length
        by_epochs = self.max_epochs * length if self.max_epochs is not None and length else None
        if self.max_iterations is None:
            return by_epochs
        return self.max_iterations if by_epochs is None else min(self.max_iterations, by_epochs)

    def fit_epochs(self, engine) -> None:
        """Set ``state.max_epochs`` from the restored counters; terminate a run that is already at its budget."""
        state = engine.state
        if self.max_iterations is not None and state.iteration >= self.max_iterations:
            engine.terminate()
            return
        epochs = self.max_epochs if self.max_epochs is not None else UNBOUNDED_EPOCHS
        length = state.epoch_length
        if self.max_iterations is not None and length:
            # epochs end at multiples of the length; the first one left may be partial (a mid-epoch stop)
            epochs = min(epochs, state.epoch + math.ceil(self.max_iterations / length) - state.iteration // length)
        state.max_epochs = epochs

    def stop_at_budget(self, engine) -> None:
        state = engine.state
        if state.iteration < self.max_iterations:
            return
        length = state.epoch_length
        if length and state.iteration % length == 0:
            state.max_epochs = state.epoch  # the run ends with this epoch, after its EPOCH_COMPLETED handlers
            return
        engine.terminate()


def attach_budget(engine, max_iterations: int | None, max_epochs: int | None) -> IterationBudget:
    """Attach the :class:`IterationBudget` of a trainer's constructor arguments and keep it as ``engine.budget``
    (``engine.max_iterations`` too, for the progress handler).

    Call it at the end of the trainer's ``__init__``: the train handlers (a resuming checkpoint handler) are
    attached by then, so the budget's ``STARTED`` sees the restored counters.
    """
    engine.budget = IterationBudget(max_iterations, max_epochs)
    engine.budget.attach(engine)
    engine.max_iterations = engine.budget.max_iterations
    return engine.budget
