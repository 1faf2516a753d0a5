"""Self-describing, atomic, ``weights_only``-loadable checkpoints.

A ``model.pt`` holds tensors and plain values only::

    {
        "format": "medssl-checkpoint/1",
        "network": {"_target_": "monai.networks.nets.ViTAutoEnc", ...},  # rebuilds the model
        "state_dict": {...},
        "preprocessing": {"spacing": [...], "orientation": "RAS", "intensity": {...}, "roi_size": [...]},
        "labels": {"0": "background", ...},
        "stage": "ssl_pretrain",
        "progress": {"epoch": 3, "iteration": 120},
        "versions": {"medssl": ..., "monai": ..., "torch": ...},
        "precision": {"requested": "auto", "used": "fp32", "reason": "CPU capability AVX2, no native bf16", ...},
    }

(``precision``: written by the training handlers, see :func:`medssl.precision.precision_record`.)

``last.pt`` adds ``optimizer``, ``scheduler``, ``teacher`` and ``rng`` for exact resume. Files are written to
a temporary file in the same folder, fsynced, then renamed over the target, so a kill during the write leaves
the previous good file in place.

A checkpoint is data, never code: it is unpickled with ``weights_only=True`` and its ``network`` config is
rebuilt by :func:`build_network` without MONAI's ``ConfigParser`` — the ``_target_`` must be one of
:data:`NETWORKS` and every argument a literal (numbers, strings, booleans, ``None``, lists / dicts of those).
:func:`check_network_config` refuses anything else (``$`` expressions, ``@`` / ``%`` references, nested
``_target_``, ``_requires_``, ``_mode_`` other than ``default``, ``_disabled_``) before anything is imported
or called.
"""

from __future__ import annotations

import importlib
import os
import pickle
import random
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.atomic import atomic_write
from medssl.errors import CheckpointError, ResourceError, attempted_allocation, is_out_of_memory

__all__ = [
    "FORMAT",
    "atomic_torch_save",
    "make_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "NETWORKS",
    "check_network_config",
    "build_network",
    "out_of_memory_building",
    "describe_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "versions",
]

FORMAT = "medssl-checkpoint/1"
_REQUIRED = ("format", "network", "state_dict", "stage")


def _monai_networks() -> dict[str, tuple[str, str]]:
    # each class under its public name and under the module that defines it, which is what
    # medssl.engines.utils.network_config writes (``func.__module__``)
    found = {}
    for module, names in (
        ("monai.networks.nets", ("vit.ViT", "vitautoenc.ViTAutoEnc", "unetr.UNETR", "swin_unetr.SwinUNETR")),
        ("monai.networks.nets", ("vnet.VNet", "unet.UNet", "basic_unet.BasicUNet", "dynunet.DynUNet")),
        ("monai.networks.nets", ("segresnet.SegResNet",)),
        # a single convolution: the cheap threshold models of the inference tests and tools
        ("monai.networks.blocks", ("convolutions.Convolution",)),
    ):
        for name in names:
            sub, cls = name.split(".")
            found[f"{module}.{cls}"] = found[f"{module}.{sub}.{cls}"] = (f"{module}.{sub}", cls)
    return found


#: The ``_target_`` values a checkpoint may name → (module, attribute) imported once the whole config passed
#: :func:`check_network_config`. Every network a bundle writes is here (``tests/reliability/
#: test_checkpoint_threats.py`` round-trips each one); each builds a module from literal arguments only.
NETWORKS: dict[str, tuple[str, str]] = {
    "medssl.networks.unetr.UNETR": ("medssl.networks.unetr", "UNETR"),
    "medssl.networks.vnet.VNet": ("medssl.networks.vnet", "VNet"),
    "medssl.networks.s5cl.s5cl_network": ("medssl.networks.s5cl", "s5cl_network"),
    "medssl.networks.s5cl.S5CLClassifier": ("medssl.networks.s5cl", "S5CLClassifier"),
    "medssl.networks.s5cl.S5CLTokenNet": ("medssl.networks.s5cl", "S5CLTokenNet"),
    # where the S5CL networks lived before issue 19: checkpoints written then name these
    "medssl.engines.s5cl.s5cl_network": ("medssl.networks.s5cl", "s5cl_network"),
    "medssl.engines.s5cl.S5CLClassifier": ("medssl.networks.s5cl", "S5CLClassifier"),
    "medssl.engines.s5cl.S5CLTokenNet": ("medssl.networks.s5cl", "S5CLTokenNet"),
    **_monai_networks(),
}

# ConfigParser's special keys: a checkpoint written by medssl has only ``_target_`` (network_config drops the
# bundle's ``_mode_: callable``); ``_desc_`` is documentation and ignored
_RESERVED = ("_target_", "_requires_", "_mode_", "_disabled_", "_desc_")
_CODE_PREFIXES = ("$", "@", "%")  # ConfigParser: expression, reference, macro
_MAX_DEPTH = 8  # real configs nest 2 deep (act=("prelu", {"init": 0.25}))
_MAX_ITEMS = 10_000
_MAX_STRING = 1_000


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _check_literal(value: Any, where: str, depth: int, count: list[int]) -> str | None:
    """Why ``value`` is not plain data, or ``None``."""
    count[0] += 1
    if count[0] > _MAX_ITEMS:
        return f"more than {_MAX_ITEMS} values"
    if depth > _MAX_DEPTH:
        return f"{where} is nested deeper than {_MAX_DEPTH} levels"
    if value is None or isinstance(value, (bool, int, float)):
        return None
    if type(value) is str:  # exactly str: a subclass could answer startswith() as it likes
        if value.startswith(_CODE_PREFIXES):
            return f"{where} is {_short(value)}: strings starting with $, @ or % are config code, not data"
        if len(value) > _MAX_STRING:
            return f"{where} is a string of {len(value)} characters (at most {_MAX_STRING})"
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            why = _check_literal(item, f"{where}[{i}]", depth + 1, count)
            if why:
                return why
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) is not str:
                return f"{where} has a {type(key).__name__} key {_short(key)} (keys must be strings)"
            if key in _RESERVED:
                return f"{where} has a nested {key!r}: a checkpoint names one network class, at the top"
            why = _check_literal(key, f"{where} key", depth + 1, count) or _check_literal(
                item, f"{where}[{key!r}]", depth + 1, count
            )
            if why:
                return why
        return None
    return f"{where} is a {type(value).__name__}, not a literal (number, string, bool, None, list or dict)"


def _why_refused(config: Any) -> str | None:
    if not isinstance(config, dict):
        return f"'network' is a {type(config).__name__}, not a dict"
    if "_target_" not in config:
        return f"no '_target_' (keys: {_short(sorted(map(str, config)), 120)})"
    target = config["_target_"]
    if type(target) is not str:
        return f"'_target_' is a {type(target).__name__}, not a class path"
    if target.startswith(_CODE_PREFIXES):
        return f"'_target_' is {_short(target)}: an expression or reference, not a class path"
    if target not in NETWORKS:
        names = {
            pkg: [c for m, c in dict.fromkeys(NETWORKS.values()) if m.startswith(pkg)] for pkg in ("medssl", "monai")
        }
        allowed = "; ".join(f"{pkg} {', '.join(cls)}" for pkg, cls in names.items())
        return f"'_target_' {_short(target)} is not an allowed network class ({allowed}: medssl.checkpoint.NETWORKS)"
    for key in ("_requires_", "_disabled_"):
        if key in config:
            return f"{key!r} is not allowed (a checkpoint's network is built from its own arguments only)"
    mode = config.get("_mode_", "default")
    if type(mode) is not str or mode != "default":
        return f"'_mode_' {_short(mode)} is not allowed (only 'default': the class is called)"
    if type(config.get("_desc_", "")) is not str:  # documentation only: ignored
        return f"'_desc_' is a {type(config['_desc_']).__name__}, not a string"
    count = [0]
    for key, value in config.items():
        if type(key) is not str or not key.isidentifier():
            return f"argument name {_short(key)} is not an identifier"
        if key in _RESERVED:
            continue
        why = _check_literal(value, f"argument {key!r}", 1, count)
        if why:
            return why
    return None


def check_network_config(config: Any, where: str | os.PathLike | None = None) -> tuple[str, dict[str, Any]]:
    """Check that a checkpoint's ``network`` config is plain data naming an allowed class; nothing is imported.

    Args:
        config: the ``network`` entry of a checkpoint.
        where: the checkpoint file, for the message.

    Returns:
        ``(target, keyword arguments)``.

    Raises:
        CheckpointError: ``refused network config: <why>`` — the class is not in :data:`NETWORKS`, or a value is
            not a literal (a ``$`` / ``@`` / ``%`` string, a nested ``_target_``, ``_requires_``, ``_mode_``
            other than ``default``, ``_disabled_``, a tensor or another object, nesting deeper than 8 levels).
            A top-level ``_desc_`` string is accepted and ignored, as ``ConfigParser`` does.
    """
    why = _why_refused(config)
    if why:
        raise CheckpointError(where, f"refused network config: {why}")
    return config["_target_"], {k: v for k, v in config.items() if k not in _RESERVED}


def versions() -> dict[str, str]:
    import monai

    import medssl

    return {
        "medssl": str(medssl.__version__),
        "monai": str(monai.__version__),
        "torch": str(torch.__version__),
    }


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def _plain(value: Any) -> Any:
    """Convert config values (tuples, numpy scalars, paths) to what ``weights_only`` loading accepts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.device):
        return str(value)
    return value


def make_checkpoint(
    *,
    network: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    stage: str,
    preprocessing: Mapping[str, Any] | None = None,
    labels: Mapping[Any, str] | None = None,
    progress: Mapping[str, int] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Assemble a checkpoint dict in the medssl format (``extra`` adds e.g. optimizer / scheduler / rng)."""
    if "_target_" not in network:
        raise CheckpointError(None, f"network config needs a '_target_', got keys {sorted(network)}")
    ckpt = {
        "format": FORMAT,
        "network": _plain(dict(network)),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "preprocessing": _plain(dict(preprocessing or {})),
        "labels": {str(k): str(v) for k, v in (labels or {}).items()},
        "stage": str(stage),
        "progress": {k: int(v) for k, v in (progress or {}).items()},
        "versions": versions(),
    }
    ckpt.update(extra)
    return ckpt


def save_checkpoint(path: str | os.PathLike, **kwargs: Any) -> Path:
    """``make_checkpoint(**kwargs)`` written atomically to ``path``."""
    return atomic_torch_save(make_checkpoint(**kwargs), path)


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", *, require_format: bool = True
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; every failure is a :class:`CheckpointError` naming the file.

    Args:
        path: the ``.pt`` file.
        map_location: where tensors go.
        require_format: check the medssl format keys (turn off to read foreign state dicts safely).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "checkpoint file is empty (0 bytes)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses arbitrary globals: a checkpoint that would run code ends here
        found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(e))
        why = found.group(0) if found else _first_line(e)
        raise CheckpointError(path, f"refused to load: it needs code to unpickle, not only tensors ({why})") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(path, f"corrupt or truncated checkpoint ({_first_line(e)})") from e
    if require_format:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(path, f"not a {FORMAT} checkpoint (format: {found!r})")
        missing = [k for k in _REQUIRED if k not in obj]
        if missing:
            raise CheckpointError(path, f"checkpoint lacks required keys {missing}")
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _n_values(state_dict: Any) -> int:
    if not isinstance(state_dict, Mapping):
        return 0
    return sum(int(t.numel()) for t in state_dict.values() if torch.is_tensor(t))


def out_of_memory_building(where, target: str, n_values: int, error: BaseException, device: str = "cpu"):
    """The :class:`ResourceError` for an allocation failure while a network is built or moved to ``device``."""
    size = [f"{target} on {device}"]
    if n_values:
        size[0] += f", {n_values:,} parameters ({n_values * 4 / 2**30:.2f} GiB in float32)"
    attempted = attempted_allocation(error)
    if attempted:
        size.append(f"tried to allocate {attempted}")
    return ResourceError(
        where,
        f"out of memory while building the network ({'; '.join(size)}); "
        "free memory or use a device with more (--device)",
    )


def build_network(
    ckpt: Mapping[str, Any], *, load_weights: bool = True, where: str | os.PathLike | None = None
) -> torch.nn.Module:
    """Rebuild the network a checkpoint describes (and load its weights strictly), without evaluating any code.

    Args:
        ckpt: a checkpoint dict (:func:`load_checkpoint`).
        load_weights: load ``ckpt["state_dict"]`` with ``strict=True``.
        where: the checkpoint file, for messages.

    Raises:
        CheckpointError: the config is refused (:func:`check_network_config`; nothing was imported or called),
            the class rejects its arguments, or the weights do not fit.
        ResourceError: out of memory while building.
    """
    target, kwargs = check_network_config(ckpt.get("network"), where)
    module, name = NETWORKS[target]
    factory = getattr(importlib.import_module(module), name)
    oom = None
    try:
        net = factory(**kwargs)
    except Exception as e:  # the class's own checks (TypeError / ValueError): the config does not describe a network
        if not is_out_of_memory(e):
            raise CheckpointError(where, f"cannot rebuild the network {target}: {_first_line(e)}") from e
        # raised outside this block so the failed allocation's frames are freed
        oom = out_of_memory_building(where, target, _n_values(ckpt.get("state_dict")), e)
    if oom is not None:
        raise oom
    if not isinstance(net, torch.nn.Module):
        raise CheckpointError(where, f"cannot rebuild the network: {target} gave a {type(net).__name__}")
    if load_weights:
        state = ckpt.get("state_dict")
        if not isinstance(state, Mapping):
            raise CheckpointError(where, f"'state_dict' is a {type(state).__name__}, not a dict of tensors")
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(where, f"weights do not fit the network {target}: {_first_line(e)}") from e
    return net


def _printable(text: str) -> str:
    # a checkpoint's strings reach the terminal: escape control characters (ANSI sequences, newlines)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def describe_checkpoint(ckpt: Mapping[str, Any]) -> str:
    """Human-readable summary of a checkpoint's metadata (``medssl inspect``); a network config that
    :func:`build_network` would refuse shows as ``REFUSED (<why>)``."""
    state = ckpt.get("state_dict")
    n_tensors = len(state) if isinstance(state, Mapping) else 0
    why = _why_refused(ckpt.get("network"))
    network = f"REFUSED ({why})" if why else ckpt["network"]["_target_"]
    lines = [
        f"format:        {ckpt.get('format')}",
        f"stage:         {ckpt.get('stage')}",
        f"network:       {network}",
        f"tensors:       {n_tensors} ({_n_values(state) / 1e6:.2f} M values)",
        f"progress:      {ckpt.get('progress')}",
        f"preprocessing: {ckpt.get('preprocessing')}",
        f"labels:        {ckpt.get('labels')}",
        f"versions:      {ckpt.get('versions')}",
    ]
    if "precision" in ckpt:
        p = ckpt["precision"]
        lines.append(f"precision:     {p.get('requested')} -> {p.get('used')} ({p.get('reason')})")
    resume = [k for k in ("optimizer", "scheduler", "teacher", "rng") if k in ckpt]
    if resume:
        lines.append(f"resume state:  {', '.join(resume)}")
    return "\n".join(_printable(line) for line in lines)


def capture_rng_state() -> dict[str, Any]:
    """torch / CUDA / numpy / python RNG states as tensors and plain values (``weights_only``-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np_s = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_s["keys"].numpy().astype(np.uint32),
            np_s["pos"],
            np_s["has_gauss"],
            np_s["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
