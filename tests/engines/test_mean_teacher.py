"""Mean Teacher: one iteration's losses, the trainer's iteration, and a tiny trainer run (the latter needs ignite)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.inferers import SimpleInferer
from torch import nn

from medssl.data.samplers import PLACEHOLDER_LABEL, TwoStreamBatchSampler, TwoStreamCollate, two_stream_items
from medssl.engines.ema import EMATeacherHandler, ema_alpha, make_teacher, update_ema
from medssl.engines.mean_teacher import MeanTeacherTrainer, batchnorm_batch_statistics, mean_teacher_losses
from medssl.errors import ConfigError, DataError
from medssl.losses.consistency import ConsistencyWeight

SIZE = 16
LBS = 2


def _net(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.Dropout3d(dropout),
        nn.Conv3d(4, 2, 1),
    )


def _batch(seed: int = 0, n: int = 4, lbs: int = LBS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, SIZE, SIZE, SIZE, generator=g)
    labels = (images > 0.5).float()  # learnable: foreground where the intensity is high
    labels[lbs:] = PLACEHOLDER_LABEL
    return images, labels


def _losses(student, teacher, images, labels, **kw):
    from monai.losses import DiceCELoss

    args = dict(
        step=0,
        labeled_batch_size=LBS,
        supervised_loss=DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.5, lambda_dice=0.5),
        consistency_weight=ConsistencyWeight(consistency=1.0, rampup_length=0),
    )
    args.update(kw)
    return mean_teacher_losses(student, teacher, images, labels, **args)


def test_losses_parts_and_gradients():
    student = _net()
    teacher = make_teacher(_net(seed=1))
    images, labels = _batch()
    parts = _losses(student, teacher, images, labels, consistency_weight=ConsistencyWeight())
    assert parts["pred"].shape == (4, 2, SIZE, SIZE, SIZE)
    w = ConsistencyWeight()(0)
    assert parts["consistency_weight"] == pytest.approx(w)
    assert parts["consistency"] > 0
    assert parts["loss"].item() == pytest.approx(parts["supervised"].item() + w * parts["consistency"].item(), rel=1e-6)
    parts["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_supervised_part_ignores_unlabeled_labels_and_consistency_only_unlabeled():
    student, teacher = _net(), make_teacher(_net(seed=1))
    images, labels = _batch()
    torch.manual_seed(5)
    a = _losses(student, teacher, images, labels)
    other = labels.clone()
    other[LBS:] = 1.0  # what the unlabeled part's labels say must not matter
    other_images = images.clone()
    torch.manual_seed(5)
    b = _losses(student, teacher, other_images, other)
    assert a["supervised"].item() == pytest.approx(b["supervised"].item(), rel=1e-6)
    # the teacher sees the unlabeled part only: changing a labeled image leaves the consistency term unchanged
    # (BatchNorm in train mode couples the student's batch, so compare with the consistency computed by hand on
    # the unlabeled cases: an eval-mode student, the teacher on its input batch's statistics)
    student.eval()
    torch.manual_seed(5)
    c = _losses(student, teacher, images, labels, noise=None)

    def teacher_ref(x):
        with torch.no_grad(), batchnorm_batch_statistics(teacher):
            return teacher(x)

    ref = (torch.softmax(student(images[LBS:]), 1) - torch.softmax(teacher_ref(images[LBS:]), 1)).pow(2).mean()
    assert c["consistency"].item() == pytest.approx(ref.item(), rel=1e-5)
    d = _losses(student, teacher, images, labels, noise=None, teacher_input="all")
    ref_all = (torch.softmax(student(images), 1) - torch.softmax(teacher_ref(images), 1)).pow(2).mean()
    assert d["consistency"].item() == pytest.approx(ref_all.item(), rel=1e-5)


def test_identical_teacher_without_noise_gives_zero_consistency():
    student = _net()  # train mode and the whole batch for both: the student's BatchNorm matches the teacher's
    teacher = make_teacher(student)
    images, labels = _batch()
    parts = _losses(student, teacher, images, labels, noise=None, teacher_input="all")
    assert parts["consistency"].item() == pytest.approx(0.0, abs=1e-10)
    noisy = _losses(student, teacher, images, labels, teacher_input="all")
    assert noisy["consistency"].item() > 0


def test_uamt_mask_parts():
    student, teacher = _net(), make_teacher(_net(seed=1, dropout=0.3))
    images, labels = _batch()
    parts = _losses(student, teacher, images, labels, step=50, uncertainty_max_steps=100, uncertainty_passes=4)
    assert 0.0 <= parts["mask_fraction"] <= 1.0
    assert parts["uncertainty_threshold"] == pytest.approx(
        (0.75 + 0.25 * torch.exp(torch.tensor(-1.25)).item()) * 0.6931, rel=1e-3
    )
    parts["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_uamt_target_pass_runs_with_dropout_as_published(monkeypatch):
    """UA-MT's EMA model stays in train mode: its target is stochastic; plain Mean Teacher's target is not."""
    import medssl.engines.mean_teacher as mt

    # an all-ones mask: the consistency then depends on the target pass only
    monkeypatch.setattr(mt, "uncertainty_mask", lambda teacher, x, *a, **k: (torch.ones_like(x[:, :1]), None))
    student, teacher = _net(), make_teacher(_net(seed=1, dropout=0.5))
    student.eval()  # a deterministic student, so only the teacher's target can change the consistency
    images, labels = _batch()
    kw = dict(noise=None)
    plain = [_losses(student, teacher, images, labels, **kw)["consistency"].item() for _ in range(2)]
    assert plain[0] == plain[1]
    uamt = dict(kw, step=50, uncertainty_max_steps=100, uncertainty_passes=2)
    torch.manual_seed(0)
    a = _losses(student, teacher, images, labels, **uamt)
    torch.manual_seed(1)
    b = _losses(student, teacher, images, labels, **uamt)
    assert a["consistency"].item() != b["consistency"].item()
    assert not any(m.training for m in teacher.modules() if isinstance(m, nn.Dropout3d))  # restored afterwards


def test_losses_reject_bad_batches():
    student, teacher = _net(), make_teacher(_net())
    images, labels = _batch()
    swapped = labels.flip(0)  # unlabeled cases first: the labeled part holds placeholders
    with pytest.raises(DataError, match="should be labeled but hold placeholder labels"):
        _losses(student, teacher, images, swapped)
    with pytest.raises(DataError, match="has no unlabeled part"):
        _losses(student, teacher, images[:2], labels[:2])
    with pytest.raises(ConfigError, match="unknown consistency 'l2'"):
        _losses(student, teacher, images, labels, consistency="l2")
    with pytest.raises(ConfigError, match="unknown teacher_input 'labeled'"):
        _losses(student, teacher, images, labels, teacher_input="labeled")


def _fake_engine(student, teacher, optimizer, iteration):
    """The attributes ``MeanTeacherTrainer._iteration`` reads, without an ignite engine."""
    from monai.losses import DiceCELoss

    ema = EMATeacherHandler(teacher, student, decay=0.99)
    events = []

    def fire_event(event):
        events.append(event)
        if event == IterationEvents.MODEL_COMPLETED:
            ema(engine)

    engine = SimpleNamespace(
        state=SimpleNamespace(device=torch.device("cpu"), iteration=iteration, output=None),
        prepare_batch=default_prepare_batch,
        non_blocking=False,
        to_kwargs={},
        labeled_batch_size=LBS,
        network=student,
        teacher=teacher,
        optimizer=optimizer,
        optim_set_to_none=False,
        precision="fp32",
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.5, lambda_dice=0.5),
        consistency="mse",
        consistency_weight=ConsistencyWeight(),
        teacher_input="unlabeled",
        noise=None,
        uncertainty_max_steps=None,
        uncertainty_passes=8,
        inferer=SimpleInferer(),
        amp=False,
        scaler=None,
        fire_event=fire_event,
        events=events,
    )
    return engine


def test_trainer_iteration_updates_student_then_teacher():
    student = _net()
    teacher = make_teacher(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    reference = copy.deepcopy(teacher)
    w0 = copy.deepcopy(student.state_dict())
    losses = []
    for it in (1, 2, 3):
        engine = _fake_engine(student, teacher, optimizer, it)
        images, labels = _batch(seed=it)
        out = MeanTeacherTrainer._iteration(engine, engine, {"image": images, "label": labels})
        update_ema(reference, student, ema_alpha(it - 1))
        losses.append(out["supervised"].item())
        assert engine.events == [
            IterationEvents.FORWARD_COMPLETED,
            IterationEvents.LOSS_COMPLETED,
            IterationEvents.BACKWARD_COMPLETED,
            IterationEvents.MODEL_COMPLETED,
        ]
        assert out["image"].shape[0] == out["label"].shape[0] == out["pred"].shape[0] == LBS
        assert (out["label"] >= 0).all()
        assert out["consistency_weight"] == pytest.approx(ConsistencyWeight()(it - 1))
        assert {"loss", "supervised", "consistency"} <= set(out)
    assert any(not torch.equal(w0[k], v) for k, v in student.state_dict().items())
    for name, value in teacher.state_dict().items():
        assert torch.allclose(value, reference.state_dict()[name], atol=1e-6), name
    assert not torch.allclose(teacher.state_dict()["0.weight"], student.state_dict()["0.weight"])
    assert all(p.grad is None for p in teacher.parameters())


def test_training_reduces_supervised_loss():
    student = _net()
    teacher = make_teacher(student)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.02)
    images, labels = _batch(seed=7)
    history = []
    for it in range(1, 16):
        engine = _fake_engine(student, teacher, optimizer, it)
        history.append(MeanTeacherTrainer._iteration(engine, engine, {"image": images, "label": labels})["supervised"])
    assert history[-1] < 0.8 * history[0]


def _items(n_labeled: int = 3, n_unlabeled: int = 3):
    g = torch.Generator().manual_seed(0)
    labeled = []
    for _ in range(n_labeled):
        image = torch.randn(1, SIZE, SIZE, SIZE, generator=g)
        labeled.append({"image": image, "label": (image > 0.5).float()})
    unlabeled = [{"image": torch.randn(1, SIZE, SIZE, SIZE, generator=g)} for _ in range(n_unlabeled)]
    return two_stream_items(labeled, unlabeled)


def test_trainer_run_changes_student_and_teacher():
    pytest.importorskip("ignite")
    from ignite.engine import Events

    items, lab, unlab = _items(4, 3)
    sampler = TwoStreamBatchSampler(lab, unlab, batch_size=4, labeled_batch_size=LBS, seed=0)
    loader = torch.utils.data.DataLoader(items, batch_sampler=sampler, collate_fn=TwoStreamCollate())
    student = _net(dropout=0.2)
    w0 = copy.deepcopy(student.state_dict())
    trainer = MeanTeacherTrainer(
        device="cpu",
        max_epochs=2,
        train_data_loader=loader,
        network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9),
        labeled_batch_size=LBS,
        uncertainty=True,
        uncertainty_passes=2,
    )
    snapshots, outputs, epochs = [], [], []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: snapshots.append(copy.deepcopy(e.network.state_dict()))
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs.append(sampler.epoch))
    trainer.run()

    assert trainer.state.iteration == 4 and len(snapshots) == 4  # 2 epochs of 4 // 2 batches
    assert epochs == [2, 3]  # set_epoch(1), set_epoch(2) from the engine, then iter() advanced
    assert any(not torch.equal(w0[k], v) for k, v in student.state_dict().items())
    reference = make_teacher(_net(dropout=0.2))
    reference.load_state_dict(w0)
    for i, snap in enumerate(snapshots):
        replica = make_teacher(_net(dropout=0.2))
        replica.load_state_dict(snap)
        update_ema(reference, replica, ema_alpha(i, 0.99))
    for name, value in trainer.teacher.state_dict().items():
        assert torch.allclose(value, reference.state_dict()[name], atol=1e-6), name
    for out in outputs:
        row = out[0] if isinstance(out, list) else out  # decollated by default
        for key in ("loss", "supervised", "consistency", "consistency_weight", "mask_fraction"):
            assert key in row


def test_trainer_rejects_inconsistent_settings():
    pytest.importorskip("ignite")
    items, lab, unlab = _items()
    sampler = TwoStreamBatchSampler(lab, unlab, batch_size=3, labeled_batch_size=1)
    loader = torch.utils.data.DataLoader(items, batch_sampler=sampler, collate_fn=TwoStreamCollate())
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="trainer has 2 but the batch sampler 1"):
        MeanTeacherTrainer("cpu", 1, loader, net, opt, labeled_batch_size=2)
    with pytest.raises(ConfigError, match="accumulation_steps"):
        MeanTeacherTrainer("cpu", 1, loader, net, opt, labeled_batch_size=1, accumulation_steps=2)


@pytest.mark.native_bf16
def test_trainer_iteration_bf16_on_cpu():
    student = _net()
    teacher = make_teacher(student)
    w0 = copy.deepcopy(student.state_dict())
    engine = _fake_engine(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), 1)
    engine.precision = "bf16"
    images, labels = _batch()
    out = MeanTeacherTrainer._iteration(engine, engine, {"image": images, "label": labels})
    assert out["pred"].dtype == torch.bfloat16  # the forward ran under autocast
    assert torch.isfinite(out["loss"]) and out["consistency"].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert any(not torch.equal(w0[k], v) for k, v in student.state_dict().items())


def test_teacher_and_student_evaluators():
    pytest.importorskip("ignite")
    from medssl.engines.mean_teacher import make_teacher_student_evaluators

    images, labels = _batch(seed=3, n=2, lbs=2)
    val = [{"image": images[i], "label": labels[i]} for i in range(2)]
    loader = torch.utils.data.DataLoader(val, batch_size=1)
    student = _net().eval()
    teacher = make_teacher(_net(seed=1))
    evaluators = make_teacher_student_evaluators("cpu", loader, {"student": student, "teacher": teacher}, num_classes=2)
    scores = {}
    for name, evaluator in evaluators.items():
        evaluator.run()
        scores[name] = evaluator.state.metrics["val_mean_dice"]
    assert set(scores) == {"student", "teacher"}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert scores["student"] != scores["teacher"]  # each evaluator ran its own network
    ref = {}
    for name, net in (("student", student), ("teacher", teacher)):
        with torch.no_grad():
            pred = net(images).argmax(1)
        fg = labels[:, 0] == 1
        dice = [(2 * (pred[i] == 1)[fg[i]].sum() / ((pred[i] == 1).sum() + fg[i].sum())).item() for i in range(2)]
        ref[name] = sum(dice) / 2
    assert scores == pytest.approx(ref, rel=1e-4)


def _run_trainer(max_epochs: int, resume_from: dict | None = None) -> tuple[MeanTeacherTrainer, dict]:
    from medssl.checkpoint import capture_rng_state, restore_rng_state

    items, lab, unlab = _items(4, 3)
    sampler = TwoStreamBatchSampler(lab, unlab, batch_size=4, labeled_batch_size=LBS, seed=0)
    loader = torch.utils.data.DataLoader(items, batch_sampler=sampler, collate_fn=TwoStreamCollate())
    student = _net(dropout=0.2)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    trainer = MeanTeacherTrainer("cpu", max_epochs, loader, student, optimizer, labeled_batch_size=LBS)
    torch.manual_seed(123)
    if resume_from is not None:
        student.load_state_dict(resume_from["network"])
        optimizer.load_state_dict(resume_from["optimizer"])
        trainer.ema_handler.load_state_dict(resume_from["teacher"])
        trainer.state.epoch, trainer.state.iteration = resume_from["epoch"], resume_from["iteration"]
        restore_rng_state(resume_from["rng"])
    trainer.run()
    state = {
        "network": copy.deepcopy(student.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "teacher": copy.deepcopy(trainer.ema_handler.state_dict()),
        "epoch": trainer.state.epoch,
        "iteration": trainer.state.iteration,
        "rng": capture_rng_state(),
    }
    return trainer, state


def test_resume_reproduces_student_and_teacher_exactly():
    pytest.importorskip("ignite")
    _, straight = _run_trainer(max_epochs=3)
    _, first = _run_trainer(max_epochs=1)
    assert first["iteration"] == 2
    _, resumed = _run_trainer(max_epochs=3, resume_from=first)
    assert resumed["iteration"] == straight["iteration"] == 6
    for key in ("network", "teacher"):
        for name, value in straight[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)
    assert not all(torch.equal(v, first["teacher"][k]) for k, v in straight["teacher"].items())


def test_teacher_batchnorm_uses_batch_statistics_without_touching_running_stats():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1))
    teacher = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1))
    teacher.load_state_dict(student.state_dict())
    # running statistics far from the data: an eval-mode forward would normalise wrongly
    teacher[1].running_mean.fill_(50.0)
    teacher[1].running_var.fill_(1e-3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    images = torch.randn(4, 1, 8, 8, 8) * 3 + 1
    labels = torch.zeros(4, 1, 8, 8, 8, dtype=torch.long)
    consistency = mean_teacher_losses(
        student,
        teacher,
        images,
        labels,
        step=1000,
        labeled_batch_size=2,
        supervised_loss=lambda p, y: p.mean() * 0,
        noise=None,
    )["consistency"]
    for k, v in teacher.state_dict().items():  # no running-stat update, no mode change left behind
        assert torch.equal(v, before[k]), k
    assert not teacher.training and not teacher[1].training
    # with batch statistics the teacher's BN output equals a train-mode forward of a copy
    with torch.no_grad(), batchnorm_batch_statistics(teacher):
        t_batch = teacher(images[2:])
    ref = nn.functional.batch_norm(teacher[0](images[2:]), None, None, teacher[1].weight, teacher[1].bias, True)
    assert torch.allclose(t_batch, teacher[3](teacher[2](ref)), atol=1e-5)
    with torch.no_grad():
        student_unlabeled = torch.softmax(student(images)[2:], 1)  # train mode: the whole batch's statistics
        t_eval = teacher(images[2:])
    by_hand = (student_unlabeled - torch.softmax(t_batch, 1)).pow(2).mean()
    assert consistency.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert not torch.isclose(consistency, (student_unlabeled - torch.softmax(t_eval, 1)).pow(2).mean())
