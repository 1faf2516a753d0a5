"""Fixtures of the 2-process tests: run a bundle with ``bundles/multi_gpu.yaml`` or a worker script under torchrun.

Every run is ``python -m torch.distributed.run --nproc_per_node=2`` on a free port: 2 gloo ranks on the CPU, each
with one intra-op thread.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], timeout: float, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# recipe overlays and the base they complete
RECIPE_BASES = {"btcv_unetr": ("supervised.yaml",), "la_vnet": ("supervised.yaml",)}


@pytest.fixture(scope="session")
def torchrun_bundle() -> Callable[..., subprocess.CompletedProcess]:
    """``run(bundle, data, out, *extra_args)``: ``monai.bundle run training`` of bundle + tiny + multi_gpu."""

    def run(bundle: str, data: Path, out: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
        recipe = [*RECIPE_BASES.get(bundle, ()), f"{bundle}.yaml"]
        configs = [str(BUNDLES / f) for f in (*recipe, "tiny.yaml", "multi_gpu.yaml")]
        args = ["-m", "monai.bundle", "run", "training", "--config_file", repr(configs), "--bundle_root",
                str(out.parent), "--dataset_dir", str(data), "--output_dir", str(out), *extra]  # fmt: skip
        return _torchrun(args, timeout)

    return run


@pytest.fixture(scope="session")
def torchrun_script() -> Callable[..., subprocess.CompletedProcess]:
    """``run(script, *args)``: a Python script as the torchrun entry point."""

    def run(script: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
        return _torchrun([str(script), *map(str, args)], timeout)

    return run


def event_file_pids(folder: Path) -> set[str]:
    """Process ids in the TensorBoard event file names (``events.out.tfevents.<time>.<host>.<pid>.<n>``)."""
    return {f.name.split(".")[-2] for f in folder.glob("events.out.tfevents.*")}


@pytest.fixture(scope="session")
def event_pids() -> Callable[[Path], set[str]]:
    return event_file_pids
