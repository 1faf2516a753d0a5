"""bundles/s5cl.yaml + tiny.yaml end to end on the small CT phantom, in both modes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from medssl.checkpoint import build_network, load_checkpoint
from tests.bundles.bundle_helpers import tensorboard_scalars

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [str(REPO / "bundles" / "s5cl.yaml"), str(REPO / "bundles" / "tiny.yaml")]
SWITCH_AFTER = 3


def _run(data: Path, out: Path, **extra) -> Path:
    from monai.bundle import run

    overrides = {
        "bundle_root": str(out.parent),
        "dataset_dir": str(data),
        "output_dir": str(out),
        "precision": "fp32",  # bf16 3D convolutions are slow on CPU
        "pseudo_label_start": SWITCH_AFTER,
        **extra,
    }
    run("training", config_file=CONFIGS, **overrides)
    return out


@pytest.fixture(scope="module")
def classification_run(ct_phantom, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s5cl_cls") / "out"
    # 3 training cases x 6 organs x 2 patches, 1 labeled per class: 30 unlabeled patches, 8 steps per epoch
    # (steps_per_epoch null = one pass of the unlabeled loader); 2 epochs = 16 steps
    return _run(
        Path(ct_phantom).parent,
        out,
        widen_factor=0.25,
        samples_per_organ=2,
        labeled_per_class=1,
        steps_per_epoch="$None",
        max_iterations=16,
    )


@pytest.fixture(scope="module")
def segmentation_run(ct_phantom, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s5cl_seg") / "out"
    # patch_size 16 (the default, as in btcv_unetr.yaml): 8 tokens per 32^3 crop
    return _run(Path(ct_phantom).parent, out, mode="segmentation")


def test_classification_outputs_and_checkpoint(classification_run):
    for name in ("model.pt", "last.pt", "val_metrics.csv"):
        assert (classification_run / name).is_file(), name
    ckpt = load_checkpoint(classification_run / "model.pt")
    assert ckpt["stage"] == "s5cl_classification"
    assert ckpt["network"]["mode"] == "classification" and ckpt["network"]["num_classes"] == 6
    assert [ckpt["labels"][k] for k in sorted(ckpt["labels"], key=int)][:2] == ["spleen", "right kidney"]
    net = build_network(ckpt).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, 32, 32, 32)).shape == (2, 6)
    last = load_checkpoint(classification_run / "last.pt")
    assert {"optimizer", "rng", "transform_rng"} <= set(last)
    assert last["progress"] == {"epoch": 2, "iteration": 16}
    with open(classification_run / "val_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in rows)


def test_classification_tensorboard_logs_terms_switch_and_pseudo_label_accuracy(classification_run):
    series = tensorboard_scalars(classification_run)
    for tag in ("loss", "loss_labeled", "loss_unlabeled", "loss_ce", "pseudo_labels", "pseudo_label_accuracy"):
        assert len(series.get(tag, [])) == 16, tag
    assert "val_accuracy" in series
    switch = sorted(series["pseudo_labels"])
    assert [step for step, on in switch if on == 1.0][0] == SWITCH_AFTER + 1
    assert [on for _, on in switch] == [float(step > SWITCH_AFTER) for step, _ in switch]
    assert all(0.0 <= v <= 1.0 for _, v in series["pseudo_label_accuracy"])


def test_segmentation_checkpoint_loads_fully_into_unetr(segmentation_run):
    from medssl.networks.pretrained import load_into_bundle, load_pretrained_vit
    from medssl.networks.unetr import UNETR

    ckpt = load_checkpoint(segmentation_run / "model.pt")
    assert ckpt["stage"] == "s5cl_segmentation" and ckpt["network"]["num_classes"] == 14
    # the network btcv_unetr.yaml + tiny.yaml builds, as `medssl inspect --into` and --pretrained_ckpt load it
    report = load_into_bundle(segmentation_run / "model.pt", [REPO / "bundles" / "btcv_unetr.yaml", CONFIGS[1]])
    assert report.complete and not report.resampled and len(report.loaded) == report.total == 31
    unetr = UNETR(1, 14, img_size=32, patch_size=16, hidden_size=96, mlp_dim=192, num_layers=2, num_heads=4)
    report = load_pretrained_vit(unetr, segmentation_run / "model.pt")
    assert report.complete and len(report.loaded) == report.total == len(unetr.vit.state_dict())
    trained = {k[len("vit.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("vit.")}
    assert all(torch.equal(unetr.vit.state_dict()[k], v) for k, v in trained.items())
    series = tensorboard_scalars(segmentation_run)
    assert {"loss_labeled", "loss_unlabeled", "loss_ce", "pseudo_labels", "val_accuracy"} <= set(series)


def test_temperature_hierarchy_violation_is_a_config_error(ct_phantom, tmp_path):
    from medssl.errors import ConfigError

    with pytest.raises(Exception) as err:
        _run(Path(ct_phantom).parent, tmp_path / "out", temperature_unlabeled=0.1, samples_per_organ=1)
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__
    config_errors = [c for c in chain if isinstance(c, ConfigError)]
    assert config_errors and "temperature_unlabeled=0.1" in str(config_errors[0])
    assert not (tmp_path / "out" / "model.pt").exists()


def test_segmentation_starts_from_a_pretrained_vit(segmentation_run, ct_phantom, tmp_path):
    """pretrained_ckpt goes through the strict ViT loader: with lr 0 the encoder stays the loaded one."""
    out = _run(
        Path(ct_phantom).parent,
        tmp_path / "out",
        mode="segmentation",
        max_epochs=1,
        learning_rate=0.0,
        pretrained_ckpt=str(segmentation_run / "model.pt"),
    )
    source = load_checkpoint(segmentation_run / "model.pt")["state_dict"]
    result = load_checkpoint(out / "model.pt")["state_dict"]
    vit = [k for k in source if k.startswith("vit.")]
    assert vit and all(torch.equal(result[k], source[k]) for k in vit)


@pytest.mark.parametrize(
    "overrides, classifier_input, optimizer_type, lr",
    [
        ({}, "projection", torch.optim.Adamax, 1e-4),  # the reference code's layout and optimizer
        ({"classifier_on": "encoder", "optimizer": "adamw"}, "encoder", torch.optim.AdamW, 1e-3),
        ({"optimizer": "adamw", "learning_rate": 5e-4}, "projection", torch.optim.AdamW, 5e-4),
    ],
)
def test_classifier_placement_and_optimizer_ids(overrides, classifier_input, optimizer_type, lr):
    """classifier_on and optimizer reach the network, its checkpoint config and the optimizer (parsed only)."""
    from monai.bundle import ConfigParser

    from medssl.engines.utils import network_config

    parser = ConfigParser()
    parser.read_config(CONFIGS)
    parser.update({"device": "cpu", "num_classes": 6, **overrides})  # num_classes given: no data is read
    network = parser.get_parsed_content("network")
    optimizer = parser.get_parsed_content("optimizer_obj")
    assert network_config(parser.get_parsed_content("network_def"))["classifier_on"] == classifier_input
    assert parser["proj_dim"] == 64 and network.head[-1].out_features == 64
    features = 64 if classifier_input == "projection" else network.num_features
    assert network.classifier.in_features == features and network.num_features == 128  # widen_factor 0.25
    assert type(optimizer) is optimizer_type
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [
        ("encoder", lr),
        ("projection", lr),
        ("classifier", lr),
    ]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(network.parameters()))
