"""S5CL resume is exact: the labeled stream's position and the pseudo-label switch step survive a restart.

The labeled loader is cycled inside :class:`~medssl.engines.s5cl.S5CLTrainer`, outside ignite's view, so a resume
used to start a fresh labeled pass (other batches, another shuffle drawn from the restored global RNG) and to
record the first resumed step as the pseudo-label switch. Here a run is stopped mid labeled pass and after the
switch, rebuilt from scratch in a "new process" (other global RNG), resumed from ``last.pt`` and compared with an
unbroken run: same labeled batches at every step, same switch step, bitwise equal weights and optimizer state.
"""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, RandGaussianNoised

from medssl.checkpoint import load_checkpoint
from medssl.engines.s5cl import S5CLTrainer
from medssl.handlers import CheckpointHandler
from medssl.networks.s5cl import S5CLClassifier

SIZE = 8
STEPS_PER_EPOCH = 4  # unlabeled: 8 items, batch 2
LABELED_BATCHES = 3  # labeled: 6 items, batch 2, so epochs end mid labeled pass
SWITCH_AT = 6  # pseudo_label_start=5
NET_CONFIG = {"_target_": "medssl.networks.s5cl.S5CLClassifier", "num_classes": 3}


def _items(n: int, seed: int, labeled: bool) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        y = int(torch.randint(0, 3, (), generator=g))
        x = y + 0.3 * torch.randn(1, SIZE, SIZE, SIZE, generator=g)
        item = {"id": i, "image_weak": x, "image_strong": x.clone()}
        item["label" if labeled else "true_label"] = y
        out.append(item)
    return out


def _build(out_dir, max_epochs: int, resume: bool, seed: int = 123):
    """Everything a bundle builds after ``seed_everything(seed)``; returns the trainer and what the test watches."""
    torch.manual_seed(seed)
    transform = Compose([RandGaussianNoised(keys="image_strong", prob=1.0, std=0.1)]).set_random_state(seed)
    labeled = DataLoader(Dataset(_items(2 * LABELED_BATCHES, 1, True), transform), batch_size=2, shuffle=True)
    unlabeled = DataLoader(Dataset(_items(2 * STEPS_PER_EPOCH, 2, False)), batch_size=2, shuffle=True)
    net = S5CLClassifier(num_classes=3, img_size=SIZE, encoder="resnet10", widen_factor=0.125, proj_dim=16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    handler = CheckpointHandler(
        out_dir, net, NET_CONFIG, "s5cl_classification", optimizer=opt, train_transform=transform, resume=resume
    )
    trainer = S5CLTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=unlabeled,
        labeled_data_loader=labeled,
        network=net,
        optimizer=opt,
        pseudo_label_start=SWITCH_AT - 1,
        train_handlers=[handler],
    )
    steps: dict[int, tuple[list[int], float]] = {}  # step -> (labeled ids, labeled strong-view sum)
    original = trainer._next_labeled

    def spy(draw=None):
        batch = original() if draw is None else original(draw)
        steps[trainer.state.iteration] = (batch["id"].tolist(), float(batch["image_strong"].sum()))
        return batch

    trainer._next_labeled = spy
    return trainer, net, opt, steps


def test_resume_mid_labeled_pass_and_after_the_switch_is_exact(tmp_path):
    straight, net_a, opt_a, steps_a = _build(tmp_path / "a", 4, resume=False)
    straight.run()
    assert straight.state.iteration == 4 * STEPS_PER_EPOCH
    assert straight.state.pseudo_label_switch_step == SWITCH_AT

    first, _, _, steps_b = _build(tmp_path / "b", 2, resume=False)
    first.run()
    saved = load_checkpoint(tmp_path / "b" / "last.pt")
    assert saved["progress"] == {"epoch": 2, "iteration": 8}
    assert 8 % LABELED_BATCHES != 0, "the stop must fall inside a labeled pass"
    assert steps_b and all(steps_b[i] == steps_a[i] for i in steps_b)  # same start as the unbroken run

    second, net_b, opt_b, steps_c = _build(tmp_path / "b", 4, resume=True)
    torch.manual_seed(999)  # a new process: another global RNG state until the restore
    seen = {}
    second.add_event_handler(
        Events.ITERATION_STARTED(once=9), lambda e: seen.update(switch=e.state.pseudo_label_switch_step)
    )
    second.run()
    assert seen["switch"] == SWITCH_AT  # set from the restored step at STARTED, not re-recorded at step 9
    assert second.state.pseudo_label_switch_step == SWITCH_AT
    assert sorted(steps_c) == list(range(9, 17))
    for step in steps_c:  # the same labeled batches, with the same random augmentation, at every resumed step
        assert steps_c[step] == steps_a[step], f"step {step}: {steps_c[step]} != {steps_a[step]}"
    for k, v in net_a.state_dict().items():
        assert torch.equal(net_b.state_dict()[k], v), k
    for (ka, a), (kb, b) in zip(opt_a.state_dict()["state"].items(), opt_b.state_dict()["state"].items()):
        assert ka == kb and all(torch.equal(a[n], b[n]) for n in a), ka


def test_labeled_passes_are_reshuffled_and_independent_of_the_global_rng(tmp_path):
    trainer, *_ = _build(tmp_path, 1, resume=False)
    passes = []
    for p in range(3):
        torch.manual_seed(p)  # the global RNG must not matter
        passes.append([b["id"].tolist() for b in trainer._labeled_pass(p)])
    again = [b["id"].tolist() for b in trainer._labeled_pass(1)]
    assert again == passes[1]
    assert passes[0] != passes[1] or passes[1] != passes[2], passes  # reshuffled per pass
    assert all(sorted(sum(p, [])) == list(range(2 * LABELED_BATCHES)) for p in passes)  # each pass sees all


@pytest.mark.parametrize("draw", [0, 2, 3, 7])
def test_seek_gives_the_batch_of_an_unbroken_stream(tmp_path, draw):
    trainer, *_ = _build(tmp_path, 1, resume=False)
    trainer.labeled_data_loader.dataset.transform = lambda x: x  # ids only: transform draws are not in question here
    unbroken = [trainer._next_labeled()["id"].tolist() for _ in range(draw + 2)]
    fresh, *_ = _build(tmp_path, 1, resume=False)
    fresh.labeled_data_loader.dataset.transform = lambda x: x
    assert [fresh._next_labeled(draw)["id"].tolist(), fresh._next_labeled()["id"].tolist()] == unbroken[draw:]
