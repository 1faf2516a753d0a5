"""The Docker images reference the real package, requirements, entry point and bundles.

No Docker engine runs on our machines, so the Dockerfiles are checked as text against the repository: every COPY
source exists, torch is the version setup.cfg pins, medssl is installed from setup.cfg (its pinned requirements),
the entry point is the console script, and the commands in the headers parse with the real CLI and name real
bundles. A wheel built from the tree (what ``pip install .`` in the image installs) then finds bundles/ and
json_splits/ through ``MEDSSL_HOME`` exactly as the image sets it.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from medssl.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _pinned_torch() -> str:
    requires = _setup_cfg()["options"]["install_requires"]
    match = re.search(r"^\s*torch==([\w.]+)\s*$", requires, re.M)
    assert match, "setup.cfg must pin torch exactly"
    return match.group(1)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _header_commands(path: Path) -> list[list[str]]:
    """The shell commands of the header comment (``#   docker ...`` with ``\\`` continuations)."""
    lines = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
    text = re.sub(r"\\\s*\n", " ", "\n".join(lines))
    return [shlex.split(ln) for ln in text.splitlines() if ln.startswith("docker run")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_references_real_files_pins_and_entry_point(dockerfile):
    steps = _instructions(dockerfile)
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for word, rest in steps if word == "ARG" and "=" in rest}
    assert args["TORCH_VERSION"] == _pinned_torch()

    copied = []
    for word, rest in steps:
        if word == "COPY":
            *sources, _dest = rest.split()
            copied += sources
    for source in copied:
        assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which is not in the repository"
    # the package is installed from setup.cfg (its pinned requirements), and bundles/json_splits come along
    assert {"setup.cfg", "pyproject.toml", "medssl", "bundles", "json_splits"} <= set(copied)
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "pip install ." in runs
    env = " ".join(rest for word, rest in steps if word == "ENV")
    workdir = [rest for word, rest in steps if word == "WORKDIR"][-1]
    assert f"MEDSSL_HOME={workdir}" in env

    entry = [json.loads(rest) for word, rest in steps if word == "ENTRYPOINT"]
    scripts = _setup_cfg()["options.entry_points"]["console_scripts"]
    name, target = (s.strip() for s in scripts.strip().split("="))
    assert entry == [[name]]
    module, func = target.split(":")
    assert callable(getattr(__import__(module, fromlist=[func]), func))


def test_cpu_image_takes_torch_from_the_cpu_index():
    runs = [rest for word, rest in _instructions(DOCKERFILES[0]) if word == "RUN"]
    torch_install = [r for r in runs if "torch==" in r]
    assert torch_install and "download.pytorch.org/whl/cpu" in torch_install[0]
    # installed before medssl, so `pip install .` finds the pin satisfied instead of pulling a CUDA build
    assert runs.index(torch_install[0]) < next(i for i, r in enumerate(runs) if "pip install ." in r)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_documented_commands_use_real_cli_and_bundles(dockerfile):
    commands = _header_commands(dockerfile)
    assert commands, f"{dockerfile.name} documents no docker run command"
    parser = build_parser()
    for cmd in commands:
        image = next(i for i, tok in enumerate(cmd) if tok.startswith("medssl:"))
        rest = cmd[image + 1 :]
        entrypoint = cmd[cmd.index("--entrypoint") + 1] if "--entrypoint" in cmd else "medssl"
        if entrypoint == "medssl":
            parser.parse_args(rest)  # SystemExit (a failure) on an unknown command or option
        else:
            config = rest[rest.index("--config_file") + 1]
            for bundle in re.findall(r"bundles/[\w.]+\.yaml", config):
                assert (ROOT / bundle).is_file(), f"{dockerfile.name} runs {bundle}, which does not exist"
            datalists = [rest[i + 1] for i, tok in enumerate(rest) if tok == "--datalist"]
            for datalist in datalists:
                assert (ROOT / datalist).is_file(), f"{dockerfile.name} uses {datalist}, which does not exist"


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv/", ".git/", "data/", "runs/"):
        assert entry in ignored


@pytest.mark.slow
def test_installed_wheel_finds_bundles_through_medssl_home(tmp_path):
    """A non-editable install cannot see the source tree: MEDSSL_HOME (set by the images) is what finds it."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("medssl-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(site)
    assert "medssl/cli.py" in names and "medssl/resources.py" in names
    code = "from medssl.resources import bundles_dir, splits_dir; print(bundles_dir()); print(splits_dir())"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}

    missing = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "MEDSSL_HOME" in missing.stderr

    found = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env={**env, "MEDSSL_HOME": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [str(ROOT / "bundles"), str(ROOT / "json_splits")]
