"""CheckpointHandler (best / last / exact resume), transform RNG states, BestOfCheckpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose, RandGaussianNoised, RandSpatialCropSamplesd

from medssl.checkpoint import load_checkpoint
from medssl.errors import CheckpointError
from medssl.handlers import CheckpointHandler
from medssl.handlers.checkpoint import capture_transform_rng, restore_transform_rng
from tests.handlers.fakes import FakeEvaluator

NET_CONFIG = {"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 2}


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
    with caplog.at_level("WARNING", logger="medssl.handlers.checkpoint"):
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


def test_best_of_checkpoint_without_validation_writes_first_candidate_final(tmp_path, caplog):
    from medssl.handlers import BestOfCheckpoint

    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    evaluators = {"teacher": FakeEvaluator({}), "student": FakeEvaluator({})}
    best = BestOfCheckpoint(
        tmp_path / "model.pt", {"teacher": teacher, "student": student}, evaluators, NET_CONFIG, "mean_teacher"
    )
    engine = Engine(lambda e, x: 0.0)
    best.attach(engine)
    with caplog.at_level("WARNING", logger="medssl.handlers.checkpoint"):
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
    from medssl.handlers import BestOfCheckpoint

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


def test_best_tracker_picks_the_round_best_in_candidate_order_and_ignores_nan():
    from medssl.handlers.checkpoint import BestTracker

    tracker = BestTracker("val_loss", "max", ["teacher", "student"])
    teacher, student = FakeEvaluator({1: 0.5, 2: 0.6, 3: float("nan")}), FakeEvaluator({1: 0.5, 2: 0.7, 3: 0.9})
    tracker.watch(teacher, "teacher")
    tracker.watch(student, "student")
    for ev in (teacher, student):
        ev.run_for(1)
    assert tracker.take(None) == ("teacher", 0.5)  # a tie goes to the candidate listed first
    for ev in (teacher, student):
        ev.run_for(2)
    assert tracker.take(0.8) is None and tracker.pending == {}  # no improvement on the best so far; round cleared
    for ev in (teacher, student):
        ev.run_for(3)
    tracker.forget()  # e.g. a validation before training: selects nothing
    assert tracker.take(None) is None
    student.run_for(3)
    teacher.run_for(3)
    assert tracker.take(0.8) == ("student", 0.9)  # the teacher's NaN never wins
    low = BestTracker("val_loss", "min")
    assert low.improves(0.1, 0.2) and not low.improves(0.3, 0.2) and not low.improves(float("inf"), None)
    with pytest.raises(ValueError, match="'median'"):
        BestTracker("val_loss", "median")
