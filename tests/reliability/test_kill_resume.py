"""SIGKILL a tiny ``ssl_pretrain`` run at random moments, resume it each time, and compare with an unbroken run.

The bundle runs in a subprocess exactly as a user runs it (``python -m monai.bundle run training``), on CPU in
fp32 with one thread, so it is deterministic: the final weights, optimizer state and best model must be bitwise
equal to those of an uninterrupted run. After every kill, every ``.pt`` in the output folder must load.
A second test kills a process in the middle of ``atomic_torch_save`` and shows the previous file survives.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medssl.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

EPOCHS = 6
MAX_KILLS = 4
# A kill lands a random 0..KILL_WINDOW_S after a random epoch boundary (or the trainer's start) of epochs 1..4:
# inside an epoch, a validation or a checkpoint write, never after the run's end, whatever the machine's speed
# (one tiny epoch with its validation and save takes 0.5-1 s on one core).
KILL_WINDOW_S = 0.5
LAST_KILL_EPOCH = EPOCHS - 2
TRAINER_STARTED = "TwoViewSSLTrainer - INFO - Engine run resuming"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _command(dataset_dir: Path, out: Path, resume: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "['bundles/ssl_pretrain.yaml','bundles/tiny.yaml']",
        "--dataset_dir",
        str(dataset_dir),
        "--output_dir",
        str(out),
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--max_epochs",
        str(EPOCHS),
        "--resume",
        "true" if resume else "false",
    ]


def _start(repo_root: Path, dataset_dir: Path, out: Path, resume: bool, log: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(
            _command(dataset_dir, out, resume), cwd=repo_root, env=_env(), stdout=f, stderr=subprocess.STDOUT
        )


def _wait_for(proc: subprocess.Popen, log: Path, text: str, offset: int, timeout: float = 180.0) -> bool:
    """True once ``text`` is in the log after byte ``offset``, False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(offset)
            found = text.encode() in f.read()
        if found:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {text!r} in {log} after {timeout} s")


def _assert_all_checkpoints_load(out: Path) -> dict[str, dict]:
    loaded = {}
    for p in sorted(out.glob("*.pt")):
        loaded[p.name] = load_checkpoint(p)  # raises CheckpointError on a partial / corrupt file
    return loaded


def _assert_same_tensors(a, b, where: str) -> None:
    if torch.is_tensor(a):
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.float() - b.float()).abs().max()})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_sigkill_and_resume_matches_uninterrupted_run(repo_root, ct_phantom, tmp_path):
    dataset_dir = ct_phantom.parent
    ref_out, out = tmp_path / "reference", tmp_path / "killed"

    ref = _start(repo_root, dataset_dir, ref_out, False, tmp_path / "reference.log")
    assert ref.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    rng = random.Random(20261122)
    log = tmp_path / "killed.log"
    history = []  # (killed in epoch, delay after its start, saved epoch after the kill)
    saved = 0
    for attempt in range(MAX_KILLS + 1):
        offset = log.stat().st_size if log.exists() else 0
        proc = _start(repo_root, dataset_dir, out, True, log)
        if attempt == MAX_KILLS or saved >= LAST_KILL_EPOCH:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
            break
        target = rng.randint(saved + 1, LAST_KILL_EPOCH)
        marker = TRAINER_STARTED if target == saved + 1 else f"TwoViewSSLTrainer - INFO - Epoch[{target - 1}] Complete"
        assert _wait_for(proc, log, marker, offset), f"run ended before {marker!r}: {log.read_text()[-3000:]}"
        delay = rng.uniform(0.0, KILL_WINDOW_S)
        time.sleep(delay)
        assert proc.poll() is None, f"run ended within {delay:.2f} s of {marker!r}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        loaded = _assert_all_checkpoints_load(out)
        saved = loaded["last.pt"]["progress"]["epoch"] if "last.pt" in loaded else 0
        history.append((target, round(delay, 2), saved))
    print(f"kills (target epoch, delay s, saved epoch after the kill): {history}")
    assert len(history) >= 2, f"too few kills: {history}"
    # equal weights alone would also follow from restarting from scratch: some attempt must have resumed from a
    # saved epoch and then completed training epochs
    text = log.read_text(errors="replace")
    attempts = text.split("medssl.engines.handlers - INFO - resume")[1:]
    assert any(
        re.match(r"d from \S+ at epoch [1-9]", a) and "TwoViewSSLTrainer - INFO - Epoch[" in a for a in attempts
    ), "no attempt resumed from a checkpoint and trained on"

    final, reference = _assert_all_checkpoints_load(out), _assert_all_checkpoints_load(ref_out)
    assert set(final) == set(reference) == {"last.pt", "model.pt"}
    for name in ("last.pt", "model.pt"):
        assert final[name]["progress"] == reference[name]["progress"]
        _assert_same_tensors(final[name]["state_dict"], reference[name]["state_dict"], f"{name}.state_dict")
    _assert_same_tensors(final["last.pt"]["optimizer"], reference["last.pt"]["optimizer"], "last.pt.optimizer")
    assert final["model.pt"]["best"] == reference["model.pt"]["best"]
    # a kill after the last save makes the next attempt a resume with nothing left to train; CheckpointHandler then
    # re-saves last.pt at COMPLETED with the RNG advanced by the validation at start (weights unchanged): see
    # test_reliability_resume_noop.py (xfail until fixed). Otherwise the saved RNG streams match too.
    if "nothing left to train" not in text:
        _assert_same_tensors(final["last.pt"]["rng"], reference["last.pt"]["rng"], "last.pt.rng")
        _assert_same_tensors(
            final["last.pt"]["transform_rng"], reference["last.pt"]["transform_rng"], "last.pt.transform_rng"
        )


_WRITER = """
import sys, torch
from medssl.checkpoint import atomic_torch_save
path = sys.argv[1]
for step in range(1, 10_000):
    atomic_torch_save({"step": step, "w": torch.full((8_000_000,), float(step))}, path)
"""


def test_sigkill_during_checkpoint_write_keeps_previous_file(tmp_path):
    """Kill a writer while its temporary file is being written: the target still holds a complete checkpoint."""
    target = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], env=_env())
    deadline = time.monotonic() + 120
    try:
        while not target.exists():  # a first complete file
            assert proc.poll() is None and time.monotonic() < deadline, "writer did not produce a first file"
            time.sleep(0.01)
        # wait for a partially written temporary file of a later save (32 MB each; the kill lands mid-write)
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "no temporary file seen"
            tmps = [p for p in tmp_path.glob(".last.pt.*.tmp") if 0 < p.stat().st_size < 30_000_000]
            if tmps:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    leftovers = list(tmp_path.glob(".last.pt.*.tmp"))
    assert leftovers, "the kill did not land during a write"
    assert any(p.stat().st_size < 32_000_000 for p in leftovers), "the temporary file was complete"
    obj = torch.load(target, weights_only=True)
    assert obj["step"] >= 1 and torch.equal(obj["w"], torch.full((8_000_000,), float(obj["step"])))
