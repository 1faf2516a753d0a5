"""medssl.engines.distributed in one process: no-op fallbacks, idle parameters, rank > 0 handler filtering."""

from __future__ import annotations

import pytest
import torch

from medssl import dist
from medssl.engines import distributed


def test_without_torchrun_everything_is_a_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.init_distributed("cpu") == torch.device("cpu")
    assert not dist.is_distributed()
    assert (dist.get_rank(), dist.get_world_size(), dist.is_main_process()) == (0, 1, True)
    net = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(net, "cpu") is net

    class Trainer:
        def run(self):
            return "ran"

    assert distributed.run(Trainer(), seed=3) == "ran"


def test_a_fixed_gpu_index_is_refused_under_torchrun(monkeypatch):
    from medssl.errors import ConfigError

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="cuda:1"):
        distributed.init_distributed("cuda:1")


def test_idle_parameters_are_exactly_those_without_a_gradient():
    from monai.networks.nets import ViTAutoEnc

    from medssl.networks.vnet import VNet

    vit = ViTAutoEnc(in_channels=1, img_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2)
    vit(torch.rand(2, 1, 16, 16, 16))[0].sum().backward()
    no_grad = {n for n, p in vit.named_parameters() if p.grad is None}
    assert no_grad and set(distributed.idle_parameters(vit)) == no_grad
    assert distributed.idle_parameters(VNet(base_filters=4)) == []


def test_loader_without_a_process_group_is_a_plain_monai_loader():
    data = list(range(10))
    shuffled = distributed.DistributedDataLoader(data, batch_size=5, shuffle=True, seed=1)
    assert isinstance(shuffled.sampler, torch.utils.data.RandomSampler)
    assert sorted(torch.cat(list(shuffled)).tolist()) == data
    ordered = distributed.DistributedDataLoader(data, batch_size=4, shuffle="false", even_divisible=False)
    assert [b.tolist() for b in ordered] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def _event_files(folder):
    return list(folder.glob("events.out.tfevents.*"))


def test_ranks_above_zero_keep_only_the_handlers_that_change_training(tmp_path, monkeypatch):
    from monai.engines import SupervisedEvaluator
    from monai.handlers import MeanAbsoluteError, StatsHandler, TensorBoardStatsHandler, ValidationHandler, from_engine

    from medssl.handlers import CheckpointHandler, MetricHistory, NonFiniteLossGuard, ProgressBar

    net = torch.nn.Conv3d(1, 1, 1)
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=[{"image": torch.rand(1, 1, 2, 2, 2), "label": torch.rand(1, 1, 2, 2, 2)}],
        network=net,
        key_val_metric={"val_l1": MeanAbsoluteError(output_transform=from_engine(["pred", "label"]))},
        val_handlers=[
            StatsHandler(iteration_log=False),
            MetricHistory(tmp_path / "val.csv", ["val_l1"]),
            TensorBoardStatsHandler(log_dir=str(tmp_path / "val_tb")),
        ],
    )
    guard = NonFiniteLossGuard()
    ckpt = CheckpointHandler(tmp_path, net, {"_target_": "torch.nn.Conv3d"}, "test")
    validation = ValidationHandler(interval=1, validator=evaluator)
    tb = TensorBoardStatsHandler(log_dir=str(tmp_path / "train_tb"))
    unknown = object()
    handlers = [guard, ckpt, StatsHandler(), tb, validation, ProgressBar(), unknown]
    assert _event_files(tmp_path / "train_tb") and _event_files(tmp_path / "val_tb")

    assert distributed.main_process_only(handlers) == handlers  # rank 0 keeps everything

    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    assert distributed.main_process_only(handlers) == [guard, ckpt, validation, unknown]
    owners = {type(distributed._owner(h[0])).__name__ for hs in evaluator._event_handlers.values() for h in hs}
    assert not owners & {"StatsHandler", "MetricHistory", "TensorBoardStatsHandler"}
    assert not _event_files(tmp_path / "train_tb") and not _event_files(tmp_path / "val_tb")
    evaluator.run()  # the stripped evaluator still validates, and writes nothing
    assert "val_l1" in evaluator.state.metrics and not (tmp_path / "val.csv").exists()
