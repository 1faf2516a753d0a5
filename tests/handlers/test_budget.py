"""IterationBudget: stops at max_iterations (mid-epoch or at an epoch's end), fits epochs on resume, two limits."""

from __future__ import annotations

import pytest
from ignite.engine import Engine, Events

from medssl.handlers.budget import UNBOUNDED_EPOCHS, IterationBudget, attach_budget, initial_max_epochs


def _engine(start: int = 0, start_epoch: int | None = None):
    """An engine recording its steps and epoch ends; ``start`` / ``start_epoch`` set at STARTED, as a resume does."""
    steps, epoch_ends = [], []
    engine = Engine(lambda e, b: steps.append(e.state.iteration))
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epoch_ends.append(e.state.iteration))

    def restore(e):
        e.state.iteration = start
        e.state.epoch = start // 3 if start_epoch is None else start_epoch

    engine.add_event_handler(Events.STARTED, restore)
    return engine, steps, epoch_ends


@pytest.mark.parametrize("budget, epoch_ends", [(5, [3]), (6, [3, 6]), (1, [])])
def test_stops_at_max_iterations(budget, epoch_ends):
    engine, steps, ends = _engine()
    IterationBudget(max_iterations=budget).attach(engine)
    engine.run(range(3), max_epochs=initial_max_epochs(budget, None, range(3)))
    assert steps == list(range(1, budget + 1)) and engine.state.iteration == budget
    # a budget at an epoch's end ends the run with that epoch: its EPOCH_COMPLETED handlers run
    assert ends == epoch_ends


@pytest.mark.parametrize("start, start_epoch", [(0, 0), (3, 1), (4, 2), (5, 2), (7, 3), (8, 3)])
def test_resume_fits_epochs_to_the_iterations_left(start, start_epoch):
    """A run restored at ``start`` (mid-epoch too: ignite finishes the broken epoch) does exactly the steps left."""
    engine, steps, _ = _engine(start, start_epoch)
    IterationBudget(max_iterations=7).attach(engine)
    engine.run(range(3), max_epochs=1)  # too few on purpose: the handler refits it at STARTED
    assert steps == list(range(start + 1, 8)) and engine.state.iteration == max(start, 7)


@pytest.mark.parametrize("max_iterations, max_epochs, last", [(5, 1, 3), (5, 4, 5), (None, 2, 6), (6, 2, 6)])
def test_both_limits_whichever_comes_first(max_iterations, max_epochs, last):
    engine, steps, _ = _engine()
    budget = attach_budget(engine, max_iterations, max_epochs)
    engine.run(range(3), max_epochs=initial_max_epochs(max_iterations, max_epochs, range(3)))
    assert steps[-1] == engine.state.iteration == last
    assert engine.budget is budget and engine.max_iterations == max_iterations
    assert budget.total_iterations(engine) == last


def test_initial_max_epochs():
    assert initial_max_epochs(7, None, range(3)) == 3
    assert initial_max_epochs(7, 2, range(3)) == 2
    assert initial_max_epochs(None, 9, range(3)) == 9
    assert initial_max_epochs(7, None, range(100), epoch_length=2) == 4
    assert initial_max_epochs(7, None, iter(range(3))) == UNBOUNDED_EPOCHS  # no len(): the handler stops it


@pytest.mark.parametrize(
    "kwargs, match",
    [({}, "None for both"), ({"max_iterations": 0}, "max_iterations.*0"), ({"max_epochs": 1.5}, "max_epochs.*1.5")],
)
def test_bad_budgets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IterationBudget(**kwargs)
    with pytest.raises(ValueError, match=match):
        initial_max_epochs(kwargs.get("max_iterations"), kwargs.get("max_epochs"), range(3))


def test_empty_loader():
    with pytest.raises(ValueError, match="empty"):
        initial_max_epochs(3, None, [])
