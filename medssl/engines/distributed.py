"""torchrun data-parallel training for every medssl bundle: process group, DDP, samplers, rank-0 outputs, shutdown.

``bundles/multi_gpu.yaml`` turns any training bundle into a DistributedDataParallel run with these pieces::

    torchrun --nproc_per_node=2 -m monai.bundle run training \\
        --config_file "['bundles/ssl_pretrain.yaml','bundles/multi_gpu.yaml']"

- :func:`init_distributed` joins the process group torchrun describes in the environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL on CUDA with device ``cuda:LOCAL_RANK``,
  gloo on CPU. Without torchrun it returns the plain device, so the overlay also runs as one process.
- :func:`wrap_ddp` wraps only the network the trainer steps; optimizers, EMA teachers, evaluators and checkpoints
  keep the raw module (same parameter tensors), so every checkpoint stays free of ``module.`` prefixes.
- :class:`DistributedDataLoader` is a MONAI ``DataLoader`` that gives each rank its shard (``DistributedSampler``;
  training: ``even_divisible=True``, every rank runs the same number of iterations; validation:
  ``even_divisible=False``, every case once, MONAI's metrics all-gather the results).
- :func:`main_process_only` drops the output handlers (logging / TensorBoard / CSV / image / progress) on ranks > 0
  (also those already attached to the evaluators of ``ValidationHandler``), keeping everything that changes
  training. A handler declares itself an output handler with the class attribute ``main_process_only = True``;
  MONAI's own are known by type (:data:`MONAI_OUTPUT_HANDLERS`).

Rank, world size and the gathers come from the leaf :mod:`medssl.dist`, which handlers and losses import too.
- :func:`run` trains and always leaves the process group (``destroy_process_group``), also when training raises.

Gradient averaging: DDP all-reduces the mean of the ranks' gradients, so a step of ``N`` ranks with ``b`` samples
each equals one process with ``N * b`` samples whenever the loss is a mean over samples (L1, Dice/CE, NT-Xent or
SupCon with gathered negatives). A loss that multiplies two batch means (the SSL recipe's ``L1 + NT-Xent * L1``)
becomes the mean over ranks of the per-rank products, which differs from the product of the global means by the
covariance of the two factors over ranks (``tests/distributed/test_step.py`` checks both statements).
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader

from medssl.config import as_bool
from medssl.dist import get_rank, get_world_size, is_distributed, is_main_process
from medssl.errors import ConfigError

__all__ = [
    "init_distributed",
    "idle_parameters",
    "wrap_ddp",
    "shutdown",
    "run",
    "seed_by_rank",
    "DistributedDataLoader",
    "main_process_only",
    "is_output_handler",
    "MONAI_OUTPUT_HANDLERS",
]

logger = logging.getLogger(__name__)


def _launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(device: str | torch.device = "auto", timeout_minutes: float | None = 30.0) -> torch.device:
    """Join the torchrun process group (once) and return this rank's device.

    Backend: NCCL when the device is CUDA, gloo on CPU. On CUDA the device is ``cuda:LOCAL_RANK`` and becomes the
    current CUDA device. Ranks > 0 log warnings and errors only, so the console shows one copy of every message.
    Called again (the overlay calls it from ``initialize`` and from ``device_obj``) it returns the same device.

    Args:
        device: the bundle's ``device`` id: ``"auto"``, ``"cuda"`` or ``"cpu"`` (a fixed ``"cuda:N"`` cannot be
            shared by several ranks).
        timeout_minutes: how long a collective waits for the other ranks before failing (NCCL's default is 10
            minutes); ``None`` keeps PyTorch's default.

    Returns:
        ``torch.device``; without torchrun's environment simply :func:`medssl.precision.resolve_device`.

    Raises:
        ConfigError: a ``cuda:N`` device under torchrun, or CUDA requested where there is none.
    """
    from medssl.precision import resolve_device

    if not _launched_by_torchrun() and not is_distributed():
        return resolve_device(device)
    text = str(device).lower()
    if text not in ("auto", "cpu", "cuda") and not isinstance(device, torch.device):
        raise ConfigError(
            "device", f"{device!r} under torchrun: use auto, cuda or cpu (each rank takes cuda:LOCAL_RANK)"
        )
    use_cuda = torch.cuda.is_available() if text == "auto" else text.startswith("cuda")
    if isinstance(device, torch.device):
        use_cuda = device.type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("device", f"device {device!r} requested but CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                "device", f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not is_distributed():
        kwargs: dict[str, Any] = {"backend": "nccl" if use_cuda else "gloo"}
        if timeout_minutes is not None:
            kwargs["timeout"] = datetime.timedelta(minutes=float(timeout_minutes))
        torch.distributed.init_process_group(**kwargs)
        # also when the config fails to build (before run() and its finally are reached)
        atexit.register(shutdown)
        if get_rank() > 0:
            logging.getLogger().setLevel(logging.WARNING)
        logger.info(f"process group: {kwargs['backend']}, world size {get_world_size()}, device {dev}")
    return dev


def idle_parameters(network: torch.nn.Module) -> list[str]:
    """Names of parameters that no forward pass of ``network`` can use, found from its structure.

    MONAI's ``TransformerBlock`` creates ``norm_cross_attn`` even without cross-attention (so every MONAI ViT:
    ``ViTAutoEnc``, UNETR's encoder, S5CL's token ViT carries two idle LayerNorm tensors per block). DDP waits
    for a gradient of every parameter that requires one, so these have to be excluded or searched for.
    """
    from monai.networks.blocks.transformerblock import TransformerBlock

    names = []
    for prefix, module in network.named_modules():
        if isinstance(module, TransformerBlock) and not getattr(module, "with_cross_attention", False):
            norm = getattr(module, "norm_cross_attn", None)
            if norm is not None:
                names += [f"{prefix}.norm_cross_attn.{n}".lstrip(".") for n, _ in norm.named_parameters()]
    return names


def wrap_ddp(
    network: torch.nn.Module, device: str | torch.device, find_unused_parameters: bool | str = "auto"
) -> torch.nn.Module:
    """``DistributedDataParallel(network)`` in a process group, ``network`` itself otherwise.

    Wrap only the module the trainer steps and keep using ``network`` elsewhere: they share the parameter tensors.

    Args:
        network: the raw model, already on ``device``.
        device: this rank's device (from :func:`init_distributed`).
        find_unused_parameters: ``"auto"``: the :func:`idle_parameters` (never used by any forward, so their
            gradient is always ``None`` and the optimizer skips them anyway) are set to ``requires_grad=False``
            and DDP does no per-step search; ``True``: DDP searches the autograd graph for unused parameters every
            step (slower; for models whose used parameters change from step to step); ``False``: neither.
    """
    if not is_distributed():
        return network
    search = False
    if str(find_unused_parameters).lower() == "auto":
        idle = set(idle_parameters(network))
        for name, p in network.named_parameters():
            if name in idle:
                p.requires_grad_(False)
        if idle:
            logger.info(f"{len(idle)} parameters take part in no forward pass (e.g. {min(idle)}): left out of DDP")
    else:
        search = as_bool(find_unused_parameters, "find_unused_parameters")
    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(
        network, device_ids=ids, output_device=ids[0] if ids else None, find_unused_parameters=search
    )


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    if is_distributed():
        torch.distributed.destroy_process_group()


def seed_by_rank(seed: int | None, loaders: Iterable[Any] = ()) -> int | None:
    """Give each rank its own random streams: python, numpy, torch and the random transforms of ``loaders``.

    Models are built before this from the same seed on every rank (identical initial weights, EMA teachers and
    validation crops); the training draws (augmentation, dropout, teacher input noise, worker seeds) then differ
    by rank, as they differ between the samples of one large batch. Rank 0 uses ``seed`` itself.

    Returns:
        the seed of this rank (``None`` when ``seed`` is ``None``: nothing is reseeded).
    """
    if seed is None:
        return None
    from monai.data.utils import set_rnd

    rank_seed = (int(seed) + 1_000_003 * get_rank()) % (2**32)
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)
    for loader in loaders:
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:
            set_rnd(dataset, rank_seed)
    return rank_seed


def _training_loaders(trainer: Any) -> list:
    found = []
    for value in vars(trainer).values():
        if isinstance(value, torch.utils.data.DataLoader) and all(value is not f for f in found):
            found.append(value)
    return found


def run(trainer: Any, seed: int | None = None) -> Any:
    """``trainer.run()`` in a process group, leaving the group afterwards whether training succeeded or raised.

    ``monai.bundle run`` does not run the ``finalize`` id when ``training`` raises, hence this wrapper. With
    ``seed`` and more than one rank, :func:`seed_by_rank` first gives each rank its own training draws.
    A successful run ends with a barrier, so no rank leaves while another still writes its last checkpoint.
    """
    try:
        if get_world_size() > 1:
            seed_by_rank(seed, _training_loaders(trainer))
        result = trainer.run()
        if is_distributed():
            torch.distributed.barrier()
        return result
    finally:
        shutdown()


# ------------------------------------------------------------------------------------------------ data loader


class DistributedDataLoader(DataLoader):
    """A MONAI ``DataLoader`` that shards its dataset over the ranks of a process group (a plain one without).

    - ``batch_sampler`` given: kept; it must be rank-aware
      (:class:`~medssl.data.samplers.DistributedTwoStreamBatchSampler`, identical to ``TwoStreamBatchSampler`` on
      one process).
    - otherwise a ``monai.data.DistributedSampler(shuffle=shuffle, even_divisible=even_divisible, seed=seed)``;
      MONAI's trainers call its ``set_epoch`` at every epoch start. ``even_divisible=True`` (training) pads with
      repeated samples so all ranks run the same number of iterations; ``False`` (validation) visits every case
      once. A dataset smaller than the world size is not split (every rank sees every case; mean metrics are
      unchanged by the all-gather of identical copies), because an empty shard would leave a rank out of the
      metric all-gather.

    Args:
        dataset: the dataset.
        num_workers: loader worker processes.
        shuffle: shuffle (per epoch, identically on all ranks before the split).
        sampler, batch_sampler: as ``torch.utils.data.DataLoader``.
        even_divisible: see above.
        seed: seed of the shuffle.
        kwargs: other ``DataLoader`` arguments (``batch_size``, ``collate_fn``, ``pin_memory``, ...).

    Raises:
        ConfigError: a batch sampler that does not know about ranks, in a process group.
    """

    def __init__(
        self,
        dataset: Any,
        num_workers: int = 0,
        *,
        shuffle: bool = False,
        sampler: Any = None,
        batch_sampler: Any = None,
        even_divisible: bool = True,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        shuffle = as_bool(shuffle, "shuffle")
        world = get_world_size()
        if world > 1 and batch_sampler is not None and getattr(batch_sampler, "num_replicas", None) != world:
            raise ConfigError(
                "train#sampler",
                f"{type(batch_sampler).__name__} does not split batches over {world} ranks; use "
                "medssl.data.samplers.DistributedTwoStreamBatchSampler (identical on one process)",
            )
        if world > 1 and batch_sampler is None and sampler is None:
            even = as_bool(even_divisible, "even_divisible")
            if even or len(dataset) >= world:
                from monai.data import DistributedSampler

                sampler = DistributedSampler(dataset, even_divisible=even, shuffle=shuffle, seed=int(seed))
                shuffle = False
            else:
                logger.info(f"{len(dataset)} cases for {world} ranks: every rank evaluates every case")
        if batch_sampler is not None:
            kwargs["batch_sampler"] = batch_sampler
        super().__init__(dataset, num_workers, shuffle=shuffle, sampler=sampler, **kwargs)


# --------------------------------------------------------------------------------------------------- handlers


#: MONAI's own handlers that only log or write files; they cannot carry medssl's ``main_process_only`` attribute.
MONAI_OUTPUT_HANDLERS = (
    "StatsHandler",
    "TensorBoardStatsHandler",
    "TensorBoardImageHandler",
    "CheckpointSaver",
    "MetricsSaver",
    "ClassificationSaver",
    "MLFlowHandler",
    "ClearMLStatsHandler",
    "ClearMLImageHandler",
)


def is_output_handler(handler: Any) -> bool:
    """Whether ``handler`` (an instance or a class) only logs or writes files, i.e. belongs on rank 0 only.

    A handler says so itself with the class attribute ``main_process_only = True`` (every output handler in
    :mod:`medssl.handlers` does); MONAI's output handlers are recognised by type (:data:`MONAI_OUTPUT_HANDLERS`).
    """
    import monai.handlers as mh

    cls = handler if isinstance(handler, type) else type(handler)
    if getattr(cls, "main_process_only", False) is True:
        return True
    monai_types = tuple(getattr(mh, n) for n in MONAI_OUTPUT_HANDLERS if hasattr(mh, n))
    return issubclass(cls, monai_types)


def _unwrap(func: Callable) -> Any:
    parent = getattr(func, "_parent", None)  # ignite wraps filtered handlers (every=N) and keeps a weakref
    return parent() if parent is not None else func


def _owner(func: Callable) -> Any:
    """The object a registered event handler belongs to (the handler instance of a bound method)."""
    return getattr(_unwrap(func), "__self__", _unwrap(func))


def _discard_tensorboard_files(handler: Any) -> None:
    """Close the SummaryWriter a dropped handler opened at construction and delete this process's empty file."""
    for attr in ("_writer", "writer", "summary_writer"):
        writer = getattr(handler, attr, None)
        if writer is None or not hasattr(writer, "get_logdir"):
            continue
        name = getattr(getattr(getattr(writer, "file_writer", None), "event_writer", None), "_file_name", None)
        writer.close()
        if name and Path(name).is_file():
            Path(name).unlink()


def _detach(engine: Any) -> None:
    """Remove the event handlers of ``engine`` that belong to output handlers (:func:`is_output_handler`).

    ignite has no public way to list an engine's handlers, so the list is read from ``engine._event_handlers``;
    the removal goes through the public ``remove_event_handler``.
    """
    dropped = {}
    for event, entries in list(engine._event_handlers.items()):
        for func in {id(f): f for f in (_unwrap(entry[0]) for entry in entries)}.values():
            owner = getattr(func, "__self__", func)
            if func is not None and is_output_handler(owner):
                engine.remove_event_handler(func, event)
                dropped[id(owner)] = owner
    for handler in dropped.values():
        _discard_tensorboard_files(handler)


def main_process_only(handlers: Sequence[Any]) -> list[Any]:
    """The trainer's handlers for this rank: all of them on rank 0; on ranks > 0 those that affect training only.

    Dropped on ranks > 0: the output handlers (:func:`is_output_handler`: stats, TensorBoard, CSV, images, progress
    bar, best-model files). Kept everywhere: checkpoint restore/saving (:class:`~medssl.handlers.CheckpointHandler` writes
    on rank 0 only), the NaN guard, LR schedules, stop conditions, BatchNorm recalibration and the
    ``ValidationHandler`` (validation is distributed: every rank evaluates its shard and the metrics all-gather);
    the output handlers already attached to those validators are removed from them here as well. TensorBoard
    writers that dropped handlers opened at construction are closed and their empty files deleted.

    Unknown handler types are kept (a handler that changes training must run on every rank).
    """
    handlers = list(handlers)
    if is_main_process():
        return handlers
    from monai.handlers import ValidationHandler

    kept = []
    for h in handlers:
        if is_output_handler(h):
            _discard_tensorboard_files(h)
            continue
        if isinstance(h, ValidationHandler) and h.validator is not None:
            _detach(h.validator)
        kept.append(h)
    return kept
