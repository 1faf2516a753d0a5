"""Ignite handlers of medssl's training bundles, one module per concern (like ``monai.handlers``).

Output handlers (they log or write files) carry the class attribute ``main_process_only = True``;
:func:`medssl.engines.distributed.main_process_only` reads it and attaches them on rank 0 only under torchrun.
"""

from medssl.handlers.batchnorm import BatchNormRecalibration
from medssl.handlers.budget import IterationBudget
from medssl.handlers.checkpoint import BestOfCheckpoint, CheckpointHandler
from medssl.handlers.guards import NonFiniteLossGuard
from medssl.handlers.images import BestOverlaySaver, ImageGridSaver, TensorBoardImageGrid
from medssl.handlers.metrics import MetricHistory, PerClassDiceLogger, RunTensorBoard, ValidationLog
from medssl.handlers.progress import ProgressBar
from medssl.handlers.tracking import MLflowRunLogger

__all__ = [
    "BatchNormRecalibration",
    "BestOfCheckpoint",
    "BestOverlaySaver",
    "CheckpointHandler",
    "ImageGridSaver",
    "IterationBudget",
    "MLflowRunLogger",
    "MetricHistory",
    "NonFiniteLossGuard",
    "PerClassDiceLogger",
    "ProgressBar",
    "RunTensorBoard",
    "TensorBoardImageGrid",
    "ValidationLog",
]
