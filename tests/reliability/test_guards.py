"""NonFiniteLossGuard: a NaN / Inf loss at step k stops training before the bad step is saved or applied."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from monai.engines import SupervisedTrainer

from medssl.checkpoint import load_checkpoint
from medssl.errors import MedsslError
from medssl.handlers import CheckpointHandler, NonFiniteLossGuard
from medssl.handlers.guards import NonFiniteLossError, loss_parts

NET_CONFIG = {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 1}


class PoisonedLoss(torch.nn.Module):
    """MSE whose value becomes ``bad`` (NaN / inf) at the ``at``-th call (1-based)."""

    def __init__(self, at: int, bad: float = float("nan")):
        super().__init__()
        self.at, self.bad, self.calls = at, bad, 0

    def forward(self, pred, target):
        self.calls += 1
        loss = torch.nn.functional.mse_loss(pred, target)
        return loss * self.bad if self.calls == self.at else loss


def _trainer(tmp_path, poison_at: int, bad: float = float("nan"), guard: bool = True, epochs: int = 4):
    torch.manual_seed(0)
    data = [{"image": torch.randn(4), "label": torch.randn(1)} for _ in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)  # 2 iterations per epoch
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    handlers = [CheckpointHandler(tmp_path, net, NET_CONFIG, "unit", optimizer=opt)]
    if guard:
        handlers.append(NonFiniteLossGuard(output_dir=tmp_path))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=net,
        optimizer=opt,
        loss_function=PoisonedLoss(poison_at, bad),
        train_handlers=handlers,
        decollate=False,
    )
    return trainer, net


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_guard_stops_before_the_bad_step_and_keeps_last_good_checkpoint(tmp_path, bad):
    trainer, net = _trainer(tmp_path, poison_at=5, bad=bad)  # iteration 5 = first iteration of epoch 3
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run()
    err = info.value
    assert (err.iteration, err.epoch) == (5, 3)
    assert "iteration 5 (epoch 3)" in str(err) and f"loss={bad}" in str(err)
    assert str(err).startswith(str(tmp_path))
    # last.pt is the one written at the end of epoch 2 (iteration 4), and it is finite
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["progress"] == {"epoch": 2, "iteration": 4}
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    # the guard fired before backward/step: the network still holds exactly the saved weights
    for k, v in net.state_dict().items():
        assert torch.equal(v, last["state_dict"][k]), k


def test_without_guard_the_nan_reaches_the_checkpoint(tmp_path):
    """Control: the same poisoned run without the guard trains on and saves NaN weights (what the guard prevents)."""
    trainer, _ = _trainer(tmp_path, poison_at=5, guard=False)
    trainer.run()
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["progress"]["iteration"] == 8
    assert not all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_finite_run_is_untouched(tmp_path):
    guarded, net_a = _trainer(tmp_path / "a", poison_at=-1)
    plain, net_b = _trainer(tmp_path / "b", poison_at=-1, guard=False)
    guarded.run()
    plain.run()
    assert guarded.state.iteration == 8
    for k, v in net_a.state_dict().items():
        assert torch.equal(v, net_b.state_dict()[k])


def test_loss_part_reported_after_the_step(tmp_path):
    """A part only placed in the output after the step (plain ignite engine: no LOSS_COMPLETED) is caught too."""

    def step(engine, batch):
        aux = float("nan") if engine.state.iteration == 3 else 0.5
        return {"loss": torch.tensor(1.0), "loss_aux": torch.tensor(aux), "pred": torch.zeros(2, 2), "lr": 0.1}

    engine = Engine(step)
    NonFiniteLossGuard().attach(engine)
    with pytest.raises(NonFiniteLossError, match=r"iteration 3 \(epoch 2\): loss=1, loss_aux=nan; stopped after"):
        engine.run([0, 1], max_epochs=3)
    assert engine.state.iteration == 3


def test_keys_restrict_the_check():
    def step(engine, batch):
        return {"loss": torch.tensor(1.0), "loss_ignored": torch.tensor(float("nan"))}

    engine = Engine(step)
    NonFiniteLossGuard(keys=["loss"]).attach(engine)
    engine.run([0], max_epochs=2)
    assert engine.state.iteration == 2


def test_error_is_a_user_error_and_a_floating_point_error():
    err = NonFiniteLossError("runs/x", "non-finite loss", 1, 1, {"loss": float("nan")})
    assert isinstance(err, MedsslError) and isinstance(err, FloatingPointError)
    assert str(err) == "runs/x: non-finite loss"


def test_loss_parts():
    out = {"loss": torch.tensor(2.0), "loss_vec": torch.ones(3), "image": torch.ones(1), "loss_f": 1.5}
    assert loss_parts(out) == {"loss": 2.0, "loss_f": 1.5}
    assert loss_parts([out]) == {"loss": 2.0, "loss_f": 1.5}
    assert loss_parts(torch.tensor(3.0)) == {"loss": 3.0}
    assert loss_parts(out, keys=["loss_f", "missing"]) == {"loss_f": 1.5}
    with pytest.raises(ValueError, match="'loss'"):
        NonFiniteLossGuard(keys="loss")
