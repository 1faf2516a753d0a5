"""The shipped SSL asset (``make assets``) is what its record says and fits the demo's UNETR."""

import json

import torch

from medssl import resources
from medssl.assets import SSL_ASSET
from medssl.checkpoint import load_checkpoint
from medssl.study_fingerprint import file_sha256


def test_asset_matches_its_record_and_is_small_and_weights_only():
    path = resources.assets_dir() / SSL_ASSET
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["file"] == SSL_ASSET and record["sha256"] == file_sha256(path)
    assert record["bytes"] == path.stat().st_size <= 20 * 2**20
    ckpt = load_checkpoint(path)  # weights_only=True: tensors and plain values only
    assert ckpt["stage"] == "ssl_pretrain" and ckpt["network"] == record["network"]
    assert ckpt["progress"]["iteration"] == record["progress"]["iteration"] > 0


def test_asset_loads_strictly_into_the_demo_unetr():
    from monai.bundle import ConfigParser

    from medssl.networks.pretrained import load_pretrained_vit

    parser = ConfigParser()
    parser.read_config(
        [str(resources.bundles_dir() / f) for f in ("supervised.yaml", "btcv_unetr.yaml", "cpu_study.yaml")]
    )
    parser["num_classes"] = 6
    net = parser.get_parsed_content("network_def")()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = load_pretrained_vit(net, resources.assets_dir() / SSL_ASSET)
    assert not report.missing
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= set(report.loaded) and len(report.loaded) > 20
    # the loaded tensors equal the asset's encoder (ViTAutoEnc names without the "vit." prefix)
    source = load_checkpoint(resources.assets_dir() / SSL_ASSET)["state_dict"]
    state = net.state_dict()
    for name in report.loaded:
        assert torch.equal(state[name], source[name.removeprefix("vit.")]), name
