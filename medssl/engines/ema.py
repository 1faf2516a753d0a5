"""Exponential-moving-average (EMA) teacher for Mean Teacher training.

The teacher's weights are an EMA of the student's (Tarvainen & Valpola, "Mean teachers are better role models",
NeurIPS 2017, https://arxiv.org/abs/1703.01780)::

    alpha(step) = min(1 - 1 / (step + 1), decay)
    teacher     = alpha * teacher + (1 - alpha) * student

``step`` counts optimizer updates from 0, as in the published code (its ``global_step`` is the iteration
counter before it is incremented): the first update has ``alpha = 0`` and copies the student, the early
updates average uniformly, and from step ``1 / (1 - decay) - 1`` on the decay takes over.

Buffers: the published code averages parameters only, and its teacher runs in train mode, so BatchNorm uses
batch statistics and the teacher's running statistics are never meaningful. Here the teacher runs in eval
mode (:func:`make_teacher`), so with ``buffers=True`` (the default) floating-point buffers such as BatchNorm's
``running_mean`` / ``running_var`` are averaged like parameters, and integer buffers (``num_batches_tracked``)
are copied. ``buffers=False`` leaves the teacher's buffers as they were when it was created.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from medssl.dist import unwrap_model

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["ema_alpha", "update_ema", "make_teacher", "teacher_noise", "EMATeacherHandler"]


def ema_alpha(step: int, decay: float = 0.99) -> float:
    """The EMA coefficient ``min(1 - 1 / (step + 1), decay)`` of the update numbered ``step`` (from 0).

    Raises:
        ValueError: ``step < 0`` or ``decay`` outside ``[0, 1]``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")
    return min(1.0 - 1.0 / (step + 1.0), float(decay))


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of ``student`` (unwrapped from DDP / compile) that never receives gradients, in eval mode.

    Eval mode is the policy: the teacher's BatchNorm layers use the EMA'd running statistics (see
    :func:`update_ema`) and dropout is off, so its targets do not depend on the batch composition. UA-MT's
    stochastic passes switch dropout on temporarily (``medssl.losses.consistency.uncertainty_mask``).
    """
    teacher = copy.deepcopy(unwrap_model(student))
    teacher.requires_grad_(False)
    return teacher.eval()


def _matched(kind: str, teacher: Mapping[str, torch.Tensor], student: Mapping[str, torch.Tensor]):
    if teacher.keys() != student.keys():
        only_t = sorted(set(teacher) - set(student))[:3]
        only_s = sorted(set(student) - set(teacher))[:3]
        raise ValueError(f"teacher and student {kind} differ: teacher only {only_t}, student only {only_s}")
    for name, t in teacher.items():
        s = student[name]
        if t.shape != s.shape:
            raise ValueError(f"{kind[:-1]} {name!r}: teacher shape {tuple(t.shape)} != student {tuple(s.shape)}")
        yield t, s


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, alpha: float, *, buffers: bool = True) -> None:
    """In place: ``teacher = alpha * teacher + (1 - alpha) * student`` for every parameter (and buffer).

    Args:
        teacher: the EMA model (same architecture as the student).
        student: the trained model; DDP / compile wrappers are unwrapped.
        alpha: EMA coefficient in ``[0, 1]``, usually :func:`ema_alpha`.
        buffers: also average floating-point buffers (BatchNorm running stats) and copy integer buffers.

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]``, or teacher and student parameter names or shapes differ.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    teacher, student = unwrap_model(teacher), unwrap_model(student)
    weight = 1.0 - float(alpha)
    for t, s in _matched("parameters", dict(teacher.named_parameters()), dict(student.named_parameters())):
        t.lerp_(s.detach().to(t.dtype), weight)
    if buffers:
        for t, s in _matched("buffers", dict(teacher.named_buffers()), dict(student.named_buffers())):
            if t.is_floating_point():
                t.lerp_(s.to(t.dtype), weight)
            else:
                t.copy_(s)


def teacher_noise(
    x: torch.Tensor, std: float = 0.1, clip: float = 0.2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``x + clamp(N(0, std^2), -clip, clip)``: the teacher's input perturbation of Mean Teacher / UA-MT.

    Args:
        x: input batch of any shape, e.g. ``(B, C, H, W, D)``.
        std: noise standard deviation (0 returns ``x`` unchanged).
        clip: bound of the noise magnitude.
        generator: optional generator for reproducible noise.

    Raises:
        ValueError: negative ``std`` or ``clip``.
    """
    if std < 0 or clip < 0:
        raise ValueError(f"std and clip must be >= 0, got std={std!r}, clip={clip!r}")
    if std == 0:
        return x
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * std
    return x + noise.clamp(-clip, clip)


class EMATeacherHandler:
    """MONAI-style handler updating an EMA teacher after every optimizer step of an ignite engine.

    The update after iteration ``i`` (``engine.state.iteration``, counted from 1 by ignite) uses
    ``step = i - 1``, so the first update copies the student (see the module docstring). ``state_dict()`` is the
    teacher's ``state_dict`` (tensors only: save it as ``teacher`` in ``last.pt``, or as a model checkpoint);
    ``load_state_dict()`` restores it strictly. The step needs no saving: it comes from the engine state.

    Args:
        teacher: EMA model, e.g. from :func:`make_teacher`; its parameters are frozen here.
        student: trained model.
        decay: EMA decay (0.99 in Mean Teacher / UA-MT for LA).
        buffers: average floating-point buffers too (see :func:`update_ema`).

    Example::

        handler = EMATeacherHandler(make_teacher(net), net, decay=0.99)
        handler.attach(trainer)  # or attach(trainer, IterationEvents.MODEL_COMPLETED) to run before other handlers
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, decay: float = 0.99, buffers: bool = True) -> None:
        ema_alpha(0, decay)  # validates decay
        self.teacher = teacher
        self.student = student
        self.decay = float(decay)
        self.buffers = bool(buffers)
        self.teacher.requires_grad_(False)

    def attach(self, engine: Engine, event: Any = None) -> None:
        """Run after each iteration (``Events.ITERATION_COMPLETED`` unless another ``event`` is given)."""
        event = Events.ITERATION_COMPLETED if event is None else event
        if not engine.has_event_handler(self, event):
            engine.add_event_handler(event, self)

    def __call__(self, engine: Engine) -> None:
        self.update(engine.state.iteration - 1)

    def update(self, step: int) -> float:
        """EMA update numbered ``step`` (from 0); returns the ``alpha`` used."""
        alpha = ema_alpha(step, self.decay)
        update_ema(self.teacher, self.student, alpha, buffers=self.buffers)
        return alpha

    def state_dict(self) -> dict[str, torch.Tensor]:
        return unwrap_model(self.teacher).state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        unwrap_model(self.teacher).load_state_dict(state_dict, strict=True)
        self.teacher.requires_grad_(False)
