"""bundles/ssl_pretrain.yaml + tiny.yaml end to end on a small synthetic CT: outputs, learning, exact resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from medssl.checkpoint import build_network, load_checkpoint
from medssl.handlers import MetricHistory
from tests.bundles.bundle_helpers import overrides as bundle_overrides

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [str(REPO / "bundles" / "ssl_pretrain.yaml"), str(REPO / "bundles" / "tiny.yaml")]


@pytest.fixture(scope="module")
def tiny_ct(ct_phantom) -> Path:
    """The session CT phantom (64 x 64 x 32; 3 training + 2 unlabeled volumes train, 1 validates)."""
    return Path(ct_phantom).parent


def _workflow(data: Path, out: Path, **extra):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=CONFIGS, workflow_type="train", **bundle_overrides(data, out, **extra))
    wf.initialize()
    return wf


@pytest.fixture(scope="module")
def tiny_run(tiny_ct, tmp_path_factory) -> Path:
    from monai.bundle import run

    out = tmp_path_factory.mktemp("ssl_run") / "out"
    # 2 epochs of 3 steps (tiny.yaml's budget is 4 steps)
    run("training", config_file=CONFIGS, **bundle_overrides(tiny_ct, out, max_iterations=6))
    return out


def test_tiny_run_writes_outputs(tiny_run):
    for name in ("model.pt", "last.pt", "views.png", "val_metrics.csv"):
        assert (tiny_run / name).is_file(), name
    assert list(tiny_run.glob("events.out.tfevents.*"))
    png = __import__("matplotlib.pyplot").pyplot.imread(tiny_run / "views.png")
    assert png.ndim == 3 and png.shape[0] > 100

    model = torch.load(tiny_run / "model.pt", weights_only=True)
    assert model["stage"] == "ssl_pretrain"
    assert model["network"]["_target_"].startswith("monai.networks.nets.")
    assert model["network"]["hidden_size"] == 96 and model["network"]["img_size"] == [32, 32, 32]
    assert model["preprocessing"]["spacing"] == [2.0, 2.0, 2.0]
    assert model["preprocessing"]["intensity"]["a_min"] == -57.0
    net = build_network(load_checkpoint(tiny_run / "model.pt"))
    recon, _ = net(torch.rand(1, 1, 32, 32, 32))
    assert recon.shape == (1, 1, 32, 32, 32)

    last = load_checkpoint(tiny_run / "last.pt")
    assert {"optimizer", "rng", "transform_rng"} <= set(last)
    assert last["progress"] == {"epoch": 2, "iteration": 6}  # 5 volumes, batch 2 → 3 iterations per epoch


def test_tiny_run_tensorboard_scalars_and_images(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    for f in tiny_run.glob("events.out.tfevents.*"):
        ea = EventAccumulator(str(f))
        ea.Reload()
        scalars |= set(ea.Tags()["scalars"])
        images |= set(ea.Tags()["images"])
    assert {"loss", "loss_reconstruction", "loss_contrastive", "lr", "val_l1"} <= scalars
    assert images


def test_tiny_run_validation_l1_decreases(tiny_run):
    history = MetricHistory.read(tiny_run / "val_metrics.csv")
    assert [int(h["epoch"]) for h in history] == [0, 1, 2]  # before training, then every epoch
    assert history[-1]["val_l1"] < history[0]["val_l1"]
    best = torch.load(tiny_run / "model.pt", weights_only=True)["best"]
    assert best["value"] == pytest.approx(min(h["val_l1"] for h in history[1:]))


def test_resume_continues_at_saved_step_with_identical_state(tiny_ct, tmp_path):
    """1 epoch, then resume for a 2nd: same step, same optimizer state, and the same weights as 2 straight epochs."""
    from ignite.engine import Events

    straight, split = tmp_path / "straight", tmp_path / "split"
    _workflow(tiny_ct, straight, max_epochs=2, max_iterations=None).run()
    _workflow(tiny_ct, split, max_epochs=1, max_iterations=None).run()
    saved = load_checkpoint(split / "last.pt")
    assert saved["progress"] == {"epoch": 1, "iteration": 3}

    wf = _workflow(tiny_ct, split, max_epochs=2, max_iterations=None, resume=True)
    trainer = wf.parser.get_parsed_content("train#trainer")
    seen = {}

    @trainer.on(Events.STARTED)
    def _after_restore(engine):  # registered after the checkpoint handler's restore
        seen["epoch"], seen["iteration"] = engine.state.epoch, engine.state.iteration
        seen["optimizer"] = copy.deepcopy(engine.optimizer.state_dict())  # live tensors change in place

    @trainer.on(Events.ITERATION_STARTED)
    def _first_step(engine):
        seen.setdefault("first_iteration", engine.state.iteration)

    wf.run()
    assert (seen["epoch"], seen["iteration"]) == (1, 3)
    assert seen["first_iteration"] == 4
    for pid, state in saved["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(seen["optimizer"]["state"][pid][k], v), (pid, k)
    assert seen["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]

    a = load_checkpoint(straight / "last.pt")
    b = load_checkpoint(split / "last.pt")
    assert a["progress"] == b["progress"] == {"epoch": 2, "iteration": 6}
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=0, msg=k)


def test_missing_dataset_is_an_error_not_generated(tmp_path):
    from medssl.errors import DataError

    wf = _workflow(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("datalist_path")
    chain, found = info.value, None
    while chain is not None:
        found = chain if isinstance(chain, DataError) else found
        chain = chain.__cause__
    assert found is not None and "nowhere" in str(found)
    assert not (tmp_path / "nowhere").exists()


def test_full_recipe_defaults(tmp_path):
    """The config without the overlay holds the published recipe."""
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(CONFIGS[0])
    expect = {
        "roi_size": [96, 96, 96],
        "spacing": [2.0, 2.0, 2.0],
        "a_min": -57.0,
        "a_max": 164.0,
        "batch_size": 4,
        "num_samples": 2,
        "max_epochs": 500,
        "max_iterations": None,
        "val_interval": 2,
        "seed": 123,
        "learning_rate": 1e-4,
        "temperature": 0.05,
        "hidden_size": 768,
        "mlp_dim": 3072,
        "num_layers": 12,
        "num_heads": 12,
        "patch_size": 16,
        "inpaint_holes": 6,
        "inpaint_min_size": 5,
        "inpaint_max_size": 32,
        "outpaint_holes": 6,
        "outpaint_min_size": 20,
        "outpaint_max_size": 64,
        "shuffle_prob": 0.8,
        "shuffle_holes": 10,
        "shuffle_size": 8,
        "precision": "auto",
        "resume": False,
        "pretrained_ckpt": None,
    }
    assert {k: p[k] for k in expect} == expect
    p["bundle_root"] = str(tmp_path)
    net = p.get_parsed_content("network_def")()
    assert sum(t.numel() for t in net.parameters()) > 80e6  # ViT-B
