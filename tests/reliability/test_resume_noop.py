"""Resuming a finished run (a kill after the last save) must leave its checkpoint as it was.

Found by test_kill_resume.py: the next attempt restores ``last.pt`` at ``max_epochs``, trains nothing, runs the
validation at start (which draws from torch's RNG) and ``CheckpointHandler`` re-saves ``last.pt`` at ``COMPLETED``
with the advanced RNG state. The weights are unaffected; a later extension of the run (larger ``max_epochs``)
would not continue the random streams of an unbroken run.
"""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from medssl.checkpoint import load_checkpoint
from medssl.handlers import CheckpointHandler

NET_CONFIG = {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 1}


def _run(out, resume: bool, epochs: int = 2, seed: int = 0) -> int:
    """Train (or resume) and return how many iterations this call ran."""
    torch.manual_seed(seed)
    data = [{"image": torch.randn(4), "label": torch.randn(1)} for _ in range(4)]
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=torch.utils.data.DataLoader(data, batch_size=2, shuffle=True),
        network=net,
        optimizer=opt,
        loss_function=torch.nn.MSELoss(),
        train_handlers=[CheckpointHandler(out, net, NET_CONFIG, "unit", optimizer=opt, resume=resume)],
        decollate=False,
    )
    # stands in for a validation at start, which draws from torch's RNG when it creates its loader iterator
    trainer.add_event_handler(Events.STARTED, lambda _: torch.rand(1))
    ran = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: ran.append(e.state.iteration))
    trainer.run()
    return len(ran)


@pytest.fixture
def finished(tmp_path):
    assert _run(tmp_path, resume=False) == 4
    before = load_checkpoint(tmp_path / "last.pt")
    # another seed, as a new process would have: another initial network and RNG state until the restore, so
    # a resume that were ignored (a fresh run) could not reproduce the saved weights and RNG by chance
    ran = _run(tmp_path, resume=True, seed=1)
    return before, load_checkpoint(tmp_path / "last.pt"), ran


def test_noop_resume_keeps_weights_and_progress(finished):
    before, after, ran = finished
    assert ran == 0  # restored at the end of the run: nothing left to train
    assert after["progress"] == before["progress"] == {"epoch": 2, "iteration": 4}
    for k, v in before["state_dict"].items():
        assert torch.equal(v, after["state_dict"][k])


def test_noop_resume_keeps_rng_state(finished):
    before, after, _ = finished
    assert torch.equal(before["rng"]["torch"], after["rng"]["torch"])
