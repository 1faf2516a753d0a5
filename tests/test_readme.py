"""README's quick examples copy-paste clean: every fenced bash block marked quick runs and exits 0.

Marking: an HTML comment ``<!-- quick -->`` on the line right before a block's opening fence (```` ```bash ````).
It is invisible on GitHub. Mark a block only when all of its commands finish in seconds on phantoms (the blocks
marked today take about 15 s together on two cores); long training blocks stay unmarked.

The marked blocks run in README order, as a reader would paste them, in one temporary working directory that
links the repository's ``bundles/`` and ``json_splits/`` (so relative paths such as ``bundles/tiny.yaml`` resolve)
and collects the ``data/`` and ``runs/`` the commands write. ``medssl`` and ``python`` on ``PATH`` are this
interpreter with this checkout first on ``PYTHONPATH``. Each block runs under ``bash -euo pipefail``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
QUICK_MARK = "<!-- quick -->"
LINKED = ("bundles", "json_splits")
BLOCK_TIMEOUT_S = 60


def quick_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number of the fence, block text)`` of every block marked quick, in order.

    Raises:
        ValueError: a mark not followed by a ```` ```bash ```` fence, or a block that never closes (a mark that
            would otherwise silently test nothing).
    """
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != QUICK_MARK:
            continue
        fence = i + 1
        if fence >= len(lines) or lines[fence].strip() != "```bash":
            raise ValueError(f"{README.name}:{i + 1}: {QUICK_MARK} must be followed by a ```bash fence")
        end = next((j for j in range(fence + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{README.name}:{fence + 1}: the quick block is never closed")
        blocks.append((fence + 1, "\n".join(lines[fence + 1 : end]) + "\n"))
    return blocks


def test_marks_are_parsed_strictly():
    text = f"intro\n{QUICK_MARK}\n```bash\necho one \\\n  two\n```\n\n```bash\necho unmarked\n```\n"
    assert quick_blocks(text) == [(3, "echo one \\\n  two\n")]
    with pytest.raises(ValueError, match=r":2: .* must be followed by a ```bash fence"):
        quick_blocks(f"x\n{QUICK_MARK}\n```python\nprint(1)\n```\n")
    with pytest.raises(ValueError, match="never closed"):
        quick_blocks(f"{QUICK_MARK}\n```bash\necho open\n")


def test_readme_has_quick_blocks_for_the_quick_start_and_the_cli():
    blocks = [block for _, block in quick_blocks(README.read_text(encoding="utf-8"))]
    assert any("medssl phantom ct-abdomen" in b for b in blocks)
    assert any("medssl --help" in b for b in blocks)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    work = tmp_path_factory.mktemp("readme")
    for name in LINKED:
        (work / name).symlink_to(REPO_ROOT / name, target_is_directory=True)
    bin_dir = tmp_path_factory.mktemp("bin")
    for name, command in (("medssl", f'"{sys.executable}" -m medssl'), ("python", f'"{sys.executable}"')):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return work, env


def test_quick_blocks_run_clean(workdir):
    work, env = workdir
    blocks = quick_blocks(README.read_text(encoding="utf-8"))
    for line, block in blocks:  # in order: a later block may use what an earlier one wrote, as for a reader
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
        assert proc.returncode == 0, (
            f"README.md:{line}: block exited {proc.returncode}\n{block}\n--- stdout\n{proc.stdout[-3000:]}"
            f"\n--- stderr\n{proc.stderr[-3000:]}"
        )
        assert not re.search(r"^medssl: error:", proc.stderr, flags=re.M), proc.stderr
    assert (work / "data" / "ct_phantom" / "datalist.json").is_file()
