"""CLI output discipline and help (issue #22, items 3 and 4).

Progress ("k/N" with ETA) and INFO lines reach stderr only when it is a terminal or with ``--verbose``;
``--quiet`` leaves errors only; the one-line errors are the last lines on stderr. Under pytest's ``capsys``
stderr is not a terminal, as in a pipe or a log file.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl import progress as progress_module
from medssl.checkpoint import save_checkpoint
from medssl.cli import TYPICAL_SESSION, build_parser, log_level, main
from medssl.progress import Progress, format_seconds, track
from medssl.transforms.presets import preprocessing_summary

SHAPE = (12, 12, 8)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """Two small volumes, their reference labels (folder and datalist) and a 1×1×1-conv threshold model."""
    root = tmp_path_factory.mktemp("cli_output")
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    items = []
    for name in ("a", "b"):
        data = np.where(rng.random(SHAPE) > 0.5, 1000, 0).astype(np.int16)
        nib.save(nib.Nifti1Image(data, AFFINE), images / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image((data > 500).astype(np.uint8), AFFINE), labels / f"{name}.nii.gz")
        items.append({"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz"})
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"labels": {"0": "bg", "1": "hi"}, "training": items}))
    config = {"_target_": "monai.networks.blocks.Convolution", "spatial_dims": 3, "in_channels": 1,
              "out_channels": 2, "kernel_size": 1, "conv_only": True}  # fmt: skip
    state = {"conv.weight": torch.tensor([-1.0, 1.0]).reshape(2, 1, 1, 1, 1), "conv.bias": torch.tensor([0.5, -0.5])}
    pre = preprocessing_summary(spacing=(1.5, 1.5, 2.0), a_min=0, a_max=1000, roi_size=(8, 8, 8))
    model = root / "model.pt"
    save_checkpoint(model, network=config, state_dict=state, stage="test", preprocessing=pre, labels={0: "bg", 1: "hi"})
    return {"root": root, "images": images, "labels": labels, "datalist": datalist, "model": model}


def _infer(case, out: Path, *flags: str, inputs=None) -> int:
    inputs = inputs or [str(case["images"])]
    return main(["infer", *flags, "--model", str(case["model"]), "--input", *inputs, "--output", str(out)])


def test_folder_infer_prints_no_progress_when_stderr_is_not_a_terminal(case, tmp_path, capsys):
    assert _infer(case, tmp_path / "out", "--precision", "fp32") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.strip() == "2 of 2 volumes segmented"


@pytest.mark.parametrize("where", ["after", "before"])
def test_verbose_folder_infer_reports_volume_k_of_n_with_eta(case, tmp_path, capsys, where):
    flags = ["--precision", "fp32"]
    args = ["infer", "--verbose", *flags] if where == "after" else ["--verbose", "infer", *flags]
    assert main([*args, "--model", str(case["model"]), "--input", str(case["images"]), "--output", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "infer: volume" in ln]
    assert len(lines) == 2, err
    assert "1/2 a.nii.gz" in lines[0] and "2/2 b.nii.gz" in lines[1]
    assert all(re.search(r"elapsed \d+s, ETA \d+s", ln) for ln in lines), lines
    assert "ETA 0s" in lines[1]


def test_quiet_prints_only_the_errors_and_they_are_last(case, tmp_path, capsys):
    bad = tmp_path / "z_bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    inputs = [str(case["images"]), str(bad)]
    assert _infer(case, tmp_path / "out", "--quiet", "--precision", "fp32", inputs=inputs) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medssl: error: {bad}: "), err
    assert captured.out.strip() == "2 of 3 volumes segmented; 1 failed"


def test_verbose_error_is_still_the_last_stderr_line(case, tmp_path, capsys):
    bad = tmp_path / "z_bad.nii.gz"  # sorted after the good volumes: its progress line comes just before the error
    bad.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    assert _infer(case, tmp_path / "out", "-v", "--precision", "fp32", inputs=[str(case["images"]), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("infer: volume 3/3 z_bad.nii.gz failed" in ln for ln in err), err
    assert err[-1].startswith(f"medssl: error: {bad}: "), err


def test_check_and_evaluate_report_progress_only_when_verbose(case, tmp_path, capsys):
    assert main(["check", str(case["datalist"])]) == 0
    assert capsys.readouterr().err == ""
    assert main(["check", "-v", str(case["datalist"])]) == 0
    err = capsys.readouterr().err
    assert "check: item 1/2 training[0]" in err and "check: item 2/2 training[1]" in err

    assert _infer(case, tmp_path / "pred", "-q", "--precision", "fp32") == 0
    capsys.readouterr()
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(case["labels"])]
    assert main([*args, "--out", str(tmp_path / "m.csv")]) == 0
    assert capsys.readouterr().err == ""
    assert main([*args, "--out", str(tmp_path / "m.csv"), "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "evaluate: case 1/2 a" in err and "evaluate: case 2/2 b" in err
    assert "INFO medssl.metrics: predictions matched by" in err  # INFO lines follow the same rule


def test_a_failing_check_ends_stderr_with_its_errors(case, tmp_path, capsys):
    datalist = tmp_path / "bad.json"
    items = json.loads(case["datalist"].read_text())["training"]
    items.append({"image": "images/missing.nii.gz", "label": "labels/a.nii.gz"})
    datalist.write_text(json.dumps({"training": items}))
    assert main(["check", "--verbose", "--dataset-dir", str(case["root"]), str(datalist)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("check: item 3/3" in ln for ln in err)
    assert err[-1].startswith("medssl: error: ") and "missing.nii.gz" in err[-1], err


def test_log_level_rule(monkeypatch):
    monkeypatch.setattr(progress_module, "stderr_is_terminal", lambda: True)
    assert log_level(verbose=False, quiet=False) == logging.INFO
    assert log_level(verbose=False, quiet=True) == logging.ERROR
    monkeypatch.setattr(progress_module, "stderr_is_terminal", lambda: False)
    assert log_level(verbose=False, quiet=False) == logging.WARNING
    assert log_level(verbose=True, quiet=False) == logging.DEBUG


def test_main_restores_the_medssl_logger(case, capsys):
    medssl_logger = logging.getLogger("medssl")
    before_level, before_handlers = medssl_logger.level, list(medssl_logger.handlers)
    assert main(["check", "-v", str(case["datalist"])]) == 0
    assert medssl_logger.level == before_level and medssl_logger.handlers == before_handlers


def test_verbose_and_quiet_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["check", "-v", "-q", "x.json"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ help


def test_main_help_ends_with_a_typical_session(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = [ln.strip() for ln in capsys.readouterr().out.strip().splitlines()]
    assert lines[-5:] == list(TYPICAL_SESSION)
    assert lines[-5].startswith("medssl phantom ") and lines[-4].startswith("python -m monai.bundle run training")
    assert [ln.split()[1] for ln in lines[-3:]] == ["inspect", "infer", "evaluate"]
    assert "bundles/supervised.yaml','bundles/btcv_unetr.yaml','bundles/tiny.yaml" in lines[-4]


def _option_help_blocks(text: str) -> dict[str, str]:
    """Option string (e.g. ``--cases``) → its help block in argparse's output."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s{2}(-[-\w]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith(" " * 6):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_option_with_a_default_shows_it(command):
    sub = _subparsers()[command]
    blocks = _option_help_blocks(sub.format_help())
    checked = 0
    for action in sub._actions:
        if not action.option_strings or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            continue
        block = blocks[action.option_strings[0]]
        assert "default" in block, (command, action.option_strings, block)
        checked += 1
    # the check looked at real options, not at an empty parse of the help
    assert checked >= {"infer": 6, "phantom": 3, "evaluate": 2}.get(command, 0)


def test_defaults_are_stated_with_their_value():
    blocks = _option_help_blocks(_subparsers()["infer"].format_help())
    assert "(default: gaussian)" in blocks["--mode"]
    assert "(default: 4)" in blocks["--sw-batch-size"] and blocks["--sw-batch-size"].count("default") == 1


# -------------------------------------------------------------------------------------------- progress


def test_progress_lines_count_eta_and_skip_a_failed_item(caplog):
    with caplog.at_level(logging.INFO, logger="medssl.progress"):
        with pytest.raises(RuntimeError):
            for item in track(["x", "y", "z"], "demo", unit="thing", describe=str.upper):
                if item == "z":
                    raise RuntimeError("boom")
    lines = [r.getMessage() for r in caplog.records if r.name == "medssl.progress"]
    assert [ln.split(" (")[0] for ln in lines] == ["demo: thing 1/3 X", "demo: thing 2/3 Y"]


def test_progress_is_silent_when_disabled_or_logging_is_off(caplog):
    with caplog.at_level(logging.WARNING, logger="medssl.progress"):
        assert list(track([1, 2], "demo")) == [1, 2]
    with caplog.at_level(logging.INFO, logger="medssl.progress"):
        p = Progress(2, "demo", enabled=False)
        p.advance()
        assert p.done == 1 and p.eta() is not None
    assert not [r for r in caplog.records if r.name == "medssl.progress"]


def test_eta_is_mean_time_per_item_times_items_left(monkeypatch):
    clock = iter([100.0, 110.0])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    p = Progress(5, "demo", enabled=False)  # start at t=100
    assert p.eta() is None
    p.done = 2  # two items in 10 s → 5 s each, 3 left
    assert p.eta() == pytest.approx(15.0)
    assert [format_seconds(s) for s in (4.4, 65, 7380)] == ["4s", "1m05s", "2h03m"]
    with pytest.raises(ValueError, match="got -1"):
        Progress(-1, "demo")


def test_a_terminal_gets_a_bar_instead_of_log_lines(monkeypatch, caplog, capsys):
    monkeypatch.setattr(progress_module, "stderr_is_terminal", lambda: True)
    with caplog.at_level(logging.INFO, logger="medssl.progress"):
        assert list(track(["a", "b"], "demo", unit="thing")) == ["a", "b"]
    assert not [r for r in caplog.records if r.name == "medssl.progress"]
    err = capsys.readouterr().err
    assert re.search(r"demo: .*\d/2 \[", err), err  # tqdm's "k/N [elapsed<ETA]" bar (refreshes are throttled)
    assert err.endswith("\r") and err.rsplit("\r", 2)[-2].strip() == ""  # cleared when done (leave=False)
