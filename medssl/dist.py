"""Ranks of a torch.distributed process group, and gathers across them: the leaf every other module may import.

Without an initialised process group every function answers as one process does (rank 0 of 1, gathers return
their input), so training, losses and handlers call them unconditionally. The process-group wiring itself
(``init_process_group``, DDP, samplers, shutdown) lives in :mod:`medssl.engines.distributed`.

This module imports torch and the standard library only, so any part of medssl can use it without an import
cycle (``tests/test_import_graph.py`` checks that).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "resolve_rank",
    "gather_with_grad",
    "gather",
    "unwrap_model",
]


def is_distributed() -> bool:
    """``True`` when a process group is initialised (with any world size)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    """This process's rank, 0 without a process group."""
    return torch.distributed.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of processes, 1 without a process group."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the process that logs and writes files."""
    return get_rank() == 0


def resolve_rank(rank: int | None) -> int:
    """``rank`` itself, or this process's rank (0 without a process group) when ``None``.

    Handlers take ``rank=None`` by default and ask here, so a test can pretend to be another rank.
    """
    return get_rank() if rank is None else int(rank)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns to each rank the gradient of its own part summed over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        ctx.rank, ctx.world, ctx.n = dist.get_rank(), dist.get_world_size(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # every rank's loss used every rank's part: rank r's part receives the sum of all ranks' gradients for it
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks along dim 0, keeping autograd for every rank's part.

    The backward pass all-reduces (sums) the gradient of the gathered tensor and hands each rank the slice of its
    own part, so with DDP's averaging a step equals one process holding the whole batch (unlike
    ``torch.distributed.all_gather``, whose outputs carry no gradient). Every rank must pass the same shape.
    Without an initialised process group (or with one rank) this returns ``x``.
    """
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks along dim 0 without gradient (e.g. labels).

    Every rank must pass the same shape. Without a process group (or with one rank) this returns ``x``.
    """
    world = get_world_size()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
