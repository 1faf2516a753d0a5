"""Switch MONAI self-attention blocks to PyTorch's fused ``scaled_dot_product_attention``.

MONAI's :class:`~monai.networks.blocks.SABlock` has a ``use_flash_attention`` option, but ``ViT``,
``ViTAutoEnc`` and ``UNETR`` do not pass it through. The flag is read at every forward, so it can be set on a
built network. The fused kernel (flash attention on CUDA, a fused bf16/fp32 kernel on CPU) computes the same
``softmax(q kᵀ · scale) v`` without materialising the attention matrix in autograd: same weights, same state dict,
results equal to rounding.
"""

from __future__ import annotations

import logging

from torch import nn

__all__ = ["use_fused_attention"]

logger = logging.getLogger(__name__)


def use_fused_attention(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Set ``use_flash_attention`` on every MONAI ``SABlock`` of ``network`` where it keeps the semantics.

    Blocks that store attention maps (``save_attn``), use a relative position embedding, or use attention
    dropout are left unchanged (MONAI's fused branch supports none of them the same way; its dropout also applies
    in eval mode).

    Args:
        network: any module; e.g. ``ViTAutoEnc``, ``ViT`` or :class:`medssl.networks.unetr.UNETR`.
        enabled: ``False`` switches the blocks back to MONAI's explicit attention.

    Returns:
        ``network`` (changed in place), so it chains in bundle expressions::

            network: "$medssl.networks.attention.use_fused_attention(@network_def().to(@device_obj))"
    """
    from monai.networks.blocks.selfattention import SABlock

    switched, kept = 0, 0
    for module in network.modules():
        if not isinstance(module, SABlock):
            continue
        if enabled and (module.save_attn or module.rel_positional_embedding is not None or module.dropout_rate > 0):
            kept += 1
            continue
        module.use_flash_attention = bool(enabled)
        switched += 1
    if kept:
        logger.info(f"fused attention: {kept} block(s) kept explicit attention (save_attn, rel. position or dropout)")
    logger.debug(f"fused attention {'on' if enabled else 'off'} in {switched} block(s)")
    return network
