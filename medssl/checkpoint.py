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
"""

from __future__ import annotations

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
from medssl.errors import CheckpointError

__all__ = [
    "FORMAT",
    "atomic_write",
    "atomic_torch_save",
    "make_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "build_network",
    "describe_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "versions",
]

FORMAT = "medssl-checkpoint/1"
_REQUIRED = ("format", "network", "state_dict", "stage")


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


def build_network(ckpt: Mapping[str, Any], *, load_weights: bool = True) -> torch.nn.Module:
    """Rebuild the network a checkpoint describes (and load its weights strictly)."""
    from monai.bundle import ConfigParser

    config = dict(ckpt["network"])
    target = str(config.get("_target_", ""))
    if not (target.startswith("medssl.") or target.startswith("monai.")):
        raise CheckpointError(None, f"refusing to build network '_target_: {target}' (only medssl.* / monai.*)")
    net = ConfigParser({"net": config}).get_parsed_content("net")
    if load_weights:
        net.load_state_dict(ckpt["state_dict"], strict=True)
    return net


def describe_checkpoint(ckpt: Mapping[str, Any]) -> str:
    """Human-readable summary of a checkpoint's metadata (``medssl inspect``)."""
    n_tensors = len(ckpt.get("state_dict", {}))
    n_params = sum(int(t.numel()) for t in ckpt.get("state_dict", {}).values() if torch.is_tensor(t))
    lines = [
        f"format:        {ckpt.get('format')}",
        f"stage:         {ckpt.get('stage')}",
        f"network:       {ckpt.get('network', {}).get('_target_')}",
        f"tensors:       {n_tensors} ({n_params / 1e6:.2f} M values)",
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
    return "\n".join(lines)


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
