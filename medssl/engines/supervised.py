"""Supervised segmentation training on MONAI's ``SupervisedTrainer``: medssl precision and an iteration budget.

MONAI's engines autocast on CUDA only. Instead of copying ``SupervisedTrainer._iteration``, the forward pass is
moved under :func:`medssl.precision.autocast` by wrapping the engine's inferer (:class:`AutocastInferer`),
so bf16 runs on CPU and CUDA alike; the loss sees fp32 logits. The same wrapper serves the validation evaluator
(sliding-window inference under bf16, accumulated in fp32).

Recipes count iterations, not epochs (UNETR on BTCV: 30000; UA-MT on LA: 6000): :class:`SupervisedSegTrainer`
takes ``max_iterations`` and stops there, mid-epoch if need be.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from medssl.engines.utils import reject_reserved
from medssl.handlers.budget import attach_budget, initial_max_epochs
from medssl.precision import autocast, cuda_amp_kwargs, resolve_device, uses_grad_scaler

__all__ = ["AutocastInferer", "SupervisedSegTrainer"]


class AutocastInferer:
    """Run another inferer under the autocast of ``precision`` and return fp32 logits.

    Args:
        inferer: e.g. ``monai.inferers.SimpleInferer()`` or ``SlidingWindowInferer(roi_size, sw_batch_size)``;
            ``None`` calls the network directly.
        device: the device the network runs on.
        precision: ``"auto"``, ``"bf16"``, ``"amp"`` or ``"fp32"`` (see :func:`medssl.precision.autocast`).

    Example::

        inferer = AutocastInferer(SlidingWindowInferer((96, 96, 96), 4, overlap=0.5), "cpu", "bf16")
        logits = inferer(image, network)  # (B, C, H, W, D) float32
    """

    def __init__(self, inferer: Callable | None, device: str | torch.device, precision: str = "fp32") -> None:
        self.inferer = inferer
        self.device = resolve_device(device)
        autocast(self.device, precision)  # validates precision now, not at the first batch
        self.precision = precision

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        with autocast(self.device, self.precision):
            out = (
                network(inputs, *args, **kwargs)
                if self.inferer is None
                else self.inferer(inputs, network, *args, **kwargs)
            )
        return out.float()


class SupervisedSegTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` with a ``precision`` (bf16 on CPU too) and an iteration budget.

    The batch is ``(image, label)`` of shapes (B, C_in, H, W, D) and (B, 1, H, W, D); the network returns logits
    (B, n_classes, H, W, D); ``loss_function(logits, label)`` (e.g. ``DiceCELoss(to_onehot_y=True,
    softmax=True)``). ``engine.state.output`` holds ``image``, ``label``, ``pred``, ``loss`` and ``lr``.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        train_data_loader: the training loader (must have a length when ``max_iterations`` is given).
        network, optimizer, loss_function: as ``SupervisedTrainer``.
        max_iterations: optimizer steps to run; training stops after exactly this many (``None``: no limit).
        max_epochs: epochs to run (``None``: no limit); with both, whichever comes first
            (:class:`medssl.handlers.budget.IterationBudget`).
        precision: ``"auto"``, ``"bf16"``, ``"amp"`` (fp16 + ``GradScaler`` on CUDA, fp32 on CPU) or ``"fp32"``.
        inferer: the training forward (default: the network on the whole batch).
        kwargs: other ``SupervisedTrainer`` arguments (``train_handlers``, ``postprocessing``, ...).

    Raises:
        ValueError: neither ``max_iterations`` nor ``max_epochs``, a non-positive budget, or an empty loader.
    """

    def __init__(
        self,
        device: str | torch.device,
        train_data_loader: Any,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        max_iterations: int | None = None,
        max_epochs: int | None = None,
        precision: str = "fp32",
        inferer: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        reject_reserved("SupervisedSegTrainer", kwargs, ("amp", "amp_kwargs"))
        device = resolve_device(device)
        epochs = initial_max_epochs(max_iterations, max_epochs, train_data_loader, kwargs.get("epoch_length"))
        # the training output is a few scalars and batch tensors: decollating 4 x (C, 96^3) logits per step is waste
        kwargs.setdefault("decollate", False)
        # amp=True only for fp16 on CUDA: MONAI then creates the GradScaler (and autocasts as we do)
        super().__init__(
            device=device,
            max_epochs=epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            inferer=AutocastInferer(inferer, device, precision),
            amp=uses_grad_scaler(device, precision),
            amp_kwargs=cuda_amp_kwargs(precision, device),
            **kwargs,
        )
        self.precision = precision
        # fired inside the iteration, after the optimizer step: the lr of this step, before any handler logs
        self.add_event_handler(IterationEvents.MODEL_COMPLETED, self._record_scalars)
        attach_budget(self, max_iterations, max_epochs)

    def _record_scalars(self, engine: SupervisedSegTrainer) -> None:
        # after backward the graph is spent: detached outputs let handlers read floats without autograd warnings
        out = engine.state.output
        items = out if isinstance(out, (list, tuple)) else [out]  # decollated: every item carries the scalars
        lr = float(engine.optimizer.param_groups[0]["lr"])
        for item in items:
            for key in ("pred", "loss"):
                if torch.is_tensor(item.get(key)):
                    item[key] = item[key].detach()
            item["lr"] = lr
