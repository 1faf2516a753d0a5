"""The iteration budget: stop an epoch-counted engine after a number of optimizer steps."""

from __future__ import annotations

__all__ = ["StopAtIteration"]


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
