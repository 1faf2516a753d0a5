"""``max_iterations`` stops every training bundle after exactly that many optimizer steps (one budget, issue #19)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medssl.checkpoint import load_checkpoint
from tests.bundles.bundle_helpers import overrides as bundle_overrides

REPO = Path(__file__).resolve().parents[2]
TINY = "tiny.yaml"
STEPS = 3

# bundle files (before tiny.yaml), the phantom fixture, more overrides; val_interval beyond the budget: no validation
CASES = {
    "ssl_pretrain": (["ssl_pretrain.yaml"], "ct_phantom", {}),
    "btcv_unetr": (["supervised.yaml", "btcv_unetr.yaml"], "ct_phantom", {}),
    "la_vnet": (["supervised.yaml", "la_vnet.yaml"], "la_phantom", {}),
    "mean_teacher": (["mean_teacher.yaml"], "la_phantom", {}),
    "mean_teacher_btcv": (["mean_teacher.yaml", "mean_teacher_btcv.yaml"], "ct_phantom", {}),
    # an epoch of 8 unlabeled patch batches: the budget stops it inside the first epoch
    "s5cl_classification": (["s5cl.yaml"], "ct_phantom", {"labeled_per_class": 1}),
    "s5cl_segmentation": (["s5cl.yaml"], "ct_phantom", {"mode": "segmentation"}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_max_iterations_stops_every_training_bundle(name, request, tmp_path):
    from monai.bundle import ConfigWorkflow

    files, fixture, extra = CASES[name]
    configs = [str(REPO / "bundles" / f) for f in [*files, TINY]]
    data = Path(request.getfixturevalue(fixture)).parent
    out = tmp_path / "out"
    wf = ConfigWorkflow(
        config_file=configs,
        workflow_type="train",
        **bundle_overrides(data, out, device="cpu", precision="fp32", max_iterations=STEPS, val_interval=1000, **extra),
    )
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    steps = []
    trainer.optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    wf.run()
    assert len(steps) == STEPS
    assert load_checkpoint(out / "last.pt")["progress"]["iteration"] == STEPS
    assert trainer.state.iteration == STEPS


@pytest.mark.parametrize(
    "files, max_epochs, max_iterations",
    [
        (["ssl_pretrain.yaml"], 500, None),
        (["s5cl.yaml"], 100, None),
        (["supervised.yaml", "btcv_unetr.yaml"], None, 30000),
        (["supervised.yaml", "la_vnet.yaml"], None, 6000),
        (["mean_teacher.yaml"], None, 6000),
        (["mean_teacher.yaml", "mean_teacher_btcv.yaml"], None, 25000),
    ],
)
def test_recipes_keep_their_budget_and_tiny_sets_one_number(files, max_epochs, max_iterations):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(REPO / "bundles" / f) for f in files])
    assert (p["max_epochs"], p["max_iterations"]) == (max_epochs, max_iterations)
    assert p["train"]["trainer"]["max_epochs"] == "@max_epochs"
    assert p["train"]["trainer"]["max_iterations"] == "@max_iterations"
    tiny = ConfigParser.load_config_file(str(REPO / "bundles" / TINY))
    assert tiny["max_iterations"] == 4 and not {"max_epochs", "steps_per_epoch"} & set(tiny)
