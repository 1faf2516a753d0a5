"""Two-view self-supervised trainer on MONAI's ``SupervisedTrainer``: only the iteration differs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from medssl.engines.utils import backward_and_step, reject_reserved
from medssl.handlers.budget import attach_budget, initial_max_epochs
from medssl.networks.outputs import first_output
from medssl.precision import autocast, resolve_device, uses_grad_scaler

__all__ = ["TwoViewSSLTrainer"]


class TwoViewSSLTrainer(SupervisedTrainer):
    """Reconstruct two corrupted views of the same crop and train with a loss of both reconstructions.

    One iteration: ``recon1, recon2 = network(view1), network(view2)``; ``parts = loss_function(recon1, recon2,
    clean)``; back-propagate ``parts["total"]``. ``engine.state.output`` holds the tensors (``gt_image``,
    ``image``, ``image_2``, ``pred`` = recon 1) and the scalars ``loss``, ``loss_reconstruction``,
    ``loss_contrastive`` and ``lr`` for the stats, TensorBoard and progress handlers. The batch is not decollated
    (the outputs are batch tensors and floats).

    Both views go through the network as one batch of 2B: the networks used here normalise per sample (LayerNorm),
    so this equals two forward passes and halves the kernel launches.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        max_epochs: epochs to train (``None``: no epoch limit; give it and/or ``max_iterations``).
        train_data_loader: yields dicts with ``clean_key``, ``view_keys`` (B, C, H, W, D).
        network: maps (B, C, H, W, D) to a reconstruction of the same shape (or a tuple whose first item is).
        optimizer: the optimizer.
        loss_function: called as ``loss_function(recon1, recon2, clean)`` → ``{"total", "reconstruction",
            "contrastive"}`` (e.g. :class:`medssl.losses.ssl.ReconstructionContrastiveLoss`).
        precision: ``"auto"``, ``"bf16"``, ``"amp"`` or ``"fp32"`` (see :func:`medssl.precision.autocast`).
        view_keys: the two view keys.
        clean_key: the clean target key.
        max_iterations: optimizer steps to train (``None``: no iteration limit); with ``max_epochs``, whichever
            comes first (:class:`medssl.handlers.budget.IterationBudget`).
        kwargs: other ``SupervisedTrainer`` arguments (``epoch_length``, ``train_handlers``, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int | None,
        train_data_loader: Any,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable[..., Mapping[str, torch.Tensor]],
        precision: str = "fp32",
        view_keys: Sequence[str] = ("image", "image_2"),
        clean_key: str = "gt_image",
        max_iterations: int | None = None,
        **kwargs: Any,
    ) -> None:
        device = resolve_device(device)
        if len(view_keys) != 2:
            raise ValueError(f"view_keys must name two views, got {view_keys}")
        reject_reserved("TwoViewSSLTrainer", kwargs, ("amp", "decollate"))
        epochs = initial_max_epochs(max_iterations, max_epochs, train_data_loader, kwargs.get("epoch_length"))
        # amp=True makes MONAI create the GradScaler in run(); autocast itself is ours (MONAI's is CUDA-only)
        super().__init__(
            device=device,
            max_epochs=epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            amp=uses_grad_scaler(device, precision),
            decollate=False,
            **kwargs,
        )
        autocast(device, precision)  # validates precision early
        self.precision = precision
        self.view_keys = tuple(view_keys)
        self.clean_key = clean_key
        attach_budget(self, max_iterations, max_epochs)

    def _iteration(self, engine: TwoViewSSLTrainer, batchdata: Mapping[str, torch.Tensor]) -> dict:
        dev, nb = engine.state.device, engine.non_blocking
        k1, k2 = engine.view_keys
        view1 = batchdata[k1].to(dev, non_blocking=nb)
        view2 = batchdata[k2].to(dev, non_blocking=nb)
        clean = batchdata[engine.clean_key].to(dev, non_blocking=nb)
        engine.state.output = {engine.clean_key: clean, k1: view1, k2: view2}

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with autocast(dev, engine.precision):
            recon = first_output(engine.network(torch.cat([view1, view2], dim=0)))
            recon1, recon2 = recon.float().chunk(2, dim=0)
            engine.state.output["pred"] = recon1
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            parts = engine.loss_function(recon1, recon2, clean)
        loss = parts["total"]
        engine.state.output["loss"] = loss
        # the parts too, so handlers of LOSS_COMPLETED (the NaN guard) can name them
        engine.state.output["loss_reconstruction"] = parts["reconstruction"].detach()
        engine.state.output["loss_contrastive"] = parts["contrastive"].detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        backward_and_step(engine, loss)

        out = engine.state.output
        out["pred"] = recon1.detach()
        out["loss"] = loss.detach()
        out["loss_reconstruction"] = parts["reconstruction"].detach()
        out["loss_contrastive"] = parts["contrastive"].detach()
        out["lr"] = float(engine.optimizer.param_groups[0]["lr"])
        return out
