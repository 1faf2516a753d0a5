"""S5CLTrainer: temperature hierarchy, pseudo-label switch step, token labels, learning; pseudo-labels from the
classifier's input and the per-module optimizer (the networks: tests/networks/test_s5cl.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from medssl.data.patches import token_majority_labels
from medssl.engines.s5cl import S5CLTrainer, check_temperatures, s5cl_optimizer
from medssl.errors import ConfigError
from medssl.networks.s5cl import S5CLClassifier, S5CLTokenNet, s5cl_network

SIZE = 8


def _cls_batches(n_batches: int, batch: int, classes: int = 3, seed: int = 0, hidden_label: bool = True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, classes, (batch,), generator=g)
        # class-dependent mean intensity: learnable in a few steps
        x = y.float()[:, None, None, None, None] + 0.3 * torch.randn(batch, 1, SIZE, SIZE, SIZE, generator=g)
        item = {"image_weak": x, "image_strong": x + 0.1 * torch.randn(x.shape, generator=g)}
        item["true_label" if hidden_label else "label"] = y
        out.append(item)
    return out


def _cls_net(seed: int = 0) -> S5CLClassifier:
    torch.manual_seed(seed)
    return S5CLClassifier(num_classes=3, img_size=SIZE, encoder="resnet10", widen_factor=0.125, proj_dim=16)


def _trainer(net, unlabeled, labeled, **kw) -> S5CLTrainer:
    opt = torch.optim.Adam(net.parameters(), lr=kw.pop("lr", 1e-3))
    return S5CLTrainer(
        device="cpu",
        max_epochs=kw.pop("max_epochs", 2),
        train_data_loader=unlabeled,
        labeled_data_loader=labeled,
        network=net,
        optimizer=opt,
        **kw,
    )


def _spy(trainer: S5CLTrainer, name: str) -> list[tuple]:
    """Replace ``trainer.<name>`` (a SupConLoss) by a wrapper recording ``(features, labels, mask)`` of each call."""
    calls: list[tuple] = []
    original = getattr(trainer, name)

    def spy(features, labels=None, mask=None):
        calls.append((features, labels, mask))
        return original(features, labels, mask=mask)

    setattr(trainer, name, spy)
    return calls


def _record(trainer: S5CLTrainer, *keys: str) -> list[dict]:
    seen: list[dict] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append({k: e.state.output.get(k) for k in keys})
    )
    return seen


@pytest.mark.parametrize("tl, tu", [(0.2, 0.2), (0.7, 0.2), (0.5, 0.1)])
def test_temperature_hierarchy_is_enforced(tl, tu):
    with pytest.raises(ConfigError, match="temperature_unlabeled") as err:
        check_temperatures(tl, tu)
    assert f"temperature_unlabeled={tu}" in str(err.value) and f"temperature_labeled={tl}" in str(err.value)
    with pytest.raises(ConfigError, match="temperature_unlabeled"):
        _trainer(
            _cls_net(),
            _cls_batches(1, 2),
            _cls_batches(1, 2, hidden_label=False),
            temperature_labeled=tl,
            temperature_unlabeled=tu,
        )
    check_temperatures(0.2, 0.7)  # the published setting is accepted


def test_bad_configuration():
    with pytest.raises(ConfigError, match="mode"):
        _trainer(_cls_net(), [], [], mode="detection")
    with pytest.raises(ConfigError, match="num_classes"):
        _trainer(_cls_net(), [], [], mode="segmentation")
    with pytest.raises(ConfigError, match="pseudo_label_start"):
        _trainer(_cls_net(), [], [], pseudo_label_start=-1)


@pytest.mark.parametrize("start, expected", [(2, 3), (0, 1), (None, 4)])  # None: one epoch = 3 steps
def test_switch_to_pseudo_labels_at_the_configured_step(start, expected):
    trainer = _trainer(_cls_net(), _cls_batches(3, 4), _cls_batches(1, 3, hidden_label=False), pseudo_label_start=start)
    spied = _spy(trainer, "unlabeled_loss")
    seen = _record(trainer, "pseudo_labels", "pseudo_label_accuracy")
    trainer.run()
    calls = [labels for _, labels, _ in spied]
    assert [s["pseudo_labels"] for s in seen] == [float(i >= expected) for i in range(1, 7)]
    assert trainer.state.pseudo_label_switch_step == expected
    # instance contrast (no labels) before the switch, the classifier's labels after it
    assert [c is None for c in calls] == [i < expected for i in range(1, 7)]
    assert all(c.shape == (4,) and c.max() < 3 for c in calls if c is not None)
    assert seen and all(0.0 <= s["pseudo_label_accuracy"] <= 1.0 for s in seen)  # true labels are in the batch


def test_confidence_threshold_masks_pseudo_labels():
    trainer = _trainer(
        _cls_net(),
        _cls_batches(2, 4),
        _cls_batches(1, 3, hidden_label=False),
        pseudo_label_start=0,
        confidence_threshold=0.99,
    )
    spied = _spy(trainer, "unlabeled_loss")
    seen = _record(trainer, "pseudo_label_confident")
    trainer.run()
    masks = [mask for _, _, mask in spied]
    # an untrained 3-class head is never 99 % sure: every unlabeled sample stays an instance
    assert masks and all(m is not None and not m.any() for m in masks)
    assert seen and all(s["pseudo_label_confident"] == 0.0 for s in seen)


def test_training_learns_and_cycles_the_labeled_loader():
    net = _cls_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    labeled = _cls_batches(2, 6, hidden_label=False, seed=1)
    trainer = _trainer(net, _cls_batches(5, 6, seed=2), labeled, max_epochs=6, lr=3e-3, pseudo_label_start=10)
    seen = _record(trainer, "loss", "loss_labeled", "loss_unlabeled", "loss_ce", "lr")
    trainer.run()
    assert len(seen) == 30  # 6 epochs of 5 unlabeled batches; the 2 labeled batches were cycled 15 times
    assert all(torch.isfinite(torch.as_tensor(float(s["loss"]))) for s in seen)
    changed = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("head.") for k in changed)
    first = sum(float(s["loss_ce"]) + float(s["loss_labeled"]) for s in seen[:5])
    last = sum(float(s["loss_ce"]) + float(s["loss_labeled"]) for s in seen[-5:])
    assert last < 0.8 * first
    net.eval()
    with torch.no_grad():
        acc = torch.cat([net(b["image_weak"]).argmax(1) == b["label"] for b in labeled]).float().mean()
    assert acc > 0.8


def _token_net(seed: int = 0) -> S5CLTokenNet:
    torch.manual_seed(seed)
    return S5CLTokenNet(1, 3, img_size=(8, 8, 8), patch_size=4, hidden_size=16, mlp_dim=32, num_layers=2, num_heads=2)


def _seg_batches(n: int, batch: int, seed: int = 0, with_label: bool = True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = torch.randint(0, 3, (batch, 1, 2, 2, 2), generator=g)
        label = label.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)  # token-constant
        x = label.float() + 0.2 * torch.randn(label.shape, generator=g)
        item = {"image_weak": x, "image_strong": x + 0.1 * torch.randn(x.shape, generator=g)}
        if with_label:
            item["label"] = label
        out.append(item)
    return out


def test_segmentation_mode_uses_token_majority_labels():
    net = _token_net()
    labeled = _seg_batches(1, 2, seed=1)
    expected_ce = F.cross_entropy(net(labeled[0]["image_weak"]), token_majority_labels(labeled[0]["label"], 4, 3))
    unlabeled = _seg_batches(2, 2, seed=2, with_label=False)
    trainer = _trainer(net, unlabeled, labeled, mode="segmentation", num_classes=3, max_epochs=1)
    seen = _record(trainer, "loss_ce", "pseudo_label_accuracy")
    spied = _spy(trainer, "labeled_loss")
    trainer.run()
    feats = [(f.shape, labels) for f, labels, _ in spied]
    # token-level LayerNorm ViT: the first step's CE is exactly CE(net(weak labeled), token majority labels)
    assert float(seen[0]["loss_ce"]) == pytest.approx(expected_ce.item(), rel=1e-4)
    assert feats[0][0] == (2 * 8, 2, 128)  # 2 volumes x 8 tokens, weak + strong, projections
    assert torch.equal(feats[0][1], token_majority_labels(labeled[0]["label"], 4, 3).reshape(-1))
    assert seen[0]["pseudo_label_accuracy"] is None  # unlabeled volumes without labels: nothing to measure


def test_segmentation_token_subset():
    trainer = _trainer(
        _token_net(),
        _seg_batches(1, 2),
        _seg_batches(1, 2),
        mode="segmentation",
        num_classes=3,
        tokens_per_volume=3,
        max_epochs=1,
    )
    spied = _spy(trainer, "unlabeled_loss")
    trainer.run()
    assert [f.shape for f, _, _ in spied] == [(2 * 3, 2, 128)]


def _tiny(mode: str, **kw):
    """A tiny S5CL network of either mode: 64 ResNet / 16 ViT features, 8-d projections, 3 classes."""
    torch.manual_seed(0)
    sizes = {"img_size": 8, "patch_size": 4, "hidden_size": 16, "mlp_dim": 32, "num_layers": 1, "num_heads": 2}
    return s5cl_network(mode, num_classes=3, in_channels=1, widen_factor=0.125, proj_dim=8, **sizes, **kw)


@pytest.mark.parametrize("classifier_on", ["projection", "encoder"])
def test_pseudo_labels_come_from_the_classifier_input_of_the_layout(classifier_on):
    """One step after the switch: the unlabeled loss gets argmax of the classifier, which read the projection
    (default) or the encoder features (option) of the weak unlabeled views."""
    net = S5CLClassifier(3, img_size=SIZE, widen_factor=0.125, proj_dim=16, classifier_on=classifier_on)
    seen: dict[str, torch.Tensor] = {}
    net.head.register_forward_hook(lambda m, i, o: seen.update(features=i[0].detach(), projection=o.detach()))
    net.classifier.register_forward_hook(lambda m, i, o: seen.update(input=i[0].detach(), logits=o.detach()))
    trainer = _trainer(
        net, _cls_batches(1, 4), _cls_batches(1, 3, hidden_label=False), pseudo_label_start=0, max_epochs=1
    )
    spied = _spy(trainer, "unlabeled_loss")
    trainer.run()
    assert torch.equal(seen["input"], seen["projection" if classifier_on == "projection" else "features"])
    assert seen["input"].shape == (2 * 3 + 2 * 4, 16 if classifier_on == "projection" else 64)
    weak_unlabeled = slice(2 * 3, 2 * 3 + 4)  # batch order: weak / strong labeled, weak / strong unlabeled
    assert torch.equal(spied[0][1], seen["logits"][weak_unlabeled].argmax(dim=1))


@pytest.mark.parametrize("mode", ["classification", "segmentation"])
@pytest.mark.parametrize(
    "name, lr, expected_type, expected_lr",
    [
        ("adamax", None, torch.optim.Adamax, 1e-4),
        ("adamw", None, torch.optim.AdamW, 1e-3),
        ("adamax", 3e-4, torch.optim.Adamax, 3e-4),
    ],
)
def test_optimizer_has_one_group_per_module(mode, name, lr, expected_type, expected_lr):
    net = _tiny(mode)
    opt = s5cl_optimizer(net, name, lr=lr)
    assert type(opt) is expected_type
    modules = {"encoder": net.encoder if mode == "classification" else net.vit, "projection": net.head}
    modules["classifier"] = net.classifier
    assert [g["name"] for g in opt.param_groups] == list(modules)
    for group in opt.param_groups:
        assert group["lr"] == expected_lr and group["weight_decay"] == 1e-4
        assert [id(p) for p in group["params"]] == [id(p) for p in modules[group["name"]].parameters()]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


def test_optimizer_rejects_unknown_names_and_networks():
    with pytest.raises(ConfigError, match="optimizer.*'sgd'"):
        s5cl_optimizer(_tiny("classification"), "sgd")
    with pytest.raises(ConfigError, match="S5CL network"):
        s5cl_optimizer(torch.nn.Linear(2, 2))
    net = _tiny("classification")
    net.extra = torch.nn.Linear(2, 2)  # a module outside the three groups would never be stepped
    with pytest.raises(ConfigError, match=r"extra\.weight"):
        s5cl_optimizer(net)


def test_temperature_hierarchy_is_enforced_with_the_reference_optimizer():
    net = _tiny("classification")
    with pytest.raises(ConfigError, match="temperature_unlabeled=0.2 <= temperature_labeled=0.2"):
        S5CLTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=_cls_batches(1, 2),
            labeled_data_loader=_cls_batches(1, 2, hidden_label=False),
            network=net,
            optimizer=s5cl_optimizer(net),
            temperature_labeled=0.2,
            temperature_unlabeled=0.2,
        )


def test_grouped_adamax_steps_as_the_reference_three_optimizers():
    """One Adamax with a group per module = the reference's three Adamax(lr 1e-4, wd 1e-4), step for step."""
    grouped, separate = _tiny("classification"), _tiny("classification")
    opt = s5cl_optimizer(grouped)
    per_module = [
        torch.optim.Adamax(m.parameters(), lr=1e-4, weight_decay=1e-4) for m in separate.module_groups().values()
    ]
    x = torch.randn(4, 1, 8, 8, 8)
    for _ in range(3):
        for net, optimizers in ((grouped, [opt]), (separate, per_module)):
            for o in optimizers:
                o.zero_grad()
            out = net(x, return_embedding=True)
            (out["logits"].square().mean() + out["projection"].square().mean()).backward()
            for o in optimizers:
                o.step()
    initial = _tiny("classification").state_dict()
    for k, v in grouped.state_dict().items():
        assert torch.equal(v, separate.state_dict()[k]), k
    assert not torch.equal(grouped.state_dict()["classifier.weight"], initial["classifier.weight"])
