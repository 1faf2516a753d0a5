"""Out of memory is reported as out of memory: what was attempted and the option that lowers it, one line, exit 2.

Running: the network's ``forward`` raises what torch raises (``torch.OutOfMemoryError`` on CUDA, the CPU
allocator's ``RuntimeError``); building: a checkpoint whose network asks for a real, impossible allocation
(hundreds of PiB: the CPU allocator refuses it at once) and a ``.to(device)`` that runs out.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.checkpoint import save_checkpoint
from medssl.cli import main
from medssl.errors import ErrorList, ResourceError
from medssl.transforms.presets import preprocessing_summary

CONV = {"_target_": "monai.networks.blocks.Convolution", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
        "kernel_size": 1, "conv_only": True}  # fmt: skip
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB"
CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)"
)


def _model(path: Path, network: dict = CONV, roi=(16, 16, 16)) -> Path:
    state = {"conv.weight": torch.ones(2, 1, 1, 1, 1), "conv.bias": torch.zeros(2)} if network is CONV else {}
    pre = preprocessing_summary(spacing=(1.5, 1.5, 2.0), a_min=0, a_max=1, roi_size=roi)
    return save_checkpoint(path, network=network, state_dict=state, stage="test", preprocessing=pre, labels={0: "a"})


def _scan(path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 12), np.float32), np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
    return path


def _errors(err: str) -> list[str]:
    return [line.removeprefix("medssl: error: ") for line in err.splitlines() if line.startswith("medssl: error: ")]


@pytest.mark.parametrize(
    "error, attempted",
    [(lambda: torch.OutOfMemoryError(CUDA_OOM), "2.00 GiB"), (lambda: RuntimeError(CPU_OOM), "2.00 GiB")],
    ids=["cuda", "cpu"],
)
def test_out_of_memory_while_running_names_the_windows_and_the_options(error, attempted, tmp_path, capsys, monkeypatch):
    from monai.networks.blocks import Convolution

    def forward(self, x):
        raise error()

    monkeypatch.setattr(Convolution, "forward", forward)
    scan, out = _scan(tmp_path / "scan.nii.gz"), tmp_path / "out"
    argv = ["infer", "--model", str(_model(tmp_path / "model.pt")), "--input", str(scan), "--output", str(out)]
    rc = main([*argv, "--precision", "fp32", "--sw-batch-size", "3", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2
    assert _errors(captured.err) == [
        f"{scan}: out of memory while running the network (3 windows of 16x16x16 voxels per call, fp32 on cpu; "
        f"tried to allocate {attempted}); lower --sw-batch-size, or use --precision bf16 (CPU) / amp (CUDA) "
        "(the window is the checkpoint's roi_size)"
    ]
    assert "cannot rebuild" not in captured.err and "Traceback" not in captured.err
    assert captured.out.strip() == "0 of 1 volumes segmented; 1 failed"
    assert not out.exists() or not any(out.iterdir())


def test_out_of_memory_while_running_is_a_resource_error_per_volume(tmp_path, monkeypatch):
    """For Python callers: a ``ResourceError`` (a ``MemoryError``) in the ``ErrorList``; with bf16 the advice does
    not repeat the precision option."""
    from monai.networks.blocks import Convolution

    from medssl.inference import Predictor

    def forward(self, x):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(Convolution, "forward", forward)
    predictor = Predictor(_model(tmp_path / "model.pt"), device="cpu", precision="bf16", progress=False)
    scans = [_scan(tmp_path / "a.nii.gz"), _scan(tmp_path / "b.nii.gz")]
    with pytest.raises(ErrorList) as info:
        predictor.predict_paths(scans, tmp_path / "out")
    failures = info.value.errors[:-1]  # the last one is the summary
    assert [type(e) for e in failures] == [ResourceError, ResourceError]
    assert all(isinstance(e, MemoryError) for e in failures)
    assert [e.path for e in failures] == [str(s) for s in scans]
    assert "bf16 on cpu" in failures[0].problem and "--precision" not in failures[0].problem


def test_out_of_memory_with_nothing_left_to_lower(tmp_path, monkeypatch):
    """One window per call in bf16 on the CPU: no option lowers it further, and the message does not pretend."""
    from monai.networks.blocks import Convolution

    from medssl.inference import Predictor

    def forward(self, x):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(Convolution, "forward", forward)
    predictor = Predictor(_model(tmp_path / "model.pt"), device="cpu", sw_batch_size=1, progress=False)
    scan = _scan(tmp_path / "a.nii.gz")
    with pytest.raises(ErrorList) as info:
        predictor.predict_paths([scan], tmp_path / "out")
    assert info.value.errors[0].problem == (
        "out of memory while running the network (1 window of 16x16x16 voxels per call, bf16 on cpu; tried to "
        "allocate 2.00 GiB); use a machine with more memory (the window is the checkpoint's roi_size)"
    )


def test_out_of_memory_while_building_names_the_network_and_the_attempt(tmp_path, capsys):
    huge = {**CONV, "out_channels": 10**8, "kernel_size": 999}  # 4e17 bytes of weights: refused at once
    model = _model(tmp_path / "huge.pt", network=huge)
    out = tmp_path / "out"
    rc = main(["infer", "--model", str(model), "--input", str(_scan(tmp_path / "s.nii.gz")), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    expected = f"{model}: out of memory while building the network (monai.networks.blocks.Convolution on cpu; tried to"
    assert len(_errors(err)) == 1 and _errors(err)[0].startswith(expected), err
    gib = float(_errors(err)[0].split("tried to allocate ")[1].split(" GiB")[0])
    assert gib == pytest.approx(10**8 * 999**3 * 4 / 2**30, rel=1e-3)
    assert not out.exists()


def test_out_of_memory_moving_the_network_to_the_device(tmp_path, monkeypatch):
    from medssl.inference import Predictor

    def to(self, *args, **kwargs):
        raise torch.OutOfMemoryError(CUDA_OOM)

    model = _model(tmp_path / "model.pt")
    monkeypatch.setattr(torch.nn.Module, "to", to)
    with pytest.raises(ResourceError) as info:
        Predictor(model, device="cpu", precision="fp32", progress=False)
    assert str(info.value) == (
        f"{model}: out of memory while building the network (monai.networks.blocks.Convolution on cpu, 4 "
        "parameters (0.00 GiB in float32); tried to allocate 2.00 GiB); free memory or use a device with more "
        "(--device)"
    )
