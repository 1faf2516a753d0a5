"""SIGKILL tiny training runs of every training bundle at random moments, resume each time, compare with an unbroken run.

Each bundle runs in a subprocess exactly as a user runs it (``python -m monai.bundle run training ... --resume
true``), on CPU in fp32 with one thread, so it is deterministic: every checkpoint it leaves (``last.pt`` with
model, optimizer, scheduler, EMA teacher, RNG and transform states; ``model.pt`` and the Mean Teacher's
``model_student.pt`` / ``model_teacher.pt``) must be bitwise equal to those of an uninterrupted run, key by key.
After every kill, every ``.pt`` in the output folder must load, and once the run has finished no temporary file of
a killed writer may be left. A kill lands either a random time into an epoch (validations and saves included) or
the moment a checkpoint's temporary file appears (a kill during the write). The reference run and the killed run
run side by side (one core each).

One harness (:func:`_kill_and_resume`) serves every bundle; a :class:`Case` holds what differs between bundles.
No case needs a tolerance: all are bitwise. Resume is exact at epoch boundaries only, which is where the bundles
save; S5CL runs with ``steps_per_epoch`` null (an epoch = one pass of the unlabeled loader) because with a shorter
``epoch_length`` ignite restarts the unlabeled pass on resume where an unbroken run continues it.
A last test kills a process in the middle of ``atomic_torch_save`` and shows the previous file survives.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from medssl.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

TEMP_GLOB = ".*.tmp"


@dataclass(frozen=True)
class Case:
    """One bundle under test.

    Attributes:
        configs: config files (relative to the repository root), the bundle then ``bundles/tiny.yaml``.
        data: the conftest fixture whose datalist's folder is the dataset (``ct_phantom`` / ``la_phantom``).
        trainer: the trainer class name in ignite's log lines (``<name> - INFO - Epoch[k] Complete``).
        epochs: epochs of the run (the iteration-based bundles get ``max_iterations`` worth this many epochs).
        overrides: more command-line overrides (``--key value``).
        files: the checkpoints the run leaves.
        max_kills: kills per run (a kill never lands in the last epoch, so the run always finishes).
    """

    configs: tuple[str, ...]
    data: str
    trainer: str
    epochs: int
    overrides: dict[str, str] = field(default_factory=dict)
    files: frozenset[str] = frozenset({"last.pt", "model.pt"})
    max_kills: int = 3


# 3 training volumes: batch 2 gives 2 steps per epoch (btcv_unetr, la_vnet); Mean Teacher's two-stream sampler
# (1 labeled + 1 unlabeled per batch) gives 3; s5cl (classification) 8 unlabeled patch batches per epoch against
# 3 labeled ones (epochs end mid labeled pass), segmentation 1 against 2.
CASES = {
    "ssl_pretrain": Case(
        ("bundles/ssl_pretrain.yaml", "bundles/tiny.yaml"),
        "ct_phantom",
        "TwoViewSSLTrainer",
        6,
        {"max_epochs": "6", "max_iterations": "$None"},
        max_kills=4,
    ),
    "btcv_unetr": Case(
        ("bundles/supervised.yaml", "bundles/btcv_unetr.yaml", "bundles/tiny.yaml"),
        "ct_phantom",
        "SupervisedSegTrainer",
        5,
        {"max_iterations": "10", "val_interval": "2"},
    ),
    "la_vnet": Case(
        ("bundles/supervised.yaml", "bundles/la_vnet.yaml", "bundles/tiny.yaml"),
        "la_phantom",
        "SupervisedSegTrainer",
        5,
        {"max_iterations": "10", "val_interval": "2", "lr_step_iterations": "3"},
    ),
    "mean_teacher": Case(
        ("bundles/mean_teacher.yaml", "bundles/tiny.yaml"),
        "la_phantom",
        "MeanTeacherTrainer",
        5,
        {
            "max_iterations": "15",
            "val_interval": "3",
            "consistency_rampup": "4.0",
            "consistency_rampup_unit": "1",
            "lr_step_iterations": "4",
            "checkpoint_interval": "1",  # the recipe writes last.pt every 25 epochs
        },
        files=frozenset({"last.pt", "model.pt", "model_student.pt", "model_teacher.pt"}),
    ),
    "s5cl_classification": Case(
        ("bundles/s5cl.yaml", "bundles/tiny.yaml"),
        "ct_phantom",
        "S5CLTrainer",
        5,
        {
            "max_epochs": "5",
            "max_iterations": "$None",
            "steps_per_epoch": "$None",
            "labeled_per_class": "1",
            "pseudo_label_start": "12",
        },
    ),
    "s5cl_segmentation": Case(
        ("bundles/s5cl.yaml", "bundles/tiny.yaml"),
        "ct_phantom",
        "S5CLTrainer",
        6,
        {
            "mode": "segmentation",
            "max_epochs": "6",
            "max_iterations": "$None",
            "steps_per_epoch": "$None",
            "pseudo_label_start": "3",
        },
    ),
}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _command(case: Case, dataset_dir: Path, out: Path, resume: bool) -> list[str]:
    args = {
        "dataset_dir": str(dataset_dir),
        "output_dir": str(out),
        "device": "cpu",
        "precision": "fp32",
        **case.overrides,
        "resume": "true" if resume else "false",
    }
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr(list(case.configs))]
    for k, v in args.items():
        cmd += [f"--{k}", v]
    return cmd


def _start(case: Case, repo_root: Path, dataset_dir: Path, out: Path, resume: bool, log: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(
            _command(case, dataset_dir, out, resume), cwd=repo_root, env=_env(), stdout=f, stderr=subprocess.STDOUT
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


def _wait_for_temp_file(proc: subprocess.Popen, out: Path, timeout: float, old: set[str]) -> bool:
    """Poll for a new checkpoint temporary file (not in ``old``, a killed attempt's leftovers); True (at once) when
    one appears, False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(n.startswith(".") and n.endswith(".tmp") and ".pt." in n and n not in old for n in os.listdir(out)):
            return True
        time.sleep(0.0005)
    return False


def _epoch_seconds(log: Path, trainer: str) -> float | None:
    """The longest epoch so far, from ignite's ``Epoch[k] Complete. Time taken: HH:MM:SS.fff`` (None: no epoch yet)."""
    pattern = rf"{trainer} - INFO - Epoch\[\d+\] Complete\. Time taken: (\d+):(\d+):([\d.]+)"
    times = re.findall(pattern, log.read_text(errors="replace"))
    return max(int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in times) if times else None


def _assert_all_checkpoints_load(out: Path) -> dict[str, dict]:
    loaded = {}
    for p in sorted(out.glob("*.pt")):
        loaded[p.name] = load_checkpoint(p)  # raises CheckpointError on a partial / corrupt file
    return loaded


def _assert_same(a, b, where: str) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _kill_and_resume(case: Case, repo_root: Path, dataset_dir: Path, tmp_path: Path, seed: int) -> list[tuple]:
    """Run the reference and, at the same time, kill / resume a second run until it finishes; compare both.

    Returns the kill history.
    """
    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    ref_log, log = tmp_path / "reference.log", tmp_path / "killed.log"
    ref = _start(case, repo_root, dataset_dir, ref_out, False, ref_log)  # one core each
    last_kill_epoch = case.epochs - 2
    rng = random.Random(seed)
    history = []  # (epoch the kill aimed at, when, saved epoch after the kill, temp file left)
    saved = 0
    first_write_s = None
    try:
        for attempt in range(case.max_kills + 1):
            offset = log.stat().st_size if log.exists() else 0
            leftovers = {p.name for p in out.glob(TEMP_GLOB)}
            proc = _start(case, repo_root, dataset_dir, out, True, log)
            if attempt == case.max_kills or saved >= last_kill_epoch:
                assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
                break
            # attempt 0: killed the moment its first checkpoint write begins (the end of epoch 1); attempt 1: a
            # random moment after its first epoch (so some attempt resumes from a save and trains on); later ones:
            # either, in the first or second epoch after the start. Never after epoch epochs - 2 (+ 0.2 epochs).
            if attempt == 0:
                target, mode = saved + 1, "write"
            elif attempt == 1:
                target, mode = saved + 2, "delay"
            else:
                target, mode = rng.randint(saved + 1, saved + 2), rng.choice(["write", "delay"])
            target = min(target, last_kill_epoch)
            if target == saved + 1:
                marker = f"{case.trainer} - INFO - Engine run resuming"
            else:
                marker = f"{case.trainer} - INFO - Epoch[{target - 1}] Complete"
            assert _wait_for(proc, log, marker, offset), f"run ended before {marker!r}: {log.read_text()[-3000:]}"
            started = time.monotonic()
            epoch_s = max(_epoch_seconds(log, case.trainer) or 0.0, first_write_s or 0.0) or None
            if mode == "write" or epoch_s is None:
                wrote = _wait_for_temp_file(proc, out, 1.2 * epoch_s if epoch_s else 300.0, leftovers)
                how = "write" if wrote else "no write"
                if wrote and attempt == 0:
                    first_write_s = time.monotonic() - started  # about one epoch
            else:
                delay = rng.uniform(0.0, 1.2 * epoch_s)
                time.sleep(delay)
                how = f"{delay:.2f} s"
            assert proc.poll() is None, f"run ended before the kill ({how} after {marker!r})"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            loaded = _assert_all_checkpoints_load(out)
            saved = loaded["last.pt"]["progress"]["epoch"] if "last.pt" in loaded else 0
            history.append((target, how, saved, bool(list(out.glob(TEMP_GLOB)))))
        assert ref.wait(timeout=600) == 0, ref_log.read_text()[-3000:]
    finally:
        for p in (ref, locals().get("proc")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    print(f"kills (epoch, when, saved epoch after the kill, temp file left): {history}")
    assert len(history) >= 2, f"too few kills: {history}"
    # equal weights alone would also follow from restarting from scratch: some attempt must have resumed from a
    # saved epoch and then completed training epochs
    text = log.read_text(errors="replace")
    attempts = text.split("medssl.handlers.checkpoint - INFO - resume")[1:]
    assert any(
        re.match(r"d from \S+ at epoch [1-9]", a) and f"{case.trainer} - INFO - Epoch[" in a for a in attempts
    ), "no attempt resumed from a checkpoint and trained on"

    assert not list(out.glob(TEMP_GLOB)), f"temporary files of killed writers left: {list(out.glob(TEMP_GLOB))}"
    final, reference = _assert_all_checkpoints_load(out), _assert_all_checkpoints_load(ref_out)
    assert set(final) == set(reference) == case.files
    for name in sorted(case.files):
        assert final[name].keys() == reference[name].keys(), name
        for key in sorted(set(final[name]) - {"versions"}):  # the RNG and transform states included
            _assert_same(final[name][key], reference[name][key], f"{name}.{key}")
    return history


@pytest.mark.parametrize("name", list(CASES))
def test_sigkill_and_resume_matches_uninterrupted_run(name, repo_root, request, tmp_path):
    case = CASES[name]
    dataset_dir = Path(request.getfixturevalue(case.data)).parent
    _kill_and_resume(case, repo_root, dataset_dir, tmp_path, seed=20261122 + sorted(CASES).index(name))


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
