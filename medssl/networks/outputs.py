"""A network seen through its first output, for tools and engines that expect one tensor.

MONAI's ``ViTAutoEnc`` returns ``(reconstruction, hidden_states)``. MONAI's bundle tools
(``python -m monai.bundle verify_net_in_out``) read ``output.shape`` and ``output.dtype`` of the network named by
``--net_id``, which a tuple does not have; ``ssl_pretrain.yaml`` therefore names this wrapper
(``reconstruction_network``) as the network its metadata describes. Training keeps the unwrapped network, and
checkpoints its state dict, so the wrapper's ``network.`` key prefix never reaches a file. The trainers take the
first output with :func:`first_output` instead of a wrapper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["first_output", "FirstOutput"]


def first_output(output: Any) -> torch.Tensor:
    """The first element of a tuple / list output (``ViTAutoEnc``: ``(image, hidden_states)``), else ``output``."""
    return output[0] if isinstance(output, (tuple, list)) else output


class FirstOutput(nn.Module):
    """Call ``network`` and return the first element of a tuple / list output (any other output unchanged).

    Args:
        network: the module to wrap, e.g. ``ViTAutoEnc``; it is registered as ``self.network``.

    Example::

        net = FirstOutput(ViTAutoEnc(in_channels=1, img_size=32, patch_size=16))
        net(torch.zeros(1, 1, 32, 32, 32)).shape  # (1, 1, 32, 32, 32): the reconstruction only
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        self.network = network

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return first_output(self.network(*args, **kwargs))
