"""Experiment tracking: ``--tracking bundles/tracking_mlflow.yaml`` records params, metrics and model.pt on rank 0.

The runs need the tracking extra (``pip install -e .[tracking]``); the metric helpers below run without it.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.engines.distributed import is_output_handler
from medssl.handlers.tracking import MLflowRunLogger, newest_match, scalar_metrics

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
CONFIGS = [str(BUNDLES / f) for f in ("supervised.yaml", "btcv_unetr.yaml", "tiny.yaml")]
TRACKING = str(BUNDLES / "tracking_mlflow.yaml")
needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="the tracking extra is missing")


def test_scalar_metrics_flattens_vectors_and_rejects_matrices():
    got = scalar_metrics({"mean": 0.5, "per_class": torch.tensor([0.1, 0.2]), "np": np.float32(1.5)})
    assert got == pytest.approx({"mean": 0.5, "per_class/0": 0.1, "per_class/1": 0.2, "np": 1.5})
    with pytest.raises(ValueError, match=r"'m'.*\(2, 2\)"):
        scalar_metrics({"m": torch.zeros(2, 2)})


def test_newest_match_picks_the_latest_file(tmp_path):
    old, new = tmp_path / "config_1.json", tmp_path / "config_2.json"
    old.write_text("{}")
    new.write_text("{}")
    os.utime(old, (2_000_000_000, 2_000_000_000))  # newer mtime although older name
    assert newest_match(tmp_path / "config_*.json") == str(old)
    assert newest_match(tmp_path / "none_*.json") is None


def test_logger_is_a_rank0_output_handler():
    assert is_output_handler(MLflowRunLogger)


def _open_run(out: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("medssl")
    runs = client.search_runs([experiment.experiment_id])
    return client, runs


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@needs_mlflow
def test_tiny_run_records_params_metrics_and_model(ct_phantom, tmp_path):
    from monai.bundle import run

    out = tmp_path / "out"
    data = Path(ct_phantom).parent
    run("training", config_file=CONFIGS, tracking=TRACKING, bundle_root=str(tmp_path), dataset_dir=str(data),
        output_dir=str(out), max_iterations=3, val_interval=2)  # fmt: skip
    client, runs = _open_run(out)
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    params = r.data.params
    assert params["seed"] == "123" and params["batch_size"] == "2" and params["roi_size"] == "[32, 32, 32]"
    assert params["dataset_dir"] == str(data)
    assert [s for s, _ in _history(client, r.info.run_id, "loss")] == [1, 2, 3]
    # validation every 2 iterations, logged at the trainer's iteration (not the evaluator's epoch)
    dice = _history(client, r.info.run_id, "val_mean_dice")
    assert [s for s, _ in dice] == [2] and all(0.0 <= v <= 1.0 for _, v in dice)
    assert {f"val_dice_per_class/{i}" for i in range(13)} <= set(r.data.metrics)
    artifacts = {f.path for f in client.list_artifacts(r.info.run_id)}
    assert {"model.pt", "val_metrics.csv"} <= artifacts
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts)
    logged = Path(client.download_artifacts(r.info.run_id, "model.pt", str(tmp_path / "dl")))
    assert logged.read_bytes() == (out / "model.pt").read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_mlflow
@pytest.mark.slow
def test_only_rank0_records_under_torchrun(ct_phantom, tmp_path):
    out = tmp_path / "out"
    configs = [*CONFIGS, str(BUNDLES / "multi_gpu.yaml")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "monai.bundle", "run", "training", "--config_file", repr(configs), "--tracking", TRACKING,
           "--bundle_root", str(tmp_path), "--dataset_dir", str(Path(ct_phantom).parent), "--output_dir", str(out),
           "--max_iterations", "2", "--val_interval", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    client, runs = _open_run(out)
    assert len(runs) == 1  # rank 1 built no handler, so it opened no run
    r = runs[0]
    # one loss per iteration: rank 1 logged nothing into rank 0's run either
    assert [s for s, _ in _history(client, r.info.run_id, "loss")] == [1, 2]
    assert [s for s, _ in _history(client, r.info.run_id, "val_mean_dice")] == [2]
    assert "model.pt" in {f.path for f in client.list_artifacts(r.info.run_id)}


@needs_mlflow
def test_ssl_pretrain_records_its_validation_metric_and_model(ct_phantom, tmp_path):
    from monai.bundle import run

    out = tmp_path / "out"
    configs = [str(BUNDLES / f) for f in ("ssl_pretrain.yaml", "tiny.yaml")]
    run("training", config_file=configs, tracking=TRACKING, bundle_root=str(tmp_path),
        dataset_dir=str(Path(ct_phantom).parent), output_dir=str(out), max_epochs=1)  # fmt: skip
    client, runs = _open_run(out)
    assert len(runs) == 1
    r = runs[0]
    assert r.data.params["max_epochs"] == "1" and r.data.params["seed"] == "123"
    assert {"loss", "val_l1"} <= set(r.data.metrics)
    assert "model.pt" in {f.path for f in client.list_artifacts(r.info.run_id)}
