"""A corrupt ``last.pt`` on resume: a clear error naming the file (and, once handled, pointing at ``model.pt``)."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from medssl.checkpoint import save_checkpoint
from medssl.errors import CheckpointError
from medssl.handlers import CheckpointHandler

NET_CONFIG = {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 1}


@pytest.fixture
def damaged_run(tmp_path):
    """An output folder with a good ``model.pt`` and a ``last.pt`` cut in half (a disk fault, a bad copy)."""
    net = torch.nn.Linear(4, 1)
    save_checkpoint(tmp_path / "model.pt", network=NET_CONFIG, state_dict=net.state_dict(), stage="unit")
    save_checkpoint(tmp_path / "last.pt", network=NET_CONFIG, state_dict=net.state_dict(), stage="unit")
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    handler = CheckpointHandler(tmp_path, torch.nn.Linear(4, 1), NET_CONFIG, "unit", resume=True)
    return tmp_path, handler, Engine(lambda e, b: None)


def test_corrupt_last_is_a_named_error(damaged_run):
    out, handler, engine = damaged_run
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        handler.restore(engine)
    assert str(info.value).startswith(f"{out / 'last.pt'}: ")
    assert "\n" not in str(info.value)


def test_corrupt_last_offers_the_best_checkpoint(damaged_run):
    out, handler, engine = damaged_run
    with pytest.raises(CheckpointError) as info:
        handler.restore(engine)
    assert str(out / "model.pt") in str(info.value)
