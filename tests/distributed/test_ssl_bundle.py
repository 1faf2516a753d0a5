"""ssl_pretrain.yaml + tiny.yaml + multi_gpu.yaml under torchrun with 2 gloo ranks: one set of outputs, and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medssl.checkpoint import build_network, load_checkpoint
from medssl.handlers import MetricHistory

TRAINER_DONE = "TwoViewSSLTrainer - INFO - Epoch[1] Complete"


@pytest.fixture(scope="module")
def ddp_run(ct_phantom, tmp_path_factory, torchrun_bundle):
    out = tmp_path_factory.mktemp("ddp_ssl") / "out"
    proc = torchrun_bundle("ssl_pretrain", Path(ct_phantom).parent, out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, proc


def test_two_ranks_write_one_set_of_outputs(ddp_run, event_pids):
    out, proc = ddp_run
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("events.")) == [
        "last.pt",
        "model.pt",
        "val_metrics.csv",
        "views.png",
    ]
    assert len(event_pids(out)) == 1  # TensorBoard files of one process (rank 0) only
    # validation at start + 2 epochs, each logged once although both ranks validated
    assert [row["epoch"] for row in MetricHistory.read(out / "val_metrics.csv")] == [0, 1, 2]
    assert proc.stdout.count(TRAINER_DONE) == 1  # ranks > 0 log warnings only
    assert "process group: gloo, world size 2" in proc.stdout

    net = build_network(load_checkpoint(out / "model.pt"))
    assert net(torch.rand(1, 1, 32, 32, 32))[0].shape == (1, 1, 32, 32, 32)
    assert not any(k.startswith("module.") for k in load_checkpoint(out / "model.pt")["state_dict"])
    last = load_checkpoint(out / "last.pt")
    # 5 training volumes → 3 per rank (even_divisible pads one) → 2 iterations of batch 2 per epoch
    assert last["progress"] == {"epoch": 2, "iteration": 4}
    assert len(last["rng_ranks"]) == 2
    # each rank trained with its own random stream (seed + rank)
    ranks = last["rng_ranks"]
    assert not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])
    keys = [[s["keys"] for s in r["transform_rng"]["states"]] for r in ranks]  # the views' crops and corruptions
    assert any(not torch.equal(a, b) for a, b in zip(*keys))
    assert torch.equal(ranks[0]["rng"]["torch"], last["rng"]["torch"])  # rank 0's is also the plain one


def test_resume_a_distributed_run(ddp_run, ct_phantom, torchrun_bundle, tmp_path, event_pids):
    out, _ = ddp_run
    resumed = tmp_path / "out"
    resumed.mkdir()
    for name in ("last.pt", "model.pt", "val_metrics.csv"):
        (resumed / name).write_bytes((out / name).read_bytes())
    proc = torchrun_bundle(
        "ssl_pretrain", Path(ct_phantom).parent, resumed, "--resume", "true", "--max_epochs", "3",
        "--max_iterations", "$None",
        "--validate_at_start", "false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("resumed from") == 1  # every rank restores; only rank 0 logs it
    assert load_checkpoint(resumed / "last.pt")["progress"] == {"epoch": 3, "iteration": 6}
    assert [row["epoch"] for row in MetricHistory.read(resumed / "val_metrics.csv")] == [0, 1, 2, 3]
    assert len(event_pids(resumed)) == 1
