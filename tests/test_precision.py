"""``precision: auto``: one resolution per process from the hardware (probe monkeypatched), logged once, recorded."""

from __future__ import annotations

import logging
import time
import warnings

import pytest
import torch

from medssl import precision as P
from medssl.errors import ConfigError


@pytest.fixture(autouse=True)
def _fresh_resolution():
    """Every test resolves from scratch (the module caches per process)."""

    def clear():
        P.cpu_probe.cache_clear()
        P._resolve.cache_clear()
        P._logged.clear()
        P._warned.clear()

    clear()
    yield
    clear()


def _cpu(monkeypatch, native: bool, conv: float = 1.0, matmul: float | None = 1.0, amx: bool = True) -> list[int]:
    """Pretend this CPU has (or lacks) native bf16 (and AMX) and that the probe measured these bf16 / fp32 ratios."""
    calls = []

    def probe():
        calls.append(1)
        return P.CpuProbe("AVX512" if native else "AVX2", native, conv, matmul if native else None)

    monkeypatch.setattr(P, "native_cpu_bf16", lambda: native)
    monkeypatch.setattr(P, "cpu_capability", lambda: "AVX512" if native else "AVX2")
    monkeypatch.setattr(P, "cpu_probe", probe)
    monkeypatch.setattr(P, "amx_cpu", lambda: amx)
    return calls


def test_auto_trains_in_fp32_on_native_bf16_without_amx_and_infers_in_bf16(monkeypatch):
    # AVX512-BF16 without AMX (Zen 5): bf16 training hit NaN losses there; inference keeps the faster bf16
    _cpu(monkeypatch, native=True, conv=0.5, matmul=0.3, amx=False)
    assert P.resolve_precision("auto", "cpu") == "fp32"
    assert "native bf16 without AMX: fp32 for training" in P.describe_precision("auto", "cpu")
    assert P.resolve_precision("auto", "cpu", training=False) == "bf16"
    assert P.resolve_precision("bf16", "cpu") == "bf16"  # an explicit choice is kept
    with P.autocast("cpu", "auto"):
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.float32


def test_auto_is_fp32_without_native_bf16_and_never_probes(monkeypatch, caplog):
    calls = _cpu(monkeypatch, native=False)
    with caplog.at_level(logging.INFO, logger="medssl.precision"):
        assert P.resolve_precision("auto", "cpu") == "fp32"
        assert P.resolve_precision("auto", "cpu") == "fp32"
    assert calls == []  # a bf16 convolution there is the slow kernel the rule avoids
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["precision auto -> fp32 (CPU capability AVX2, no native bf16)"]  # logged once
    with P.autocast("cpu", "auto"):
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.float32


@pytest.mark.parametrize(
    "conv, matmul, used, words",
    [
        (0.5, 0.3, "bf16", "bf16 conv 2.0x faster and matmul 3.3x faster"),
        (2.0, 0.25, "fp32", "bf16 conv 2.0x slower and matmul 4.0x faster"),
        (0.5, 1.2, "fp32", "matmul 1.2x slower"),
        (0.95, 0.3, "fp32", "conv 1.1x faster"),  # within the margin: fp32
    ],
)
def test_auto_on_a_native_bf16_cpu_follows_the_probe(monkeypatch, conv, matmul, used, words):
    _cpu(monkeypatch, native=True, conv=conv, matmul=matmul)
    assert P.resolve_precision("auto", "cpu") == used
    line = P.describe_precision("auto", "cpu")
    assert line.startswith(f"precision auto -> {used} (CPU capability AVX512, native bf16; ") and words in line
    record = P.precision_record("auto", "cpu")
    assert record["requested"] == "auto" and record["used"] == used and record["probe"]["conv_ratio"] == conv
    with P.autocast("cpu", "auto"):
        out = torch.randn(4, 4) @ torch.randn(4, 4)
    assert out.dtype == (torch.bfloat16 if used == "bf16" else torch.float32)


@pytest.mark.parametrize("bf16_supported, used", [(True, "bf16"), (False, "amp")])
def test_auto_on_cuda(monkeypatch, bf16_supported, used):
    calls = _cpu(monkeypatch, native=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Mock GPU")
    assert P.resolve_precision("auto", "cuda") == used
    assert P.describe_precision("auto", "cuda").startswith(f"precision auto -> {used} (CUDA device Mock GPU ")
    assert P.uses_grad_scaler("cuda", "auto") is (used == "amp")
    assert P.cuda_amp("cuda", "auto") is True
    dtype = torch.bfloat16 if used == "bf16" else torch.float16
    assert P.cuda_amp_kwargs("auto", "cuda") == {"dtype": dtype}
    assert calls == []  # the CPU probe is not consulted for a CUDA device


def test_explicit_bf16_without_native_bf16_warns_once_with_the_slowdown_and_runs(monkeypatch):
    _cpu(monkeypatch, native=False, conv=231.0)
    with pytest.warns(RuntimeWarning, match=r"bf16 convolution took 231x the fp32 time"):
        assert P.resolve_precision("bf16", "cpu") == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.resolve_precision("bf16", "cpu") == "bf16"  # once per process
    assert P.resolve_precision("auto", "cpu") == "fp32"  # auto never picks it there
    with P.autocast("cpu", "bf16"):
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.bfloat16


def test_explicit_bf16_on_a_native_cpu_does_not_warn(monkeypatch):
    _cpu(monkeypatch, native=True, conv=2.0, matmul=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.resolve_precision("bf16", "cpu") == "bf16"
    assert P.describe_precision("bf16", "cpu") == "precision bf16 -> bf16 (requested)"


def test_explicit_fp32_and_amp_are_kept_and_unknown_is_refused(monkeypatch):
    calls = _cpu(monkeypatch, native=True)
    assert P.resolve_precision("fp32", "cpu") == "fp32"
    assert P.resolve_precision("amp", "cpu") == "amp"  # runs fp32 on CPU (autocast)
    assert calls == []
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        P.resolve_precision("fp16", "cpu")


def test_the_probe_runs_once_per_process_and_leaves_threads_and_rng_alone(monkeypatch):
    ratios = []

    def fake_ratio(fp32_fn, bf16_fn, reps):
        fp32_fn(), bf16_fn()  # the real kernels run (once each here)
        ratios.append(reps)
        return 0.5

    monkeypatch.setattr(P, "native_cpu_bf16", lambda: True)
    monkeypatch.setattr(P, "amx_cpu", lambda: True)
    monkeypatch.setattr(P, "_ratio", fake_ratio)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert P.resolve_precision("auto", "cpu") == "bf16"
    P.resolve_precision("auto", "cpu"), P.describe_precision("auto", "cpu"), P.precision_record("auto", "cpu")
    assert len(ratios) == 2  # one conv and one matmul, for all the calls above
    assert torch.equal(torch.rand(3), expected)  # seeded runs draw the same numbers with or without the probe
    assert torch.get_num_threads() == threads


def test_the_real_probe_is_short():
    start = time.perf_counter()
    probe = P.cpu_probe()
    assert time.perf_counter() - start < 2.0  # a fraction of a second unloaded; generous for a shared machine
    assert probe.capability == P.cpu_capability() and probe.native_bf16 == P.native_cpu_bf16()
    assert probe.conv_ratio > 0 and (probe.matmul_ratio is None) == (not probe.native_bf16)


def test_predictor_runs_in_the_resolved_precision(monkeypatch, tmp_path):
    from medssl.checkpoint import save_checkpoint
    from medssl.inference import Predictor
    from medssl.transforms.presets import preprocessing_summary

    config = {"_target_": "monai.networks.blocks.Convolution", "spatial_dims": 3, "in_channels": 1,
              "out_channels": 2, "kernel_size": 1, "conv_only": True}  # fmt: skip
    state = {"conv.weight": torch.tensor([-1.0, 1.0]).reshape(2, 1, 1, 1, 1), "conv.bias": torch.tensor([0.5, -0.5])}
    pre = preprocessing_summary(spacing=(1.5, 1.5, 2.0), a_min=-1, a_max=1, roi_size=(16, 16, 16))
    model = save_checkpoint(
        tmp_path / "model.pt", network=config, state_dict=state, stage="test", preprocessing=pre, labels={0: "bg"}
    )
    for native, conv, used in ((False, 1.0, "fp32"), (True, 0.5, "bf16")):
        P._resolve.cache_clear()
        _cpu(monkeypatch, native=native, conv=conv, matmul=0.3)
        predictor = Predictor(model, device="cpu", progress=False)
        assert predictor.precision == used
        assert next(predictor.network.parameters()).dtype == (torch.bfloat16 if used == "bf16" else torch.float32)


def test_cli_and_study_default_to_auto():
    from medssl.cli import build_parser
    from medssl.study import StudyConfig

    args = build_parser().parse_args(["infer", "--model", "m.pt", "--input", "x", "--output", "o"])
    assert args.precision == "auto"
    assert StudyConfig(datalist="d.json", out="o").precision == "auto"


def test_resolve_device_and_precision():
    assert P.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert P.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="'gpu0'"):
        P.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            P.resolve_device("cuda:1")
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with P.autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    for p in ("fp32", "amp"):
        with P.autocast("cpu", p):
            assert (a @ b).dtype == torch.float32
    with pytest.raises(ConfigError, match="'fp16'"):
        P.autocast("cpu", "fp16")
    assert not P.uses_grad_scaler("cpu", "amp") and not P.cuda_amp("cpu", "bf16")
    assert P.cuda_amp_kwargs("bf16") == {"dtype": torch.bfloat16}
