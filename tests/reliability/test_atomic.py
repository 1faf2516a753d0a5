"""Stale temporary files of killed atomic writes are removed, a live writer's never (``medssl.atomic``).

A real writer process is paused in the middle of :func:`~medssl.atomic.atomic_write` (its ``write`` callback waits),
so its temporary file is half written and locked, exactly as during a checkpoint save; it is then SIGKILLed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import medssl.atomic as atomic
from medssl.atomic import TEMP_SUFFIX, atomic_write, atomic_write_text, remove_stale_temp_files

_PAUSED_WRITER = """
import sys, time
from pathlib import Path
from medssl.atomic import atomic_write

def write(f):
    f.write(b"half")
    f.flush()
    print("writing", flush=True)
    while not Path(sys.argv[2]).exists():
        time.sleep(0.01)
    f.write(b" and the rest")

atomic_write(sys.argv[1], write)
print("done", flush=True)
"""


@pytest.fixture(autouse=True)
def _fresh_sweep_memory(monkeypatch):
    monkeypatch.setattr(atomic, "_swept", set())


def _paused_writer(target: Path, go: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_WRITER, str(target), str(go)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing", "the writer did not start its write"
    return proc


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".*{TEMP_SUFFIX}"))


def test_live_writers_temp_file_is_kept_and_a_killed_ones_removed(tmp_path):
    target, go = tmp_path / "last.pt", tmp_path / "go"
    target.write_bytes(b"previous")
    live = _paused_writer(target, go)
    try:
        (temp,) = _temps(tmp_path)
        assert temp.read_bytes() == b"half"
        # another run writing into the same folder sweeps it: the live writer's file stays
        assert remove_stale_temp_files(tmp_path) == []
        atomic_write_text(tmp_path / "model.pt", "other run")
        assert temp.exists()
        go.touch()
        assert live.wait(timeout=60) == 0 and live.stdout.read().strip() == "done"
        assert target.read_bytes() == b"half and the rest" and not temp.exists()

        go.unlink()
        killed = _paused_writer(target, go)
        (temp,) = _temps(tmp_path)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
        assert temp.exists() and target.read_bytes() == b"half and the rest"  # the previous file survives
        assert remove_stale_temp_files(tmp_path) == [temp]
        assert not temp.exists() and target.read_bytes() == b"half and the rest"
    finally:
        for p in (live, locals().get("killed")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_the_first_write_of_a_process_removes_leftovers_in_its_folder(tmp_path):
    target, go = tmp_path / "last.pt", tmp_path / "go"
    killed = _paused_writer(target, go)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    (leftover,) = _temps(tmp_path)
    atomic_write_text(tmp_path / "val_metrics.json", "{}")  # any file, any target in the folder
    assert not leftover.exists() and _temps(tmp_path) == []


def test_only_own_temp_files_are_touched(tmp_path):
    foreign = [tmp_path / n for n in (".results.csv.abc123.tmp", ".x.tmp.png", "notes.atomic.tmp", ".y.tmp")]
    for p in foreign:
        p.write_text("someone else's")
    young_init = tmp_path / ".last.pt.k2j3h4.atomic.init"
    old_init = tmp_path / ".last.pt.zz99aa.atomic.init"
    young_init.write_bytes(b"")
    old_init.write_bytes(b"")
    past = time.time() - 2 * atomic.INIT_GRACE_S
    os.utime(old_init, (past, past))
    assert remove_stale_temp_files(tmp_path) == [old_init]
    assert all(p.exists() for p in [*foreign, young_init])
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_a_failed_write_leaves_nothing_and_the_file_keeps_its_mode(tmp_path):
    target = tmp_path / "out.bin"

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom)
    assert list(tmp_path.iterdir()) == []
    atomic_write(target, lambda f: f.write(b"ok"))
    assert target.read_bytes() == b"ok"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path, umask):
    """mkstemp creates 0600 files; an atomically written result must be as readable as open() would make it."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777


def test_atomic_write_all_changes_no_file_when_one_write_fails(tmp_path):
    from medssl.atomic import atomic_write_all

    a, b = tmp_path / "a.csv", tmp_path / "b.md"
    atomic_write_all({a: lambda f: f.write(b"old a"), b: lambda f: f.write(b"old b")})

    def boom(f):
        raise RuntimeError("bad value")

    with pytest.raises(RuntimeError, match="bad value"):
        atomic_write_all({a: lambda f: f.write(b"new a"), b: boom})
    assert a.read_bytes() == b"old a" and b.read_bytes() == b"old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.md"]
