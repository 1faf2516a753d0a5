"""bundles/btcv_unetr.yaml + tiny.yaml on a small CT phantom: self-describing model.pt, per-class Dice, learning."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.checkpoint import build_network, load_checkpoint
from medssl.data.phantoms import BTCV_LABELS
from medssl.handlers import MetricHistory
from tests.bundles.bundle_helpers import overrides as bundle_overrides
from tests.bundles.bundle_helpers import tensorboard_scalars

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [str(REPO / "bundles" / f) for f in ("supervised.yaml", "btcv_unetr.yaml", "tiny.yaml")]
ORGANS = [name for k, name in sorted(BTCV_LABELS.items()) if k > 0]


def _tag(name: str) -> str:
    return "val_dice/" + name.replace(" ", "_")


@pytest.fixture(scope="module")
def tiny_ct(ct_phantom) -> Path:
    """The session CT phantom (64 x 64 x 32; 3 training cases, 1 validation case)."""
    return Path(ct_phantom).parent


@pytest.fixture(scope="module")
def tiny_run(tiny_ct, tmp_path_factory) -> Path:
    from monai.bundle import run

    out = tmp_path_factory.mktemp("btcv_run") / "out"
    # 3 cases, batch 2 -> 2 iterations per epoch: 5 iterations stop in the middle of the third epoch
    run("training", config_file=CONFIGS, **bundle_overrides(tiny_ct, out, max_iterations=5, val_interval=2))
    return out


def test_model_is_self_describing_and_rebuilds(tiny_run):
    for name in ("model.pt", "last.pt", "best_overlay.png", "val_metrics.csv"):
        assert (tiny_run / name).is_file(), name
    ckpt = load_checkpoint(tiny_run / "model.pt")
    assert ckpt["stage"] == "finetune"
    assert ckpt["network"]["_target_"] == "medssl.networks.unetr.UNETR"
    assert ckpt["network"]["out_channels"] == 14 and ckpt["network"]["img_size"] == [32, 32, 32]
    assert {int(k): v for k, v in ckpt["labels"].items()} == BTCV_LABELS
    pre = ckpt["preprocessing"]
    assert pre["spacing"] == [1.5, 1.5, 2.0] and pre["orientation"] == "RAS" and pre["roi_size"] == [32, 32, 32]
    assert (pre["intensity"]["a_min"], pre["intensity"]["a_max"]) == (-175.0, 250.0)

    net = build_network(ckpt).eval()
    for k, v in net.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k
    with torch.no_grad():
        assert net(torch.rand(1, 1, 32, 32, 32)).shape == (1, 14, 32, 32, 32)
    assert load_checkpoint(tiny_run / "last.pt")["progress"] == {"epoch": 3, "iteration": 5}


def test_validation_dice_per_class_is_logged(tiny_run):
    history = MetricHistory.read(tiny_run / "val_metrics.csv")
    assert [int(h["iteration"]) for h in history] == [2, 4]  # every val_interval iterations
    tb = tensorboard_scalars(tiny_run)
    for organ in ORGANS:
        assert [s for s, _ in tb[_tag(organ)]] == [2, 4], organ
        for (_, logged), row in zip(tb[_tag(organ)], history):
            assert logged == pytest.approx(row[_tag(organ)], abs=1e-6)
    for row in history:
        per_class = [row[_tag(o)] for o in ORGANS if not math.isnan(row[_tag(o)])]
        assert 0.0 <= row["val_mean_dice"] <= 1.0
        # one validation case: the mean Dice is the mean over the classes present
        assert row["val_mean_dice"] == pytest.approx(float(np.mean(per_class)), abs=1e-5)
        # beside it, the tutorial convention: background joins the classes present, so the background Dice it
        # implies, (n + 1) * tutorial - sum(organs), is a Dice
        background = (len(per_class) + 1) * row["val_mean_dice_tutorial"] - float(np.sum(per_class))
        assert -1e-4 <= background <= 1.0 + 1e-4
    assert [s for s, _ in tb["val_mean_dice_tutorial"]] == [2, 4]
    best = load_checkpoint(tiny_run / "model.pt")["best"]
    assert best["metric"] == "val_mean_dice"
    assert best["value"] == pytest.approx(max(h["val_mean_dice"] for h in history))


def test_training_loss_decreases_and_lr_is_the_recipe(tiny_run):
    tb = tensorboard_scalars(tiny_run)
    losses = [v for _, v in tb["loss"]]
    assert [s for s, _ in tb["loss"]] == [1, 2, 3, 4, 5]
    assert losses[-1] < losses[0]
    assert all(v == pytest.approx(1e-4) for _, v in tb["lr"])


def test_best_overlay_png(tiny_run):
    import matplotlib.pyplot as plt

    png = plt.imread(tiny_run / "best_overlay.png")
    assert png.ndim == 3 and png.shape[0] > 200 and png.shape[1] > 400


def test_full_recipe_defaults(tmp_path):
    """Without the overlay the config holds the published UNETR / BTCV recipe."""
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(CONFIGS[:2])
    expect = {
        "roi_size": [96, 96, 96],
        "spacing": [1.5, 1.5, 2.0],
        "orientation": "RAS",
        "a_min": -175.0,
        "a_max": 250.0,
        "num_samples": 4,
        "batch_size": 1,
        "flip_prob": 0.1,
        "rot90_prob": 0.1,
        "intensity_shift": 0.1,
        "intensity_shift_prob": 0.5,
        "learning_rate": 1e-4,
        "weight_decay": 1e-5,
        "max_iterations": 30000,
        "max_epochs": None,
        "val_interval": 100,
        "sw_batch_size": 4,
        "num_classes": 14,
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "patch_size": 16,
        "proj_type": "conv",
        "precision": "auto",
        "pretrained_ckpt": None,
        "resume": False,
    }
    assert {k: p[k] for k in expect} == expect
    p["bundle_root"] = str(tmp_path)
    crop = p.get_parsed_content("crop_transforms")[1]
    assert type(crop).__name__ == "RandCropByPosNegLabeld" and crop.cropper.num_samples == 4
    loss = p.get_parsed_content("loss")
    assert type(loss).__name__ == "DiceCELoss"
    net = p.get_parsed_content("network_def")()
    assert sum(t.numel() for t in net.parameters()) > 90e6  # UNETR-B


def test_logged_dice_matches_a_naive_recomputation(tiny_run, tiny_ct):
    """Re-run model.pt on the validation case and count voxels: the per-class Dice of its iteration."""
    import json

    from monai.inferers import SlidingWindowInferer
    from monai.transforms import Compose

    from medssl.engines.supervised import AutocastInferer
    from medssl.networks.attention import use_fused_attention
    from medssl.networks.patch_conv import use_patch_matmul
    from medssl.transforms.presets import preprocessing_from_summary

    ckpt = load_checkpoint(tiny_run / "model.pt")
    # the kernels the bundle validates with (bf16 rounding differs between kernels by ~1e-4 Dice)
    net = use_fused_attention(use_patch_matmul(build_network(ckpt))).eval()
    case = json.loads((tiny_ct / "datalist.json").read_text())["validation"][0]
    item = {k: str(tiny_ct / v) for k, v in case.items()}
    data = Compose(preprocessing_from_summary(ckpt["preprocessing"], keys=["image", "label"]))(item)
    # the run's precision (auto) and what it resolved to are in the checkpoint; validate again in the same one
    assert ckpt["precision"]["requested"] == "auto" and ckpt["precision"]["used"] in ("bf16", "fp32")
    used = ckpt["precision"]["used"]
    from medssl.checkpoint import describe_checkpoint

    assert f"precision:     auto -> {used} (CPU capability " in describe_checkpoint(ckpt)  # medssl inspect
    inferer = AutocastInferer(SlidingWindowInferer([32, 32, 32], sw_batch_size=4, overlap=0.5), "cpu", used)
    with torch.no_grad():
        pred = inferer(data["image"][None], net)[0].argmax(0).numpy()
    ref = np.asarray(data["label"][0]).round().astype(int)
    row = next(
        r for r in MetricHistory.read(tiny_run / "val_metrics.csv") if r["iteration"] == ckpt["best"]["iteration"]
    )
    for k, organ in enumerate(ORGANS, start=1):
        p, r = pred == k, ref == k
        if not r.any():
            assert math.isnan(row[_tag(organ)]), organ
            continue
        naive = 2.0 * np.logical_and(p, r).sum() / (p.sum() + r.sum())
        assert row[_tag(organ)] == pytest.approx(naive, abs=1e-4), organ


def test_per_class_logger_rejects_a_vector_of_the_wrong_length():
    from types import SimpleNamespace

    from medssl.handlers import PerClassDiceLogger

    logger = PerClassDiceLogger(evaluator=None, class_names=BTCV_LABELS)
    evaluator = SimpleNamespace(state=SimpleNamespace(metrics={"val_dice_per_class": torch.zeros(12)}))
    with pytest.raises(ValueError, match="12 values"):
        logger.per_class(evaluator)
    evaluator.state.metrics["val_dice_per_class"] = torch.arange(13) / 13
    assert logger.per_class(evaluator)["left adrenal gland"] == pytest.approx(12 / 13)


def test_overlay_slices_show_the_labelled_region():
    from medssl.handlers.images import overlay_slices, save_overlay_png

    ref = np.zeros((8, 8, 20), dtype=int)
    ref[2:5, 2:5, 10:14] = 3
    pred = np.zeros_like(ref)
    assert overlay_slices(ref, pred, 3) == [10, 12, 13]
    pred[0, 0, 2] = 1  # a false positive far away widens the range
    assert overlay_slices(ref, pred, 2) == [2, 13]
    assert overlay_slices(ref, pred, 9) == [2, 10, 11, 12, 13]  # fewer labelled slices than asked for
    assert overlay_slices(np.zeros_like(ref), np.zeros_like(ref), 3) == [0, 10, 19]  # no foreground: whole volume
    with pytest.raises(ValueError, match="shapes differ"):
        save_overlay_png("unused.png", np.zeros((1, 8, 8, 19)), ref, pred)
