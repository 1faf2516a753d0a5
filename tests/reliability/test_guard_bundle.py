"""NonFiniteLossGuard wired into the real ssl_pretrain bundle (tiny overlay): a NaN in the first step of epoch 2 stops the run.

The bundle lists the guard in ``train#handlers``; the bundle's loss is wrapped
so that the first step of epoch 2 returns NaN; the run must stop with a message naming step and loss parts,
``last.pt`` of epoch 1 must survive untouched, and the network must still hold its weights.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from medssl.checkpoint import load_checkpoint
from medssl.handlers.guards import NonFiniteLossError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [str(REPO / "bundles" / "ssl_pretrain.yaml"), str(REPO / "bundles" / "tiny.yaml")]
GUARD = {"_target_": "medssl.handlers.NonFiniteLossGuard", "output_dir": "@output_dir"}


class _PoisonAt:
    """The bundle's loss, with every part NaN at the ``at``-th call."""

    def __init__(self, loss, at: int):
        self.loss, self.at, self.calls = loss, at, 0

    def __call__(self, *args):
        self.calls += 1
        parts = self.loss(*args)
        if self.calls == self.at:
            parts = {k: v * float("nan") if k != "reconstruction" else v for k, v in parts.items()}
        return parts


@pytest.fixture(scope="module")
def stopped_run(ct_phantom, tmp_path_factory):
    """Run the guarded, poisoned bundle once: (trainer, output folder, steps per epoch, the raised error)."""
    from monai.bundle import ConfigWorkflow

    tmp_path = tmp_path_factory.mktemp("guarded_ssl")
    out = tmp_path / "out"
    wf = ConfigWorkflow(
        config_file=CONFIGS,
        workflow_type="train",
        bundle_root=str(tmp_path),
        dataset_dir=str(Path(ct_phantom).parent),
        output_dir=str(out),
        device="cpu",
        precision="fp32",
        max_epochs=3,
        validate_at_start=False,
    )
    assert GUARD in wf.parser["train"]["handlers"]  # every training bundle lists the guard itself
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    steps_per_epoch = len(trainer.data_loader)
    trainer.loss_function = _PoisonAt(trainer.loss_function, at=steps_per_epoch + 1)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run()
    return trainer, out, steps_per_epoch, info.value


def test_nan_in_ssl_pretrain_stops_and_keeps_last_good_checkpoint(stopped_run):
    trainer, out, steps_per_epoch, err = stopped_run
    step = steps_per_epoch + 1
    assert str(err).startswith(f"{out}: non-finite loss at iteration {step} (epoch 2): loss=nan")
    last = load_checkpoint(out / "last.pt")
    assert last["progress"] == {"epoch": 1, "iteration": steps_per_epoch}
    weights = trainer.network.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in last["state_dict"].items())


def test_nan_message_names_every_ssl_loss_part(stopped_run):
    err = stopped_run[3]
    assert {"loss", "loss_reconstruction", "loss_contrastive"} <= set(err.parts)
    assert math.isfinite(err.parts["loss_reconstruction"])  # the poisoned step kept it finite
    assert math.isnan(err.parts["loss_contrastive"]) and math.isnan(err.parts["loss"])


TRAINING_BUNDLES = {
    "ssl_pretrain": ["ssl_pretrain.yaml"],
    "btcv_unetr": ["supervised.yaml", "btcv_unetr.yaml"],
    "la_vnet": ["supervised.yaml", "la_vnet.yaml"],
    "mean_teacher": ["mean_teacher.yaml"],
    "mean_teacher_btcv": ["mean_teacher.yaml", "mean_teacher_btcv.yaml"],
    "s5cl": ["s5cl.yaml"],
}


def test_every_training_bundle_is_listed():
    """A new training bundle must join the guard check below (every bundle with a trainer is one)."""
    import yaml

    with_trainer = set()
    for path in (REPO / "bundles").glob("*.yaml"):
        config = yaml.safe_load(path.read_text()) or {}
        if isinstance(config.get("train"), dict) and "trainer" in config["train"]:
            with_trainer.add(path.name)
    listed = {files[0] for files in TRAINING_BUNDLES.values()}
    assert with_trainer == listed


def _handler_entries(parser, handlers) -> list:
    """The handler configs of ``train#handlers`` in order: a list as written, or a ``$`` expression that joins
    referenced ids (``"$[@a, @b] + @c"``, as bundles/supervised.yaml composes them), each reference expanded."""
    if isinstance(handlers, list):
        return [e for h in handlers for e in (_handler_entries(parser, h) if _is_reference(h) else [h])]
    if isinstance(handlers, str) and handlers.startswith(("$", "@")):
        entries = []
        for ref in re.findall(r"@([A-Za-z0-9_#]+)", handlers):
            item = parser[ref]
            entries.extend(_handler_entries(parser, item) if isinstance(item, (list, str)) else [item])
        return entries
    return [handlers]


def _is_reference(value) -> bool:
    return isinstance(value, str) and value.startswith("@") and "#" in value


@pytest.mark.parametrize("overlays", [["tiny.yaml"], ["tiny.yaml", "multi_gpu.yaml"]])
@pytest.mark.parametrize("name", sorted(TRAINING_BUNDLES))
def test_every_training_bundle_hands_the_nan_guard_to_its_trainer(name, overlays):
    from monai.bundle import ConfigParser

    from medssl.engines.distributed import is_output_handler

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / f) for f in TRAINING_BUNDLES[name] + overlays])
    handlers = parser["train"]["trainer"]["train_handlers"]
    # the trainer takes @train#handlers, directly or through main_process_only (which keeps the guard on every rank)
    assert handlers in ("@train#handlers", "$medssl.engines.distributed.main_process_only(@train#handlers)"), handlers
    entries = _handler_entries(parser, parser["train"]["handlers"])
    targets = [h.get("_target_") if isinstance(h, dict) else h for h in entries]
    assert GUARD in entries, f"{name}: no NonFiniteLossGuard in train#handlers {targets}"
    # the guard sits right before the checkpoint handler, so on any shared event it fires before a save
    guard = targets.index(GUARD["_target_"])
    assert targets[guard + 1] == "medssl.handlers.CheckpointHandler", targets
    from medssl.handlers import NonFiniteLossGuard

    assert not is_output_handler(NonFiniteLossGuard)
