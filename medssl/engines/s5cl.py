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

Two modes share :class:`S5CLTrainer` (the networks are :mod:`medssl.networks.s5cl`'s):

- ``classification``: :class:`~medssl.networks.s5cl.S5CLClassifier` (MONAI 3D ResNet-10 or ViT encoder, pooled) on
  patches, e.g. the organ-patch task of :mod:`medssl.data.patches`;
- ``segmentation``: :class:`~medssl.networks.s5cl.S5CLTokenNet`, UNETR's ViT encoder (stored as ``vit``) whose
  tokens are the samples: labeled tokens carry the majority label of their patch
  (:func:`medssl.data.patches.token_majority_labels`), unlabeled tokens are instances (then pseudo-labeled).
  Its checkpoint loads into :class:`medssl.networks.unetr.UNETR` with
  :func:`medssl.networks.pretrained.load_pretrained_vit` (the heads are outside ``vit.`` and skipped).

:func:`s5cl_optimizer` stays here, beside the trainer, rather than with the networks: which optimizer, which
learning rate and how the groups step are the training recipe; the networks only name their modules
(:meth:`~medssl.networks.s5cl.S5CLBase.module_groups`).

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
from medssl.data.records import image_records, labeled_records
from medssl.engines.utils import backward_and_step, reject_reserved
from medssl.errors import ConfigError, DataError
from medssl.handlers.budget import attach_budget, initial_max_epochs
from medssl.losses.supcon import SupConLoss
from medssl.networks.s5cl import MODES, S5CLBase
from medssl.precision import autocast, resolve_device, uses_grad_scaler

__all__ = [
    "OPTIMIZER_LEARNING_RATES",
    "check_temperatures",
    "s5cl_optimizer",
    "TokenLabelBatch",
    "s5cl_data",
    "S5CLTrainer",
]

logger = logging.getLogger(__name__)

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


def s5cl_optimizer(
    network: nn.Module, optimizer: str = "adamax", lr: float | None = None, weight_decay: float = 1.0e-4
) -> torch.optim.Optimizer:
    """One optimizer over an S5CL network with a parameter group per module: encoder, projection, classifier.

    The reference code steps three ``Adamax(lr=1e-4, weight_decay=1e-4)`` optimizers, one per module. Adamax updates
    each parameter from its own state, so one Adamax whose three groups carry those settings takes the same steps,
    and the trainer, the checkpoint and resume keep handling a single optimizer. Each group's ``"name"`` says which
    module it holds, so a group's learning rate can be changed on its own.

    Args:
        network: :class:`~medssl.networks.s5cl.S5CLClassifier` or :class:`~medssl.networks.s5cl.S5CLTokenNet` (or a
            DDP wrapper of one).
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
    if not isinstance(net, S5CLBase):
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
    """``prepare_batch`` for evaluators of :class:`~medssl.networks.s5cl.S5CLTokenNet`: the image and its token
    majority labels.

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
        "labeled": labeled_records(datalist, labeled_keys, dataset_dir),
        "unlabeled": image_records(datalist, unlabeled_keys, dataset_dir),
        "validation": labeled_records(datalist, val_keys, dataset_dir),
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
        max_epochs: epochs (passes over the unlabeled loader, or ``epoch_length`` steps); ``None``: no epoch limit.
        train_data_loader: the **unlabeled** loader: dicts with ``weak_key`` and ``strong_key`` ``(B, C, H, W, D)``
            and optionally ``true_label_key`` (labels unknown to training; only for ``pseudo_label_accuracy``).
        labeled_data_loader: dicts with ``weak_key``, ``strong_key`` and ``label_key`` (classification: ``(B,)``
            class indices; segmentation: ``(B, 1, H, W, D)`` label maps aligned with both views). Iterated
            cyclically.
        network: :class:`~medssl.networks.s5cl.S5CLClassifier` or :class:`~medssl.networks.s5cl.S5CLTokenNet`
            (``forward(x, return_embedding=True)`` gives
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
        precision: ``"auto"``, ``"bf16"``, ``"amp"`` or ``"fp32"`` (see :func:`medssl.precision.autocast`).
        weak_key, strong_key, label_key, true_label_key: batch keys.
        max_iterations: optimizer steps (``None``: no iteration limit); with ``max_epochs``, whichever comes first
            (:class:`medssl.handlers.budget.IterationBudget`).
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
        max_epochs: int | None,
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
        max_iterations: int | None = None,
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
        epochs = initial_max_epochs(max_iterations, max_epochs, train_data_loader, kwargs.get("epoch_length"))
        super().__init__(
            device=device,
            max_epochs=epochs,
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
        attach_budget(self, max_iterations, max_epochs)

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
