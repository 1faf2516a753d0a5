"""Engine utilities: network configs, datasets, scalars, reserved keyword arguments."""

from __future__ import annotations

import functools
import sys
import types

import pytest
import torch
from monai.transforms import Compose, RandGaussianNoised

from medssl.engines import utils
from medssl.errors import ConfigError, DataError


def test_network_config_from_callable_component():
    from monai.bundle import ConfigParser

    p = ConfigParser(
        {
            "net": {
                "_target_": "monai.networks.nets.ViTAutoEnc",
                "_mode_": "callable",
                "in_channels": 1,
                "img_size": [32, 32, 32],
                "patch_size": 16,
                "hidden_size": 48,
                "mlp_dim": 96,
                "num_layers": 1,
                "num_heads": 2,
            }
        }
    )
    cfg = utils.network_config(p.get_parsed_content("net"))
    assert cfg["_target_"].startswith("monai.networks.nets") and cfg["hidden_size"] == 48
    rebuilt = ConfigParser({"n": cfg}).get_parsed_content("n")
    assert sum(t.numel() for t in rebuilt.parameters()) == sum(
        t.numel() for t in p.get_parsed_content("net")().parameters()
    )
    with pytest.raises(ConfigError, match="positional"):
        utils.network_config(functools.partial(torch.nn.Linear, 3))


def test_resolve_dataset_generates_only_the_default(tmp_path, monkeypatch):
    calls = []

    def ensure_phantom(kind, out, cases, unlabeled, seed):
        calls.append((kind, cases, unlabeled, seed))
        out.mkdir(parents=True)
        (out / "datalist.json").write_text("{}")
        return out / "datalist.json"

    monkeypatch.setitem(sys.modules, "medssl.data.phantoms", types.SimpleNamespace(ensure_phantom=ensure_phantom))
    default = tmp_path / "data" / "ct_phantom"
    with pytest.raises(DataError, match="elsewhere"):
        utils.resolve_dataset(tmp_path / "elsewhere", tmp_path / "elsewhere" / "datalist.json", default)
    assert not calls
    got = utils.resolve_dataset(default, default / "datalist.json", default, cases=2, unlabeled=1, seed=5)
    assert got == (default / "datalist.json").resolve() and calls == [("ct-abdomen", 2, 1, 5)]
    utils.resolve_dataset(default, default / "datalist.json", default)  # exists now: not generated again
    assert len(calls) == 1


def test_fixed_random_dataset_repeats_each_item():
    t = Compose([RandGaussianNoised(keys="x", prob=1.0)])
    ds = utils.FixedRandomDataset([{"x": torch.zeros(1, 4)}, {"x": torch.zeros(1, 4)}], t, seed=3)
    a0, a1, b0 = ds[0]["x"], ds[1]["x"], ds[0]["x"]
    assert torch.equal(a0, b0) and not torch.equal(a0, a1)


def test_pick_scalars():
    out = {"loss": torch.tensor(2.0), "lr": 0.1, "pred": torch.zeros(2)}
    assert utils.pick_scalars(["loss", "lr", "absent"])(out) == {"loss": 2.0, "lr": 0.1}
    assert utils.pick_scalars(["loss"])([out, out]) == {"loss": 2.0}  # decollated: the first item's scalars


def test_reserved_keys_are_refused_with_a_hint_for_amp():
    utils.reject_reserved("T", {"epoch_length": 3}, ("amp", "decollate"))  # unrelated keys pass
    with pytest.raises(ValueError, match=r"'amp' is set by T \(use precision=\.\.\.\), got amp=True"):
        utils.reject_reserved("T", {"amp": True}, ("amp", "decollate"))
    with pytest.raises(ValueError, match=r"'decollate' is set by T, got decollate=True$"):
        utils.reject_reserved("T", {"decollate": True}, ("amp", "decollate"))


def test_the_ssl_trainer_refuses_amp():
    from medssl.engines.ssl import TwoViewSSLTrainer
    from medssl.losses.ssl import ReconstructionContrastiveLoss

    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="'amp' is set by TwoViewSSLTrainer"):
        TwoViewSSLTrainer(device="cpu", max_epochs=1, train_data_loader=[], network=net,
                          optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                          loss_function=ReconstructionContrastiveLoss(), amp=True)  # fmt: skip
