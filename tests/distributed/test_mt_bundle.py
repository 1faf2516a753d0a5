"""mean_teacher.yaml + tiny.yaml + multi_gpu.yaml under torchrun with 2 gloo ranks: one set of checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from medssl.checkpoint import build_network, load_checkpoint
from medssl.handlers.metrics import CsvLog


def test_mean_teacher_two_ranks(la_phantom, tmp_path, torchrun_bundle, event_pids):
    out = tmp_path / "out"
    proc = torchrun_bundle("mean_teacher", Path(la_phantom).parent, out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("events."))
    assert files == ["last.pt", "model.pt", "model_student.pt", "model_teacher.pt", "val_metrics.csv"]
    assert len(event_pids(out)) == 1
    # 3 labeled training volumes → 1 per rank, labeled batch 1 → 1 iteration per epoch; validation every iteration
    rows = CsvLog.read(out / "val_metrics.csv")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert proc.stdout.count("MeanTeacherTrainer - INFO - Engine run finished") == 1

    last = load_checkpoint(out / "last.pt")
    assert last["progress"]["iteration"] == 4
    assert {"teacher", "optimizer", "scheduler", "rng_ranks"} <= set(last)
    for name in ("model.pt", "model_student.pt", "model_teacher.pt"):
        ckpt = load_checkpoint(out / name)
        assert not any(k.startswith("module.") for k in ckpt["state_dict"])
        logits = build_network(ckpt).eval()(torch.randn(1, 1, 32, 32, 32))
        assert logits.shape == (1, 2, 32, 32, 32)
