"""Every kind of the bad-input corpus (tests/reliability/conftest.py) gets one clear line from ``medssl check``.

Per kind: exit code 2, stderr is exactly one line ``medssl: error: <file>: <problem>`` naming the damaged file,
nothing on stdout, and the dataset folder is byte-for-byte unchanged with no new files (no partial outputs).
The kinds whose defect is in an image also go through ``medssl.inference.infer`` (the function behind
``medssl infer``) and the ``medssl infer`` command: exactly one error line naming the file, no
output file written, the dataset untouched; a folder of good and bad scans segments the good ones.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from medssl.cli import main


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Relative path → (sha256, mode) of every file, and every folder, under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir", p.stat().st_mode)
    return out


def run_cli(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, file: Path, problem: str) -> None:
    lines = err.splitlines()
    assert rc == 2, f"exit code {rc}, stderr {err!r}"
    assert len(lines) == 1, f"expected one error line, got {lines}"
    line = lines[0]
    prefix = f"medssl: error: {file}: "
    assert line.startswith(prefix), f"{line!r} does not start with {prefix!r}"
    assert re.search(problem, line[len(prefix) :]), f"{line!r} does not match {problem!r}"


def test_valid_dataset_passes(valid_dataset, capsys):
    """The corpus' base dataset is valid, so each failure below is caused by its one defect."""
    rc, out, err = run_cli(["check", str(valid_dataset.datalist)], capsys)
    assert (rc, err) == (0, "")
    assert "OK (2 files checked" in out and "label values found: [0, 1, 2]" in out


def test_check_rejects_bad_input(bad_dataset, capsys):
    ds, file, problem = bad_dataset
    before = snapshot(ds.root)
    rc, out, err = run_cli(["check", str(ds.datalist)], capsys)
    assert out == ""
    assert_one_line_error(rc, err, file, problem)
    assert snapshot(ds.root) == before


def _threshold_model(path: Path) -> Path:
    """A 1x1x1 convolution model checkpoint: cheap, and any input problem is the input's, not the model's."""
    import torch

    from medssl.checkpoint import save_checkpoint
    from medssl.transforms.presets import preprocessing_summary

    config = {"_target_": "monai.networks.blocks.Convolution", "spatial_dims": 3, "in_channels": 1,
              "out_channels": 2, "kernel_size": 1, "conv_only": True}  # fmt: skip
    state = {"conv.weight": torch.tensor([-1.0, 1.0]).reshape(2, 1, 1, 1, 1), "conv.bias": torch.tensor([0.5, -0.5])}
    pre = preprocessing_summary(spacing=(1.5, 1.5, 2.0), a_min=-1, a_max=1, roi_size=(16, 16, 16))
    return save_checkpoint(
        path, network=config, state_dict=state, stage="test", preprocessing=pre, labels={0: "bg", 1: "a"}
    )


def _assert_infer_error(lines: list[str], file: Path, problem: str) -> None:
    naming = [line for line in lines if f"{file}: " in line]
    assert len(naming) == 1, f"expected one line naming {file}, got {lines}"
    assert re.search(problem, naming[0].split(f"{file}: ", 1)[1]), f"{naming[0]!r} does not match {problem!r}"
    # besides it, at most the run summary ("0 of 1 volumes segmented ..."), which names no file
    assert len(lines) <= 2, lines


def test_valid_image_segments(valid_dataset, tmp_path):
    from medssl.inference import infer

    out = tmp_path / "out"
    report = infer(
        _threshold_model(tmp_path / "model.pt"), [valid_dataset.image], out, precision="fp32", progress=False
    )
    assert not report.failures and len(list(out.glob("*_seg.nii.gz"))) == 1


def test_infer_rejects_bad_image(bad_image, tmp_path):
    from medssl.errors import MedsslError
    from medssl.inference import infer

    ds, file, problem = bad_image
    model = _threshold_model(tmp_path / "model.pt")
    before, out = snapshot(ds.root), tmp_path / "out"
    with pytest.raises(MedsslError) as info:
        infer(model, [file], out, device="cpu", precision="fp32", progress=False)
    _assert_infer_error(str(info.value).splitlines(), file, problem)
    assert not out.exists() or not any(out.iterdir()), f"partial outputs: {list(out.iterdir())}"
    assert snapshot(ds.root) == before


def test_cli_infer_rejects_bad_image(bad_image, tmp_path, capsys):
    ds, file, problem = bad_image
    model = _threshold_model(tmp_path / "model.pt")
    before, out = snapshot(ds.root), tmp_path / "out"
    argv = ["infer", "--model", str(model), "--input", str(file), "--output", str(out), "--precision", "fp32"]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2, err
    lines = [line.removeprefix("medssl: error: ") for line in err.splitlines() if line.startswith("medssl: error: ")]
    assert len(lines) == 1, lines  # the summary ("0 of 1 volumes segmented; 1 failed") is on stdout
    _assert_infer_error(lines, file, problem)
    assert not out.exists() or not any(out.iterdir())
    assert snapshot(ds.root) == before


def test_cli_infer_folder_segments_good_files_and_names_each_bad_one(tmp_path, capsys):
    """A folder with good and bad scans: every good one is segmented, each bad one gets exactly one error line (and
    no output), the summary goes to stdout, exit code 2; the input folder is untouched."""
    import nibabel as nib
    import numpy as np

    folder, out = tmp_path / "scans", tmp_path / "out"
    folder.mkdir()
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for name in ("good_a", "good_b"):
        nib.save(nib.Nifti1Image(rng.normal(size=(8, 8, 6)).astype(np.float32), affine), str(folder / f"{name}.nii.gz"))
    truncated = folder / "bad_truncated.nii.gz"
    data = (folder / "good_a.nii.gz").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty = folder / "bad_empty.nii.gz"
    empty.write_bytes(b"")
    flat = folder / "bad_2d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), affine), str(flat))
    bad = {truncated: r"corrupt or truncated", empty: r"empty \(0 bytes\)", flat: r"is 2D"}
    before = snapshot(folder)

    argv = ["infer", "--model", str(_threshold_model(tmp_path / "model.pt")), "--input", str(folder)]
    rc, stdout, err = run_cli([*argv, "--output", str(out), "--precision", "fp32", "--no-progress"], capsys)
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("medssl: error: ")]
    assert len(errors) == len(bad), errors  # one line per bad file, nothing else prefixed as an error
    for file, problem in bad.items():
        _assert_infer_error([e.removeprefix("medssl: error: ") for e in errors if f"{file}: " in e], file, problem)
    assert all(str(folder / "good_") not in line for line in err.splitlines()), err  # good files cause no error
    assert stdout.strip() == "2 of 5 volumes segmented; 3 failed"
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == ["good_a_seg.nii.gz", "good_b_seg.nii.gz"]
    assert not [p for p in out.iterdir() if p.name.startswith("bad_") or p.name.startswith(".")]
    assert snapshot(folder) == before


def test_cli_infer_all_good_exits_zero(valid_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["infer", "--model", str(_threshold_model(tmp_path / "model.pt")), "--input", str(valid_dataset.image)]
    rc, stdout, err = run_cli([*argv, "--output", str(out), "--precision", "fp32", "--no-progress"], capsys)
    assert (rc, stdout.strip()) == (0, "1 of 1 volumes segmented"), err
    assert "medssl: error" not in err
