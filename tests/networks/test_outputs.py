"""first_output / FirstOutput: one tensor from a tuple-returning network (ViTAutoEnc), for engines and bundle checks."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ViTAutoEnc

from medssl.networks.outputs import FirstOutput, first_output


def test_first_output_of_vitautoenc_is_the_reconstruction():
    torch.manual_seed(0)
    net = ViTAutoEnc(in_channels=1, img_size=32, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        reconstruction, hidden = net.eval()(x)
        got = FirstOutput(net)(x)
    assert isinstance(hidden, list) and len(hidden) == 2
    assert torch.equal(got, reconstruction) and got.shape == (2, 1, 32, 32, 32)
    assert list(FirstOutput(net).state_dict()) == [f"network.{k}" for k in net.state_dict()]


def test_first_output_takes_the_first_element_of_a_tuple_or_list_only():
    a, b = torch.ones(1), torch.zeros(1)
    assert first_output((a, [b])) is a
    assert first_output([b, a]) is b
    assert first_output(a) is a
    mapping = {"pred": a}
    assert first_output(mapping) is mapping  # not a sequence: unchanged


def test_first_output_passes_a_tensor_through_and_refuses_a_non_module():
    linear = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    assert torch.equal(FirstOutput(linear)(x), linear(x))
    with pytest.raises(TypeError, match="torch.nn.Module, got function"):
        FirstOutput(lambda t: t)
