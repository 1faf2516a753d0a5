"""Small pieces every medssl training bundle shares: seeding, batches, datasets, network configs."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medssl.errors import ConfigError, DataError

__all__ = [
    "backward_and_step",
    "reject_reserved",
    "seed_everything",
    "PrepareBatchKeys",
    "pick_scalars",
    "network_config",
    "resolve_dataset",
    "FixedRandomDataset",
]

logger = logging.getLogger(__name__)


def seed_everything(seed: int | None, deterministic: bool = False) -> int | None:
    """Seed python, numpy, torch (all devices) and MONAI's global transform seed; returns ``seed``.

    ``deterministic=True`` also asks cuDNN for deterministic kernels (slower).
    """
    from monai.utils import set_determinism

    if seed is None:
        return None
    set_determinism(seed=int(seed), use_deterministic_algorithms=None)
    if not deterministic:
        # set_determinism switches cuDNN to deterministic mode; speed matters more for training
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = torch.cuda.is_available()
    return int(seed)


class PrepareBatchKeys:
    """``prepare_batch`` for MONAI engines reading the input and target from chosen keys.

    Args:
        image_key: network input (e.g. a corrupted SSL view ``"image"``).
        label_key: target (e.g. the clean crop ``"gt_image"``).
    """

    def __init__(self, image_key: str = "image", label_key: str = "label") -> None:
        self.image_key = image_key
        self.label_key = label_key

    def __call__(
        self, batchdata: Mapping[str, torch.Tensor], device: str | torch.device | None = None, non_blocking=False, **kw
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def move(x):
            return x.to(device=device, non_blocking=non_blocking, **kw) if device is not None else x

        return move(batchdata[self.image_key]), move(batchdata[self.label_key])


def pick_scalars(keys: Sequence[str]) -> Callable[[Mapping[str, Any]], dict[str, float]]:
    """An ``output_transform`` for Stats/TensorBoard handlers: ``{key: float}`` for the keys present."""
    keys = tuple(keys)

    def transform(output: Mapping[str, Any]) -> dict[str, float]:
        if isinstance(output, (list, tuple)):  # decollated output: every item holds the same scalars
            output = output[0]
        return {k: float(output[k]) for k in keys if k in output}

    return transform


def network_config(network_def: Any) -> dict[str, Any]:
    """The plain ``_target_`` dict of a bundle's ``network_def`` (written with ``_mode_: callable``).

    ``ConfigParser`` turns a ``_mode_: callable`` component into a ``functools.partial`` whose keywords are the
    resolved arguments, which is exactly what a checkpoint needs to rebuild the network.
    """
    if isinstance(network_def, Mapping):
        if "_target_" not in network_def:
            raise ConfigError("network_def", f"needs a '_target_', got keys {sorted(network_def)}")
        return {k: v for k, v in network_def.items() if not (k.startswith("_") and k != "_target_")}
    if isinstance(network_def, functools.partial):
        if network_def.args:
            raise ConfigError("network_def", f"positional arguments cannot be stored: {network_def.args}")
        func = network_def.func
        return {"_target_": f"{func.__module__}.{func.__qualname__}", **network_def.keywords}
    raise ConfigError(
        "network_def", f"expected a '_mode_: callable' component or a dict, got {type(network_def).__name__}"
    )


def resolve_dataset(
    dataset_dir: str | os.PathLike,
    datalist: str | os.PathLike,
    default_dataset_dir: str | os.PathLike | None = None,
    *,
    phantom: str = "ct-abdomen",
    cases: int = 6,
    unlabeled: int = 4,
    seed: int = 0,
) -> Path:
    """The datalist path, generating the bundle's default phantom when (and only when) it is missing.

    Raises:
        DataError: ``dataset_dir`` or ``datalist`` is missing and is not the bundle's default phantom folder.
    """
    dataset_dir, datalist = Path(dataset_dir), Path(datalist)
    if datalist.is_file():
        return datalist.resolve()
    is_default = default_dataset_dir is not None and dataset_dir.resolve() == Path(default_dataset_dir).resolve()
    if not is_default:
        what = datalist if dataset_dir.is_dir() else dataset_dir
        raise DataError(what, "does not exist (only the bundle's default phantom folder is generated)")
    from medssl.data.phantoms import ensure_phantom

    logger.info(f"generating the default {phantom} phantom in {dataset_dir} (cases={cases}, unlabeled={unlabeled})")
    generated = Path(ensure_phantom(phantom, dataset_dir, cases=cases, unlabeled=unlabeled, seed=seed))
    if generated.resolve() != datalist.resolve() and not datalist.is_file():
        raise DataError(datalist, f"the phantom datalist was written to {generated}, not here")
    return datalist.resolve()


class FixedRandomDataset(torch.utils.data.Dataset):
    """A dataset whose random transforms draw the same values for item ``i`` every epoch (seed ``seed + i``).

    Used for validation so that the validation loss of randomly corrupted views is comparable across epochs,
    independent of worker count and order.

    Args:
        data: the records.
        transform: a MONAI ``Compose`` (anything with ``set_random_state`` and ``__call__``).
        seed: base seed.
    """

    def __init__(self, data: Sequence, transform: Callable, seed: int = 0) -> None:
        self.data = list(data)
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        self.transform.set_random_state(seed=(self.seed + int(index)) % (2**32))
        return self.transform(dict(self.data[index]))


def reject_reserved(owner: str, kwargs: Mapping[str, Any], keys: Sequence[str]) -> None:
    """Refuse trainer keyword arguments that ``owner`` sets itself (``amp`` and ``amp_kwargs`` follow ``precision``).

    Raises:
        ValueError: naming the first reserved key found in ``kwargs`` and its value.
    """
    for k in keys:
        if k in kwargs:
            hint = " (use precision=...)" if k.startswith("amp") else ""
            raise ValueError(f"{k!r} is set by {owner}{hint}, got {k}={kwargs[k]}")


def backward_and_step(engine: Any, loss: torch.Tensor) -> None:
    """Backward pass and optimizer step of a custom ``_iteration``, firing MONAI's iteration events.

    Scales the loss when the engine holds a GradScaler (fp16 AMP on CUDA). Fires ``BACKWARD_COMPLETED`` after the
    backward pass and ``MODEL_COMPLETED`` after the step (an EMA teacher updates there).
    """
    from monai.engines.utils import IterationEvents

    scaler = getattr(engine, "scaler", None)
    if scaler is not None:
        scaler.scale(loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        scaler.step(engine.optimizer)
        scaler.update()
    else:
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
    engine.fire_event(IterationEvents.MODEL_COMPLETED)
