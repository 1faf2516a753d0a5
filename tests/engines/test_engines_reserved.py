"""Trainers refuse keyword arguments they set themselves (AMP follows ``precision``), naming key and value."""

from __future__ import annotations

import pytest
import torch

from medssl.engines.utils import reject_reserved


def test_reserved_keys_are_refused_with_a_hint_for_amp():
    reject_reserved("T", {"epoch_length": 3}, ("amp", "decollate"))  # unrelated keys pass
    with pytest.raises(ValueError, match=r"'amp' is set by T \(use precision=\.\.\.\), got amp=True"):
        reject_reserved("T", {"amp": True}, ("amp", "decollate"))
    with pytest.raises(ValueError, match=r"'decollate' is set by T, got decollate=True$"):
        reject_reserved("T", {"decollate": True}, ("amp", "decollate"))


def test_the_ssl_trainer_refuses_amp():
    from medssl.engines.ssl import TwoViewSSLTrainer
    from medssl.losses.ssl import ReconstructionContrastiveLoss

    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="'amp' is set by TwoViewSSLTrainer"):
        TwoViewSSLTrainer(device="cpu", max_epochs=1, train_data_loader=[], network=net,
                          optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                          loss_function=ReconstructionContrastiveLoss(), amp=True)  # fmt: skip
