"""The one ViT encoder every medssl network builds: UNETR's, S5CL's token network's and S5CL's ViT classifier's.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale", ICLR 2021
(https://arxiv.org/abs/2010.11929).

:func:`vit_encoder` builds a MONAI :class:`~monai.networks.nets.ViT` without its classification token, so its
tensors are named ``patch_embedding.* / blocks.N.* / norm.*`` wherever it sits (``vit.*`` in
:class:`medssl.networks.unetr.UNETR` and :class:`medssl.networks.s5cl.S5CLTokenNet`, ``encoder.*`` in
:class:`medssl.networks.s5cl.S5CLClassifier`): an encoder trained in one of them loads into another of the same
sizes (:func:`medssl.networks.pretrained.load_pretrained_vit`). :func:`vit_token_grid` is the token grid the
encoder sees, ``img_size / patch_size`` per axis, refusing sizes whose patches do not tile the image (a
convolutional patch embedding would drop the remainder without a word).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import ViT
from monai.utils import ensure_tuple_rep

__all__ = ["vit_token_grid", "vit_encoder"]


def vit_token_grid(
    img_size: Sequence[int] | int, patch_size: Sequence[int] | int, spatial_dims: int = 3
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Image size, patch size and token grid, one int per spatial dimension each.

    Args:
        img_size: input size (int or one per spatial dim).
        patch_size: patch size (int or one per spatial dim).
        spatial_dims: 2 or 3.

    Returns:
        ``(img_size, patch_size, grid)`` with ``grid = img_size // patch_size`` per axis; tokens come in MONAI's
        order over ``grid`` (see :func:`medssl.data.patches.token_majority_labels`).

    Raises:
        ValueError: a size that is not a multiple of its patch size (naming both and the offending sizes).

    Example::

        vit_token_grid(96, 16)          # ((96, 96, 96), (16, 16, 16), (6, 6, 6))
    """
    img = tuple(int(s) for s in ensure_tuple_rep(img_size, spatial_dims))
    patch = tuple(int(p) for p in ensure_tuple_rep(patch_size, spatial_dims))
    bad = [s for s, p in zip(img, patch) if p < 1 or s % p]
    if bad:
        raise ValueError(f"img_size {img} must be divisible by patch_size {patch} (not: {bad})")
    return img, patch, tuple(s // p for s, p in zip(img, patch))


def vit_encoder(
    in_channels: int,
    img_size: Sequence[int] | int,
    patch_size: Sequence[int] | int,
    hidden_size: int = 768,
    mlp_dim: int = 3072,
    num_layers: int = 12,
    num_heads: int = 12,
    proj_type: str = "conv",
    dropout_rate: float = 0.0,
    spatial_dims: int = 3,
    qkv_bias: bool = False,
    save_attn: bool = False,
) -> ViT:
    """A MONAI ``ViT`` encoder (no classification token): ``(B, C, *img_size)`` → tokens ``(B, N, hidden_size)``
    and the hidden state after each block.

    Args:
        in_channels: image channels.
        img_size: input size; a multiple of ``patch_size`` on every axis.
        patch_size: patch size (int or one per spatial dim).
        hidden_size: transformer width.
        mlp_dim: transformer MLP width.
        num_layers: transformer blocks.
        num_heads: attention heads (must divide ``hidden_size``).
        proj_type: ``"conv"`` or ``"perceptron"`` patch embedding (must match a pretrained checkpoint).
        dropout_rate: transformer dropout.
        spatial_dims: 2 or 3.
        qkv_bias: bias on the attention qkv projection.
        save_attn: keep attention maps in the self-attention blocks.

    Raises:
        ValueError: ``dropout_rate`` outside ``[0, 1]``, ``hidden_size`` not divisible by ``num_heads``, or
            ``img_size`` not divisible by ``patch_size``.

    Example::

        vit = vit_encoder(1, img_size=96, patch_size=16)   # ViT-B/16 on 96³ crops: 216 tokens of 768
        tokens, hidden_states = vit(torch.zeros(1, 1, 96, 96, 96))
    """
    if not 0.0 <= dropout_rate <= 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1], got {dropout_rate}")
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    img, patch, _ = vit_token_grid(img_size, patch_size, spatial_dims)
    return ViT(
        in_channels=in_channels,
        img_size=img,
        patch_size=patch,
        hidden_size=hidden_size,
        mlp_dim=mlp_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        proj_type=proj_type,
        classification=False,
        dropout_rate=dropout_rate,
        spatial_dims=spatial_dims,
        qkv_bias=qkv_bias,
        save_attn=save_attn,
    )
