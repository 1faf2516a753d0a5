"""Stand-ins shared by the handler tests."""

from __future__ import annotations

import types

from ignite.engine import Events


class FakeEvaluator:
    """Stands in for a MONAI evaluator: the metric of each run is scripted by trainer epoch (or iteration)."""

    def __init__(self, values):
        self.values = dict(values)
        self.state = types.SimpleNamespace(epoch=0, metrics={})
        self.on_completed = []

    def add_event_handler(self, event, handler):
        assert event == Events.COMPLETED
        self.on_completed.append(handler)

    def run_for(self, step):
        if step in self.values:
            self.state.metrics = {"val_loss": self.values[step]}
            for h in self.on_completed:
                h(self)
