"""The LA bundles' ``dice_squared`` id: UA-MT's published loss when true, the plain soft Dice + CE when false.

The published loss (UA-MT, code/utils/losses.py ``dice_loss`` and the LA training scripts) is
``0.5 * CE + 0.5 * (1 - (2 sum(p g) + 1e-5) / (sum(p^2) + sum(g^2) + 1e-5))`` with ``p`` the atrium softmax and
``g`` the atrium mask, summed over the whole labeled batch. The references below compute it term by term in float64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BASES = {
    "la_vnet": [str(REPO / "bundles" / f) for f in ("supervised.yaml", "la_vnet.yaml")],
    "mean_teacher": [str(REPO / "bundles" / "mean_teacher.yaml")],
}
OVERLAY = str(REPO / "bundles" / "la_uamt_protocol.yaml")
SMOOTH = 1e-5


def _loss(base: str, dice_squared=None, overlay: bool = False):
    """The ``loss`` object of ``base`` (+ the published-protocol overlay), ``dice_squared`` overridden unless None."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([*BASES[base], OVERLAY] if overlay else BASES[base])
    if dice_squared is not None:
        parser["dice_squared"] = dice_squared
    return parser.get_parsed_content("loss")


def _batch(seed: int, shape=(3, 2, 6, 5, 4), scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits (B, 2, ...) and a label (B, 1, ...) of 0/1, as the trainers pass them."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen) * scale
    label = (torch.rand((shape[0], 1, *shape[2:]), generator=gen) > 0.6).float()
    return logits, label


def _reference(logits: torch.Tensor, label: torch.Tensor, *, squared: bool) -> torch.Tensor:
    """0.5 * CE + 0.5 * soft Dice of the atrium channel over the whole batch, every sum written out."""
    x = logits.double()
    log_p = x - x.exp().sum(dim=1, keepdim=True).log()
    target = label[:, 0].long()
    ce = -log_p.gather(1, target[:, None]).mean()
    p = log_p[:, 1].exp()
    g = (target == 1).double()
    intersect = (p * g).sum()
    if squared:
        denominator = (p * p).sum() + (g * g).sum()
    else:
        denominator = p.sum() + g.sum()
    dice = 1 - (2 * intersect + SMOOTH) / (denominator + SMOOTH)
    return 0.5 * ce + 0.5 * dice


def _value_and_grad(loss_fn, logits: torch.Tensor, label: torch.Tensor) -> tuple[float, torch.Tensor]:
    x = logits.clone().requires_grad_(True)
    value = loss_fn(x, label)
    value.backward()
    return float(value.detach()), x.grad.double()


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize(
    ("dice_squared", "overlay", "expected"),
    [(None, False, False), (False, False, False), ("true", False, True), (True, False, True), (None, True, True)],
)
def test_bundles_parse_dice_squared_both_ways(base, dice_squared, overlay, expected):
    loss = _loss(base, dice_squared, overlay)
    assert loss.dice.squared_pred is expected
    # the rest of the published recipe is the same either way: the atrium over the whole batch, 0.5 / 0.5
    assert loss.dice.include_background is False and loss.dice.batch is True
    assert (loss.lambda_ce, loss.lambda_dice) == (0.5, 0.5)
    assert (loss.dice.smooth_nr, loss.dice.smooth_dr) == (SMOOTH, SMOOTH)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_squared_is_the_published_loss_value_and_gradient(base, seed):
    logits, label = _batch(seed)
    value, grad = _value_and_grad(_loss(base, True), logits, label)
    ref_value, ref_grad = _value_and_grad(lambda x, y: _reference(x, y, squared=True), logits, label)
    assert value == pytest.approx(ref_value, abs=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("base", sorted(BASES))
def test_default_is_the_plain_soft_dice_and_differs_from_the_squared_one(base):
    logits, label = _batch(3)
    default, squared = float(_loss(base)(logits, label)), float(_loss(base, True)(logits, label))
    assert default == pytest.approx(float(_reference(logits, label, squared=False)), abs=1e-6)
    # soft probabilities: p^2 < p, so the squared denominator is smaller and the two losses differ
    assert abs(default - squared) > 1e-2
    assert abs(float(_reference(logits, label, squared=True)) - float(_reference(logits, label, squared=False))) > 1e-2


@pytest.mark.parametrize("base", sorted(BASES))
def test_squared_and_default_agree_on_hard_predictions(base):
    # p in {0, 1} (to float32 precision): p^2 = p, so the two denominators, and the losses, coincide
    _, label = _batch(4)
    guess = (torch.rand(label.shape, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    sign = 2 * guess - 1
    logits = torch.cat([-sign, sign], dim=1) * 20.0
    default, squared = float(_loss(base)(logits, label)), float(_loss(base, True)(logits, label))
    assert squared == pytest.approx(default, abs=1e-6)
    assert squared == pytest.approx(float(_reference(logits, label, squared=True)), abs=1e-6)
    assert float(_loss(base, True).dice(logits, label)) > 0.1  # the guess is wrong on part of the atrium
