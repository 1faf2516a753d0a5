"""Experiment tracking: MONAI's MLflow handler on a medssl trainer, with validation metrics at the trainer's step.

:class:`MLflowRunLogger` is what ``bundles/tracking_mlflow.yaml`` (MONAI tracking settings) appends to a training
bundle's ``train#handlers``::

    python -m monai.bundle run training \\
        --config_file "['bundles/supervised.yaml','bundles/btcv_unetr.yaml']" \\
        --tracking bundles/tracking_mlflow.yaml

One MLflow run per training run records the parameters (the bundle's shared ids and MONAI's ``max_epochs``,
``epoch_length``), the training loss every iteration, every validation metric at the trainer iteration it was
computed (vector metrics such as ``val_dice_per_class`` one series per element), and at the end ``model.pt``,
``val_metrics.csv`` and the executed config as artefacts. Install the tracking extra first
(``pip install medssl[tracking]``: ``mlflow-skinny`` and the SQLite store it needs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.handlers import MLFlowHandler

__all__ = ["MLflowRunLogger", "newest_match", "scalar_metrics"]


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``{name: float}`` of ignite metrics: scalars as they are, a vector ``v`` as ``name/0``, ``name/1``, ...

    Args:
        metrics: e.g. ``evaluator.state.metrics``; values are numbers, tensors or arrays.

    Raises:
        ValueError: a value with more than one dimension (name and shape in the message).
    """
    out: dict[str, float] = {}
    for name, value in metrics.items():
        t = torch.as_tensor(value).detach().float().cpu()
        if t.ndim == 0:
            out[name] = float(t)
        elif t.ndim == 1:
            out.update({f"{name}/{i}": float(x) for i, x in enumerate(t.tolist())})
        else:
            raise ValueError(f"metric {name!r}: expected a scalar or a vector, got shape {tuple(t.shape)}")
    return out


def newest_match(pattern: str | os.PathLike) -> str | None:
    """The most recently modified file matching the glob ``pattern``, or None."""
    import glob

    found = [p for p in glob.glob(str(pattern)) if os.path.isfile(p)]
    return max(found, key=os.path.getmtime) if found else None


class MLflowRunLogger(MLFlowHandler):
    """MONAI's :class:`~monai.handlers.MLFlowHandler` for a trainer that also logs its evaluator's metrics.

    Attach it to the trainer only (one MLflow run per training run). Each time ``evaluator`` completes, every metric
    in ``evaluator.state.metrics`` is logged at the trainer's iteration (validation may run mid-epoch), vectors one
    element per series (:func:`scalar_metrics`). ``artifacts`` that do not exist when training completes (e.g. no
    ``model.pt`` because no validation ran) are skipped by MONAI's handler.

    Args:
        evaluator: the validation engine, or None.
        artifacts: files logged when training completes; a pattern with ``*`` names its newest match at
            construction (``config_*.json``: the executed config MONAI writes just before the handler is built).
        args, kwargs: :class:`~monai.handlers.MLFlowHandler`'s (``tracking_uri``, ``experiment_name``,
            ``artifacts``, ``experiment_param``, ``output_transform``, ...).
    """

    main_process_only = True  # logs / writes files: attached on rank 0 only (medssl.engines.distributed)

    def __init__(self, *args: Any, evaluator: Any = None, artifacts: Sequence[str | os.PathLike] | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        kept = [newest_match(a) if "*" in str(a) else str(a) for a in (artifacts or []) if a]
        super().__init__(*args, artifacts=[a for a in kept if a] or None, **kwargs)
        self.evaluator = evaluator

    def attach(self, engine: Any) -> None:
        """Attach MONAI's events to the trainer and log the evaluator's metrics at the trainer's iteration."""
        from ignite.engine import Events

        super().attach(engine)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, lambda ev: self.log_validation(engine, ev))

    def log_validation(self, trainer: Any, evaluator: Any) -> None:
        """Log ``evaluator.state.metrics`` at ``trainer.state.iteration`` (nothing before the run has started)."""
        if self.cur_run is None or not evaluator.state.metrics:
            return
        self._log_metrics(scalar_metrics(evaluator.state.metrics), step=trainer.state.iteration)
