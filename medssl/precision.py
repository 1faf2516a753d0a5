"""Which floating-point precision to run in: ``auto`` resolves, once per process, to what this hardware runs fast.

``precision`` is one of :data:`PRECISIONS`; every bundle, ``medssl infer``, ``medssl study``, the demo and the
benchmarks default to ``auto``, and :func:`resolve_precision` is the one place it is turned into a concrete value:

* CUDA: ``bf16`` where ``torch.cuda.is_bf16_supported()``, else ``amp`` (fp16 autocast + ``GradScaler``);
* CPU: ``bf16`` only where oneDNN has native bf16 kernels (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``:
  AVX512-BF16 or AMX) **and** a short timed probe (:func:`cpu_probe`: one ``Conv3d`` and one matmul in both
  dtypes, about 0.1 s, cached) finds both at least :data:`BF16_MIN_SPEEDUP` times faster in bf16; otherwise
  ``fp32``. Without native bf16, oneDNN falls back to ``aten::slow_conv3d_forward`` for bf16 convolutions:
  53–299× slower than fp32 on an AVX2-only EPYC (see README), so a CPU flag alone is not enough, and a flag
  list alone would not catch a CPU whose bf16 kernels exist but lose to its fp32 ones. For **training** ``auto``
  also requires AMX tiles (:func:`amx_cpu`): on an AVX512-BF16 CPU without AMX (AMD Zen 5) bf16 training of a
  small V-Net stopped on a NaN loss at iteration 2 in 1 of 3 two-thread runs and resumed runs were not bitwise
  equal, while fp32 never did; inference (``Predictor``, ``training=False``) keeps bf16 there, where it measured
  1.3-1.7x faster with the same Dice.

``auto`` logs one line (:func:`describe_precision`), e.g.
``precision auto -> fp32 (CPU capability AVX2, no native bf16)``; an explicit ``bf16`` on a CPU without native
bf16 runs but warns once with the probe's measured slowdown. :func:`precision_record` is what checkpoints and
benchmark reports store.

:func:`resolve_device` picks the device and :func:`autocast` the context a training or inference step runs in.
MONAI's engines only autocast on CUDA (``amp=True`` → ``torch.autocast("cuda")`` + ``GradScaler``); medssl's
``precision`` id runs the same bundle everywhere, ``auto`` resolved as above:

=========  ==========================  ==============================
precision  CPU                         CUDA
=========  ==========================  ==============================
``bf16``   ``torch.autocast("cpu",     ``torch.autocast("cuda",
           dtype=torch.bfloat16)``     dtype=torch.bfloat16)``, no scaler
``amp``    fp32 (no fp16 on CPU)       fp16 autocast + ``GradScaler``
``fp32``   no autocast                 no autocast
=========  ==========================  ==============================
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from medssl.errors import ConfigError

__all__ = [
    "PRECISIONS",
    "BF16_MIN_SPEEDUP",
    "CpuProbe",
    "cpu_capability",
    "cpu_model",
    "native_cpu_bf16",
    "amx_cpu",
    "cpu_probe",
    "resolve_precision",
    "describe_precision",
    "precision_record",
    "resolve_device",
    "autocast",
    "uses_grad_scaler",
    "cuda_amp",
    "cuda_amp_kwargs",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32", "amp")

# bf16 must beat fp32 in the probe by a margin: autocast adds casts that a kernel timing does not see, and near
# 1.0 either choice is within noise of the other (fp32 then, the more accurate one). The probe's conv ratio
# tracks whole networks: 0.32-0.66 over 8 processes on a loaded Zen 5, where a tiny UNETR's validation ran 0.64
BF16_MIN_SPEEDUP = 1.1

# decoder-like shapes: batch 4 keeps fp32 on oneDNN (batch 1 goes to slow_conv3d), 16 channels at 16³
_CONV_SHAPE = (4, 16, 16, 16, 16)
# without native bf16 a bf16 convolution is hundreds of times slower: a small one measures the slowdown
_SMALL_CONV_SHAPE = (4, 16, 8, 8, 8)
_MATMUL_SIZE = 256

_logged: set[tuple[str, str]] = set()
_warned: set[str] = set()


@dataclass(frozen=True)
class CpuProbe:
    """What :func:`cpu_probe` found on this CPU.

    Attributes:
        capability: ``torch.backends.cpu.get_cpu_capability()`` (``"AVX2"``, ``"AVX512"``, ...).
        native_bf16: oneDNN has native bf16 kernels.
        conv_ratio: bf16 / fp32 seconds of the probe convolution (``> 1``: bf16 slower).
        matmul_ratio: bf16 / fp32 seconds of the probe matmul (``None`` where not measured: without native bf16
            a bf16 matmul can take minutes).
    """

    capability: str
    native_bf16: bool
    conv_ratio: float
    matmul_ratio: float | None

    @property
    def bf16_fast(self) -> bool:
        """Native bf16 and both probe kernels at least :data:`BF16_MIN_SPEEDUP` times faster than fp32."""
        limit = 1.0 / BF16_MIN_SPEEDUP
        return (
            self.native_bf16
            and self.conv_ratio <= limit
            and (self.matmul_ratio is not None and self.matmul_ratio <= limit)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "capability": self.capability,
            "native_bf16": self.native_bf16,
            "conv_ratio": round(self.conv_ratio, 3),
            "matmul_ratio": None if self.matmul_ratio is None else round(self.matmul_ratio, 3),
        }


def cpu_capability() -> str:
    """The instruction set torch dispatches to on this CPU (``"AVX2"``, ``"AVX512"``, ``"DEFAULT"``, ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # an old or unusual build: the capability is only reported, never decided on
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows; reports only, never decides."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_cpu_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 / AMX); False where torch cannot tell."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amx_cpu() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later); False where torch cannot tell."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def _ratio(fp32_fn, bf16_fn, reps: int) -> float:
    """bf16 / fp32 of the fastest of ``reps`` interleaved calls each, after one warm-up call each."""
    fp32_fn(), bf16_fn()
    best = [float("inf"), float("inf")]
    for _ in range(reps):
        for i, fn in enumerate((fp32_fn, bf16_fn)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[1] / max(best[0], 1e-9)


@functools.lru_cache(maxsize=1)
def cpu_probe() -> CpuProbe:
    """Time one ``Conv3d(16, 16, 3)`` and one 256² matmul in fp32 and bf16 on this CPU (cached per process).

    Runs on one thread, whatever the process uses: the question is which dtype's kernels are faster, and on a
    shared machine several threads mostly measure the other processes. Draws from its own generator, so the
    global RNG (seeded runs) is untouched. About 0.1 s with native bf16; without it only a small convolution is
    timed (bf16 falls back to a slow reference kernel there).
    """
    native = native_cpu_bf16()
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            shape = _CONV_SHAPE if native else _SMALL_CONV_SHAPE
            x = torch.randn(shape, generator=gen)
            w = torch.randn(shape[1], shape[1], 3, 3, 3, generator=gen)
            xb, wb = x.bfloat16(), w.bfloat16()
            conv = _ratio(
                lambda: torch.nn.functional.conv3d(x, w, padding=1),
                lambda: torch.nn.functional.conv3d(xb, wb, padding=1),
                reps=5 if native else 1,
            )
            matmul = None
            if native:
                a = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, generator=gen)
                ab = a.bfloat16()
                matmul = _ratio(lambda: a @ a, lambda: ab @ ab, reps=5)
    finally:
        torch.set_num_threads(threads)
    return CpuProbe(cpu_capability(), native, conv, matmul)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check(precision: Any) -> str:
    if precision not in PRECISIONS:
        raise ConfigError("precision", f"unknown precision {precision!r} (use one of {', '.join(PRECISIONS)})")
    return precision


def _speed(ratio: float) -> str:
    return f"{1 / ratio:.1f}x faster" if ratio < 1 else f"{ratio:.1f}x slower"


def _cpu_reason(probe: CpuProbe) -> str:
    if not probe.native_bf16:
        return f"CPU capability {probe.capability}, no native bf16"
    parts = [f"conv {_speed(probe.conv_ratio)}"]
    if probe.matmul_ratio is not None:
        parts.append(f"matmul {_speed(probe.matmul_ratio)}")
    return f"CPU capability {probe.capability}, native bf16; bf16 {' and '.join(parts)} than fp32 in the probe"


@functools.cache
def _resolve(precision: str, device: torch.device, training: bool = True) -> tuple[str, str]:
    """``(used precision, reason)`` for a checked precision on a concrete device."""
    if device.type == "cuda":
        if precision != "auto":
            return precision, "requested"
        if torch.cuda.is_bf16_supported():
            return "bf16", f"CUDA device {torch.cuda.get_device_name(device)} supports bf16"
        return "amp", f"CUDA device {torch.cuda.get_device_name(device)} has no bf16: fp16 with a GradScaler"
    if device.type != "cpu":
        return ("fp32" if precision == "auto" else precision), f"{device.type} device"
    if precision == "fp32" or precision == "amp":
        return precision, "requested"  # amp on CPU runs fp32 (see medssl.precision.autocast)
    if precision == "bf16":
        return (
            "bf16",
            "requested" if native_cpu_bf16() else f"requested; CPU capability {cpu_capability()}, no native bf16",
        )
    if not native_cpu_bf16():  # no probe needed (and its bf16 convolution would be the slow one)
        return "fp32", f"CPU capability {cpu_capability()}, no native bf16"
    if training and not amx_cpu():
        return "fp32", f"CPU capability {cpu_capability()}, native bf16 without AMX: fp32 for training"
    probe = cpu_probe()
    return ("bf16" if probe.bf16_fast else "fp32"), _cpu_reason(probe)


def resolve_precision(precision: str, device: str | torch.device | None = "cpu", *, training: bool = True) -> str:
    """The concrete precision (``bf16``, ``fp32`` or ``amp``) to run ``precision`` in on ``device``.

    ``auto`` follows the rule in this module's docstring and is logged once per device; an explicit ``bf16`` on
    a CPU without native bf16 warns once (RuntimeWarning) with the probe's measured slowdown and is kept.

    Args:
        precision: one of :data:`PRECISIONS`.
        device: the device the work runs on (``"auto"`` / ``None``: CUDA when available, else CPU).
        training: a training run (``auto`` needs AMX for bf16 on a CPU) or inference only.

    Raises:
        ConfigError: an unknown precision.

    Example::

        resolve_precision("auto", "cpu")  # "fp32" on an AVX2-only CPU, "bf16" where bf16 kernels win
    """
    dev = _device(device)
    used = _resolve(_check(precision), dev, bool(training))[0]
    key = (precision, dev.type, bool(training))
    if precision == "auto" and key not in _logged:
        _logged.add(key)
        logger.info(describe_precision(precision, dev, training=training))
    if dev.type == "cpu" and used == "bf16" and "cpu" not in _warned and not native_cpu_bf16():
        _warned.add("cpu")
        probe = cpu_probe()
        warnings.warn(
            f"precision bf16 on a CPU without native bf16 (capability {probe.capability}): a bf16 convolution "
            f"took {probe.conv_ratio:.0f}x the fp32 time in the probe; precision auto or fp32 runs fp32 here",
            RuntimeWarning,
            stacklevel=2,
        )
    return used


def describe_precision(precision: str, device: str | torch.device | None = "cpu", *, training: bool = True) -> str:
    """One line saying what ``precision`` resolves to on ``device`` and why.

    Example: ``precision auto -> fp32 (CPU capability AVX2, no native bf16)``.
    """
    dev = _device(device)
    used, reason = _resolve(_check(precision), dev, bool(training))
    return f"precision {precision} -> {used} ({reason})"


def precision_record(
    precision: str, device: str | torch.device | None = "cpu", *, training: bool = True
) -> dict[str, Any]:
    """Plain values for checkpoints and benchmark reports: requested, used, reason and (CPU) the probe."""
    dev = _device(device)
    used, reason = _resolve(_check(precision), dev, bool(training))
    record: dict[str, Any] = {"requested": precision, "used": used, "reason": reason, "device": dev.type}
    if dev.type == "cpu" and native_cpu_bf16() and (precision == "auto" or used == "bf16"):
        record["probe"] = cpu_probe().as_dict()
    return record


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; anything else is checked and returned as a device.

    Raises:
        ConfigError: an unknown device string, or CUDA requested on a machine without it.
    """
    if isinstance(device, torch.device):
        dev = device
    elif str(device).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(str(device))
        except RuntimeError as e:
            raise ConfigError("device", f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"device {str(dev)!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError("device", f"device {str(dev)!r} requested but only {torch.cuda.device_count()} GPU(s)")
    return dev


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` on ``device`` (a ``nullcontext`` when no autocast applies)."""
    dev = torch.device(device)
    precision = resolve_precision(precision, dev)
    if precision == "fp32":
        return contextlib.nullcontext()
    if dev.type == "cuda":
        dtype = torch.float16 if precision == "amp" else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)
    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()  # fp16 autocast on CPU is slow and unsupported by many kernels


def uses_grad_scaler(device: str | torch.device, precision: str) -> bool:
    """fp16 needs loss scaling; bf16 has fp32's exponent range and does not."""
    dev = torch.device(device)
    return dev.type == "cuda" and resolve_precision(precision, dev) == "amp"


def cuda_amp(device: str | torch.device, precision: str) -> bool:
    """The ``amp`` flag for MONAI engines (evaluators): they autocast on CUDA only."""
    dev = torch.device(device)
    return dev.type == "cuda" and resolve_precision(precision, dev) != "fp32"


def cuda_amp_kwargs(precision: str, device: str | torch.device | None = None) -> dict:
    """The ``amp_kwargs`` for MONAI engines matching :func:`autocast` on CUDA.

    Args:
        precision: as :func:`autocast`.
        device: where the engine runs; ``auto`` resolves for it (default: CUDA when available). Off CUDA the
            kwargs are unused (:func:`cuda_amp` is False) and ``auto`` gives fp16's.
    """
    dev = torch.device("cuda" if device is None and torch.cuda.is_available() else (device or "cpu"))
    used = resolve_precision(precision, dev) if dev.type == "cuda" or precision != "auto" else "amp"
    return {"dtype": torch.bfloat16 if used == "bf16" else torch.float16}
