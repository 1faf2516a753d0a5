"""Checkpoint handler (best / last / exact resume), metric history, image grids, and the engine utilities."""

from __future__ import annotations

import csv
import functools
import sys
import types

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose, RandGaussianNoised, RandSpatialCropSamplesd

from medssl.checkpoint import load_checkpoint
from medssl.engines import utils
from medssl.engines.handlers import (
    CheckpointHandler,
    CsvLog,
    MetricHistory,
    capture_transform_rng,
    image_grid,
    restore_transform_rng,
    save_image_grid,
)
from medssl.errors import CheckpointError, ConfigError, DataError

NET_CONFIG = {"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 2}


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


def _training(tmp_path, max_epochs, values=None, resume=False, extra=None, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    data = [torch.randn(4, 3) for _ in range(3)]

    def step(engine, x):
        opt.zero_grad()
        loss = (net(x) + torch.rand(1)).pow(2).mean()  # torch RNG inside the step: resume must restore it
        loss.backward()
        opt.step()
        return loss.item()

    engine = Engine(step)
    evaluator = FakeEvaluator(values or {}) if values is not None else None
    handler = CheckpointHandler(
        tmp_path,
        net,
        NET_CONFIG,
        "unit",
        optimizer=opt,
        scheduler=sched,
        evaluator=evaluator,
        mode="min",
        resume=resume,
        preprocessing={"spacing": [1.0, 1.0, 1.0]},
        labels={0: "background"},
        extra_modules=extra,
    )
    handler.attach(engine)
    if evaluator is not None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run_for(e.state.epoch))
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: sched.step())
    return engine, net, opt, data, handler


def test_best_follows_the_metric_and_last_holds_everything(tmp_path):
    engine, net, opt, data, handler = _training(tmp_path, 4, values={1: 0.5, 2: 0.7, 3: 0.3, 4: 0.4})
    bests = []

    def collect(e):
        bests.append(torch.load(tmp_path / "model.pt", weights_only=True)["progress"])

    # registered at start, i.e. after the handler's own epoch-end save
    engine.add_event_handler(Events.STARTED, lambda e: e.add_event_handler(Events.EPOCH_COMPLETED, collect))
    engine.run(data, max_epochs=4)
    # model.pt is rewritten only when val_loss improves (epochs 1 and 3)
    assert [b["epoch"] for b in bests] == [1, 1, 3, 3]
    best = load_checkpoint(tmp_path / "model.pt")
    assert best["best"] == {"metric": "val_loss", "value": 0.3, "epoch": 3, "iteration": 9, "selected_by": "best"}
    assert best["stage"] == "unit" and best["labels"] == {"0": "background"}
    assert "optimizer" not in best
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["progress"] == {"epoch": 4, "iteration": 12}
    assert {"optimizer", "scheduler", "rng"} <= set(last)
    for k, v in net.state_dict().items():
        assert torch.equal(last["state_dict"][k], v)
    assert last["scheduler"]["last_epoch"] == 4


def test_the_save_runs_after_handlers_attached_later(tmp_path):
    """Validation is attached after the checkpoint handler in bundles; its metric must still be seen."""
    engine, *_ = _training(tmp_path, 2, values={1: 0.5, 2: 0.4})
    engine.run([torch.randn(4, 3)], max_epochs=2)
    assert load_checkpoint(tmp_path / "model.pt")["best"]["epoch"] == 2


def test_iteration_level_validation_and_validation_at_start(tmp_path):
    engine, net, opt, data, handler = _training(tmp_path, 2)
    evaluator = FakeEvaluator({0: 0.1, 2: 0.9, 4: 0.5, 6: 0.7})
    handler.evaluator = evaluator
    evaluator.add_event_handler(Events.COMPLETED, handler._on_validated)
    engine.add_event_handler(Events.STARTED, lambda e: evaluator.run_for(0))  # validation at start: 0.1
    engine.add_event_handler(Events.ITERATION_COMPLETED(every=2), lambda e: evaluator.run_for(e.state.iteration))
    engine.run(data, max_epochs=2)
    best = load_checkpoint(tmp_path / "model.pt")["best"]
    # the start value (0.1, untrained weights) selects nothing; 0.5 at iteration 4 beats 0.9 and 0.7
    assert best == {"metric": "val_loss", "value": 0.5, "epoch": 2, "iteration": 4, "selected_by": "best"}
    assert load_checkpoint(tmp_path / "model.pt")["progress"] == {"epoch": 2, "iteration": 4}


def test_run_stopped_mid_epoch_still_writes_last(tmp_path):
    engine, *_, data, _ = _training(tmp_path, 1, values={})
    engine.run(data, max_iters=4)  # 3 iterations per epoch: stops inside epoch 2
    assert load_checkpoint(tmp_path / "last.pt")["progress"] == {"epoch": 2, "iteration": 4}


@pytest.mark.parametrize("with_evaluator", [True, False])
def test_run_without_any_validation_writes_final_weights_as_model(tmp_path, caplog, with_evaluator):
    """val_interval beyond the budget: no validation ever runs, yet model.pt must exist and say what it holds."""
    engine, net, *_, data, _ = _training(tmp_path, 1, values={} if with_evaluator else None)
    with caplog.at_level("WARNING", logger="medssl.engines.handlers"):
        engine.run(data, max_iters=4)  # stops mid-epoch: no EPOCH_COMPLETED save either
    ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt["best"] == {"metric": "val_loss", "value": None, "epoch": 2, "iteration": 4, "selected_by": "final"}
    for k, v in net.state_dict().items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    warned = [r.message for r in caplog.records if "selected_by: final" in r.message]
    assert len(warned) == (1 if with_evaluator else 0)


def test_exact_resume_matches_an_uninterrupted_run(tmp_path):
    ema = torch.nn.Linear(3, 2)
    straight, net_a, opt_a, data, _ = _training(tmp_path / "a", 4, values={})
    straight.run(data, max_epochs=4)

    first, _, _, data_b, _ = _training(tmp_path / "b", 2, values={}, extra={"teacher": ema})
    first.run(data_b, max_epochs=2)
    saved = load_checkpoint(tmp_path / "b" / "last.pt")
    assert torch.equal(saved["teacher"]["weight"], ema.weight)

    with torch.no_grad():
        ema.weight.zero_()
    # a new process would start from other random weights and another RNG state
    second, net_b, opt_b, _, handler = _training(
        tmp_path / "b", 4, values={}, resume=True, extra={"teacher": ema}, seed=9
    )
    started = {}
    second.add_event_handler(
        Events.STARTED,
        lambda e: started.update(epoch=e.state.epoch, iteration=e.state.iteration, lr=opt_b.param_groups[0]["lr"]),
    )
    second.run(data_b, max_epochs=4)
    assert started == {"epoch": 2, "iteration": 6, "lr": 0.1 * 0.5**2}
    assert torch.equal(ema.weight, saved["teacher"]["weight"])
    for k, v in net_a.state_dict().items():
        assert torch.equal(net_b.state_dict()[k], v), k
    assert second.state.iteration == straight.state.iteration == 12


def test_resume_without_last_starts_fresh_and_wrong_stage_fails(tmp_path):
    engine, *_, data, handler = _training(tmp_path, 1, values={}, resume=True)
    engine.run(data, max_epochs=1)  # nothing to resume: a normal run
    assert load_checkpoint(tmp_path / "last.pt")["progress"]["epoch"] == 1
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["stage"] = "other"
    torch.save(ckpt, tmp_path / "last.pt")
    engine2, *_, data2, _ = _training(tmp_path, 2, values={}, resume=True)
    with pytest.raises(CheckpointError, match="stage is 'other'"):
        engine2.run(data2, max_epochs=2)


def test_bad_arguments(tmp_path):
    net = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="'median'"):
        CheckpointHandler(tmp_path, net, NET_CONFIG, "s", mode="median")
    with pytest.raises(ValueError, match="optimizer"):
        CheckpointHandler(tmp_path, net, NET_CONFIG, "s", extra_modules={"optimizer": net})


def test_transform_rng_round_trip():
    def chain():
        return Compose(
            [
                RandSpatialCropSamplesd(keys="x", roi_size=(4, 4), num_samples=2, random_size=False),
                RandGaussianNoised(keys="x", prob=1.0),
            ]
        ).set_random_state(0)

    def draw(t):
        return np.stack([np.asarray(s["x"]) for s in t({"x": torch.arange(64.0).reshape(1, 8, 8)})])

    a = chain()
    draw(a)
    saved = capture_transform_rng(a)
    expected = draw(a)
    b = chain()
    restore_transform_rng(b, saved)
    np.testing.assert_array_equal(draw(b), expected)
    with pytest.raises(CheckpointError, match="saved"):
        restore_transform_rng(Compose([RandGaussianNoised(keys="x")]), saved)


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
    from medssl.engines.seg_handlers import PerClassDiceLogger

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

    from medssl.engines.seg_handlers import PerClassDiceLogger

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


def test_image_grid_layout_and_scaling(tmp_path):
    vol = torch.arange(8 * 6 * 10, dtype=torch.float32).reshape(1, 8, 6, 10)
    grid = image_grid({"a": vol, "b": -vol[0]}, num_slices=3)
    assert grid.shape == (2 * 6, 3 * 8)  # rot90: H x W slices become W x H tiles
    assert 0.0 <= grid.min() and grid.max() <= 1.0  # scaled by the volume's min/max (end slices not shown)
    top = grid[:6]
    assert np.all(np.diff(top[0, [0, 8, 16]]) > 0)  # later slices are brighter in a ramp along depth
    path = save_image_grid(tmp_path / "g.png", {"a": vol, "b": vol}, num_slices=3)
    import matplotlib.pyplot as plt

    assert plt.imread(path).ndim == 3
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        image_grid({"a": torch.zeros(2, 2)})


# ------------------------------------------------------------------------------------------ engine utilities


def test_resolve_device_and_precision():
    assert utils.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert utils.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="'gpu0'"):
        utils.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            utils.resolve_device("cuda:1")
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with utils.autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    for p in ("fp32", "amp"):
        with utils.autocast("cpu", p):
            assert (a @ b).dtype == torch.float32
    with pytest.raises(ConfigError, match="'fp16'"):
        utils.autocast("cpu", "fp16")
    assert not utils.uses_grad_scaler("cpu", "amp") and not utils.cuda_amp("cpu", "bf16")
    assert utils.cuda_amp_kwargs("bf16") == {"dtype": torch.bfloat16}


@pytest.mark.parametrize("value, expected", [(True, True), ("true", True), ("False", False), (0, False), ("on", True)])
def test_as_bool(value, expected):
    assert utils.as_bool(value) is expected


def test_as_bool_rejects_other_values():
    with pytest.raises(ConfigError, match="'maybe'"):
        utils.as_bool("maybe", "resume")


def test_network_config_from_callable_component():
    from monai.bundle import ConfigParser

    p = ConfigParser(
        {
            "net": {
                "_target_": "monai.networks.nets.ViTAutoEnc",
                "_mode_": "callable",
                "in_channels": 1,
                "img_size": [32, 32, 32],
                "patch_size": 16,
                "hidden_size": 48,
                "mlp_dim": 96,
                "num_layers": 1,
                "num_heads": 2,
            }
        }
    )
    cfg = utils.network_config(p.get_parsed_content("net"))
    assert cfg["_target_"].startswith("monai.networks.nets") and cfg["hidden_size"] == 48
    rebuilt = ConfigParser({"n": cfg}).get_parsed_content("n")
    assert sum(t.numel() for t in rebuilt.parameters()) == sum(
        t.numel() for t in p.get_parsed_content("net")().parameters()
    )
    with pytest.raises(ConfigError, match="positional"):
        utils.network_config(functools.partial(torch.nn.Linear, 3))


def test_resolve_dataset_generates_only_the_default(tmp_path, monkeypatch):
    calls = []

    def ensure_phantom(kind, out, cases, unlabeled, seed):
        calls.append((kind, cases, unlabeled, seed))
        out.mkdir(parents=True)
        (out / "datalist.json").write_text("{}")
        return out / "datalist.json"

    monkeypatch.setitem(sys.modules, "medssl.data.phantoms", types.SimpleNamespace(ensure_phantom=ensure_phantom))
    default = tmp_path / "data" / "ct_phantom"
    with pytest.raises(DataError, match="elsewhere"):
        utils.resolve_dataset(tmp_path / "elsewhere", tmp_path / "elsewhere" / "datalist.json", default)
    assert not calls
    got = utils.resolve_dataset(default, default / "datalist.json", default, cases=2, unlabeled=1, seed=5)
    assert got == (default / "datalist.json").resolve() and calls == [("ct-abdomen", 2, 1, 5)]
    utils.resolve_dataset(default, default / "datalist.json", default)  # exists now: not generated again
    assert len(calls) == 1


def test_fixed_random_dataset_repeats_each_item():
    t = Compose([RandGaussianNoised(keys="x", prob=1.0)])
    ds = utils.FixedRandomDataset([{"x": torch.zeros(1, 4)}, {"x": torch.zeros(1, 4)}], t, seed=3)
    a0, a1, b0 = ds[0]["x"], ds[1]["x"], ds[0]["x"]
    assert torch.equal(a0, b0) and not torch.equal(a0, a1)


def test_pick_scalars_and_first_output():
    out = {"loss": torch.tensor(2.0), "lr": 0.1, "pred": torch.zeros(2)}
    assert utils.pick_scalars(["loss", "lr", "absent"])(out) == {"loss": 2.0, "lr": 0.1}
    assert utils.first_output((torch.ones(1), [torch.zeros(1)])).item() == 1.0


def test_best_of_checkpoint_without_validation_writes_first_candidate_final(tmp_path, caplog):
    from medssl.engines.mt_handlers import BestOfCheckpoint

    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    evaluators = {"teacher": FakeEvaluator({}), "student": FakeEvaluator({})}
    best = BestOfCheckpoint(
        tmp_path / "model.pt", {"teacher": teacher, "student": student}, evaluators, NET_CONFIG, "mean_teacher"
    )
    engine = Engine(lambda e, x: 0.0)
    best.attach(engine)
    with caplog.at_level("WARNING", logger="medssl.engines.mt_handlers"):
        engine.run([0, 1, 2], max_epochs=2)
    ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt["best"]["selected_by"] == "final" and ckpt["best"]["network"] == "teacher"
    assert ckpt["best"]["value"] is None and ckpt["progress"] == {"epoch": 2, "iteration": 6}
    for k, v in teacher.state_dict().items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    assert any("selected_by: final" in r.message for r in caplog.records)


@pytest.mark.parametrize("final, use_module", [("student", False), ("teacher", True)])
def test_best_of_checkpoint_without_validation_writes_the_chosen_final_weights(tmp_path, final, use_module):
    """Mean Teacher's teacher_eval is refreshed only at validation: without one, model.pt must not be its stale
    copy but the live student (``final``) or the EMA teacher itself (``final_network``)."""
    from medssl.engines.mt_handlers import BestOfCheckpoint

    torch.manual_seed(0)
    stale, student, live_teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    evaluators = {"teacher": FakeEvaluator({}), "student": FakeEvaluator({})}
    best = BestOfCheckpoint(
        tmp_path / "model.pt", {"teacher": stale, "student": student}, evaluators, NET_CONFIG, "mean_teacher",
        final=final, final_network=live_teacher if use_module else None,
    )  # fmt: skip
    engine = Engine(lambda e, x: 0.0)
    best.attach(engine)
    engine.run([0, 1], max_epochs=1)
    ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt["best"]["network"] == final and ckpt["best"]["selected_by"] == "final"
    expected = live_teacher if use_module else student
    for k, v in expected.state_dict().items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    assert not torch.equal(ckpt["state_dict"]["weight"], stale.weight)
    with pytest.raises(ValueError, match="final must name a candidate"):
        BestOfCheckpoint(tmp_path / "x.pt", {"teacher": stale}, {"teacher": FakeEvaluator({})}, NET_CONFIG, "mt",
                         final="student")  # fmt: skip


def test_progress_bar_writes_plain_status_lines_when_not_on_a_terminal(capsys):
    from ignite.engine import Engine

    from medssl.engines.handlers import ProgressBar

    engine = Engine(lambda e, b: {"loss": 1.0 / e.state.iteration})
    bar = ProgressBar(output_transform=lambda out: {"loss": out["loss"]}, plain=True, status_interval=3600)
    bar.attach(engine)
    engine.run(range(5), max_epochs=2)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("medssl-progress")]
    # the first iteration and the last (the interval is an hour): a log holds lines, not a redrawn bar
    assert lines == ["medssl-progress iteration 1/10 loss=1", "medssl-progress iteration 10/10 loss=0.1"]
