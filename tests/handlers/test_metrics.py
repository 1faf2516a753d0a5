"""MetricHistory, CsvLog and PerClassDiceLogger: CSV rows, resumed logs."""

from __future__ import annotations

import csv
import types

import pytest
import torch
from ignite.engine import Engine, Events

from medssl.handlers import MetricHistory
from medssl.handlers.metrics import CsvLog
from tests.handlers.fakes import FakeEvaluator


def test_metric_history_appends(tmp_path):
    h = MetricHistory(tmp_path / "m.csv", ["val_l1"])
    for epoch, value in [(0, 0.5), (2, 0.25)]:
        h(types.SimpleNamespace(state=types.SimpleNamespace(epoch=epoch, metrics={"val_l1": value})))
    assert MetricHistory.read(tmp_path / "m.csv") == [{"epoch": 0.0, "val_l1": 0.5}, {"epoch": 2.0, "val_l1": 0.25}]
    state = types.SimpleNamespace(state=types.SimpleNamespace(epoch=3, metrics={"val_l1": 0.1}))
    MetricHistory(tmp_path / "m.csv", ["val_l1"], append=True)(state)  # a resumed run continues the file
    assert len(MetricHistory.read(tmp_path / "m.csv")) == 3
    MetricHistory(tmp_path / "m.csv", ["val_l1"])(state)  # a new run starts it again
    assert MetricHistory.read(tmp_path / "m.csv") == [{"epoch": 3.0, "val_l1": 0.1}]


def test_resumed_metric_history_drops_the_epochs_it_logs_again(tmp_path):
    """Killed after validating epochs 1..4 but checkpointed at 2: the resumed run logs 3 and 4 again, once."""

    def at(epoch, value):
        return types.SimpleNamespace(state=types.SimpleNamespace(epoch=epoch, metrics={"val_l1": value}))

    h = MetricHistory(tmp_path / "m.csv", ["val_l1"])
    for epoch in (1, 2, 3, 4):
        h(at(epoch, 1.0))
    resumed = MetricHistory(tmp_path / "m.csv", ["val_l1"], append=True)
    resumed(at(3, 0.5))
    resumed(at(4, 0.25))
    rows = MetricHistory.read(tmp_path / "m.csv")
    assert [(r["epoch"], r["val_l1"]) for r in rows] == [(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.25)]


def test_csv_log_truncates_after_the_resumed_step(tmp_path):
    log = CsvLog(tmp_path / "v.csv")
    for it in (2, 4, 6, 8):
        log.append(["iteration", "dice"], [it, it / 10])
    resumed = CsvLog(tmp_path / "v.csv", append=True, step_column="iteration")
    assert resumed.truncate_after("iteration", 4) == 2
    assert [r["iteration"] for r in CsvLog.read(tmp_path / "v.csv")] == [2, 4]
    resumed.append(["iteration", "dice"], [4, 0.9])  # a validation at start of the resumed run: replaces row 4
    resumed.append(["iteration", "dice"], [6, 0.7])
    rows = CsvLog.read(tmp_path / "v.csv")
    assert [(r["iteration"], r["dice"]) for r in rows] == [(2, 0.2), (4, 0.9), (6, 0.7)]
    assert CsvLog(tmp_path / "v.csv").truncate_after("iteration", 0) == 0  # a fresh log is not edited


def test_per_class_dice_logger_truncates_at_the_restored_iteration(tmp_path):
    from medssl.handlers import PerClassDiceLogger

    path = tmp_path / "val.csv"
    CsvLog(path).append(["iteration", "epoch", "val_mean_dice"], [2, 1, 0.1])
    CsvLog(path, append=True).append(["iteration", "epoch", "val_mean_dice"], [4, 2, 0.2])
    CsvLog(path, append=True).append(["iteration", "epoch", "val_mean_dice"], [6, 3, 0.3])
    logger = PerClassDiceLogger(FakeEvaluator({}), {0: "bg", 1: "organ"}, csv_path=path, append=True)
    trainer = Engine(lambda e, x: None)
    trainer.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "iteration", 2))  # the restore
    logger.attach(trainer)
    trainer.add_event_handler(Events.STARTED, lambda e: e.terminate())
    trainer.run([0], max_epochs=1)
    assert [r["iteration"] for r in CsvLog.read(path)] == [2]


def test_per_class_dice_logger_writes_the_tutorial_convention_beside_the_mean(tmp_path):
    """Real MONAI MeanDice handlers as btcv_unetr.yaml configures them, on two constructed 3-class cases."""
    from monai.handlers import MeanDice, from_engine
    from monai.networks.utils import one_hot

    from medssl.handlers import PerClassDiceLogger

    ref = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    ref[0, 0, 0, 0:2] = 1  # 8 voxels
    ref[0, 0, 1, 0:2] = 2  # 8 voxels
    swapped = ref.clone()
    swapped[0, 0, 0, 1], swapped[0, 0, 1, 1] = 2, 1  # half of each organ predicted as the other: Dice 0.5 each
    batches = [(swapped, ref), (ref.clone(), ref)]  # case 2 perfect
    evaluator = Engine(lambda e, b: {"pred": list(one_hot(b[0], 3)), "label": list(one_hot(b[1], 3))})
    metrics = {
        "val_mean_dice": MeanDice(include_background=False, reduction="mean", output_transform=from_engine(["pred", "label"])),
        "val_dice_per_class": MeanDice(include_background=False, reduction="mean_batch", output_transform=from_engine(["pred", "label"])),
        "val_mean_dice_tutorial": MeanDice(include_background=True, reduction="mean", output_transform=from_engine(["pred", "label"])),
    }  # fmt: skip
    for name, metric in metrics.items():
        metric.attach(evaluator, name)
    path = tmp_path / "val_metrics.csv"
    logger = PerClassDiceLogger(
        evaluator, {0: "bg", 1: "liver", 2: "spleen"}, extra_names=["val_mean_dice_tutorial"], csv_path=path
    )
    trainer = Engine(lambda e, b: evaluator.run(batches))
    logger.attach(trainer)
    trainer.run([0], max_epochs=1)
    with open(path, newline="") as f:
        header = next(iter(csv.reader(f)))
    assert header == [
        "iteration",
        "epoch",
        "val_mean_dice",
        "val_mean_dice_tutorial",
        "val_dice/liver",
        "val_dice/spleen",
    ]
    (row,) = CsvLog.read(path)
    # organs: case 1 (0.5 + 0.5) / 2, case 2 1.0 → 0.75; tutorial: case 1 (1 + 0.5 + 0.5) / 3, case 2 1.0 → 5/6
    assert row["val_mean_dice"] == pytest.approx(0.75)
    assert row["val_mean_dice_tutorial"] == pytest.approx(5 / 6)
    assert row["val_dice/liver"] == pytest.approx(0.75) and row["val_dice/spleen"] == pytest.approx(0.75)
