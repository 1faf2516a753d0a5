"""Training progress: ignite's tqdm bar on a terminal, plain status lines in a log file."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

from medssl.dist import resolve_rank

__all__ = ["ProgressBar"]


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

    main_process_only = True  # logs / writes files: attached on rank 0 only (medssl.engines.distributed)

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
        if resolve_rank(self.rank) != 0:
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
        """The run's iteration budget: the trainer's :class:`~medssl.handlers.budget.IterationBudget` where it has
        one, else epochs × length."""
        budget = getattr(engine, "budget", None)
        if budget is not None:
            return budget.total_iterations(engine)
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
