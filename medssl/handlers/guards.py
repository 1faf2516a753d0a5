"""Training guards: stop a run cleanly when it has gone numerically wrong.

:class:`NonFiniteLossGuard` checks the loss (and every loss part in ``engine.state.output``) of each iteration and
raises :class:`NonFiniteLossError` as soon as one is NaN or infinite, naming the iteration, the epoch and every
loss part. It checks twice:

* at ``IterationEvents.LOSS_COMPLETED`` (fired by MONAI trainers and every medssl trainer between the loss and
  ``backward()``): the run stops **before** the optimizer step, so the network in memory still holds the weights
  of the previous (good) iteration;
* at ``Events.ITERATION_COMPLETED``, for loss parts a trainer only puts into the output after the step (e.g.
  ``loss_contrastive`` of :class:`~medssl.engines.ssl.TwoViewSSLTrainer`) and for engines without
  ``LOSS_COMPLETED``.

Either way the exception propagates out of ``engine.run()``: ignite does not fire ``EPOCH_COMPLETED`` or
``COMPLETED``, so :class:`~medssl.handlers.CheckpointHandler` (which saves ``last.pt`` on those events
and ``model.pt`` from an ``ITERATION_COMPLETED`` handler it registers when the run starts, i.e. after this guard)
never writes the bad state: the last good checkpoints stay on disk, and the process exits non-zero.

In a process group (torchrun) the ranks agree before raising: one ``all_reduce`` per check tells every rank which
ranks saw a non-finite loss, and all of them raise at the same iteration, so a NaN on one rank never leaves the
others waiting in DDP's gradient all-reduce. Every rank must therefore attach the guard (``main_process_only`` in
:mod:`medssl.engines.distributed` keeps it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from medssl.dist import get_rank, get_world_size
from medssl.errors import MedsslError

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "loss_parts"]


class NonFiniteLossError(MedsslError, FloatingPointError):
    """Training produced a NaN or infinite loss; ``path`` is the checkpoint folder left untouched (or ``None``).

    Attributes:
        iteration: the engine iteration (1-based) whose loss was not finite.
        epoch: the engine epoch.
        parts: loss part name → value (``float``; NaN / inf included) at the time of the check.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str, iteration: int, epoch: int, parts: dict):
        self.iteration = iteration
        self.epoch = epoch
        self.parts = dict(parts)
        super().__init__(path, problem)


def _scalar(value: Any) -> float | None:
    """A Python float for a scalar tensor / number, ``None`` for anything else (images, lists, strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if torch.is_tensor(value) and value.numel() == 1:
        return float(value.detach().float().cpu().item())
    return None


def loss_parts(output: Any, keys: Sequence[str] | None = None) -> dict[str, float]:
    """The scalar loss values of an engine output.

    Args:
        output: ``engine.state.output`` (a dict; a decollated list of dicts uses its first item; a bare scalar
            tensor is reported as ``loss``).
        keys: names to report; default every scalar entry whose name contains ``"loss"``.

    Returns:
        name → float, in the output's order.
    """
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        output = output[0]
    if not isinstance(output, Mapping):
        value = _scalar(output)
        return {} if value is None else {"loss": value}
    names = [k for k in output if "loss" in str(k).lower()] if keys is None else [k for k in keys if k in output]
    parts = {}
    for name in names:
        value = _scalar(output[name])
        if value is not None:
            parts[str(name)] = value
    return parts


class NonFiniteLossGuard:
    """Stop training with :class:`NonFiniteLossError` at the first NaN / Inf loss or loss part.

    Attach it in the bundle's ``train#handlers`` (anywhere in the list; it needs no ordering relative to
    :class:`~medssl.handlers.CheckpointHandler`, see the module docstring)::

        - _target_: medssl.handlers.NonFiniteLossGuard
          output_dir: "@output_dir"

    Args:
        keys: loss entries of ``engine.state.output`` to check; default every scalar entry whose name contains
            ``"loss"`` (``loss``, ``loss_reconstruction``, ``loss_consistency``, ...).
        output_dir: the run's checkpoint folder, named in the message as the place of the last good checkpoint.
        check_after_step: also check at ``ITERATION_COMPLETED`` (loss parts only reported after the step).

    Raises:
        NonFiniteLossError: from the engine's event, e.g. ``non-finite loss at iteration 7 (epoch 2):
        loss=nan, loss_reconstruction=0.41, loss_contrastive=nan; stopped before the optimizer step ...``.
    """

    def __init__(
        self,
        keys: Sequence[str] | None = None,
        output_dir: str | os.PathLike | None = None,
        check_after_step: bool = True,
    ) -> None:
        if isinstance(keys, str):
            raise ValueError(f"keys must be a list of output names, got the string {keys!r}")
        self.keys = None if keys is None else list(keys)
        self.output_dir = output_dir
        self.check_after_step = bool(check_after_step)

    def attach(self, engine) -> None:
        from ignite.engine import Events
        from monai.engines.utils import IterationEvents

        try:
            engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.before_step)
        except ValueError:  # a plain ignite Engine has no MONAI iteration events: the after-step check remains
            if not self.check_after_step:
                raise ValueError(
                    f"{type(engine).__name__} has no IterationEvents.LOSS_COMPLETED; keep check_after_step=True"
                ) from None
        if self.check_after_step:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.after_step)

    def before_step(self, engine) -> None:
        self._check(engine, "stopped before the optimizer step, the weights in memory are those of the last step")

    def after_step(self, engine) -> None:
        self._check(engine, "stopped after the optimizer step, the weights in memory may be damaged")

    def _check(self, engine, when: str) -> None:
        bad_ranks = _non_finite_ranks(_loss_tensors(engine.state.output, self.keys))
        if not bad_ranks:
            return
        parts = loss_parts(engine.state.output, self.keys)
        iteration, epoch = int(engine.state.iteration), int(engine.state.epoch)
        kept = "" if self.output_dir is None else "; the checkpoints in this folder were not overwritten"
        rank = get_rank()
        if rank in bad_ranks:
            listed = ", ".join(f"{k}={v:.6g}" for k, v in parts.items())
            where = "" if bad_ranks == [0] and get_world_size() == 1 else f" on rank {rank}"
            problem = f"non-finite loss at iteration {iteration} (epoch {epoch}){where}: {listed}; {when}{kept}"
        else:
            problem = (
                f"non-finite loss at iteration {iteration} (epoch {epoch}) on rank(s) {bad_ranks}; every rank "
                f"stops at the same iteration; {when}{kept}"
            )
        raise NonFiniteLossError(self.output_dir, problem, iteration, epoch, parts)


def _loss_tensors(output: Any, keys: Sequence[str] | None) -> list[Any]:
    """The scalar loss entries of ``output`` as found (tensors stay on their device; numbers stay numbers)."""
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        output = output[0]
    if not isinstance(output, Mapping):
        return [output] if _is_scalar(output) else []
    names = [k for k in output if "loss" in str(k).lower()] if keys is None else [k for k in keys if k in output]
    return [output[k] for k in names if _is_scalar(output[k])]


def _is_scalar(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1)


def _non_finite_ranks(values: Sequence[Any]) -> list[int]:
    """Ranks whose ``values`` hold a NaN / Inf; every rank of a process group gets the same answer.

    One host synchronisation per call (instead of one ``.item()`` per loss part): the flags are reduced on the
    device, and in a process group one ``all_reduce`` of a per-rank flag vector tells every rank who failed, so all
    ranks stop at the same iteration instead of the healthy ones waiting in DDP's gradient all-reduce.
    """
    world = get_world_size()
    tensors = [v.detach().reshape(()) for v in values if torch.is_tensor(v)]
    numbers_ok = all(math.isfinite(float(v)) for v in values if not torch.is_tensor(v))
    if world == 1:
        if not numbers_ok:
            return [0]
        if not tensors:
            return []
        flag = torch.stack([t.float() for t in tensors]).isfinite().all()
        return [] if bool(flag) else [0]
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.zeros(world, dtype=torch.int32, device=device)
    if not numbers_ok:
        flags[get_rank()] = 1
    if tensors:
        finite = torch.stack([t.float().to(device, non_blocking=True) for t in tensors]).isfinite().all()
        flags[get_rank()] += (~finite).to(torch.int32)
    dist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]
