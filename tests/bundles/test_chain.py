"""The chain ssl_pretrain.yaml → btcv_unetr.yaml (pretrained_ckpt) with tiny.yaml: every encoder tensor arrives."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from medssl.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "bundles" / "tiny.yaml")
SSL = [str(REPO / "bundles" / "ssl_pretrain.yaml"), TINY]
FINETUNE = [str(REPO / "bundles" / "supervised.yaml"), str(REPO / "bundles" / "btcv_unetr.yaml"), TINY]
ENCODER = re.compile(r"^(patch_embedding|blocks|norm)\.")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def pretrained(ct_phantom, tmp_path_factory) -> Path:
    from monai.bundle import run

    data = Path(ct_phantom).parent
    out = tmp_path_factory.mktemp("chain") / "ssl"
    run("training", config_file=SSL, bundle_root=str(out.parent), dataset_dir=str(data), output_dir=str(out),
        max_epochs=1)  # fmt: skip
    return out / "model.pt"


def test_finetune_starts_from_every_pretrained_encoder_tensor(pretrained, ct_phantom, tmp_path):
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    source = {k: v for k, v in load_checkpoint(pretrained)["state_dict"].items() if ENCODER.match(k)}
    assert len(source) > 20

    out = tmp_path / "finetune"
    wf = ConfigWorkflow(config_file=FINETUNE, workflow_type="train", bundle_root=str(tmp_path),
                        dataset_dir=str(Path(ct_phantom).parent), output_dir=str(out), pretrained_ckpt=str(pretrained),
                        max_iterations=2, val_interval=2)  # fmt: skip
    # after the workflow has configured logging from bundles/logging.conf (which replaces the root handlers)
    lines = _Lines()
    log = logging.getLogger("medssl.networks.pretrained")
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    try:
        wf.initialize()
        trainer = wf.parser.get_parsed_content("train#trainer")
        at_start = {}

        @trainer.on(Events.ITERATION_STARTED(once=1))
        def _before_first_step(engine):
            at_start.update({k: v.detach().cpu().clone() for k, v in engine.network.vit.state_dict().items()})

        wf.run()
    finally:
        log.removeHandler(lines)

    full = [m for m in lines.lines if re.search(r"loaded (\d+)/(\d+) encoder tensors", m)]
    assert len(full) == 1, lines.lines
    n, total = map(int, re.search(r"loaded (\d+)/(\d+)", full[0]).groups())
    assert n == total == len(at_start), full[0]

    assert set(source) <= set(at_start)
    for k, v in source.items():
        assert torch.equal(at_start[k], v), k
    # then fine-tuning moves them, and model.pt holds the fine-tuned UNETR
    tuned = load_checkpoint(out / "model.pt")
    assert tuned["stage"] == "finetune"
    assert not torch.equal(tuned["state_dict"]["vit.blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])


def test_a_mismatched_encoder_is_refused(pretrained, ct_phantom, tmp_path):
    """A deeper fine-tuning encoder than the pretrained one: strict loading raises instead of starting half-random."""
    from monai.bundle import ConfigWorkflow

    from medssl.errors import CheckpointError

    wf = ConfigWorkflow(config_file=FINETUNE, workflow_type="train", bundle_root=str(tmp_path),
                        dataset_dir=str(Path(ct_phantom).parent), output_dir=str(tmp_path / "out"),
                        pretrained_ckpt=str(pretrained), num_layers=3)  # fmt: skip
    wf.initialize()
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("network")
    chain, found = info.value, None
    while chain is not None:
        found = chain if isinstance(chain, CheckpointError) else found
        chain = chain.__cause__
    assert found is not None and "no source" in str(found)
