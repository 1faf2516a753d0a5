"""EMA teacher: coefficient, numerics for parameters and BatchNorm buffers, noise, handler and its state."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from medssl.engines.ema import EMATeacherHandler, ema_alpha, make_teacher, teacher_noise, update_ema


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.BatchNorm3d(3), nn.ReLU(), nn.Conv3d(3, 2, 1))


def _train_step(net: nn.Module, lr: float = 0.1) -> None:
    """One SGD step in train mode: changes parameters and BatchNorm running stats."""
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    x = torch.randn(2, 1, 4, 4, 4) * 3 + 1
    net(x).square().mean().backward()
    opt.step()


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize(
    "step, decay, expected",
    [
        (0, 0.99, 0.0),
        (1, 0.99, 0.5),
        (3, 0.99, 0.75),
        (49, 0.99, 0.98),
        (98, 0.99, 1 - 1 / 99),
        (99, 0.99, 0.99),
        (5000, 0.99, 0.99),
    ],
)
def test_ema_alpha(step, decay, expected):
    assert ema_alpha(step, decay) == pytest.approx(expected)


def test_ema_alpha_rejects_bad_values():
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        ema_alpha(-1)
    with pytest.raises(ValueError, match="decay must be in"):
        ema_alpha(3, 1.5)


def test_make_teacher_is_frozen_eval_copy():
    student = _net()
    teacher = make_teacher(student)
    assert not teacher.training and student.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for (name, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(t, s), name
        assert t.data_ptr() != s.data_ptr(), name


def test_update_ema_matches_hand_computation_params_and_buffers():
    student = _net()
    teacher = make_teacher(student)
    _train_step(student)
    _train_step(student)
    before_t, before_s = _state(teacher), _state(student)
    alpha = 0.7
    update_ema(teacher, student, alpha)
    after = teacher.state_dict()
    for name, value in after.items():
        if name.endswith("num_batches_tracked"):
            assert value.item() == before_s[name].item() == 2  # integer buffer copied
        else:
            assert torch.allclose(value, alpha * before_t[name] + (1 - alpha) * before_s[name], atol=1e-6), name
    # running stats actually changed, so the buffer check above is not comparing equal numbers
    assert not torch.allclose(before_t["1.running_mean"], before_s["1.running_mean"])


def test_update_ema_buffers_false_leaves_buffers():
    student = _net()
    teacher = make_teacher(student)
    _train_step(student)
    before_t, before_s = _state(teacher), _state(student)
    update_ema(teacher, student, 0.5, buffers=False)
    for name, _ in teacher.named_buffers():
        assert torch.equal(teacher.state_dict()[name], before_t[name]), name
    w = "0.weight"
    assert torch.allclose(teacher.state_dict()[w], 0.5 * before_t[w] + 0.5 * before_s[w])


def test_first_step_copies_student():
    student = _net()
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)  # teacher differs everywhere
    _train_step(student)
    update_ema(teacher, student, ema_alpha(0))
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, student.state_dict()[name]), name


def test_update_ema_rejects_mismatch():
    with pytest.raises(ValueError, match="teacher and student parameters differ"):
        update_ema(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.5)
    with pytest.raises(ValueError, match=r"teacher shape \(3, 2\) != student \(2, 2\)"):
        update_ema(nn.Linear(2, 3), nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match="alpha must be in"):
        update_ema(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)


def test_teacher_noise_is_bounded_and_centered():
    x = torch.zeros(20000)
    y = teacher_noise(x, std=0.1, clip=0.2, generator=torch.Generator().manual_seed(0))
    assert y.abs().max() <= 0.2 + 1e-7
    assert y.abs().max() == pytest.approx(0.2)  # ~4.6% of N(0, 0.1) samples exceed 0.2 and are clamped
    assert abs(y.mean().item()) < 0.005
    assert 0.08 < y.std().item() < 0.1  # clamping shrinks the spread slightly below 0.1
    assert teacher_noise(x, std=0.0) is x
    with pytest.raises(ValueError, match="std=-1"):
        teacher_noise(x, std=-1)


def test_handler_steps_with_engine_iteration_and_state_dict_roundtrip():
    student = _net()
    teacher = make_teacher(student)
    handler = EMATeacherHandler(teacher, student, decay=0.99)
    reference = copy.deepcopy(teacher)
    calls = []
    engine = SimpleNamespace(
        state=SimpleNamespace(iteration=0),
        has_event_handler=lambda h, e: False,
        add_event_handler=lambda e, h: calls.append((e, h)),
    )
    handler.attach(engine, event="custom")
    assert calls == [("custom", handler)]
    for it in (1, 2, 3):
        _train_step(student)
        engine.state.iteration = it
        handler(engine)
        update_ema(reference, student, ema_alpha(it - 1, 0.99))
    for name, value in teacher.state_dict().items():
        assert torch.allclose(value, reference.state_dict()[name]), name
    assert not torch.allclose(teacher.state_dict()["0.weight"], student.state_dict()["0.weight"])  # α>0 after step 0

    saved = {k: v.clone() for k, v in handler.state_dict().items()}
    _train_step(student)
    handler.update(10)
    restored = EMATeacherHandler(make_teacher(_net()), student)
    restored.load_state_dict(saved)
    for name, value in restored.teacher.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert all(not p.requires_grad for p in restored.teacher.parameters())


def test_update_ema_unwraps_data_parallel():
    student = _net()
    teacher = make_teacher(nn.DataParallel(student))
    assert isinstance(teacher, nn.Sequential)
    _train_step(student)
    update_ema(teacher, nn.DataParallel(student), 0.0)
    assert torch.equal(teacher.state_dict()["0.weight"], student.state_dict()["0.weight"])
