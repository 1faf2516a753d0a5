"""S5CL's networks: an encoder with a projection head and a classifier, on pooled features or on every ViT token.

Tran et al., "S5CL: Unifying Fully-Supervised, Self-Supervised, and Semi-Supervised Learning Through Hierarchical
Contrastive Learning", MICCAI 2022 (https://arxiv.org/abs/2203.07307). The trainer
(:class:`medssl.engines.s5cl.S5CLTrainer`) embeds weak and strong views with ``forward(x, return_embedding=True)``
and contrasts the projections; the classifier's logits give the cross entropy and the pseudo-labels.

- :class:`S5CLClassifier` (``mode="classification"``): MONAI 3D ResNet-10 or a ViT encoder, pooled, e.g. for the
  organ-patch task of :mod:`medssl.data.patches`;
- :class:`S5CLTokenNet` (``mode="segmentation"``): a ViT (stored as ``vit``) whose tokens are the samples. Both ViTs
  are :func:`medssl.networks.vit.vit_encoder`'s, the encoder of :class:`medssl.networks.unetr.UNETR`, so a token
  network's checkpoint loads into a UNETR of the same sizes with
  :func:`medssl.networks.pretrained.load_pretrained_vit` (the heads are outside ``vit.`` and skipped).

Where the classifier sits (``classifier_on``): ``"projection"`` (the reference code's layout) reads the projection
the contrastive losses see; ``"encoder"`` reads the encoder features beside the projection head (medssl's earlier
layout, and the class default so that a checkpoint config written before the option rebuilds its network).
:meth:`S5CLBase.module_groups` names the three modules the reference steps with one optimizer each
(:func:`medssl.engines.s5cl.s5cl_optimizer`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medssl.errors import ConfigError
from medssl.networks.vit import vit_encoder, vit_token_grid

__all__ = [
    "MODES",
    "CLASSIFIER_INPUTS",
    "ProjectionHead",
    "S5CLBase",
    "S5CLClassifier",
    "S5CLTokenNet",
    "s5cl_network",
]

MODES = ("classification", "segmentation")
# what the classifier reads: the projection (the reference code's layout) or the encoder features
CLASSIFIER_INPUTS = ("projection", "encoder")


class ProjectionHead(nn.Sequential):
    """``Linear → ReLU → Linear``, applied to the last dimension (the SimCLR / SupCon projection head)."""

    def __init__(self, in_features: int, out_features: int = 128, hidden_features: int | None = None) -> None:
        hidden = int(hidden_features or in_features)
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))


class S5CLBase(nn.Module):
    """The classifier and projection head both S5CL networks put on their encoder features.

    Subclasses store their encoder under :attr:`encoder_attribute` and call :meth:`_build_heads` after it (the
    initial weights are drawn in module order, so the order is part of a seeded run).
    """

    encoder_attribute = "encoder"  # the attribute holding the encoder

    def _build_heads(self, in_features: int, num_classes: int, proj_dim: int, classifier_on: str) -> None:
        if classifier_on not in CLASSIFIER_INPUTS:
            raise ConfigError(
                "classifier_on",
                f"unknown classifier input {classifier_on!r} (use one of {', '.join(CLASSIFIER_INPUTS)})",
            )
        self.classifier_on = classifier_on
        # classifier before head: the encoder layout draws its initial weights in the order it always did
        self.classifier = nn.Linear(proj_dim if classifier_on == "projection" else in_features, num_classes)
        self.head = ProjectionHead(in_features, proj_dim)

    def _project_and_classify(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., in_features)`` → projections ``(..., proj_dim)`` and logits ``(..., num_classes)``."""
        projection = self.head(features)
        return projection, self.classifier(projection if self.classifier_on == "projection" else features)

    def module_groups(self) -> dict[str, nn.Module]:
        """The modules the optimizer steps as separate groups: ``encoder``, ``projection`` head, ``classifier``."""
        return {
            "encoder": getattr(self, self.encoder_attribute),
            "projection": self.head,
            "classifier": self.classifier,
        }


class S5CLClassifier(S5CLBase):
    """A 3D encoder with a projection head on its pooled features and a classifier on the projection (or on the
    features).

    ``forward(x)`` gives the class logits ``(B, num_classes)`` (so MONAI evaluators use it as is);
    ``forward(x, return_embedding=True)`` also gives the projections ``(B, proj_dim)`` the contrastive losses see.

    Args:
        num_classes: classes.
        img_size: input size (int or 3 ints); needed by the ViT encoder.
        in_channels: input channels.
        encoder: ``"resnet10"`` (MONAI ``resnet10``, global average pooled) or ``"vit"``
            (:func:`~medssl.networks.vit.vit_encoder`, mean of the tokens).
        widen_factor: ResNet width multiplier (1.0 = 512 features).
        conv1_size, conv1_stride: the ResNet stem convolution (MONAI's defaults 7 and 1; 3 and 2 are 3-4x
            cheaper on small patches).
        patch_size, hidden_size, mlp_dim, num_layers, num_heads: ViT sizes.
        proj_dim: projection size.
        classifier_on: ``"projection"`` (the classifier reads the projections, as in the reference code; the
            bundle's default) or ``"encoder"`` (it reads the pooled features; the class default, so that a
            checkpoint config written before the option existed rebuilds the network it was trained as).

    Raises:
        ValueError: fewer than 2 classes, an unknown encoder, or (ViT) an ``img_size`` not divisible by
            ``patch_size``.
        ConfigError: an unknown ``classifier_on``.
    """

    def __init__(
        self,
        num_classes: int,
        img_size: Sequence[int] | int = 32,
        in_channels: int = 1,
        encoder: str = "resnet10",
        widen_factor: float = 1.0,
        conv1_size: int = 7,
        conv1_stride: int = 1,
        patch_size: int = 8,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        proj_dim: int = 128,
        classifier_on: str = "encoder",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.encoder_name = encoder
        if encoder == "resnet10":
            from monai.networks.nets import resnet10

            self.encoder = resnet10(
                spatial_dims=3,
                n_input_channels=in_channels,
                feed_forward=False,
                widen_factor=widen_factor,
                conv1_t_size=conv1_size,
                conv1_t_stride=conv1_stride,
            )
            features = int(512 * widen_factor)
        elif encoder == "vit":
            self.encoder = vit_encoder(
                in_channels,
                img_size,
                patch_size,
                hidden_size=hidden_size,
                mlp_dim=mlp_dim,
                num_layers=num_layers,
                num_heads=num_heads,
            )
            features = hidden_size
        else:
            raise ValueError(f"encoder must be 'resnet10' or 'vit', got {encoder!r}")
        self.num_features = features
        self._build_heads(features, num_classes, proj_dim, classifier_on)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W, D)`` → pooled features ``(B, num_features)``."""
        if self.encoder_name == "vit":
            tokens, _ = self.encoder(x)
            return tokens.mean(dim=1)
        return self.encoder(x)

    def forward(self, x: torch.Tensor, return_embedding: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits ``(B, num_classes)``; with ``return_embedding`` ``{"projection": (B, proj_dim), "logits"}``.

        The embedding is a ``forward`` option rather than a method so that DDP wrappers see the call.
        """
        projection, logits = self._project_and_classify(self.features(x))
        if return_embedding:
            return {"projection": projection, "logits": logits}
        return logits


class S5CLTokenNet(S5CLBase):
    """A UNETR-compatible ViT encoder (``self.vit``) with a per-token projection head and classifier (on the
    projection, or on the tokens).

    The ViT is :func:`~medssl.networks.vit.vit_encoder`'s, as in :class:`medssl.networks.unetr.UNETR`, so the
    ``vit.*`` tensors of a checkpoint load into a UNETR of the same sizes. ``forward(x)`` gives token logits
    ``(B, num_classes, N)`` (``N`` tokens in MONAI order, see :func:`~medssl.data.patches.token_majority_labels`).

    Args:
        in_channels, img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads, proj_type, dropout_rate,
            qkv_bias: as in :class:`~medssl.networks.unetr.UNETR`.
        num_classes: label classes (background included).
        proj_dim: projection size.
        classifier_on: ``"projection"`` (the classifier reads each token's projection, as in the reference code;
            the bundle's default) or ``"encoder"`` (it reads the ViT tokens; the class default, so that a checkpoint
            config written before the option existed rebuilds the network it was trained as).

    Raises:
        ValueError: ``img_size`` not divisible by ``patch_size``, or another size
            :func:`~medssl.networks.vit.vit_encoder` refuses.
        ConfigError: an unknown ``classifier_on``.
    """

    encoder_attribute = "vit"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        proj_type: str = "conv",
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        proj_dim: int = 128,
        classifier_on: str = "encoder",
    ) -> None:
        super().__init__()
        self.img_size, self.patch_size, self.feat_size = vit_token_grid(img_size, patch_size)
        self.vit = vit_encoder(
            in_channels,
            self.img_size,
            self.patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type=proj_type,
            dropout_rate=dropout_rate,
            qkv_bias=qkv_bias,
        )
        self._build_heads(hidden_size, num_classes, proj_dim, classifier_on)

    def forward(self, x: torch.Tensor, return_embedding: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """Token logits ``(B, num_classes, N)``; with ``return_embedding`` ``{"projection": (B, N, proj_dim),
        "logits"}``."""
        tokens, _ = self.vit(x)
        projection, logits = self._project_and_classify(tokens)
        logits = logits.transpose(1, 2)
        if return_embedding:
            return {"projection": projection, "logits": logits}
        return logits


def s5cl_network(mode: str, **kwargs: Any) -> nn.Module:
    """:class:`S5CLClassifier` (``mode="classification"``) or :class:`S5CLTokenNet` (``"segmentation"``).

    The bundle's ``network_def`` (``_mode_: callable``) targets this function so that one config serves both modes;
    arguments the chosen network does not take are dropped (e.g. ``encoder`` in segmentation mode).

    Raises:
        ConfigError: an unknown mode.
    """
    if mode not in MODES:
        raise ConfigError("mode", f"unknown mode {mode!r} (use one of {', '.join(MODES)})")
    cls = S5CLClassifier if mode == "classification" else S5CLTokenNet
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})
