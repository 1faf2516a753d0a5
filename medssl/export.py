"""``medssl export``: a checkpoint's network as TorchScript (with its preprocessing and labels attached) or as
the bare state dict MONAI's loaders expect.

The TorchScript file runs without medssl or MONAI (``torch.jit.load``); the metadata travels inside it as
``_extra_files["medssl.json"]``: ``{"format", "network", "preprocessing", "labels", "roi_size", "stage",
"versions"}``, so a deployment can preprocess and name the classes exactly as training did. The network is
traced on one window of the checkpoint's roi size (UNETR's token grid is fixed by that size anyway), in fp32
and on the CPU; load it with ``map_location`` to move it.

The state dict (:func:`export_state_dict`) is ``{name: tensor}`` (parameters and buffers) and nothing else,
the file a MONAI model-zoo bundle ships as ``models/model.pt``: ``monai.handlers.CheckpointLoader(load_dict=
{"model": net})``, ``monai.bundle.load(..., model=net)`` and ``net.load_state_dict(torch.load(f,
weights_only=True))`` read it as is. A medssl ``model.pt`` nests the same tensors under ``"state_dict"`` beside
its metadata, whose keys those loaders would take for parameter names.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from medssl.atomic import atomic_write
from medssl.errors import CheckpointError

__all__ = ["METADATA_FILE", "export_state_dict", "export_torchscript", "load_torchscript"]

METADATA_FILE = "medssl.json"


def _roi_size(ckpt: dict[str, Any], where) -> list[int]:
    roi = (ckpt.get("preprocessing") or {}).get("roi_size") or ckpt["network"].get("img_size")
    if roi is None:
        raise CheckpointError(where, "checkpoint gives no roi_size (preprocessing.roi_size or network img_size)")
    return [int(roi)] * 3 if isinstance(roi, (int, float)) else [int(r) for r in roi]


def export_torchscript(checkpoint: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Trace the checkpoint's network on a ``(1, in_channels, *roi_size)`` input and save it atomically.

    Args:
        checkpoint: a medssl ``model.pt``.
        output: the ``.ts`` / ``.pt`` file to write (never the checkpoint itself).

    Returns:
        ``output``.

    Raises:
        CheckpointError: unreadable checkpoint, a refused network config
            (:func:`medssl.checkpoint.check_network_config`), no roi size, ``output`` equal to ``checkpoint``, or a
            network that cannot be traced.

    Example::

        export_torchscript("runs/btcv/model.pt", "runs/btcv/model.ts")
        net = torch.jit.load("runs/btcv/model.ts", _extra_files=(extra := {"medssl.json": ""}))
    """
    from medssl.checkpoint import build_network, check_network_config, load_checkpoint

    checkpoint, output = Path(checkpoint), Path(output)
    if output.resolve() == checkpoint.resolve():
        raise CheckpointError(output, "refusing to overwrite the checkpoint with its export")
    ckpt = load_checkpoint(checkpoint)
    check_network_config(ckpt["network"], checkpoint)  # before any of it is read
    roi = _roi_size(ckpt, checkpoint)
    net = build_network(ckpt, where=checkpoint).eval()
    in_channels = int(ckpt["network"].get("in_channels", 1))
    example = torch.zeros((1, in_channels, *roi))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-derived constants are fixed by the roi
            traced = torch.jit.trace(net, example, check_trace=False)
    except Exception as e:  # tracing failures are about the model code, reported on the checkpoint
        raise CheckpointError(checkpoint, f"cannot trace the network: {str(e).splitlines()[0][:200]}") from e
    meta = {
        "format": "medssl-torchscript/1",
        "network": ckpt["network"],
        "preprocessing": ckpt.get("preprocessing"),
        "labels": ckpt.get("labels"),
        "roi_size": roi,
        "stage": ckpt.get("stage"),
        "versions": ckpt.get("versions"),
    }
    extra = {METADATA_FILE: json.dumps(meta, indent=2)}
    return atomic_write(output, lambda f: torch.jit.save(traced, f, _extra_files=extra))


def export_state_dict(checkpoint: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the bare state dict of the checkpoint's network, atomically, loadable with ``weights_only=True``.

    The network is rebuilt and its weights loaded strictly first (:func:`medssl.checkpoint.build_network`), so
    the file holds exactly the tensors the network's class expects, under the names it expects.

    Args:
        checkpoint: a medssl ``model.pt`` (or ``last.pt``).
        output: the ``.pt`` file to write (never the checkpoint itself).

    Returns:
        ``output``.

    Raises:
        CheckpointError: unreadable checkpoint, a refused network config, weights that do not fit it, or
            ``output`` equal to ``checkpoint``.

    Example::

        export_state_dict("runs/btcv/model.pt", "runs/btcv/model_sd.pt")
        net.load_state_dict(torch.load("runs/btcv/model_sd.pt", weights_only=True))
    """
    from medssl.checkpoint import atomic_torch_save, build_network, load_checkpoint

    checkpoint, output = Path(checkpoint), Path(output)
    if output.resolve() == checkpoint.resolve():
        raise CheckpointError(output, "refusing to overwrite the checkpoint with its export")
    ckpt = load_checkpoint(checkpoint)
    state = build_network(ckpt, where=checkpoint).state_dict()
    return atomic_torch_save(state, output)


def load_torchscript(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Load an exported model: ``(scripted module, metadata dict)``.

    Raises:
        CheckpointError: not a TorchScript file, or one without medssl metadata.
    """
    path = Path(path)
    extra = {METADATA_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(path, f"not a TorchScript file ({str(e).splitlines()[0][:200]})") from e
    if not extra[METADATA_FILE]:
        raise CheckpointError(path, f"TorchScript file has no {METADATA_FILE} metadata (not a medssl export)")
    return module, json.loads(extra[METADATA_FILE])
