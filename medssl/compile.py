"""``compile: auto|true|false``: whether a network's forward runs through ``torch.compile`` (inductor).

:func:`compile_network` is the one place a network is compiled: :func:`medssl.networks.build.make_network` calls
it for the training bundles (``ssl_pretrain.yaml``, and the ``supervised.yaml`` recipes btcv_unetr / la_vnet through
their ``network`` line) and :class:`medssl.inference.Predictor` for ``compile=True``. It replaces the module's
``forward`` by ``torch.compile(module.forward)`` on the instance: the state dict, parameters, hooks and
checkpoints stay exactly as they are (``torch.compile(module)`` would return a wrapper whose state-dict keys carry
an ``_orig_mod.`` prefix). ``nn.Module.compile()`` is not used: with torch 2.13 it captured no frame here and ran
eagerly without a word. A deep copy of a compiled module would call the original's forward, so bundles that copy
their network (Mean Teacher's teacher) do not take the id.

``auto`` (:func:`resolve_compile`) is deliberately conservative: compiling is on only where a measurement in
:data:`MEASURED` says the compiled step of *this* workload is at least :data:`MIN_SPEEDUP` times faster and, when
the run's length is known, that the time saved over the run exceeds the compile time. A workload
(:func:`compile_key`) is the device kind (``"cuda"``, or ``"cpu:<torch CPU capability>"`` with ``+AMX`` on a CPU
with AMX tiles: an AMX Xeon and a Zen 5 both report ``AVX512``), the network class, the precision actually used
and training or inference; a record also holds the measured network's parameter count, and applies only to a
network within 5 % of it (what ``torch.compile`` buys a ViT-B says nothing about a tiny test model). Where no
record applies, ``auto`` is off, with the reason logged, and it is off where inductor would need a C++ compiler that
is missing. ``true`` compiles (on CPU a missing C++ compiler is a :class:`~medssl.errors.ConfigError` naming the
id); ``false`` never does.

The inductor cache (``TORCHINDUCTOR_CACHE_DIR``) is set to ``<output_dir>/torch_compile_cache`` before compiling,
unless the environment already names one (that one is kept, and logged).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl.config import as_bool
from medssl.errors import ConfigError

__all__ = [
    "CACHE_SUBDIR",
    "COMPILE_CHOICES",
    "MEASURED",
    "MIN_SPEEDUP",
    "PARAMS_TOLERANCE",
    "compile_key",
    "compile_network",
    "cpp_compiler",
    "device_kind",
    "parse_compile",
    "resolve_compile",
    "set_cache_dir",
]

logger = logging.getLogger(__name__)

COMPILE_CHOICES = ("auto", "true", "false")
CACHE_SUBDIR = "torch_compile_cache"
#: a compiled step must be at least this much faster (measured) before ``auto`` turns compiling on
MIN_SPEEDUP = 1.1

#: Measurements of a compiled step by :func:`compile_key`: ``{"speedup": median eager s / median compiled s,
#: "compile_s": the first (compiling) step's seconds minus the eager first step's, "step_s": median eager seconds
#: per step, "params": the measured network's parameter count, "source": the benchmark and its machine}``.
#: ``python -m bench ssl_step`` / ``finetune_step --recipe-batch`` measure them (cases ``medssl default`` and
#: ``medssl default+compile``, or ``medssl+levers`` and ``medssl+compile`` for bf16); BENCHMARKS.md has the runs.
MEASURED: dict[str, Mapping[str, Any]] = {
    # AMD EPYC (Zen 5), 2 cores, 2 torch threads, each run started idle; BENCHMARKS.md "Round 2". Where two runs
    # exist the lower speed-up is kept. Fine-tuning: `bench finetune_step --recipe-batch --reps 3` (UNETR ViT-B/16,
    # 4 crops of 96^3), runs D and K of 7 Dec 2026: fp32 1.34x / 1.32x, bf16 1.35x / 1.10x.
    "cpu:AVX512/UNETR/fp32/train": {
        "speedup": 1.32, "compile_s": 85.0, "step_s": 25.3, "params": 92_802_478,
        "source": "bench finetune_step --recipe-batch, AMD EPYC Zen 5, 2 threads (runs D, K)",
    },
    "cpu:AVX512/UNETR/bf16/train": {
        "speedup": 1.10, "compile_s": 85.0, "step_s": 10.6, "params": 92_802_478,
        "source": "bench finetune_step --recipe-batch, AMD EPYC Zen 5, 2 threads (runs D, K)",
    },
    # SSL: `bench ssl_step --recipe-batch --reps 3` (ViTAutoEnc ViT-B/16, 8 crops x 2 views of 96^3), runs A (2 Dec),
    # B and L (7 Dec): fp32 1.01x / 1.01x, bf16 1.06x / 0.98x. Compiling does not pay here.
    "cpu:AVX512/ViTAutoEnc/fp32/train": {
        "speedup": 1.01, "compile_s": 32.0, "step_s": 11.6, "params": 89_146_641,
        "source": "bench ssl_step --recipe-batch, AMD EPYC Zen 5, 2 threads (runs B, L)",
    },
    "cpu:AVX512/ViTAutoEnc/bf16/train": {
        "speedup": 0.98, "compile_s": 28.0, "step_s": 6.5, "params": 89_146_641,
        "source": "bench ssl_step --recipe-batch, AMD EPYC Zen 5, 2 threads (runs A, L)",
    },
}  # fmt: skip
#: a record applies to a network whose parameter count is within this fraction of the measured one
PARAMS_TOLERANCE = 0.05

_ENV = "TORCHINDUCTOR_CACHE_DIR"
_set_by_us: str | None = None


def parse_compile(value: Any) -> str:
    """``"auto"``, ``"true"`` or ``"false"`` from a bundle id / CLI value (booleans and their strings accepted).

    Raises:
        ConfigError: any other value (names the ``compile`` id).
    """
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return "true" if as_bool(value, "compile") else "false"
    except ConfigError:
        raise ConfigError("compile", f"must be auto, true or false, got {value!r}") from None


def device_kind(device: str | torch.device) -> str:
    """``"cuda"``, or ``"cpu:<torch CPU capability>"`` with ``+AMX`` where the CPU has AMX tiles."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda"
    if device.type != "cpu":
        return device.type
    from medssl.precision import amx_cpu, cpu_capability

    return f"cpu:{cpu_capability()}" + ("+AMX" if amx_cpu() else "")


def compile_key(device: str | torch.device, network: nn.Module | str, precision: str, *, training: bool = True) -> str:
    """The workload :data:`MEASURED` is keyed by, e.g. ``"cpu:AVX512/UNETR/fp32/train"``.

    Args:
        device: where the network runs (:func:`device_kind`).
        network: the module or its class name.
        precision: the precision actually used (``fp32`` / ``bf16`` / ``amp``, not ``auto``).
        training: a training step (``train``) or a forward only (``infer``).
    """
    name = network if isinstance(network, str) else type(network).__name__
    return f"{device_kind(device)}/{name}/{precision}/{'train' if training else 'infer'}"


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would call on CPU (``$CXX`` or inductor's ``cpp.cxx`` setting), or ``None``."""
    candidates = [os.environ.get("CXX")]
    try:
        import torch._inductor.config as inductor_config

        candidates += [c for c in (inductor_config.cpp.cxx or ()) if c]
    except Exception:  # an unusual torch build: fall back to the usual names
        pass
    candidates += ["g++", "c++", "clang++"]
    for name in candidates:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def resolve_compile(
    compile: Any,
    device: str | torch.device = "cpu",
    network: nn.Module | str | None = None,
    precision: str = "auto",
    *,
    training: bool = True,
    iterations: int | None = None,
) -> tuple[bool, str]:
    """``(compile or not, reason)`` for the ``compile`` id on ``device``.

    Args:
        compile: ``auto`` / ``true`` / ``false`` (or a bool).
        device: where the network runs.
        network: the network (or its class name); ``auto`` needs it to find a measurement (and, for a module, to
            check that the measured network had about as many parameters).
        precision: the ``precision`` id; ``auto`` is resolved as the trainer / Predictor resolves it.
        training: training step or forward only.
        iterations: the run's length in steps, when known: ``auto`` then also needs the recorded time saved per
            step × ``iterations`` to exceed the recorded compile time.
    """
    choice = parse_compile(compile)
    if choice == "false":
        return False, "compile false"
    if choice == "true":
        return True, "compile true"
    if network is None:
        return False, "compile auto -> off (no network named: no measurement to go by)"
    from medssl.precision import resolve_precision

    key = compile_key(device, network, resolve_precision(precision, device, training=training), training=training)
    record = MEASURED.get(key)
    if not record:
        return False, f"compile auto -> off ({key}: no measurement recorded that torch.compile helps here)"
    measured_params = int(record.get("params") or 0)
    if isinstance(network, nn.Module) and measured_params:
        params = sum(p.numel() for p in network.parameters())
        if abs(params - measured_params) > PARAMS_TOLERANCE * measured_params:
            return False, (
                f"compile auto -> off ({key}: measured on a network of {measured_params / 1e6:.1f} M parameters, "
                f"this one has {params / 1e6:.1f} M)"
            )
    speedup = float(record["speedup"])
    if speedup < MIN_SPEEDUP:
        return False, f"compile auto -> off ({key}: measured {speedup:.2f}x, below {MIN_SPEEDUP}x)"
    if iterations is not None and record.get("step_s") and record.get("compile_s") is not None:
        saved = float(iterations) * float(record["step_s"]) * (1.0 - 1.0 / speedup)
        if saved <= float(record["compile_s"]):
            return False, (
                f"compile auto -> off ({key}: {speedup:.2f}x would save {saved:.0f} s over {iterations} steps, "
                f"less than the {float(record['compile_s']):.0f} s compile)"
            )
    if torch.device(device).type == "cpu" and cpp_compiler() is None:
        return False, f"compile auto -> off ({key}: measured {speedup:.2f}x, but no C++ compiler for inductor)"
    return True, f"compile auto -> on ({key}: measured {speedup:.2f}x)"


def set_cache_dir(output_dir: str | os.PathLike | None) -> str | None:
    """Point inductor's cache at ``<output_dir>/torch_compile_cache`` (created) unless the environment names one.

    Returns:
        The cache directory in effect (``None``: no ``output_dir`` and none set).
    """
    global _set_by_us
    current = os.environ.get(_ENV)
    # importing torch._inductor writes its default into the environment: that one is not a user's choice
    if current and current not in (_set_by_us, _inductor_default()):
        logger.info(f"torch.compile cache: {current} (from {_ENV})")
        return current
    if output_dir is None or str(output_dir) == "":
        return current
    path = (Path(output_dir) / CACHE_SUBDIR).resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ[_ENV] = _set_by_us = str(path)
    try:  # inductor memoises some cache paths: start from the new directory
        from torch._inductor.utils import clear_caches

        clear_caches()
    except Exception:  # an unusual torch build: the environment variable alone still applies to new entries
        pass
    return str(path)


def _inductor_default() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return os.path.abspath(default_cache_dir())
    except Exception:  # an unusual torch build
        return None


def compile_network(
    network: nn.Module,
    compile: Any = "auto",
    device: str | torch.device = "cpu",
    output_dir: str | os.PathLike | None = None,
    *,
    precision: str = "auto",
    training: bool = True,
    iterations: int | None = None,
) -> nn.Module:
    """``network`` with its forward compiled by ``torch.compile`` when :func:`resolve_compile` says so.

    The same module is returned (state dict unchanged); the decision and its reason are logged. ``precision``,
    ``training`` and ``iterations`` go to :func:`resolve_compile` (they matter to ``auto`` only).

    Raises:
        ConfigError: an invalid ``compile`` value, or ``compile`` true on CPU without a C++ compiler.
    """
    on, reason = resolve_compile(compile, device, network, precision, training=training, iterations=iterations)
    if not on:
        if parse_compile(compile) != "false":  # an explicit false needs no line
            logger.info(reason)
        return network
    if torch.device(device).type == "cpu" and cpp_compiler() is None:
        raise ConfigError(
            "compile",
            "torch.compile on CPU (inductor) needs a C++ compiler (g++ / clang++, or $CXX) and none was found; "
            "install one or set compile: false",
        )
    cache = set_cache_dir(output_dir)
    network.forward = _plain_tensor_inputs(torch.compile(network.forward))
    logger.info(f"{reason}: {type(network).__name__}.forward compiled (inductor cache {cache or 'default'})")
    return network


def _plain_tensor_inputs(compiled: Any) -> Any:
    """``compiled`` called with MONAI ``MetaTensor`` arguments as plain tensors.

    Every operation on a ``MetaTensor`` goes through its ``__torch_function__``, which dynamo cannot trace: a
    MetaTensor batch (what MONAI transforms and loaders produce) broke the compiled UNETR forward into dozens of
    graphs, one per call site, and hit dynamo's recompile limit; a small Conv3d net given one failed outright
    (``TypeError: Multiple dispatch failed``). The network's output is then a plain tensor;
    MONAI's sliding-window inferer restores the input's meta on its result, and losses do not use it.
    """
    from monai.data import MetaTensor

    def plain(value: Any) -> Any:
        return value.as_tensor() if isinstance(value, MetaTensor) else value

    def forward(*args: Any, **kwargs: Any) -> Any:
        return compiled(*(plain(a) for a in args), **{k: plain(v) for k, v in kwargs.items()})

    return forward
