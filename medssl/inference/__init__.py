"""Inference: segment NIfTI / NRRD / MetaImage scans with a medssl checkpoint, on exactly the input grid.

* :mod:`~medssl.inference.predictor`: :class:`Predictor` and :func:`infer` (``medssl infer``).
* :mod:`~medssl.inference.window`: memory-bounded sliding window that emits labels slab by slab.
* :mod:`~medssl.inference.grid`: separable model-grid → input-grid inversion of labels and probabilities.
* :mod:`~medssl.inference.volume`: finding, reading and atomically writing volumes.
"""

from medssl.inference.predictor import InferenceReport, Prediction, Predictor, infer
from medssl.inference.window import sliding_window_segment

__all__ = ["Predictor", "Prediction", "InferenceReport", "infer", "sliding_window_segment"]
