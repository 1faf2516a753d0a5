"""bundles/la_uamt_protocol.yaml on mean_teacher.yaml and la_vnet.yaml: the published window, the final model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.checkpoint import load_checkpoint
from medssl.handlers import ValidationLog
from medssl.inference.window import overlap_for_stride
from tests.bundles.bundle_helpers import overrides

REPO = Path(__file__).resolve().parents[2]
OVERLAY = str(REPO / "bundles" / "la_uamt_protocol.yaml")
TINY = str(REPO / "bundles" / "tiny.yaml")
BASES = {
    "mean_teacher": [str(REPO / "bundles" / "mean_teacher.yaml")],
    "la_vnet": [str(REPO / "bundles" / f) for f in ("supervised.yaml", "la_vnet.yaml")],
}


def _parser(base: str, data: Path, out: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([*BASES[base], OVERLAY])
    for key, value in overrides(data, out, num_workers=0, cache_rate=0.0).items():
        parser[key] = value
    return parser


def _published_starts(size: int, patch: int, stride: int) -> list[int]:
    """UA-MT's test_single_case along one axis: zero-pad to the patch, then min(k * stride, size - patch)."""
    size = max(size, patch)
    return [min(stride * k, size - patch) for k in range(math.ceil((size - patch) / stride) + 1)]


@pytest.mark.parametrize("base", sorted(BASES))
def test_overlay_parses_with_the_published_window_and_one_final_validation(base, la_phantom, tmp_path):
    parser = _parser(base, Path(la_phantom).parent, tmp_path / "out")
    assert parser.get_parsed_content("roi_size") == [112, 112, 80]
    assert parser.get_parsed_content("val_interval") == parser.get_parsed_content("max_iterations") == 6000
    assert parser.get_parsed_content("orientation") is None
    assert parser.get_parsed_content("validate_at_start") is False
    sliding = parser.get_parsed_content("validate#inferer").inferer
    assert tuple(sliding.roi_size) == (112, 112, 80)
    assert tuple(sliding.overlap) == pytest.approx((0.8348214, 0.8348214, 0.94375))
    assert parser.get_parsed_content("preprocessing_summary")["orientation"] is None
    assert parser.get_parsed_content("dice_squared") is True and parser.get_parsed_content("loss").dice.squared_pred
    if base == "mean_teacher":
        assert parser.get_parsed_content("train#best_model").networks.keys() == {"student"}


@pytest.mark.parametrize("size", [(150, 140, 88), (130, 125, 88), (100, 150, 70), (112, 200, 81)])
def test_monai_windows_start_where_the_published_loop_starts(size):
    from monai.inferers import sliding_window_inference

    roi, stride = (112, 112, 80), (18, 18, 4)
    seen = set()

    def predictor(window, slices):
        seen.update(tuple(s.start for s in sl[2:]) for sl in slices)
        return torch.zeros(window.shape[0], 2, *window.shape[2:])

    with torch.no_grad():
        sliding_window_inference(
            torch.zeros(1, 1, *size), roi, 8, predictor, overlap=overlap_for_stride(roi, stride), with_coord=True
        )
    expected = {
        (x, y, z)
        for x in _published_starts(size[0], 112, 18)
        for y in _published_starts(size[1], 112, 18)
        for z in _published_starts(size[2], 80, 4)
    }
    assert seen == expected


def test_overlap_for_stride_bad_arguments():
    assert overlap_for_stride((32, 32), (32, 1)) == (0.0, pytest.approx(1 - 1.5 / 32))
    for stride in [(0, 4), (33, 4), (2.5, 4), (18,)]:
        with pytest.raises(ValueError, match="stride"):
            overlap_for_stride((32, 32), stride)


def test_tiny_mean_teacher_run_keeps_the_final_student(la_phantom, tmp_path):
    from monai.bundle import run

    out = tmp_path / "out"
    run("training", config_file=[*BASES["mean_teacher"], TINY, OVERLAY], **overrides(Path(la_phantom).parent, out))
    rows = ValidationLog.read(out / "val_metrics.csv")
    assert [int(r["iteration"]) for r in rows] == [4], "one validation, at the last iteration"
    model, last = load_checkpoint(out / "model.pt"), load_checkpoint(out / "last.pt")
    assert model["best"]["network"] == "student" and model["best"]["iteration"] == 4
    assert model["best"]["value"] == pytest.approx(float(rows[0]["val_mean_dice/student"]))
    assert model["preprocessing"]["orientation"] is None
    for key, value in last["state_dict"].items():  # the student's weights after the last iteration
        assert torch.equal(model["state_dict"][key], value), key
    assert any(not torch.equal(last["teacher"][k], v) for k, v in last["state_dict"].items() if v.is_floating_point())
    assert np.isfinite(model["best"]["value"])
