"""Mean Teacher trainer: a MONAI ``SupervisedTrainer`` whose iteration adds an EMA teacher's consistency target.

One iteration on a batch of ``labeled_batch_size`` labeled cases followed by unlabeled ones (the order
:class:`~medssl.data.samplers.TwoStreamBatchSampler` produces):

1. the student segments the whole batch;
2. supervised loss (default ``0.5 * (CE + Dice)``) on the labeled part;
3. the teacher (no gradient, eval mode) segments the unlabeled part (or the whole batch) with input noise
   ``clamp(N(0, 0.1), ±0.2)``;
4. consistency (softmax-MSE or KL) between student and teacher on that part, optionally restricted by UA-MT's
   uncertainty mask;
5. ``loss = supervised + weight(step) * consistency``; backward; optimizer step;
6. the EMA update of the teacher (:class:`~medssl.engines.ema.EMATeacherHandler`), attached to
   ``IterationEvents.MODEL_COMPLETED`` so it runs inside the iteration, before any ``ITERATION_COMPLETED``
   handler (a checkpoint saved there already holds this iteration's teacher).

``step`` is ``engine.state.iteration - 1`` (from 0), as the published code's ``iter_num`` for the weight ramp,
the EMA coefficient and the UA-MT threshold.

References: Tarvainen & Valpola, NeurIPS 2017 (https://arxiv.org/abs/1703.01780); Yu et al., UA-MT,
MICCAI 2019 (https://arxiv.org/abs/1907.07034).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from medssl.data.samplers import TwoStreamBatchSampler
from medssl.engines.ema import EMATeacherHandler, make_teacher, teacher_noise
from medssl.engines.utils import backward_and_step
from medssl.errors import ConfigError, DataError
from medssl.handlers.budget import attach_budget, initial_max_epochs
from medssl.losses.consistency import (
    CONSISTENCY_LOSSES,
    ConsistencyWeight,
    dropout_on,
    masked_mean,
    uamt_threshold,
    uncertainty_mask,
)
from medssl.networks.outputs import first_output
from medssl.precision import autocast, cuda_amp, cuda_amp_kwargs, uses_grad_scaler

if TYPE_CHECKING:
    from ignite.engine import Events
else:
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = [
    "TEACHER_INPUTS",
    "batchnorm_batch_statistics",
    "mean_teacher_losses",
    "MeanTeacherTrainer",
    "make_teacher_student_evaluators",
]

TEACHER_INPUTS = ("unlabeled", "all")


def _default_supervised_loss() -> nn.Module:
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.5, lambda_dice=0.5)


def _forward(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return first_output(network(x))


@contextlib.contextmanager
def batchnorm_batch_statistics(network: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers normalise with the statistics of the batch they see.

    Running statistics stay untouched (momentum 0), everything else keeps its mode. The Mean Teacher and UA-MT
    code run their teacher this way (train-mode BatchNorm). Early in training the EMA of the student's running
    statistics does not match the averaged weights, and an eval-mode teacher then segments nothing (measured
    on the LA phantom: teacher Dice 0.07 with running statistics vs 0.67 with re-estimated ones at iteration 300).
    """
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [
        (m.training, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
        for m in norms
    ]
    for m in norms:
        m.train()
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (training, momentum, tracked) in zip(norms, saved):
            m.train(training)
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def mean_teacher_losses(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    step: int,
    labeled_batch_size: int,
    supervised_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    consistency: str | Callable[..., torch.Tensor] = "mse",
    consistency_weight: Callable[[int], float] | None = None,
    teacher_input: str = "unlabeled",
    noise: Callable[[torch.Tensor], torch.Tensor] | None = teacher_noise,
    uncertainty_max_steps: int | None = None,
    uncertainty_passes: int = 8,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _forward,
) -> dict[str, Any]:
    """Forward passes and losses of one Mean Teacher iteration (no backward, no optimizer step).

    Args:
        student: trained network, ``(B, C_in, *spatial) -> (B, C, *spatial)`` logits.
        teacher: EMA network of the same architecture; run under ``no_grad`` in eval mode, its BatchNorm layers on
            the statistics of the teacher's input batch as in the published code (running statistics untouched,
            see :func:`batchnorm_batch_statistics`).
        images: ``(B, C_in, *spatial)``, the first ``labeled_batch_size`` cases labeled.
        labels: ``(B, 1, *spatial)``; only the labeled part is read.
        step: iteration counted from 0 (drives the weight ramp and the UA-MT threshold).
        labeled_batch_size: number of labeled cases at the front of the batch.
        supervised_loss: ``loss(logits, labels)`` on the labeled part, e.g. ``DiceCELoss``.
        consistency: ``"mse"`` (softmax-MSE, default), ``"kl"``, or a callable
            ``(student_logits, teacher_logits, reduction=...)`` like :func:`~medssl.losses.consistency.softmax_mse_loss`.
        consistency_weight: ``weight(step)``; default :class:`~medssl.losses.consistency.ConsistencyWeight` ``()``.
        teacher_input: ``"unlabeled"`` (the published recipe) or ``"all"``: the cases the consistency covers.
        noise: teacher input perturbation (``None`` for none).
        uncertainty_max_steps: enables the UA-MT mask, its threshold ramping over this many steps.
        uncertainty_passes: UA-MT's ``T``.
        forward: ``forward(network, x) -> logits``; the default takes the first output of tuple-returning networks.

    Returns:
        ``pred`` (student logits, whole batch), ``loss`` (differentiable total), ``supervised`` and
        ``consistency`` (detached), ``consistency_weight`` (float); with UA-MT also ``uncertainty_threshold``
        and ``mask_fraction`` (share of voxels kept).

    Raises:
        ConfigError: unknown ``consistency`` / ``teacher_input``.
        DataError: the batch has no unlabeled part although ``teacher_input="unlabeled"``, or the labeled part
            holds placeholder (negative) labels, i.e. the batch is not ordered labeled-first.
    """
    if isinstance(consistency, str):
        if consistency not in CONSISTENCY_LOSSES:
            raise ConfigError(
                "consistency", f"unknown consistency {consistency!r} (use one of {list(CONSISTENCY_LOSSES)})"
            )
        consistency = CONSISTENCY_LOSSES[consistency]
    if teacher_input not in TEACHER_INPUTS:
        raise ConfigError("teacher_input", f"unknown teacher_input {teacher_input!r} (use one of {TEACHER_INPUTS})")
    weight_fn = ConsistencyWeight() if consistency_weight is None else consistency_weight
    n_lab = int(labeled_batch_size)
    if not 1 <= n_lab <= images.shape[0]:
        raise DataError(None, f"labeled_batch_size={n_lab} does not fit a batch of {images.shape[0]} cases")
    if teacher_input == "unlabeled" and images.shape[0] == n_lab:
        raise DataError(None, f"batch of {n_lab} cases has no unlabeled part (labeled_batch_size={n_lab})")
    lab_labels = labels[:n_lab]
    if bool((lab_labels < 0).any()):
        raise DataError(
            None,
            f"the first {n_lab} cases of the batch should be labeled but hold placeholder labels: "
            "is the loader built with TwoStreamBatchSampler and the same labeled_batch_size?",
        )

    pred = forward(student, images)
    supervised = supervised_loss(pred[:n_lab], lab_labels).mean()

    cons_slice = slice(n_lab, None) if teacher_input == "unlabeled" else slice(None)
    teacher_in = images[cons_slice]
    teacher.eval()

    # UA-MT's published code never puts its EMA model in eval mode: with the uncertainty mask, the target pass runs
    # with dropout on like the stochastic passes (plain Mean Teacher keeps a deterministic target)
    target_dropout = dropout_on(teacher) if uncertainty_max_steps is not None else contextlib.nullcontext()
    with torch.no_grad(), batchnorm_batch_statistics(teacher), target_dropout:
        teacher_logits = forward(teacher, noise(teacher_in) if noise is not None else teacher_in)
    out: dict[str, Any] = {"pred": pred}
    if uncertainty_max_steps is None:
        cons = consistency(pred[cons_slice], teacher_logits, reduction="mean")
    else:
        threshold = uamt_threshold(step, uncertainty_max_steps, num_classes=pred.shape[1])
        with batchnorm_batch_statistics(teacher):
            mask, _ = uncertainty_mask(
                teacher, teacher_in, threshold, passes=uncertainty_passes, perturb=noise, mc_dropout=True
            )
        cons = masked_mean(consistency(pred[cons_slice], teacher_logits, reduction="none"), mask)
        out.update(uncertainty_threshold=float(threshold), mask_fraction=float(mask.mean()))
    weight = float(weight_fn(step))
    out.update(
        loss=supervised + weight * cons,
        supervised=supervised.detach(),
        consistency=cons.detach(),
        consistency_weight=weight,
    )
    return out


class MeanTeacherTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` for Mean Teacher / UA-MT; overrides only ``_iteration`` (see the module docstring).

    ``engine.state.output`` holds ``image`` / ``label`` / ``pred`` of the labeled part (so train metrics and
    post-processing never see placeholder labels), ``loss``, ``supervised``, ``consistency``,
    ``consistency_weight`` and, with UA-MT, ``uncertainty_threshold`` and ``mask_fraction``.

    Args:
        device, train_data_loader, network, optimizer: as ``SupervisedTrainer``.
        max_epochs: epochs (``None``: no epoch limit; give it and/or ``max_iterations``).
        loss_function: supervised loss; default ``DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.5,
            lambda_dice=0.5)``, i.e. ``0.5 * (CE + Dice)`` (the published LA code computes Dice on the
            foreground only; pass ``include_background=False`` to match it).
        labeled_batch_size: labeled cases at the front of each batch (must match the batch sampler's).
        teacher: EMA model; default :func:`~medssl.engines.ema.make_teacher` ``(network)``. Its training forward
            normalises with batch statistics (see :func:`mean_teacher_losses`).
        consistency: ``"mse"`` | ``"kl"`` | callable (see :func:`mean_teacher_losses`).
        consistency_weight: ``weight(step)``; default ``ConsistencyWeight(0.1, 40, 150)``.
        teacher_input: ``"unlabeled"`` | ``"all"``.
        noise_std, noise_clip: teacher input noise ``clamp(N(0, std), ±clip)``; ``noise_std=0`` disables it.
        uncertainty: enable the UA-MT mask.
        uncertainty_passes: UA-MT's ``T``.
        uncertainty_max_steps: threshold ramp length; default the run's total iterations.
        max_iterations: optimizer steps (``None``: no iteration limit); with ``max_epochs``, whichever comes first
            (:class:`medssl.handlers.budget.IterationBudget`).
        ema_decay, ema_buffers: see :class:`~medssl.engines.ema.EMATeacherHandler`.
        precision: ``"auto"`` | ``"fp32"`` | ``"bf16"`` | ``"amp"`` (see ``medssl.engines.utils``).
        kwargs: passed to ``SupervisedTrainer`` (``train_handlers``, ``prepare_batch``, ...).

    Raises:
        ConfigError: bad settings, gradient accumulation (not supported: the EMA follows every step), or a
            ``TwoStreamBatchSampler`` whose ``labeled_batch_size`` differs.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int | None,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable | None = None,
        *,
        labeled_batch_size: int,
        teacher: nn.Module | None = None,
        consistency: str | Callable = "mse",
        consistency_weight: Callable[[int], float] | None = None,
        teacher_input: str = "unlabeled",
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
        uncertainty: bool = False,
        uncertainty_passes: int = 8,
        uncertainty_max_steps: int | None = None,
        ema_decay: float = 0.99,
        ema_buffers: bool = True,
        precision: str = "fp32",
        max_iterations: int | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ConfigError("accumulation_steps", "Mean Teacher updates the teacher after every optimizer step")
        if kwargs.pop("amp", False):
            raise ConfigError("amp", "use precision='amp' (or 'bf16') instead of amp=True")
        if isinstance(consistency, str) and consistency not in CONSISTENCY_LOSSES:
            raise ConfigError(
                "consistency", f"unknown consistency {consistency!r} (use one of {list(CONSISTENCY_LOSSES)})"
            )
        if teacher_input not in TEACHER_INPUTS:
            raise ConfigError("teacher_input", f"unknown teacher_input {teacher_input!r} (use one of {TEACHER_INPUTS})")
        if int(labeled_batch_size) != labeled_batch_size or labeled_batch_size < 1:
            raise ConfigError("labeled_batch_size", f"must be a positive integer, got {labeled_batch_size!r}")
        batch_sampler = getattr(train_data_loader, "batch_sampler", None)
        if isinstance(batch_sampler, TwoStreamBatchSampler) and batch_sampler.labeled_batch_size != labeled_batch_size:
            raise ConfigError(
                "labeled_batch_size",
                f"trainer has {labeled_batch_size} but the batch sampler {batch_sampler.labeled_batch_size}",
            )
        dev = torch.device(device)
        epochs = initial_max_epochs(max_iterations, max_epochs, train_data_loader, kwargs.get("epoch_length"))
        super().__init__(
            device=dev,
            max_epochs=epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=_default_supervised_loss() if loss_function is None else loss_function,
            amp=uses_grad_scaler(dev, precision),  # makes MONAI create the GradScaler in run()
            **kwargs,
        )
        self.precision = precision
        self.labeled_batch_size = int(labeled_batch_size)
        self.teacher = (make_teacher(network) if teacher is None else teacher).to(dev)
        self.consistency = consistency
        self.consistency_weight = ConsistencyWeight() if consistency_weight is None else consistency_weight
        self.teacher_input = teacher_input
        self.noise = functools.partial(teacher_noise, std=noise_std, clip=noise_clip) if noise_std > 0 else None
        self.uncertainty = bool(uncertainty)
        self.uncertainty_passes = int(uncertainty_passes)
        self._uncertainty_max_steps = uncertainty_max_steps
        self.ema_handler = EMATeacherHandler(self.teacher, network, decay=ema_decay, buffers=ema_buffers)
        self.ema_handler.attach(self, IterationEvents.MODEL_COMPLETED)
        if hasattr(batch_sampler, "set_epoch"):
            # MONAI only does this for a DistributedSampler in `loader.sampler`, not for a batch sampler
            self.add_event_handler(Events.EPOCH_STARTED, lambda engine: batch_sampler.set_epoch(engine.state.epoch))
        attach_budget(self, max_iterations, max_epochs)

    @property
    def uncertainty_max_steps(self) -> int | None:
        if not self.uncertainty:
            return None
        if self._uncertainty_max_steps is not None:
            return int(self._uncertainty_max_steps)
        if self.max_iterations is not None:
            return self.max_iterations
        if self.state.max_epochs is None or self.state.epoch_length is None:
            raise ConfigError("uncertainty_max_steps", "cannot infer the run length: set uncertainty_max_steps")
        return int(self.state.max_epochs * self.state.epoch_length)

    def _iteration(self, engine: MeanTeacherTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        n_lab = engine.labeled_batch_size
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with autocast(engine.state.device, engine.precision):
            parts = mean_teacher_losses(
                engine.network,
                engine.teacher,
                inputs,
                targets,
                step=engine.state.iteration - 1,
                labeled_batch_size=n_lab,
                supervised_loss=engine.loss_function,
                consistency=engine.consistency,
                consistency_weight=engine.consistency_weight,
                teacher_input=engine.teacher_input,
                noise=engine.noise,
                uncertainty_max_steps=engine.uncertainty_max_steps,
                uncertainty_passes=engine.uncertainty_passes,
                forward=lambda net, x: first_output(engine.inferer(x, net)),
            )
        pred = parts.pop("pred")
        engine.state.output = {Keys.IMAGE: inputs[:n_lab], Keys.LABEL: targets[:n_lab], Keys.PRED: pred[:n_lab]}
        engine.state.output.update(parts)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss = engine.state.output[Keys.LOSS]
        backward_and_step(engine, loss)  # runs the EMA update
        return engine.state.output


def make_teacher_student_evaluators(
    device: str | torch.device,
    val_data_loader: Any,
    networks: Mapping[str, nn.Module],
    *,
    num_classes: int,
    inferer: Any = None,
    include_background: bool = False,
    precision: str = "fp32",
    val_handlers: Mapping[str, Sequence] | None = None,
    metric_name: str = "val_mean_dice",
    tutorial_metric: str | None = None,
    **kwargs: Any,
) -> dict[str, SupervisedEvaluator]:
    """One ``SupervisedEvaluator`` per network (e.g. ``{"student": net, "teacher": trainer.teacher}``).

    Each gets its own mean-Dice metric (``metric_name``) on softmax-argmax predictions against one-hot labels,
    so the two validation curves can be logged and checkpointed side by side.

    Args:
        device: evaluation device.
        val_data_loader: validation loader (labels required).
        networks: name → network.
        num_classes: classes including background.
        inferer: e.g. ``SlidingWindowInferer``; default ``SimpleInferer``.
        include_background: count the background class in the mean Dice.
        precision: as the trainer (MONAI evaluators autocast on CUDA only).
        val_handlers: name → handlers for that evaluator (e.g. a ``CheckpointSaver`` per network).
        metric_name: key metric name.
        tutorial_metric: when given, also this metric (reported, never selecting): MONAI ``MeanDice(
            include_background=True, reduction="mean")``, the MONAI BTCV UNETR tutorial's include-background mean
            (e.g. ``"val_mean_dice_tutorial"``, as ``btcv_unetr.yaml`` logs it).
        kwargs: passed to every ``SupervisedEvaluator``.
    """
    from monai.handlers import MeanDice, from_engine
    from monai.transforms import Activationsd, AsDiscreted, Compose

    if num_classes < 2:
        raise ConfigError("num_classes", f"must be >= 2, got {num_classes!r}")
    evaluators = {}
    for name, net in networks.items():
        post = Compose(
            [
                Activationsd(keys=Keys.PRED, softmax=True),
                AsDiscreted(keys=[Keys.PRED, Keys.LABEL], argmax=[True, False], to_onehot=[num_classes, num_classes]),
            ]
        )
        metric = MeanDice(include_background=include_background, output_transform=from_engine([Keys.PRED, Keys.LABEL]))
        extra = {}
        if tutorial_metric:
            extra[tutorial_metric] = MeanDice(
                include_background=True, reduction="mean", output_transform=from_engine([Keys.PRED, Keys.LABEL])
            )
        evaluators[name] = SupervisedEvaluator(
            device=torch.device(device),
            val_data_loader=val_data_loader,
            network=net,
            inferer=inferer,
            postprocessing=post,
            key_val_metric={metric_name: metric},
            additional_metrics=extra or None,
            val_handlers=list((val_handlers or {}).get(name, [])),
            amp=cuda_amp(device, precision),
            amp_kwargs=cuda_amp_kwargs(precision, device),
            **kwargs,
        )
    return evaluators
