"""A checkpoint is data, never code: crafted ``network`` configs are refused before anything runs.

Each crafted config carries a payload that writes a canary file when MONAI's ``ConfigParser`` (what
``build_network`` used before issue 16) rebuilds it — ``test_payload_is_live`` proves that, so the refusals
below cannot pass with a dead payload. Every path that rebuilds a network from a checkpoint — ``medssl infer``,
``medssl export``, :class:`~medssl.inference.Predictor`, ``bundles/inference.yaml``'s ``network_def`` — must
refuse each config with ``refused network config: <why>`` naming the file, leave the canary unwritten and write
no output; ``medssl inspect`` prints the metadata and marks the network ``REFUSED``. Every network the bundles
write, and every allow-listed class, still round-trips through the safe builder with strict weights.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

from medssl.checkpoint import FORMAT, NETWORKS, build_network, load_checkpoint, save_checkpoint
from medssl.cli import main
from medssl.errors import CheckpointError

REPO = Path(__file__).resolve().parents[2]
UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}


def _write(canary: Path) -> str:
    return f"__import__('pathlib').Path({str(canary)!r}).write_text('ran')"


def _crafted(tmp_path: Path, canary: Path) -> dict[str, tuple[dict, str, bool]]:
    """name -> (network config, the reason the refusal must give (regex), whether it carries a live payload).

    The payloads use ``tmp_path / "evil.yaml"`` and the module ``tmp_path / "medssl_threat_canary.py"``, written
    by the ``crafted`` fixture.
    """
    evil_yaml = tmp_path / "evil.yaml"
    return {
        "dollar_in_argument": (
            {"_target_": "monai.networks.nets.UNet", **UNET, "spatial_dims": f"${_write(canary)} and 3"},
            r"argument 'spatial_dims' is .*strings starting with \$, @ or % are config code",
            True,
        ),
        "run_cmd_target": (
            {"_target_": "monai.utils.run_cmd", "cmd_list": ["touch", str(canary)]},
            r"'_target_' 'monai.utils.run_cmd' is not an allowed network class",
            True,
        ),
        "nested_target": (
            {
                "_target_": "monai.networks.nets.UNet",
                **UNET,
                "act": {"_target_": "monai.utils.run_cmd", "cmd_list": ["touch", str(canary)]},
            },  # fmt: skip
            r"argument 'act' has a nested '_target_'",
            True,
        ),
        "at_reference": (
            {
                "_target_": "monai.networks.nets.UNet",
                "spatial_dims": "@net#payload",
                "in_channels": 1,
                "payload": f"${_write(canary)} and 3",
            },  # fmt: skip
            r"argument 'spatial_dims' is '@net#payload'",
            True,
        ),
        "percent_macro": (
            {"_target_": "monai.networks.nets.UNet", **UNET, "spatial_dims": f"%{evil_yaml}#payload"},
            r"argument 'spatial_dims' is '%",
            True,
        ),
        "requires": (
            {"_target_": "monai.networks.nets.UNet", "_requires_": f"${_write(canary)}", **UNET},
            r"'_requires_' is not allowed",
            True,
        ),
        "dollar_target": (
            {"_target_": f"${_write(canary)} and 'monai.networks.nets.UNet'", **UNET},
            r"'_target_' is .*an expression or reference, not a class path",
            True,
        ),
        "class_outside_allow_list": (
            {"_target_": "medssl_threat_canary.Net"},
            r"'_target_' 'medssl_threat_canary.Net' is not an allowed network class",
            True,
        ),
        "mode_debug": (  # ConfigParser's debug mode opens pdb on the terminal
            {"_target_": "monai.networks.nets.UNet", "_mode_": "debug", **UNET},
            r"'_mode_' 'debug' is not allowed",
            False,
        ),
        "tensor_argument": (
            {"_target_": "monai.networks.nets.UNet", **UNET, "in_channels": torch.tensor(1)},
            r"argument 'in_channels' is a Tensor, not a literal",
            False,
        ),
        "too_deep": (
            {"_target_": "monai.networks.nets.UNet", **UNET, "act": [[[[[[[[["relu"]]]]]]]]]},
            r"argument 'act'(\[0\])+ is nested deeper than 8 levels",
            False,
        ),
        "not_a_dict": (["monai.networks.nets.UNet"], r"'network' is a list, not a dict", False),
    }


CASES = sorted(_crafted(Path("/unused"), Path("/unused/canary")))
LIVE = [name for name in CASES if _crafted(Path("/unused"), Path("/unused/canary"))[name][2]]


@pytest.fixture()
def crafted(request, tmp_path, monkeypatch):
    """(checkpoint path, reason regex, canary path) for the case ``request.param``; the tmp folder is importable."""
    monkeypatch.syspath_prepend(str(tmp_path))
    canary = tmp_path / "canary"
    (tmp_path / "evil.yaml").write_text(f'payload: "${_write(canary)} and 3"\n')
    # importing this module writes the canary
    (tmp_path / "medssl_threat_canary.py").write_text(f"{_write(canary)}\n\n\nclass Net:\n    pass\n")
    config, reason, _ = _crafted(tmp_path, canary)[request.param]
    pre = {"spacing": [1.5, 1.5, 2.0], "orientation": "RAS", "roi_size": [16, 16, 16],
           "intensity": {"a_min": 0.0, "a_max": 1.0, "b_min": 0.0, "b_max": 1.0, "clip": True}}  # fmt: skip
    path = tmp_path / "downloaded.pt"
    # what an attacker writes: any dict torch.save accepts, not necessarily through make_checkpoint
    torch.save({"format": FORMAT, "network": config, "state_dict": {}, "stage": "finetune", "preprocessing": pre,
                "labels": {"0": "background", "1": "organ"}}, path)  # fmt: skip
    yield path, reason, canary
    sys.modules.pop("medssl_threat_canary", None)


def _image(tmp_path: Path) -> Path:
    import nibabel as nib
    import numpy as np

    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
    return path


def _one_error_line(rc: int, err: str, file: Path, reason: str) -> None:
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1, lines
    prefix = f"medssl: error: {file}: refused network config: "
    assert lines[0].startswith(prefix), lines[0]
    assert re.search(reason, lines[0][len(prefix) :]), f"{lines[0]!r} does not match {reason!r}"


@pytest.mark.parametrize("crafted", LIVE, indirect=True)
def test_payload_is_live(crafted):
    """The payloads run under ConfigParser, the old builder: without the checks the tests below would fail."""
    from monai.bundle import ConfigParser

    path, _, canary = crafted
    config = torch.load(path, weights_only=True)["network"]
    try:
        ConfigParser({"net": config}).get_parsed_content("net")
    except Exception:  # the payload ran before the (nonsense) network failed to build
        pass
    assert canary.exists(), "the payload did not run under ConfigParser"


@pytest.mark.parametrize("crafted", CASES, indirect=True)
def test_cli_infer_refuses(crafted, tmp_path, capsys):
    path, reason, canary = crafted
    out = tmp_path / "out"
    rc = main(["infer", "--model", str(path), "--input", str(_image(tmp_path)), "--output", str(out), "--no-progress"])
    captured = capsys.readouterr()
    _one_error_line(rc, captured.err, path, reason)
    assert not canary.exists()
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("crafted", CASES, indirect=True)
def test_cli_export_refuses(crafted, tmp_path, capsys):
    path, reason, canary = crafted
    ts = tmp_path / "model.ts"
    rc = main(["export", str(path), "--torchscript", str(ts)])
    _one_error_line(rc, capsys.readouterr().err, path, reason)
    assert not canary.exists() and not ts.exists()
    assert [p.name for p in tmp_path.iterdir() if "atomic" in p.name] == []


@pytest.mark.parametrize("crafted", CASES, indirect=True)
def test_predictor_refuses(crafted):
    from medssl.inference import Predictor

    path, reason, canary = crafted
    with pytest.raises(CheckpointError, match=f"refused network config: {reason}") as info:
        Predictor(path, device="cpu", progress=False)
    assert info.value.path == str(path)
    # the loaded dict (a Python caller's route) is checked the same way
    with pytest.raises(CheckpointError, match=f"refused network config: {reason}"):
        Predictor(torch.load(path, weights_only=True), device="cpu", progress=False)
    assert not canary.exists()


@pytest.mark.parametrize("crafted", CASES, indirect=True)
def test_inference_bundle_network_def_refuses(crafted):
    """``bundles/inference.yaml`` is trusted code, but the checkpoint it names is data."""
    from monai.bundle import ConfigParser

    path, reason, canary = crafted
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "inference.yaml"))
    parser["model_path"] = str(path)
    with pytest.raises(Exception) as info:  # ConfigParser re-raises expression errors as RuntimeError
        parser.get_parsed_content("network_def")
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    refused = [e for e in chain if isinstance(e, CheckpointError)]
    assert refused and re.search(f"refused network config: {reason}", str(refused[0])), chain
    assert refused[0].path == str(path)
    assert not canary.exists()


@pytest.mark.parametrize("crafted", CASES, indirect=True)
def test_cli_inspect_marks_the_network_refused(crafted, capsys):
    path, reason, canary = crafted
    rc = main(["inspect", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    line = next(line for line in out.splitlines() if line.startswith("network:"))
    assert line.split(None, 1)[1].startswith("REFUSED (") and re.search(reason, line), line
    assert "stage:         finetune" in out and "'1': 'organ'" in out  # the metadata is still shown
    assert not canary.exists()


def test_inspect_escapes_control_characters(tmp_path, capsys):
    """A checkpoint's strings reach the terminal: an ANSI escape sequence is printed escaped, not interpreted."""
    path = save_checkpoint(
        tmp_path / "m.pt", network={"_target_": "monai.networks.nets.UNet", **UNET}, state_dict={},
        stage="\x1b]0;pwned\x07finetune\nnetwork: fake", labels={0: "bg"},
    )  # fmt: skip
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "stage:         \\x1b]0;pwned\\x07finetune\\nnetwork: fake" in out
    assert [line for line in out.splitlines() if line.startswith("network:")] == [
        "network:       monai.networks.nets.UNet"
    ]


# ------------------------------------------------------------------------------------------------ round trips

BUNDLES = {
    "ssl_pretrain": (["ssl_pretrain.yaml"], {}),
    "btcv_unetr": (["supervised.yaml", "btcv_unetr.yaml"], {}),
    "la_vnet": (["supervised.yaml", "la_vnet.yaml"], {}),
    "mean_teacher": (["mean_teacher.yaml"], {}),
    "mean_teacher_btcv": (["mean_teacher.yaml", "mean_teacher_btcv.yaml"], {}),
    "s5cl_classification": (["s5cl.yaml"], {"mode": "classification"}),
    "s5cl_segmentation": (["s5cl.yaml"], {"mode": "segmentation"}),
}


def _ids(config, prefix: str = ""):
    """Every config id (``a#b#0#c``) under ``config``."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        here = f"{prefix}#{key}" if prefix else str(key)
        yield here
        yield from _ids(value, here)


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_every_bundle_checkpoint_loads_through_the_safe_builder(name, tmp_path):
    """The network config each bundle's checkpoint handlers write (evaluated from the bundle itself) with the
    weights of the bundle's network (wrapped by use_patch_matmul / use_fused_attention where the bundle does)
    rebuilds through build_network with strict weights."""
    from monai.bundle import ConfigParser

    files, extra = BUNDLES[name]
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / f) for f in files] + [str(REPO / "bundles" / "tiny.yaml")])
    parser.update({"device": "cpu", "bundle_root": str(tmp_path), **extra})
    writers = [i for i in _ids(parser.config) if i.endswith("#network_config")]
    assert writers, f"{name}: no checkpoint handler with a network_config"
    configs = [parser.get_parsed_content(i) for i in writers]
    assert all(c == configs[0] for c in configs), configs
    network = parser.get_parsed_content("network")
    path = save_checkpoint(tmp_path / "model.pt", network=configs[0], state_dict=network.state_dict(), stage=name)
    ckpt = load_checkpoint(path)
    assert ckpt["network"]["_target_"] in NETWORKS
    rebuilt = build_network(ckpt, where=path)  # strict
    assert type(rebuilt) is type(parser.get_parsed_content("network_def")())
    expected = network.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in rebuilt.state_dict().items())


TINY = {
    "monai.networks.nets.ViT": {"in_channels": 1, "img_size": 16, "patch_size": 8, "hidden_size": 16,
                                "mlp_dim": 16, "num_layers": 1, "num_heads": 2},
    "monai.networks.nets.ViTAutoEnc": {"in_channels": 1, "img_size": 16, "patch_size": 4, "hidden_size": 16,
                                       "mlp_dim": 16, "num_layers": 1, "num_heads": 2},
    "monai.networks.nets.UNETR": {"in_channels": 1, "out_channels": 2, "img_size": 16, "feature_size": 4,
                                  "hidden_size": 16, "mlp_dim": 16, "num_heads": 2},
    "monai.networks.nets.SwinUNETR": {"in_channels": 1, "out_channels": 2, "feature_size": 12,
                                      "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]},
    "monai.networks.nets.UNet": UNET,
    # 2D: the 3D V-Net has 46 M parameters and no width argument; the act pair exercises a nested list and dict
    "monai.networks.nets.VNet": {"spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                                 "act": ["elu", {"inplace": True}]},
    "monai.networks.nets.BasicUNet": {"in_channels": 1, "out_channels": 2, "features": [2, 2, 2, 2, 2, 2]},
    "monai.networks.nets.DynUNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "kernel_size": [3, 3, 3],
                                    "strides": [1, 2, 2], "upsample_kernel_size": [2, 2]},
    "monai.networks.nets.SegResNet": {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]},
    "monai.networks.blocks.Convolution": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "kernel_size": 1},
    "medssl.networks.unetr.UNETR": {"in_channels": 1, "out_channels": 2, "img_size": 16, "patch_size": 8,
                                    "hidden_size": 16, "mlp_dim": 16, "num_layers": 4, "num_heads": 2,
                                    "feature_size": 4},
    "medssl.networks.vnet.VNet": {"in_channels": 1, "out_channels": 2, "base_filters": 2},
    "medssl.networks.s5cl.S5CLClassifier": {"num_classes": 2, "widen_factor": 0.0625},
    "medssl.networks.s5cl.S5CLTokenNet": {"num_classes": 2, "in_channels": 1, "img_size": 16, "patch_size": 8, "hidden_size": 16,
                                          "mlp_dim": 16, "num_layers": 1, "num_heads": 2},
}  # fmt: skip
TINY["medssl.networks.s5cl.s5cl_network"] = {"mode": "segmentation", **TINY["medssl.networks.s5cl.S5CLTokenNet"]}


def test_allow_list_names_what_it_imports():
    """Each allowed ``_target_`` resolves to the object of that name (an alias drifting in MONAI would show)."""
    for target, (module, attr) in NETWORKS.items():
        obj = getattr(importlib.import_module(module), attr)
        if target.startswith("monai."):
            parent, _, name = target.rpartition(".")
            assert getattr(importlib.import_module(parent), name) is obj
        assert f"{obj.__module__}.{obj.__qualname__}" in NETWORKS, target
    assert {f"{m}.{a}" for m, a in NETWORKS.values()} <= set(NETWORKS)
    canonical = {f"{m}.{a}" for m, a in NETWORKS.values()}
    round_tripped = {"{}.{}".format(*NETWORKS[t]) for t in TINY}
    assert round_tripped == canonical, "every allowed class has a round-trip config in TINY"


@pytest.mark.parametrize("target", sorted(TINY))
def test_every_allowed_class_round_trips(target, tmp_path):
    config = {"_target_": target, **TINY[target]}
    net = build_network({"network": config}, load_weights=False)
    path = save_checkpoint(tmp_path / "m.pt", network=config, state_dict=net.state_dict(), stage="test")
    rebuilt = build_network(load_checkpoint(path), where=path)
    assert type(rebuilt) is type(net)
    assert all(torch.equal(t, net.state_dict()[k]) for k, t in rebuilt.state_dict().items())


@pytest.mark.parametrize("crafted", ["run_cmd_target", "dollar_in_argument", "nested_target"], indirect=True)
def test_pretrained_loading_takes_only_the_tensors(crafted, tmp_path):
    """``pretrained_ckpt`` (``load_pretrained_vit``) reads a checkpoint's state dict, never builds its network: a
    crafted config next to real ViT weights loads the weights and runs nothing."""
    from monai.networks.nets import ViT

    from medssl.networks.pretrained import load_pretrained_vit

    path, _, canary = crafted
    vit = ViT(in_channels=1, img_size=16, patch_size=8, hidden_size=16, mlp_dim=16, num_layers=1, num_heads=2)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = vit.state_dict()
    torch.save(ckpt, path)
    target = ViT(in_channels=1, img_size=16, patch_size=8, hidden_size=16, mlp_dim=16, num_layers=1, num_heads=2)
    report = load_pretrained_vit(target, path, prefix="")
    assert report.loaded and not canary.exists()
    assert all(torch.equal(t, vit.state_dict()[k]) for k, t in target.state_dict().items())


def test_datalist_strings_are_never_evaluated(tmp_path, capsys):
    """A datalist is data: a ``$`` string in it is a (missing) file name, never an expression."""
    import json

    canary = tmp_path / "canary"
    payload = f"${_write(canary)}"
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": payload, "label": payload}]}))
    rc = main(["check", str(datalist)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("medssl: error: "), err
    assert "__import__" in err  # named as the file that is missing
    assert not canary.exists()


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"_mode_": torch.zeros(2)}, r"'_mode_' tensor\(\[0., 0.\]\) is not allowed"),
        ({"_mode_": "callable"}, r"'_mode_' 'callable' is not allowed"),
        ({"_disabled_": False}, r"'_disabled_' is not allowed"),
        ({"_desc_": ["$x"]}, r"'_desc_' is a list, not a string"),
        ({torch.zeros(1): 1}, r"argument name tensor\(\[0.\]\) is not an identifier"),
        ({"not an identifier": 1}, r"argument name 'not an identifier' is not an identifier"),
        ({"act": {torch.zeros(1): 1}}, r"argument 'act' has a Tensor key"),
        ({"act": {"$x": 1}}, r"argument 'act' key is '\$x'"),
        ({"act": ["prelu", {"_requires_": "@x"}]}, r"argument 'act'\[1\] has a nested '_requires_'"),
        ({"channels": [1] * 20_000}, r"more than 10000 values"),
        ({"norm": "x" * 2_000}, r"argument 'norm' is a string of 2000 characters"),
        ({"act": type("S", (str,), {})("$x")}, r"argument 'act' is a S, not a literal"),
    ],
    ids=lambda v: None,
)
def test_check_network_config_refuses(config, reason):
    from medssl.checkpoint import check_network_config

    with pytest.raises(CheckpointError, match=f"^m.pt: refused network config: {reason}"):
        check_network_config({"_target_": "monai.networks.nets.UNet", **UNET, **config}, "m.pt")


def test_check_network_config_accepts_desc_and_default_mode():
    from medssl.checkpoint import check_network_config

    config = {"_target_": "monai.networks.nets.UNet", "_desc_": "a note", "_mode_": "default", **UNET}
    assert check_network_config(config) == ("monai.networks.nets.UNet", UNET)
