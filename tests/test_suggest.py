"""medssl.suggest: strategies rank certain below uncertain, diversity, seeded control, datalist copy, CLI."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.checkpoint import make_checkpoint, save_checkpoint
from medssl.cli import main
from medssl.data.datalist import load_datalist
from medssl.errors import CheckpointError, ConfigError
from medssl.suggest import Score, score_volumes, select, similarity_matrix, write_label_datalist
from medssl.transforms.presets import preprocessing_summary

SPACING = (2.0, 2.0, 2.0)
SHAPE = (12, 12, 8)


def _threshold_network(weight: float, dropout: float | None = None) -> dict:
    """A 1×1×1 convolution whose foreground logit margin is ``2 * weight * (x - 0.5)`` for the intensity ``x``
    scaled from [0, 1000] to [0, 1]: peaked softmax far from 500, flat at 500."""
    config = {"_target_": "monai.networks.blocks.Convolution", "spatial_dims": 3, "in_channels": 1,
              "out_channels": 2, "kernel_size": 1, "conv_only": dropout is None}  # fmt: skip
    if dropout is not None:
        config.update(dropout=dropout, act=None, norm=None)
    state = {
        "conv.weight": torch.tensor([-weight, weight]).reshape(2, 1, 1, 1, 1),
        "conv.bias": torch.tensor([weight / 2, -weight / 2]),
    }
    pre = preprocessing_summary(spacing=SPACING, a_min=0, a_max=1000, roi_size=(8, 8, 8))
    return {"network": config, "state_dict": state, "stage": "test", "preprocessing": pre, "labels": {0: "bg", 1: "fg"}}


def _volume(path: Path, data: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([*SPACING, 1.0])), str(path))
    return str(path)


def _halves(axis: int, uncertain: float, other: float) -> np.ndarray:
    data = np.full(SHAPE, other, dtype=np.float32)
    index = [slice(None)] * 3
    index[axis] = slice(0, SHAPE[axis] // 2)
    data[tuple(index)] = uncertain
    return data


@pytest.fixture()
def volumes(tmp_path) -> dict[str, str]:
    """certain: every voxel far above threshold; flat: every voxel at it; two identical half-uncertain
    volumes (split along x) and a slightly less uncertain one split along y."""
    return {
        "certain": _volume(tmp_path / "certain.nii.gz", np.full(SHAPE, 1000.0)),
        "flat": _volume(tmp_path / "flat.nii.gz", np.full(SHAPE, 500.0)),
        "twin_a": _volume(tmp_path / "twin_a.nii.gz", _halves(0, 500.0, 1000.0)),
        "twin_b": _volume(tmp_path / "twin_b.nii.gz", _halves(0, 500.0, 1000.0)),
        "other": _volume(tmp_path / "other.nii.gz", _halves(1, 520.0, 1000.0)),
    }


def _records(volumes, names):
    return [{"image": volumes[n]} for n in names]


# ------------------------------------------------------------------------------------------------ scores


def test_entropy_scores_a_peaked_prediction_below_a_flat_one(volumes):
    ckpt = make_checkpoint(**_threshold_network(20.0))
    scores = score_volumes(ckpt, _records(volumes, ["certain", "flat"]), "entropy", device="cpu", precision="fp32")
    by_case = {s.case: s.score for s in scores}
    assert by_case["certain"] < 0.01
    assert by_case["flat"] == pytest.approx(1.0, abs=1e-3)  # p = (0.5, 0.5): normalised entropy 1
    ranked = select(scores, 2)
    assert [s.score.case for s in ranked] == ["flat", "certain"]


def test_mc_dropout_samples_disagreement_and_refuses_a_network_without_dropout(volumes):
    records = _records(volumes, ["certain", "twin_a"])
    with_dropout = make_checkpoint(**_threshold_network(2.0, dropout=0.5))
    first = score_volumes(with_dropout, records, "mc_dropout", samples=4, seed=3, device="cpu", precision="fp32")
    again = score_volumes(with_dropout, records, "mc_dropout", samples=4, seed=3, device="cpu", precision="fp32")
    assert [s.score for s in first] == [s.score for s in again]  # seeded masks
    assert all(s.score > 0 for s in first)  # dropout makes the passes disagree
    without = make_checkpoint(**_threshold_network(2.0))
    with pytest.raises(CheckpointError, match="mc_dropout needs dropout layers"):
        score_volumes(without, records, "mc_dropout", device="cpu")


def test_teacher_student_is_zero_for_the_same_weights_and_positive_for_others(volumes, tmp_path):
    records = _records(volumes, ["twin_a"])
    student = make_checkpoint(**_threshold_network(4.0))
    same = score_volumes(student, records, "teacher_student", teacher=student, device="cpu", precision="fp32")
    assert same[0].score == pytest.approx(0.0, abs=1e-4)
    # a Mean Teacher last.pt: the student's network config plus the EMA weights under "teacher"
    teacher_state = make_checkpoint(**_threshold_network(1.0))["state_dict"]
    last = save_checkpoint(tmp_path / "last.pt", **_threshold_network(4.0), teacher=teacher_state)
    other = score_volumes(student, records, "teacher_student", teacher=last, device="cpu", precision="fp32")
    assert other[0].score > 0.05
    wrong = _threshold_network(4.0)
    wrong["network"]["out_channels"] = 3
    with pytest.raises(CheckpointError, match="does not match"):
        score_volumes(student, records, "teacher_student", teacher=make_checkpoint(**wrong), device="cpu")
    with pytest.raises(ConfigError, match="needs a teacher"):
        score_volumes(student, records, "teacher_student", device="cpu")


def test_random_is_deterministic_per_seed_and_differs_across_seeds(volumes):
    records = _records(volumes, list(volumes))
    a = [s.score for s in score_volumes(None, records, "random", seed=0)]
    b = [s.score for s in score_volumes(None, records, "random", seed=0)]
    c = [s.score for s in score_volumes(None, records, "random", seed=1)]
    assert a == b
    assert a != c


# --------------------------------------------------------------------------------------------- diversity


def test_diversity_keeps_two_identical_volumes_out_of_the_same_top_two(volumes):
    ckpt = make_checkpoint(**_threshold_network(10.0))
    records = _records(volumes, ["twin_a", "twin_b", "other"])
    scores = score_volumes(ckpt, records, "entropy", device="cpu", precision="fp32")
    by_case = {s.case: s.score for s in scores}
    assert by_case["twin_a"] == by_case["twin_b"] > by_case["other"]
    plain = [s.score.case for s in select(scores, 2, diversity=0.0)]
    assert sorted(plain) == ["twin_a", "twin_b"]  # by score alone the twins take both places
    diverse = [s.score.case for s in select(scores, 2, diversity=0.5)]
    assert diverse == ["twin_a", "other"]
    assert select(scores, 2, diversity=0.5)[1].adjusted_score < by_case["other"] / by_case["twin_a"]


def test_similarity_is_one_for_identical_descriptors():
    sim = similarity_matrix(np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    assert sim[0, 1] == pytest.approx(1.0)
    assert sim[0, 2] == pytest.approx(np.exp(-1.0))
    scores = [Score(f"c{i}", f"/x/c{i}", 1.0, "entropy") for i in range(3)]
    assert [s.score.case for s in select(scores, 3)] == ["c0", "c1", "c2"]  # ties: earlier record first


# ----------------------------------------------------------------------------------------- datalist copy


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from medssl.data.phantoms import generate_phantom_dataset

    out = tmp_path_factory.mktemp("suggest_phantom")
    return Path(generate_phantom_dataset("ct-abdomen", out, cases=2, unlabeled=3, seed=0, shape=(48, 48, 24)))


def test_datalist_copy_moves_exactly_the_chosen_cases(phantom, tmp_path):
    before = phantom.read_bytes()
    raw = json.loads(before)
    unlabeled = load_datalist(phantom, keys="unlabeled").items("unlabeled")
    chosen = [unlabeled[2]["image"], unlabeled[0]["image"]]
    new = tmp_path / "elsewhere" / "next.json"
    new.parent.mkdir()
    new.write_text(write_label_datalist(phantom, chosen, new))
    assert phantom.read_bytes() == before
    copy = load_datalist(new, keys=["training", "unlabeled"])
    assert [i["image"] for i in copy.items("unlabeled")] == [unlabeled[1]["image"]]
    assert copy.items("training") == load_datalist(phantom, keys="training").items("training")
    moved = json.loads(new.read_text())["to_label"]
    # rebased relative to the copy's folder, in datalist order
    assert [os.path.normpath(new.parent / m["image"]) for m in moved] == [chosen[1], chosen[0]]
    assert {k for k in raw if k != "unlabeled"} <= set(json.loads(new.read_text()))


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture()
def model_file(tmp_path) -> Path:
    return save_checkpoint(tmp_path / "model.pt", **_threshold_network(0.01))


def test_cli_end_to_end_writes_csv_png_and_datalist(phantom, model_file, tmp_path, caplog):
    out, new = tmp_path / "suggest", tmp_path / "next.json"
    before = phantom.read_bytes()
    argv = ["suggest", "--model", str(model_file), "--datalist", str(phantom), "--count", "2", "--out", str(out),
            "--device", "cpu", "--precision", "fp32", "--write-datalist", str(new)]  # fmt: skip
    caplog.set_level(logging.INFO, logger="medssl.suggest")
    assert main(argv) == 0
    assert "volume 3 of 3" in caplog.text and "ETA" in caplog.text
    rows = list(csv.DictReader((out / "suggestions.csv").open()))
    assert [r["rank"] for r in rows] == ["1", "2"]
    assert {r["strategy"] for r in rows} == {"entropy"}
    assert (out / "suggestions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads(new.read_text())["to_label"]) == 2
    assert phantom.read_bytes() == before
    # resumed from the cache: the same suggestions without running the network
    caplog.clear()
    assert main(argv) == 0
    assert caplog.text.count("(cached)") == 3
    assert list(csv.DictReader((out / "suggestions.csv").open())) == rows


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--key", "missing"], "no key ['missing']"),
        (["--strategy", "mc_dropout"], "mc_dropout needs dropout layers"),
        (["--strategy", "nope"], "unknown strategy 'nope'"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(phantom, model_file, tmp_path, capsys, extra, problem):
    out = tmp_path / "suggest"
    argv = ["suggest", "--model", str(model_file), "--datalist", str(phantom), "--count", "1", "--out", str(out),
            "--device", "cpu", *extra]  # fmt: skip
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medssl: error: ") and problem in lines[0]
    assert not out.exists()
