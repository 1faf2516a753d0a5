"""MONAI conformance of the bundles: each has standard metadata, and MONAI's ``verify_net_in_out`` accepts it.

``verify_net_in_out`` builds the bundle's network from its config (full size: one forward of one window on the
CPU, a few seconds for the ViT-B UNETR), feeds it a random input of the metadata's channels / shape / dtype and
checks the output's channels and dtype against the metadata. ``verify_metadata`` would also validate the file
against MONAI's JSON schema, but it downloads the schema first, so offline the standard fields are checked here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medssl.checkpoint import build_network, save_checkpoint
from medssl.data.phantoms import BTCV_LABELS, LA_LABELS
from medssl.transforms.presets import preprocessing_summary

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
METADATA = BUNDLES / "metadata"
SHAPE_ID = "_meta_#network_data_format#inputs#image#spatial_shape"

# bundle -> the verify_net_in_out arguments (README "Use a medssl model with plain MONAI" shows the same)
VERIFY: dict[str, dict] = {
    "ssl_pretrain": {"net_id": "reconstruction_network", "config_file": ["ssl_pretrain.yaml"]},
    "btcv_unetr": {"net_id": "network", "config_file": ["supervised.yaml", "btcv_unetr.yaml"]},
    "la_vnet": {"net_id": "network", "config_file": ["supervised.yaml", "la_vnet.yaml"]},
    "mean_teacher": {"net_id": "network", "config_file": ["mean_teacher.yaml"]},
    "mean_teacher_btcv": {"net_id": "network", "config_file": ["mean_teacher.yaml", "mean_teacher_btcv.yaml"]},
    # num_classes is read from the data otherwise (building the patch dataset)
    "s5cl": {"net_id": "network", "config_file": ["s5cl.yaml"], "num_classes": 6},
    # the network the checkpoint at model_path describes: the `inference_model` fixture's
    "inference": {"net_id": "network_def", "config_file": ["inference.yaml"]},
}
TOP_LEVEL = {  # MONAI's standard metadata fields and their types
    "schema": str,
    "version": str,
    "changelog": dict,
    "monai_version": str,
    "pytorch_version": str,
    "numpy_version": str,
    "required_packages_version": dict,
    "task": str,
    "description": str,
    "authors": str,
    "copyright": str,
    "network_data_format": dict,
}
TENSOR_FIELDS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data")
SEGMENTATION_LABELS = {
    "btcv_unetr": BTCV_LABELS,
    "mean_teacher_btcv": BTCV_LABELS,
    "inference": BTCV_LABELS,
    "la_vnet": LA_LABELS,
    "mean_teacher": LA_LABELS,
}


def _meta(bundle: str) -> dict:
    return json.loads((METADATA / f"{bundle}.json").read_text())


@pytest.fixture(scope="module")
def inference_model(tmp_path_factory) -> Path:
    """A small UNETR checkpoint with the 14 BTCV classes (inference.yaml's default is a full btcv_unetr run)."""
    torch.manual_seed(0)
    config = {"_target_": "medssl.networks.unetr.UNETR", "in_channels": 1, "out_channels": 14, "img_size": [32] * 3,
              "patch_size": 16, "hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 2, "feature_size": 4}  # fmt: skip
    net = build_network({"network": config}, load_weights=False)
    path = tmp_path_factory.mktemp("conformance") / "model.pt"
    pre = preprocessing_summary(spacing=(1.5, 1.5, 2.0), a_min=-175, a_max=250, roi_size=[32] * 3)
    save_checkpoint(path, network=config, state_dict=net.state_dict(), stage="finetune", preprocessing=pre)
    return path


def _verify_args(bundle: str, inference_model: Path) -> dict:
    args = dict(VERIFY[bundle])
    args["config_file"] = [str(BUNDLES / f) for f in args["config_file"]]
    args["meta_file"] = str(METADATA / f"{bundle}.json")
    if bundle == "inference":
        args["model_path"] = str(inference_model)
        args[SHAPE_ID] = [32, 32, 32]  # the small checkpoint's window; channels and dtype stay the metadata's
    return args


def test_one_metadata_file_per_bundle_and_a_collection_file_without_a_network():
    assert sorted(p.stem for p in METADATA.glob("*.json")) == sorted(VERIFY)
    # MONAI loads bundles/metadata.json into every run without --meta_file (and logs an error when it is missing):
    # it describes the collection and no network, since one file cannot describe every bundle's network
    shared = json.loads((BUNDLES / "metadata.json").read_text())
    assert "network_data_format" not in shared and "bundles" not in shared
    assert "optional_packages_version" not in shared and shared["required_packages_version"]


@pytest.mark.parametrize("bundle", sorted(VERIFY))
def test_metadata_has_the_standard_fields(bundle):
    meta = _meta(bundle)
    for key, kind in TOP_LEVEL.items():
        assert isinstance(meta.get(key), kind), f"{bundle}: {key} missing or not a {kind.__name__}"
    assert meta["version"] in meta["changelog"]
    # MONAI renames this deprecated key to required_packages_version, overwriting the real one
    assert "optional_packages_version" not in meta
    assert "bundles" not in meta  # the old non-standard map of every bundle
    for side, key in (("inputs", "image"), ("outputs", "pred")):
        tensor = meta["network_data_format"][side][key]
        assert all(f in tensor for f in TENSOR_FIELDS), f"{bundle}: {side}.{key} lacks {TENSOR_FIELDS}"
        assert len(tensor["channel_def"]) == tensor["num_channels"]
        assert tensor["dtype"] == "float32"


def test_metadata_versions_agree_across_bundles():
    fields = ("schema", "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version")
    found = {bundle: {f: _meta(bundle)[f] for f in fields} for bundle in VERIFY}
    assert len({json.dumps(v, sort_keys=True) for v in found.values()}) == 1, found


@pytest.mark.parametrize("bundle", sorted(SEGMENTATION_LABELS))
def test_segmentation_channel_names_are_the_label_names(bundle):
    pred = _meta(bundle)["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {str(k): v for k, v in SEGMENTATION_LABELS[bundle].items()}


@pytest.mark.parametrize("bundle", sorted(VERIFY))
def test_verify_net_in_out(bundle, inference_model):
    from monai.bundle import verify_net_in_out

    verify_net_in_out(device="cpu", **_verify_args(bundle, inference_model))


def test_verify_net_in_out_rejects_a_wrong_channel_count(inference_model):
    from monai.bundle import verify_net_in_out

    args = _verify_args("la_vnet", inference_model)
    args["_meta_#network_data_format#outputs#pred#num_channels"] = 3
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(device="cpu", **args)


def test_verify_net_in_out_command_line():
    # the README's command as a user types it: fire parses --config_file and --num_classes
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network", "--meta_file",
           "bundles/metadata/s5cl.json", "--config_file", "bundles/s5cl.yaml", "--device", "cpu", "--num_classes", "6"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr


def test_study_runs_attach_the_metadata_of_their_bundle():
    from medssl.study import _bundle_command

    def meta_file(*names: str) -> str | None:
        cmd = _bundle_command([BUNDLES / n for n in names], {})
        return cmd[cmd.index("--meta_file") + 1] if "--meta_file" in cmd else None

    assert meta_file("btcv_unetr.yaml", "tiny.yaml") == str(METADATA / "btcv_unetr.json")
    # an overlay with a network of its own describes the run
    assert meta_file("mean_teacher.yaml", "mean_teacher_btcv.yaml", "tiny.yaml") == str(
        METADATA / "mean_teacher_btcv.json"
    )
    assert meta_file("tiny.yaml") is None
