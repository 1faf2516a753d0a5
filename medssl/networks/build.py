"""Build a bundle's training network in one call: instantiate, place, load weights, switch on the fast kernels.

Every training bundle declares its network as a ``_mode_: callable`` component (``network_def``, which the
checkpoint stores to rebuild the model) and builds the module with::

    network: "$medssl.networks.build.make_network(@network_def, @device_obj, @pretrained_ckpt, pretrained='encoder')"

``pretrained`` says what ``pretrained_ckpt`` is:

- ``"encoder"``: a self-supervised ViT (medssl / ``ViTAutoEnc`` / ``ViT`` checkpoint) loaded into the network's ViT
  by :func:`medssl.networks.pretrained.load_pretrained_vit` (strict, reported; ``allow_partial`` is the only way
  around a mismatch);
- ``"network"``: a medssl checkpoint of this very network, to continue from (:func:`load_weights`, strict).

``fast_kernels`` computes patch-wise convolutions as matmuls (:mod:`medssl.networks.patch_conv`) and attention with
the fused kernel (:mod:`medssl.networks.attention`): the same parameters and results, faster on CPU.
``compile`` (``auto`` / ``true`` / ``false``, the bundles' ``compile`` id) runs the forward through
``torch.compile`` where :func:`medssl.compile.resolve_compile` says so, with the inductor cache under
``output_dir`` (:func:`medssl.compile.compile_network`; ``auto`` is off until a measurement says it helps).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from medssl.config import as_bool
from medssl.errors import CheckpointError, ConfigError

__all__ = ["PRETRAINED_KINDS", "load_weights", "make_network"]

logger = logging.getLogger(__name__)

#: What a bundle's ``pretrained_ckpt`` can hold (see the module docstring).
PRETRAINED_KINDS = ("encoder", "network")


def load_weights(network: nn.Module, checkpoint: str | os.PathLike | None) -> nn.Module:
    """Load a medssl checkpoint's ``state_dict`` into ``network`` strictly (``None`` / ``""``: leave it as it is).

    This continues training of the same architecture; loading a ViT encoder into another network is
    :func:`medssl.networks.pretrained.with_pretrained_vit`'s job.

    Raises:
        CheckpointError: the file is not a medssl checkpoint or its tensors do not fit ``network``.
    """
    if checkpoint is None or checkpoint == "":
        return network
    from medssl.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    try:
        network.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(checkpoint, f"does not fit the network ({str(e).splitlines()[0][:200]})") from e
    logger.info(f"loaded {len(ckpt['state_dict'])} tensors from {checkpoint}")
    return network


def make_network(
    network_def: Callable[[], nn.Module] | nn.Module,
    device: str | torch.device = "cpu",
    pretrained_ckpt: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    pretrained: str = "network",
    allow_partial: bool | str = False,
    fast_kernels: bool | str = True,
    compile: bool | str = False,
    output_dir: str | os.PathLike | None = None,
    precision: str = "auto",
    iterations: int | None = None,
) -> nn.Module:
    """The training network of a bundle: built, moved to ``device``, weights loaded, fast kernels on.

    Args:
        network_def: the bundle's ``network_def`` (a callable that builds the module) or a module.
        device: where the network lives (``@device_obj``).
        pretrained_ckpt: ``None`` / ``""`` trains from scratch; otherwise a checkpoint of the kind ``pretrained``.
        pretrained: ``"encoder"`` (SSL ViT into the network's ViT) or ``"network"`` (the same network, strict).
        allow_partial: ``"encoder"`` only: accept an encoder that covers part of the network's ViT (reported).
        fast_kernels: patch-wise convolutions as matmuls and fused attention (numerically the same model).
        compile: ``auto`` / ``true`` / ``false``: compile the forward (:func:`medssl.compile.compile_network`);
            the state dict is unchanged.
        output_dir: the run's folder; the inductor cache goes to ``<output_dir>/torch_compile_cache``.
        precision: the bundle's ``precision`` id and ``iterations`` its ``max_iterations``: what ``compile: auto``
            looks up (:func:`medssl.compile.resolve_compile`: the measured speed-up of this network in this
            precision here, and whether the run is long enough to repay the compile time).

    Raises:
        ConfigError: an unknown ``pretrained`` kind, ``allow_partial`` with ``pretrained="network"``, an invalid
            ``compile``, or ``compile`` true on CPU without a C++ compiler.
        CheckpointError: the checkpoint does not fit (see :func:`load_weights` and
            :func:`medssl.networks.pretrained.load_pretrained_vit`).
    """
    if pretrained not in PRETRAINED_KINDS:
        raise ConfigError("pretrained", f"must be one of {PRETRAINED_KINDS}, got {pretrained!r}")
    partial = as_bool(allow_partial, "allow_partial_load")
    if partial and pretrained != "encoder":
        raise ConfigError("allow_partial_load", "applies to a pretrained encoder only (pretrained='encoder')")
    network = network_def if isinstance(network_def, nn.Module) else network_def()
    network = network.to(device)
    if pretrained == "encoder":
        from medssl.networks.pretrained import with_pretrained_vit

        network = with_pretrained_vit(network, pretrained_ckpt, allow_partial=partial)
    else:
        network = load_weights(network, pretrained_ckpt)
    if as_bool(fast_kernels, "fast_kernels"):
        from medssl.networks.attention import use_fused_attention
        from medssl.networks.patch_conv import use_patch_matmul

        network = use_fused_attention(use_patch_matmul(network))
    from medssl.compile import compile_network

    return compile_network(network, compile, device, output_dir, precision=precision, iterations=iterations)
