"""ProgressBar's plain status lines."""

from __future__ import annotations

from ignite.engine import Engine


def test_progress_bar_writes_plain_status_lines_when_not_on_a_terminal(capsys):

    from medssl.handlers import ProgressBar

    engine = Engine(lambda e, b: {"loss": 1.0 / e.state.iteration})
    bar = ProgressBar(output_transform=lambda out: {"loss": out["loss"]}, plain=True, status_interval=3600)
    bar.attach(engine)
    engine.run(range(5), max_epochs=2)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("medssl-progress")]
    # the first iteration and the last (the interval is an hour): a log holds lines, not a redrawn bar
    assert lines == ["medssl-progress iteration 1/10 loss=1", "medssl-progress iteration 10/10 loss=0.1"]
