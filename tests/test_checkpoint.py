import os
import pickle

import pytest
import torch

from medssl.checkpoint import (
    FORMAT,
    atomic_torch_save,
    build_network,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from medssl.errors import CheckpointError

TINY_VIT_AE = {
    "_target_": "monai.networks.nets.ViTAutoEnc",
    "in_channels": 1,
    "img_size": [32, 32, 32],
    "patch_size": 16,
    "hidden_size": 96,
    "mlp_dim": 192,
    "num_layers": 2,
    "num_heads": 4,
    "proj_type": "conv",
}


def test_roundtrip_rebuilds_identical_network(tmp_path):
    net = build_network({"network": TINY_VIT_AE}, load_weights=False)
    path = save_checkpoint(
        tmp_path / "model.pt",
        network=TINY_VIT_AE,
        state_dict=net.state_dict(),
        stage="ssl_pretrain",
        preprocessing={"spacing": (2.0, 2.0, 2.0), "roi_size": (32, 32, 32)},
        labels={0: "background"},
        progress={"epoch": 2, "iteration": 10},
    )
    ckpt = torch.load(path, weights_only=True)  # the contract: plain weights_only loading works
    assert ckpt["format"] == FORMAT
    assert ckpt["preprocessing"]["spacing"] == [2.0, 2.0, 2.0]
    rebuilt = build_network(load_checkpoint(path))
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.eval()(x)[0], rebuilt.eval()(x)[0])


def test_rng_state_roundtrip(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    atomic_torch_save({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(4), np.random.rand(4), random.random())
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (torch.rand(4), np.random.rand(4), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_atomic_save_keeps_previous_file_when_write_fails(tmp_path):
    target = tmp_path / "last.pt"
    atomic_torch_save({"step": torch.tensor(1)}, target)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"step": Boom()}, target)
    assert torch.load(target, weights_only=True)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"PK\x03\x04 truncated", "corrupt"),
        (pickle.dumps({"x": _Exploit()}), "refused"),
    ],
)
def test_bad_checkpoints_raise_named_errors(tmp_path, content, message):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value)


def test_code_executing_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _Exploit()}, bad)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(bad)


def test_foreign_dict_is_not_a_medssl_checkpoint(tmp_path):
    p = tmp_path / "sd.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, p)
    with pytest.raises(CheckpointError, match="not a medssl-checkpoint/1"):
        load_checkpoint(p)
    assert "state_dict" in load_checkpoint(p, require_format=False)


def test_network_target_outside_the_allow_list_is_refused():
    with pytest.raises(CheckpointError, match="refused network config: '_target_' 'os.system' is not an allowed"):
        build_network({"network": {"_target_": "os.system", "command": "true"}}, load_weights=False)


@pytest.mark.parametrize(
    "old_target, mode, cls",
    [
        ("medssl.engines.s5cl.s5cl_network", {"mode": "segmentation"}, "S5CLTokenNet"),
        ("medssl.engines.s5cl.S5CLTokenNet", {}, "S5CLTokenNet"),
        ("medssl.engines.s5cl.S5CLClassifier", {"encoder": "vit"}, "S5CLClassifier"),
    ],
)
def test_s5cl_checkpoint_naming_the_old_engines_module_rebuilds(old_target, mode, cls, tmp_path):
    """S5CL checkpoints written before the networks moved to medssl.networks.s5cl name medssl.engines.s5cl: they
    rebuild the network from its new home, with their weights and outputs."""
    import medssl.networks.s5cl as s5cl

    sizes = {"num_classes": 3, "in_channels": 1, "img_size": 8, "patch_size": 4, "hidden_size": 16, "mlp_dim": 32}
    config = {"_target_": old_target, **mode, **sizes, "num_layers": 1, "num_heads": 2, "proj_dim": 8}
    torch.manual_seed(0)
    net = getattr(s5cl, cls)(**{k: v for k, v in config.items() if k not in ("_target_", "mode")}).eval()
    path = save_checkpoint(tmp_path / "model.pt", network=config, state_dict=net.state_dict(), stage="s5cl")
    rebuilt = build_network(load_checkpoint(path), where=path).eval()
    assert type(rebuilt) is getattr(s5cl, cls)
    x = torch.rand(2, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))
