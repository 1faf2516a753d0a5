"""S5CL in 3D: supervised, self-supervised and pseudo-label contrast in one hierarchy of SupCon losses.

Tran et al., "S5CL: Unifying Fully-Supervised, Self-Supervised, and Semi-Supervised Learning Through Hierarchical
Contrastive Learning", MICCAI 2022 (https://arxiv.org/abs/2203.07307). Each step embeds the weak and strong views
of a labeled and an unlabeled batch with one encoder and a projection head:

- ``L_l`` = SupCon on the labeled embeddings with their labels at temperature ``τ_l``;
- ``L_u`` = SupCon on the unlabeled embeddings, each sample its own class (instance contrast) at ``τ_u``; after
  ``pseudo_label_start`` steps the classifier's pseudo-labels of the weak unlabeled views are the classes instead
  (those below ``confidence_threshold`` stay instances);
- total = ``w_l * L_l + w_u * L_u + w_c * CE(classifier(weak labeled), labels)``.

Where the classifier sits (``classifier_on``): ``"projection"`` (default, the reference code's layout) reads the
projection the contrastive losses see, so cross entropy, contrast and pseudo-labels share one embedding;
``"encoder"`` reads the pooled encoder features beside the projection head (medssl's earlier layout). The
optimizer (:func:`s5cl_optimizer`) has one parameter group per module (encoder, projection head, classifier), as
the reference steps one Adamax (lr 1e-4) per module; ``docs/fidelity.md`` (section (d)) lists what follows the
reference.

``τ_u > τ_l`` is the method's hierarchy (labeled classes are pulled together harder than instances):
:func:`check_temperatures` rejects anything else.

Two modes share :class:`S5CLTrainer`:

- ``classification``: :class:`S5CLClassifier` (MONAI 3D ResNet-10 or ViT encoder, pooled) on patches, e.g. the
  organ-patch task of :mod:`medssl.data.patches`;
- ``segmentation``: :class:`S5CLTokenNet`, a UNETR-compatible MONAI ``ViT`` (stored as ``vit``) whose tokens are
  the samples: labeled tokens carry the majority label of their patch
  (:func:`medssl.data.patches.token_majority_labels`), unlabeled tokens are instances (then pseudo-labeled).
  Its checkpoint loads into :class:`medssl.networks.unetr.UNETR` with
  :func:`medssl.networks.pretrained.load_pretrained_vit` (the heads are outside ``vit.`` and skipped).

Loaders: the trainer's ``train_data_loader`` is the **unlabeled** loader (an epoch is one pass over it, so the
default ``pseudo_label_start`` is one epoch); the labeled loader is iterated cyclically inside the trainer (a new
pass, reshuffled, whenever it runs out), because the labeled set is the small one. The order of labeled pass ``p``
comes from a generator seeded with ``(labeled_seed, p)`` and step ``i`` always takes batch ``(i - 1) mod L`` of pass
``(i - 1) // L`` (``L`` labeled batches), so a run resumed from a checkpoint at any step draws exactly the labeled
batches an unbroken run would have drawn; likewise the pseudo-label switch step is a function of the step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import ensure_tuple_rep
from torch import nn

from medssl.data.patches import DEFAULT_ORGANS, token_majority_labels
from medssl.engines.utils import autocast, backward_and_step, reject_reserved, resolve_device, uses_grad_scaler
from medssl.errors import ConfigError, DataError
from medssl.losses.supcon import SupConLoss

__all__ = [
    "MODES",
    "CLASSIFIER_INPUTS",
    "OPTIMIZER_LEARNING_RATES",
    "check_temperatures",
    "ProjectionHead",
    "S5CLClassifier",
    "S5CLTokenNet",
    "s5cl_network",
    "s5cl_optimizer",
    "TokenLabelBatch",
    "s5cl_data",
    "S5CLTrainer",
]

logger = logging.getLogger(__name__)

MODES = ("classification", "segmentation")
# what the classifier reads: the projection (the reference code's layout) or the encoder features
CLASSIFIER_INPUTS = ("projection", "encoder")
# the recipe learning rate of each optimizer: Adamax as the reference notebook, AdamW as medssl before
OPTIMIZER_LEARNING_RATES = {"adamax": 1.0e-4, "adamw": 1.0e-3}


def _plain(x: Any, device: torch.device | str | None = None, non_blocking: bool = False) -> torch.Tensor:
    """A plain tensor: MetaTensors carry batched metadata that breaks indexing and token reshapes."""
    from monai.data import MetaTensor

    x = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
    return x.to(device=device, non_blocking=non_blocking) if device is not None else x


def check_temperatures(temperature_labeled: float, temperature_unlabeled: float) -> None:
    """S5CL needs ``τ_u > τ_l > 0``.

    Raises:
        ConfigError: naming the offending id and both values.
    """
    tl, tu = float(temperature_labeled), float(temperature_unlabeled)
    if not tl > 0:
        raise ConfigError("temperature_labeled", f"must be > 0, got temperature_labeled={tl}")
    if not tu > tl:
        raise ConfigError(
            "temperature_unlabeled",
            f"must be larger than temperature_labeled (S5CL's hierarchy), got temperature_unlabeled={tu} "
            f"<= temperature_labeled={tl}",
        )


class ProjectionHead(nn.Sequential):
    """``Linear → ReLU → Linear``, applied to the last dimension (the SimCLR / SupCon projection head)."""

    def __init__(self, in_features: int, out_features: int = 128, hidden_features: int | None = None) -> None:
        hidden = int(hidden_features or in_features)
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))


class _ClassifierAndProjection(nn.Module):
    """The classifier and projection head both S5CL networks put on their encoder features."""

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


class S5CLClassifier(_ClassifierAndProjection):
    """A 3D encoder with a projection head on its pooled features and a classifier on the projection (or on the
    features).

    ``forward(x)`` gives the class logits ``(B, num_classes)`` (so MONAI evaluators use it as is);
    ``forward(x, return_embedding=True)`` also gives the projections ``(B, proj_dim)`` the contrastive losses see.

    Args:
        num_classes: classes.
        img_size: input size (int or 3 ints); needed by the ViT encoder.
        in_channels: input channels.
        encoder: ``"resnet10"`` (MONAI ``resnet10``, global average pooled) or ``"vit"`` (MONAI ``ViT``, mean of
            the tokens).
        widen_factor: ResNet width multiplier (1.0 = 512 features).
        conv1_size, conv1_stride: the ResNet stem convolution (MONAI's defaults 7 and 1; 3 and 2 are 3-4x
            cheaper on small patches).
        patch_size, hidden_size, mlp_dim, num_layers, num_heads: ViT sizes.
        proj_dim: projection size.
        classifier_on: ``"projection"`` (the classifier reads the projections, as in the reference code; the
            bundle's default) or ``"encoder"`` (it reads the pooled features; the class default, so that a
            checkpoint config written before the option existed rebuilds the network it was trained as).

    Raises:
        ValueError: fewer than 2 classes or an unknown encoder.
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
            from monai.networks.nets import ViT

            self.encoder = ViT(
                in_channels=in_channels,
                img_size=ensure_tuple_rep(img_size, 3),
                patch_size=ensure_tuple_rep(patch_size, 3),
                hidden_size=hidden_size,
                mlp_dim=mlp_dim,
                num_layers=num_layers,
                num_heads=num_heads,
                classification=False,
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


class S5CLTokenNet(_ClassifierAndProjection):
    """A UNETR-compatible ViT encoder (``self.vit``) with a per-token projection head and classifier (on the
    projection, or on the tokens).

    The ViT is built exactly as :class:`medssl.networks.unetr.UNETR` builds it, so the ``vit.*`` tensors of a
    checkpoint load into a UNETR of the same sizes. ``forward(x)`` gives token logits ``(B, num_classes, N)``
    (``N`` tokens in MONAI order, see :func:`~medssl.data.patches.token_majority_labels`).

    Args:
        in_channels, img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads, proj_type, dropout_rate,
            qkv_bias: as in :class:`~medssl.networks.unetr.UNETR`.
        num_classes: label classes (background included).
        proj_dim: projection size.
        classifier_on: ``"projection"`` (the classifier reads each token's projection, as in the reference code;
            the bundle's default) or ``"encoder"`` (it reads the ViT tokens; the class default, so that a checkpoint
            config written before the option existed rebuilds the network it was trained as).

    Raises:
        ValueError: ``img_size`` not divisible by ``patch_size``.
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
        from monai.networks.nets import ViT

        self.img_size = tuple(int(s) for s in ensure_tuple_rep(img_size, 3))
        self.patch_size = tuple(int(p) for p in ensure_tuple_rep(patch_size, 3))
        bad = [s for s, p in zip(self.img_size, self.patch_size) if s % p]
        if bad:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")
        self.feat_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_classes = int(num_classes)
        self.vit = ViT(
            in_channels=in_channels,
            img_size=self.img_size,
            patch_size=self.patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type=proj_type,
            classification=False,
            dropout_rate=dropout_rate,
            spatial_dims=3,
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
    import inspect

    if mode not in MODES:
        raise ConfigError("mode", f"unknown mode {mode!r} (use one of {', '.join(MODES)})")
    cls = S5CLClassifier if mode == "classification" else S5CLTokenNet
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def s5cl_optimizer(
    network: nn.Module, optimizer: str = "adamax", lr: float | None = None, weight_decay: float = 1.0e-4
) -> torch.optim.Optimizer:
    """One optimizer over an S5CL network with a parameter group per module: encoder, projection, classifier.

    The reference code steps three ``Adamax(lr=1e-4, weight_decay=1e-4)`` optimizers, one per module. Adamax updates
    each parameter from its own state, so one Adamax whose three groups carry those settings takes the same steps,
    and the trainer, the checkpoint and resume keep handling a single optimizer. Each group's ``"name"`` says which
    module it holds, so a group's learning rate can be changed on its own.

    Args:
        network: :class:`S5CLClassifier` or :class:`S5CLTokenNet` (or a DDP wrapper of one).
        optimizer: ``"adamax"`` (the reference's) or ``"adamw"`` (fused; medssl's earlier choice).
        lr: every group's learning rate; ``None``: the optimizer's recipe rate in :data:`OPTIMIZER_LEARNING_RATES`
            (Adamax 1e-4, AdamW 1e-3).
        weight_decay: every group's weight decay (Adamax: added to the gradient, as in the reference; AdamW:
            decoupled).

    Raises:
        ConfigError: an unknown optimizer, or a network whose parameters the three modules do not cover exactly.
    """
    if optimizer not in OPTIMIZER_LEARNING_RATES:
        raise ConfigError(
            "optimizer", f"unknown optimizer {optimizer!r} (use one of {', '.join(OPTIMIZER_LEARNING_RATES)})"
        )
    net = getattr(network, "module", network)
    if not isinstance(net, _ClassifierAndProjection):
        raise ConfigError("network", f"s5cl_optimizer needs an S5CL network, got {type(net).__name__}")
    lr = OPTIMIZER_LEARNING_RATES[optimizer] if lr is None else float(lr)
    groups = [{"name": name, "params": list(module.parameters())} for name, module in net.module_groups().items()]
    grouped = [id(p) for g in groups for p in g["params"]]
    seen = set(grouped)
    left_out = [name for name, p in net.named_parameters() if id(p) not in seen]
    if left_out:
        raise ConfigError("network", f"parameters outside the encoder / projection / classifier groups: {left_out}")
    if len(grouped) != len(set(grouped)):
        raise ConfigError("network", "the encoder / projection / classifier groups share parameters")
    if optimizer == "adamax":
        return torch.optim.Adamax(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)


class TokenLabelBatch:
    """``prepare_batch`` for evaluators of :class:`S5CLTokenNet`: the image and its token majority labels.

    Args:
        patch_size: the ViT patch size.
        num_classes: label classes.
        image_key, label_key: batch keys.
    """

    def __init__(
        self, patch_size: Sequence[int] | int, num_classes: int, image_key: str = "image", label_key: str = "label"
    ) -> None:
        self.patch_size = patch_size
        self.num_classes = int(num_classes)
        self.image_key = image_key
        self.label_key = label_key

    def __call__(self, batchdata: Mapping[str, torch.Tensor], device=None, non_blocking=False, **kw):
        image = _plain(batchdata[self.image_key], device, non_blocking)
        label = _plain(batchdata[self.label_key], device, non_blocking)
        return image, token_majority_labels(label, self.patch_size, self.num_classes)


def _records(datalist, dataset_dir, keys: Sequence[str], need_label: bool) -> list[dict[str, Any]]:
    from medssl.data.datalist import load_datalist

    dl = load_datalist(datalist, dataset_dir=dataset_dir, keys=list(keys))
    records = []
    for key in keys:
        for item in dl.items(key):
            if need_label and "label" not in item:
                raise DataError(dl.path, f"{key!r} item {item.get('image')} has no label")
            records.append({k: str(item[k]) for k in (("image", "label") if need_label else ("image",))})
    if not records:
        raise DataError(dl.path, f"no items under {list(keys)}")
    return records


def s5cl_data(
    mode: str,
    datalist: str,
    dataset_dir: str | None = None,
    *,
    roi_size: Sequence[int] | int = 96,
    num_samples: int = 1,
    organs: Sequence[int] = DEFAULT_ORGANS,
    labeled_per_class: int = 2,
    samples_per_organ: int = 4,
    jitter: int = 4,
    spacing: Sequence[float] | None = (1.5, 1.5, 2.0),
    orientation: str | None = "RAS",
    a_min: float = -175.0,
    a_max: float = 250.0,
    seed: int = 0,
    labeled_keys: Sequence[str] = ("training",),
    unlabeled_keys: Sequence[str] = ("unlabeled",),
    val_keys: Sequence[str] = ("validation",),
    weak_kwargs: Mapping[str, Any] | None = None,
    strong_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Records and transforms of both S5CL modes, for the bundle (one call instead of two config branches).

    - ``classification``: :func:`medssl.data.patches.organ_patch_task` on the ``labeled_keys[0]`` /
      ``val_keys[0]`` cases of a labeled CT datalist with cubes of edge ``roi_size`` (the unlabeled pool is the
      unlabeled patches of the labeled cases, whose hidden labels give the pseudo-label accuracy);
      independent weak / strong views of each patch.
    - ``segmentation``: labeled volumes (``labeled_keys``, with labels; ``num_samples`` crops of ``roi_size`` per
      volume, half centred on foreground) and unlabeled volumes (``unlabeled_keys``; random crops), CT
      preprocessing, weak / strong views with shared geometry (token ``t`` is the same tissue in both); validation:
      the centre crop of each ``val_keys`` volume.

    Returns:
        ``{"labeled", "unlabeled", "validation"}`` record lists, ``{"labeled_transform", "unlabeled_transform",
        "validation_transform"}`` MONAI ``Compose`` chains, ``"num_classes"`` and ``"class_names"``
        (index → name).

    Raises:
        ConfigError: unknown mode, non-cubic ``roi_size`` in classification mode.
        DataError: missing datalist keys, files, labels or label names (see
            :func:`medssl.data.datalist.load_datalist`).
    """
    from monai.transforms import (
        CenterSpatialCropd,
        Compose,
        EnsureTyped,
        RandCropByPosNegLabeld,
        RandSpatialCropSamplesd,
        SpatialPadd,
    )

    from medssl.transforms.presets import ct_preprocessing
    from medssl.transforms.s5cl_views import s5cl_weak_strong_views

    if mode not in MODES:
        raise ConfigError("mode", f"unknown mode {mode!r} (use one of {', '.join(MODES)})")
    roi = tuple(int(r) for r in ensure_tuple_rep(roi_size, 3))
    views = {"weak_kwargs": dict(weak_kwargs or {}), "strong_kwargs": dict(strong_kwargs or {})}
    if mode == "classification":
        from medssl.data.patches import organ_patch_task

        if len(set(roi)) != 1:
            raise ConfigError("roi_size", f"classification patches are cubes, got roi_size={list(roi)}")
        task = organ_patch_task(
            datalist,
            dataset_dir,
            organs=organs,
            patch_size=roi[0],
            labeled_per_class=labeled_per_class,
            samples_per_organ=samples_per_organ,
            jitter=jitter,
            a_min=a_min,
            a_max=a_max,
            seed=seed,
            train_key=labeled_keys[0],
            test_key=val_keys[0],
        )
        to_tensor = EnsureTyped(keys="image", track_meta=False)
        train = Compose([to_tensor, *s5cl_weak_strong_views("image", spatial_size=roi, **views)])
        return {
            "labeled": task.labeled,
            "unlabeled": task.unlabeled,
            "validation": task.test,
            "labeled_transform": train,
            "unlabeled_transform": train,
            "validation_transform": Compose([to_tensor]),
            "num_classes": task.num_classes,
            "class_names": task.class_names,
        }

    from medssl.data.datalist import load_datalist

    names = load_datalist(datalist, dataset_dir=dataset_dir, check_files=False).labels
    if not names:
        raise DataError(datalist, "segmentation mode needs the datalist's 'labels' (index -> name)")
    window = {"spacing": spacing, "orientation": orientation, "a_min": a_min, "a_max": a_max}
    both = ["image", "label"]
    labeled = Compose(
        [
            *ct_preprocessing(both, **window),
            SpatialPadd(keys=both, spatial_size=roi),
            RandCropByPosNegLabeld(
                keys=both, label_key="label", spatial_size=roi, pos=1, neg=1, num_samples=num_samples
            ),
            *s5cl_weak_strong_views("image", label_key="label", shared_geometry=True, **views),
        ]
    )
    unlabeled = Compose(
        [
            *ct_preprocessing(["image"], **window),
            SpatialPadd(keys="image", spatial_size=roi),
            RandSpatialCropSamplesd(keys="image", roi_size=roi, num_samples=num_samples, random_size=False),
            *s5cl_weak_strong_views("image", shared_geometry=True, **views),
        ]
    )
    validation = Compose(
        [
            *ct_preprocessing(both, **window),
            SpatialPadd(keys=both, spatial_size=roi),
            CenterSpatialCropd(keys=both, roi_size=roi),
        ]
    )
    return {
        "labeled": _records(datalist, dataset_dir, labeled_keys, need_label=True),
        "unlabeled": _records(datalist, dataset_dir, unlabeled_keys, need_label=False),
        "validation": _records(datalist, dataset_dir, val_keys, need_label=True),
        "labeled_transform": labeled,
        "unlabeled_transform": unlabeled,
        "validation_transform": validation,
        "num_classes": max(names) + 1,
        "class_names": dict(names),
    }


class S5CLTrainer(SupervisedTrainer):
    """S5CL training on MONAI's ``SupervisedTrainer``: only the iteration differs.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        max_epochs: epochs (passes over the unlabeled loader).
        train_data_loader: the **unlabeled** loader: dicts with ``weak_key`` and ``strong_key`` ``(B, C, H, W, D)``
            and optionally ``true_label_key`` (labels unknown to training; only for ``pseudo_label_accuracy``).
        labeled_data_loader: dicts with ``weak_key``, ``strong_key`` and ``label_key`` (classification: ``(B,)``
            class indices; segmentation: ``(B, 1, H, W, D)`` label maps aligned with both views). Iterated
            cyclically.
        network: :class:`S5CLClassifier` or :class:`S5CLTokenNet` (``forward(x, return_embedding=True)`` gives
            ``{"projection", "logits"}``).
        optimizer: the optimizer.
        mode: ``"classification"`` or ``"segmentation"``.
        num_classes: classes (segmentation: for the token majority labels).
        temperature_labeled, temperature_unlabeled: ``τ_l``, ``τ_u`` (``τ_u > τ_l``).
        weight_labeled, weight_unlabeled, weight_ce: ``w_l``, ``w_u``, ``w_c``.
        pseudo_label_start: pseudo-labels from step ``pseudo_label_start + 1`` on; ``None``: one epoch (the
            unlabeled loader's length, or ``epoch_length`` when given).
        confidence_threshold: pseudo-labels with a lower softmax probability stay instances (0: keep all).
        tokens_per_volume: segmentation: contrast a random subset of this many token positions per step (the same
            positions in both views), to bound the ``(2 * B * N)²`` similarity matrix; ``None``: every token.
        gather_distributed: SupCon negatives from every DDP rank.
        precision: ``"auto"``, ``"bf16"``, ``"amp"`` or ``"fp32"`` (see :func:`medssl.engines.utils.autocast`).
        weak_key, strong_key, label_key, true_label_key: batch keys.
        labeled_seed: seeds the order of every labeled pass (with the pass index); ``None``: ``torch.initial_seed()``
            at construction, i.e. the bundle's ``seed`` after ``seed_everything``. A ``RandomSampler`` (``shuffle``)
            and the loader's worker seeds draw from it, a sampler with ``set_epoch`` (``DistributedSampler``) gets
            the pass index, so the labeled stream never touches torch's global RNG and is reproducible from the
            step alone (exact resume).
        kwargs: other ``SupervisedTrainer`` arguments (``epoch_length``, ``train_handlers``, ...).

    ``engine.state.output`` holds the scalars ``loss``, ``loss_labeled``, ``loss_unlabeled``, ``loss_ce``,
    ``pseudo_labels`` (0 before the switch, 1 after), ``pseudo_label_confident`` (fraction above the threshold),
    ``pseudo_label_accuracy`` (of the confident pseudo-labels, when ``true_label_key`` is in the batch) and ``lr``;
    ``engine.state.pseudo_label_switch_step`` is the first step that used pseudo-labels (``None`` before; also
    right after a resume past the switch).

    Resume: with ``engine.state.iteration`` restored (e.g. by :class:`medssl.handlers.CheckpointHandler`),
    the next step repositions the labeled stream by skipping indices (no loading, no RNG draw; with loader workers
    the skipped batches are loaded and dropped, which keeps the workers' transform streams aligned). Not exact: a
    labeled loader without ``len()`` (restarts a pass), and an ``epoch_length`` shorter than the unlabeled loader
    (ignite restarts the unlabeled pass on resume where an unbroken run continues it).

    Raises:
        ConfigError: ``τ_u <= τ_l``, an unknown mode, or a negative ``pseudo_label_start``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        labeled_data_loader: Any,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        mode: str = "classification",
        num_classes: int | None = None,
        temperature_labeled: float = 0.2,
        temperature_unlabeled: float = 0.7,
        weight_labeled: float = 1.0,
        weight_unlabeled: float = 1.0,
        weight_ce: float = 1.0,
        pseudo_label_start: int | None = None,
        confidence_threshold: float = 0.0,
        tokens_per_volume: int | None = None,
        gather_distributed: bool = False,
        precision: str = "fp32",
        weak_key: str = "image_weak",
        strong_key: str = "image_strong",
        label_key: str = "label",
        true_label_key: str = "true_label",
        labeled_seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise ConfigError("mode", f"unknown mode {mode!r} (use one of {', '.join(MODES)})")
        check_temperatures(temperature_labeled, temperature_unlabeled)
        if pseudo_label_start is not None and int(pseudo_label_start) < 0:
            raise ConfigError("pseudo_label_start", f"must be >= 0 or null, got {pseudo_label_start}")
        if not 0.0 <= float(confidence_threshold) < 1.0:
            raise ConfigError("confidence_threshold", f"must be in [0, 1), got {confidence_threshold}")
        if mode == "segmentation" and num_classes is None:
            raise ConfigError("num_classes", "segmentation mode needs num_classes for the token labels")
        reject_reserved("S5CLTrainer", kwargs, ("amp", "decollate", "loss_function"))
        device = resolve_device(device)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=nn.CrossEntropyLoss(),
            amp=uses_grad_scaler(device, precision),
            decollate=False,
            **kwargs,
        )
        autocast(device, precision)  # validates precision early
        self.precision = precision
        self.mode = mode
        self.num_classes = num_classes
        self.labeled_data_loader = labeled_data_loader
        self.labeled_seed = int(torch.initial_seed() if labeled_seed is None else labeled_seed)
        self._labeled_iter: Iterator | None = None
        self._labeled_next = 0  # index of the labeled draw self._labeled_iter yields next
        self.labeled_loss = SupConLoss(temperature_labeled, gather_distributed=gather_distributed)
        self.unlabeled_loss = SupConLoss(temperature_unlabeled, gather_distributed=gather_distributed)
        self.weights = (float(weight_labeled), float(weight_unlabeled), float(weight_ce))
        self.pseudo_label_start = None if pseudo_label_start is None else int(pseudo_label_start)
        self.confidence_threshold = float(confidence_threshold)
        self.tokens_per_volume = None if tokens_per_volume is None else int(tokens_per_volume)
        self.keys = (weak_key, strong_key, label_key, true_label_key)
        self.state.pseudo_label_switch_step = None
        from ignite.engine import Events

        # after the train handlers' STARTED (a CheckpointHandler's restore sets the iteration)
        self.add_event_handler(Events.STARTED, S5CLTrainer._sync_switch_step)

    # ------------------------------------------------------------------------------------------------ data

    def _labeled_pass(self, index: int) -> Iterator:
        """A fresh iterator over the labeled loader for its ``index``-th pass (0-based), ordered by
        ``(labeled_seed, index)`` only."""
        from torch.utils.data import DataLoader, RandomSampler

        loader = self.labeled_data_loader
        seed = int(np.random.SeedSequence([self.labeled_seed, index]).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(seed)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(index)
        elif isinstance(sampler, RandomSampler):
            sampler.generator = generator
        if isinstance(loader, DataLoader):
            loader.generator = generator  # the workers' base seed, drawn when the iterator is created
        return iter(loader)

    def _seek_labeled(self, draw: int) -> None:
        """Position the labeled stream so that the next batch is the ``draw``-th (0-based) of the whole run."""
        try:
            length = len(self.labeled_data_loader)
        except TypeError:
            length = None
        if not length:
            if draw:
                logger.warning(f"S5CL: the labeled loader has no length; step {draw + 1} starts a new labeled pass")
            self._labeled_iter, self._labeled_next = iter(self.labeled_data_loader), draw
            return
        it = self._labeled_pass(draw // length)
        skip = draw % length
        if skip and getattr(self.labeled_data_loader, "num_workers", 1) == 0 and hasattr(it, "_next_index"):
            for _ in range(skip):  # indices only: nothing is loaded, no transform draws a random number
                it._next_index()
        else:  # workers (or any iterable): load and drop, so the workers' random streams move as unbroken
            for _ in range(skip):
                next(it)
        self._labeled_iter, self._labeled_next = it, draw

    def _next_labeled(self, draw: int | None = None) -> Mapping[str, Any]:
        """The ``draw``-th labeled batch of the run (default: the one after the last); a pass that runs out is
        followed by the next, reshuffled."""
        draw = self._labeled_next if draw is None else int(draw)
        if self._labeled_iter is None or draw != self._labeled_next:
            self._seek_labeled(draw)
        try:
            batch = next(self._labeled_iter)
        except StopIteration:
            self._seek_labeled(draw)
            batch = next(self._labeled_iter)
        self._labeled_next = draw + 1
        return batch

    def switch_step(self) -> int:
        """The first step that uses pseudo-labels (1-based iteration)."""
        start = self.pseudo_label_start
        if start is None:
            start = self.state.epoch_length or len(self.data_loader)
        return int(start) + 1

    def _sync_switch_step(self) -> None:
        """``state.pseudo_label_switch_step`` from the step: every step runs once, so the first one that used
        pseudo-labels is :meth:`switch_step` once the run got there (also after a resume)."""
        step = self.switch_step()
        self.state.pseudo_label_switch_step = step if self.state.iteration >= step else None

    def _token_subset(self, n_tokens: int, device: torch.device) -> torch.Tensor | None:
        k = self.tokens_per_volume
        if k is None or k >= n_tokens:
            return None
        return torch.randperm(n_tokens, device=device)[:k]

    # ------------------------------------------------------------------------------------------- iteration

    def _iteration(self, engine: S5CLTrainer, batchdata: Mapping[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        dev, nb = engine.state.device, engine.non_blocking
        weak_key, strong_key, label_key, true_key = engine.keys
        # one labeled batch per step: the draw index follows from the step (see the module docstring)
        labeled = engine._next_labeled(engine.state.iteration - 1)
        lw, ls = (_plain(labeled[k], dev, nb) for k in (weak_key, strong_key))
        uw, us = (_plain(batchdata[k], dev, nb) for k in (weak_key, strong_key))
        labels = _plain(labeled[label_key], dev, nb)
        true_unlabeled = batchdata.get(true_key, batchdata.get(label_key) if engine.mode == "segmentation" else None)
        nl, nu = lw.shape[0], uw.shape[0]
        use_pseudo = engine.state.iteration >= engine.switch_step()
        if use_pseudo and engine.state.pseudo_label_switch_step is None:
            engine._sync_switch_step()
            if engine.state.iteration == engine.state.pseudo_label_switch_step:
                logger.info(f"S5CL: pseudo-labels replace instance contrast from step {engine.state.iteration}")
        engine.state.output = {weak_key: uw, strong_key: us}

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with autocast(dev, engine.precision):
            out = engine.network(torch.cat([lw, ls, uw, us], dim=0), return_embedding=True)
            proj, logits = out["projection"].float(), out["logits"].float()
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        p_lw, p_ls, p_uw, p_us = proj.split([nl, nl, nu, nu], dim=0)
        logits_lw, logits_uw = logits[:nl], logits[2 * nl : 2 * nl + nu]

        if engine.mode == "segmentation":
            labels = token_majority_labels(labels, engine.network_patch_size(), engine.num_classes)  # (B, N)
            subset = engine._token_subset(p_lw.shape[1], dev)
            loss_ce = F.cross_entropy(logits_lw, labels)

            def tokens(x: torch.Tensor) -> torch.Tensor:  # (B, N, ...) -> (B * K, ...)
                x = x if subset is None else x[:, subset]
                return x.reshape(-1, *x.shape[2:])

            feats_l = torch.stack([tokens(p_lw), tokens(p_ls)], dim=1)
            feats_u = torch.stack([tokens(p_uw), tokens(p_us)], dim=1)
            l_labels = tokens(labels)
            u_logits = tokens(logits_uw.transpose(1, 2))  # (B * K, C)
            if true_unlabeled is not None:
                true_unlabeled = token_majority_labels(
                    _plain(true_unlabeled, dev), engine.network_patch_size(), engine.num_classes
                )
                true_unlabeled = tokens(true_unlabeled)
        else:
            labels = labels.long().reshape(-1)
            loss_ce = F.cross_entropy(logits_lw, labels)
            feats_l = torch.stack([p_lw, p_ls], dim=1)
            feats_u = torch.stack([p_uw, p_us], dim=1)
            l_labels, u_logits = labels, logits_uw
            if true_unlabeled is not None:
                true_unlabeled = _plain(true_unlabeled, dev).long().reshape(-1)

        with torch.no_grad():
            prob, pseudo = torch.softmax(u_logits.detach(), dim=1).max(dim=1)
            confident = prob >= engine.confidence_threshold
        loss_l = engine.labeled_loss(feats_l, l_labels)
        if use_pseudo:
            loss_u = engine.unlabeled_loss(feats_u, pseudo, mask=confident)
        else:
            loss_u = engine.unlabeled_loss(feats_u)
        w_l, w_u, w_c = engine.weights
        loss = w_l * loss_l + w_u * loss_u + w_c * loss_ce
        engine.state.output["loss"] = loss
        # the parts too, so handlers of LOSS_COMPLETED (the NaN guard) can name them
        engine.state.output.update(
            {"loss_labeled": loss_l.detach(), "loss_unlabeled": loss_u.detach(), "loss_ce": loss_ce.detach()}
        )
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        backward_and_step(engine, loss)

        result = engine.state.output
        result.update(
            {
                "loss": loss.detach(),
                "loss_labeled": loss_l.detach(),
                "loss_unlabeled": loss_u.detach(),
                "loss_ce": loss_ce.detach(),
                "pseudo_labels": float(use_pseudo),
                "pseudo_label_confident": float(confident.float().mean()),
                "lr": float(engine.optimizer.param_groups[0]["lr"]),
            }
        )
        if true_unlabeled is not None and bool(confident.any()):
            hit = pseudo[confident] == true_unlabeled[confident]
            result["pseudo_label_accuracy"] = float(hit.float().mean())
        return result

    def network_patch_size(self) -> tuple[int, ...]:
        """The ViT patch size of the (possibly DDP-wrapped) token network."""
        net = getattr(self.network, "module", self.network)
        return tuple(net.patch_size)
