"""Metrics in mm on constructed cases, the empty-mask rule, and folder evaluation on tiny NIfTI files."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import compute_dice

from medssl.errors import DataError, ErrorList
from medssl.metrics import (
    binary_metrics,
    evaluate_case,
    evaluate_folder,
    tutorial_case_dice,
    tutorial_dice,
    tutorial_mean,
    tutorial_running_mean,
)

SPACING = (0.8, 1.0, 2.0)  # anisotropic, mm
SHAPE = (64, 64, 32)


def sphere(center_mm, radius_mm, shape=SHAPE, spacing=SPACING) -> np.ndarray:
    axes = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return np.linalg.norm(grid - np.asarray(center_mm), axis=-1) <= radius_mm


CENTER = np.array(SHAPE) * np.array(SPACING) / 2


def test_identical_masks_are_perfect():
    m = sphere(CENTER, 12)
    r = binary_metrics(m, m, SPACING)
    assert (r["dice"], r["jaccard"], r["hd95_mm"], r["asd_mm"]) == (1.0, 1.0, 0.0, 0.0)
    assert r["ref_voxels"] == r["pred_voxels"] == int(m.sum())


@pytest.mark.parametrize("axis", [0, 2])
@pytest.mark.parametrize("k_mm", [4.0, 8.0])
def test_offset_spheres_hd95_is_the_offset(axis, k_mm):
    """Two spheres offset by k mm: the surface distances are k*|cos(theta)|, HD95 = 0.95 k ~ k within a voxel."""
    shift = np.zeros(3)
    shift[axis] = k_mm
    r = binary_metrics(sphere(CENTER + shift, 14), sphere(CENTER, 14), SPACING)
    assert abs(r["hd95_mm"] - k_mm) <= max(SPACING)
    assert abs(r["hd95_mm"] - 0.95 * k_mm) <= max(SPACING)
    assert 0 < r["asd_mm"] < r["hd95_mm"]  # the mean of k*|cos| is k/2 on the continuous sphere


@pytest.mark.parametrize("k_mm", [4.0, 8.0])
def test_concentric_spheres_distances_equal_the_radius_gap(k_mm):
    """Radii r and r + k: every surface point is k mm from the other surface, so HD95 ~ ASD ~ k."""
    r = binary_metrics(sphere(CENTER, 10 + k_mm), sphere(CENTER, 10), SPACING)
    assert abs(r["hd95_mm"] - k_mm) <= max(SPACING)
    assert abs(r["asd_mm"] - k_mm) <= max(SPACING)


def test_distances_use_the_spacing():
    """The same voxel masks at doubled spacing give doubled distances."""
    a, b = sphere(CENTER, 12), sphere(CENTER + np.array([6.0, 0, 0]), 12)
    r1 = binary_metrics(a, b, SPACING)
    r2 = binary_metrics(a, b, tuple(2 * s for s in SPACING))
    assert r2["hd95_mm"] == pytest.approx(2 * r1["hd95_mm"], rel=1e-5)
    assert r2["asd_mm"] == pytest.approx(2 * r1["asd_mm"], rel=1e-5)
    assert r2["dice"] == r1["dice"]


def test_dice_and_jaccard_against_naive_reference():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, size=(8, 8, 6))
    ref = np.where(rng.random((8, 8, 6)) < 0.6, pred, rng.integers(0, 4, size=(8, 8, 6)))
    rows = evaluate_case(pred, ref, (1.0, 1.0, 1.0), {0: "background", 1: "a", 2: "b", 3: "c"})
    assert [row["label"] for row in rows] == [1, 2, 3]  # background excluded
    onehot = lambda x: torch.nn.functional.one_hot(torch.from_numpy(x), 4).permute(3, 0, 1, 2)[None]  # noqa: E731
    monai_dice = compute_dice(onehot(pred), onehot(ref), include_background=False)[0]
    for row in rows:
        tp = fp = fn = 0
        for p, r in zip(pred.ravel().tolist(), ref.ravel().tolist()):
            tp += p == row["label"] and r == row["label"]
            fp += p == row["label"] and r != row["label"]
            fn += p != row["label"] and r == row["label"]
        assert row["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert row["jaccard"] == pytest.approx(tp / (tp + fp + fn))
        assert row["dice"] == pytest.approx(float(monai_dice[row["label"] - 1]), abs=1e-6)


def test_empty_mask_rule():
    empty, full = np.zeros(SHAPE, bool), sphere(CENTER, 8)
    both = binary_metrics(empty, empty, SPACING)
    assert (both["dice"], both["jaccard"], both["hd95_mm"], both["asd_mm"]) == (1.0, 1.0, 0.0, 0.0)
    for pred, ref in ((empty, full), (full, empty)):
        one = binary_metrics(pred, ref, SPACING)
        assert (one["dice"], one["jaccard"]) == (0.0, 0.0)
        assert math.isnan(one["hd95_mm"]) and math.isnan(one["asd_mm"])


def test_evaluate_case_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(4, 4, 4\) differs .* \(4, 4, 5\)"):
        evaluate_case(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), SPACING, {1: "x"})
    with pytest.raises(ValueError, match=r"spacing .*\(1.0, 0.0, 1.0\)"):
        evaluate_case(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1), {1: "x"})


# ------------------------------------------------------------------------------------------- folders

SMALL = (24, 20, 12)
SMALL_SPACING = (1.5, 1.0, 2.5)


def write_nifti(path: Path, array: np.ndarray, spacing=SMALL_SPACING, origin=(0.0, 0.0, 0.0)) -> Path:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(array.astype(np.uint8), affine), str(path))
    return path


def small_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = np.zeros(SMALL, np.uint8)
    ref[4:14, 4:12, 2:8] = 1
    ref[15:22, 10:18, 4:10] = 2
    pred = ref.copy()
    pred[rng.integers(0, 24, 30), rng.integers(0, 20, 30), rng.integers(0, 12, 30)] = 1
    return pred, ref


@pytest.fixture()
def dataset(tmp_path) -> dict[str, Path]:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "pred").mkdir()
    entries = []
    for i in range(3):
        pred, ref = small_case(i)
        if i == 2:
            pred[pred == 2] = 0  # class 2 missed entirely: Dice 0, distances undefined
        write_nifti(tmp_path / "images" / f"case{i}.nii.gz", np.zeros(SMALL))
        write_nifti(tmp_path / "labels" / f"case{i}.nii.gz", ref)
        write_nifti(tmp_path / "pred" / f"case{i}_seg.nii.gz", pred)
        entries.append({"image": f"images/case{i}.nii.gz", "label": f"labels/case{i}.nii.gz"})
    datalist = tmp_path / "datalist.json"
    labels = {"0": "background", "1": "liver", "2": "spleen"}
    datalist.write_text(json.dumps({"labels": labels, "training": [], "validation": entries}))
    return {"root": tmp_path, "datalist": datalist, "pred": tmp_path / "pred", "labels": tmp_path / "labels"}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_folder_with_datalist(dataset, tmp_path):
    out = tmp_path / "metrics" / "scores.csv"
    summary = evaluate_folder(dataset["pred"], dataset["datalist"], out)
    rows = read_rows(out)
    assert [(r["case"], r["label"], r["name"]) for r in rows] == [
        (f"case{i}", str(k), name) for i in range(3) for k, name in ((1, "liver"), (2, "spleen"))
    ]
    # every CSV row equals the in-memory evaluation of that case (x, y, z order with the NIfTI spacing)
    for i in range(3):
        pred = np.asarray(nib.load(dataset["pred"] / f"case{i}_seg.nii.gz").dataobj)
        ref = np.asarray(nib.load(dataset["labels"] / f"case{i}.nii.gz").dataobj)
        expected = evaluate_case(pred, ref, SMALL_SPACING, {1: "liver", 2: "spleen"})
        got = [r for r in rows if r["case"] == f"case{i}"]
        for e, g in zip(expected, got):
            for m in ("dice", "jaccard", "hd95_mm", "asd_mm"):
                assert float(g[m]) == pytest.approx(e[m], abs=1e-5, nan_ok=True)
    spleen2 = rows[-1]
    assert float(spleen2["dice"]) == 0.0 and spleen2["hd95_mm"] == "nan" and spleen2["pred_voxels"] == "0"
    md = out.with_suffix(".md").read_text()
    assert md == summary
    assert "| 2 | spleen | 3 |" in md and "(1 excl.)" in md
    liver = [float(r["dice"]) for r in rows if r["label"] == "1"]
    assert f"{np.mean(liver):.3f} ± {np.std(liver, ddof=1):.3f}" in md
    assert "| overall |  | 6 |" in md and "Background (label 0) excluded" in md


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_evaluate_folder_results_follow_the_umask_and_leave_no_temp_files(dataset, tmp_path, umask):
    """mkstemp makes 0600 files: the results must get the mode a plain open() gives (Docker host user reads them)."""
    out = tmp_path / "results" / "scores.csv"
    old = os.umask(umask)
    try:
        evaluate_folder(dataset["pred"], dataset["datalist"], out)
    finally:
        os.umask(old)
    for path in (out, out.with_suffix(".md")):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert sorted(p.name for p in out.parent.iterdir()) == ["scores.csv", "scores.md"]


def test_evaluate_folder_writes_both_results_or_neither(dataset, tmp_path, monkeypatch):
    out = tmp_path / "results" / "scores.csv"

    import medssl.atomic as atomic

    real = atomic._prepare
    calls = []

    def second_fails(path, write):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, write)

    monkeypatch.setattr(atomic, "_prepare", second_fails)
    with pytest.raises(OSError, match="disk full"):
        evaluate_folder(dataset["pred"], dataset["datalist"], out)
    assert len(calls) == 2 and list(out.parent.iterdir()) == []  # the CSV was not renamed, its temp file is gone


def test_evaluate_folder_with_reference_folder(dataset, tmp_path):
    out = tmp_path / "scores.csv"
    evaluate_folder(dataset["pred"], dataset["labels"], out)
    rows = read_rows(out)
    assert [(r["case"], r["name"]) for r in rows][:2] == [("case0", "label_1"), ("case0", "label_2")]
    assert len(rows) == 6


def test_mismatched_geometry_names_both_files(dataset, tmp_path):
    pred, _ = small_case(1)
    bad = write_nifti(dataset["pred"] / "case1_seg.nii.gz", pred, spacing=(1.5, 1.0, 3.0))
    out = tmp_path / "scores.csv"
    with pytest.raises(
        DataError, match=r"case1_seg\.nii\.gz: geometry differs from the reference .*case1\.nii\.gz.*spacing"
    ):
        evaluate_folder(dataset["pred"], dataset["datalist"], out)
    assert not out.exists() and not out.with_suffix(".md").exists()
    write_nifti(bad, pred[:, :, :10])
    with pytest.raises(DataError, match=r"size \(24, 20, 10\) vs \(24, 20, 12\)"):
        evaluate_folder(dataset["pred"], dataset["datalist"], out)


def test_missing_predictions_are_all_listed(dataset, tmp_path, capsys):
    for i in (0, 2):
        (dataset["pred"] / f"case{i}_seg.nii.gz").unlink()
    out = tmp_path / "scores.csv"
    with pytest.raises(ErrorList) as info:
        evaluate_folder(dataset["pred"], dataset["datalist"], out)
    assert [Path(e.path).name for e in info.value.errors] == ["case0_seg.nii.gz", "case2_seg.nii.gz"]
    assert not out.exists()

    from medssl.cli import main

    assert main(["evaluate", "--pred", str(dataset["pred"]), "--ref", str(dataset["datalist"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("medssl: error: ") and "is missing" in line for line in err)


def test_nnunet_named_predictions_score_the_same_and_the_summary_says_so(dataset, tmp_path):
    medssl_out = tmp_path / "medssl.csv"
    evaluate_folder(dataset["pred"], dataset["datalist"], medssl_out)
    assert "medssl naming (`<name>_seg.nii.gz`)" in medssl_out.with_suffix(".md").read_text()
    nnunet = tmp_path / "nnunet_pred"
    nnunet.mkdir()
    for f in dataset["pred"].iterdir():  # nnU-Net names a prediction exactly like its reference
        (nnunet / f.name.replace("_seg.nii.gz", ".nii.gz")).write_bytes(f.read_bytes())
    out = tmp_path / "nnunet.csv"
    md = evaluate_folder(nnunet, dataset["datalist"], out)
    assert "nnU-Net naming (`<name>.nii.gz`)" in md and "medssl naming" not in md
    assert [r["dice"] for r in read_rows(out)] == [r["dice"] for r in read_rows(medssl_out)]
    # one case under both names is ambiguous: refused, naming the case, nothing written
    (nnunet / "case1_seg.nii.gz").write_bytes((nnunet / "case1.nii.gz").read_bytes())
    with pytest.raises(ErrorList) as info:
        evaluate_folder(nnunet, dataset["datalist"], tmp_path / "again.csv")
    assert "case 'case1' has two predictions, case1_seg.nii.gz and case1.nii.gz" in str(info.value)
    assert not (tmp_path / "again.csv").exists()


def test_unknown_label_values_and_bad_datalist(dataset, tmp_path):
    pred, _ = small_case(0)
    pred[0, 0, 0] = 7
    write_nifti(dataset["pred"] / "case0_seg.nii.gz", pred)
    with pytest.raises(DataError, match=r"label values \[7\] are not in the datalist's labels \[0, 1, 2\]"):
        evaluate_folder(dataset["pred"], dataset["datalist"], tmp_path / "s.csv")
    with pytest.raises(DataError, match=r"no 'test' list"):
        evaluate_folder(dataset["pred"], dataset["datalist"], tmp_path / "s.csv", key="test")


def test_evaluate_folder_on_ct_phantom(ct_phantom, tmp_path):
    """The phantom's own datalist (13 named BTCV organs): perfect predictions, then one organ dropped."""
    import shutil

    data = json.loads(Path(ct_phantom).read_text())
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for entry in data["validation"]:
        name = Path(entry["image"]).name.removesuffix(".nii.gz")
        shutil.copy(Path(ct_phantom).parent / entry["label"], pred_dir / f"{name}_seg.nii.gz")
    out = tmp_path / "scores.csv"
    evaluate_folder(pred_dir, ct_phantom, out)
    rows = read_rows(out)
    assert len(rows) == 13 * len(data["validation"])
    assert all(float(r["dice"]) == 1.0 and float(r["hd95_mm"]) == 0.0 for r in rows)
    first = sorted(pred_dir.iterdir())[0]
    img = nib.load(str(first))
    arr = np.asarray(img.dataobj).copy()
    arr[arr == 1] = 0
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), str(first))
    md = evaluate_folder(pred_dir, ct_phantom, out)
    spleen = [r for r in read_rows(out) if r["label"] == "1"][0]
    assert spleen["name"] == data["labels"]["1"] and float(spleen["dice"]) == 0.0 and spleen["hd95_mm"] == "nan"
    assert "(1 excl.)" in md


# ------------------------------------------------------------------------ tutorial convention (MONAI BTCV UNETR)


def swapped_organs(shape=(4, 4, 4)) -> tuple[np.ndarray, np.ndarray]:
    """Two organs of 8 voxels that swap half their voxels: background Dice 1, each organ Dice 0.5."""
    ref = np.zeros(shape, np.int64)
    ref[0, 0:2, 0:4] = 1  # 8 voxels
    ref[1, 0:2, 0:4] = 2  # 8 voxels
    pred = ref.copy()
    pred[0, 1, 0:4] = 2  # 4 voxels of organ 1 predicted as organ 2
    pred[1, 1, 0:4] = 1  # and 4 of organ 2 as organ 1
    return pred, ref


def monai_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int, reduction: str) -> torch.Tensor:
    """MONAI's DiceMetric as the tutorial configures it (include_background=True), fed one-hot like the tutorial."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=True, reduction=reduction)
    metric(
        y_pred=one_hot(torch.as_tensor(pred)[None, None], num_classes),
        y=one_hot(torch.as_tensor(ref)[None, None], num_classes),
    )
    return metric.aggregate()


def organs_mean(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> float:
    rows = evaluate_case(pred, ref, (1, 1, 1), {c: f"c{c}" for c in range(num_classes)})
    return float(np.mean([r["dice"] for r in rows]))


def test_conventions_differ_by_the_background_term():
    pred, ref = swapped_organs()
    assert organs_mean(pred, ref, 3) == pytest.approx(0.5)  # (0.5 + 0.5) / 2
    np.testing.assert_allclose(tutorial_dice(pred, ref, 3), [1.0, 0.5, 0.5])
    assert tutorial_case_dice(pred, ref, 3) == pytest.approx(2 / 3)  # (1 + 0.5 + 0.5) / 3
    np.testing.assert_allclose(monai_dice(pred, ref, 3, "none").numpy()[0], tutorial_dice(pred, ref, 3))
    assert float(monai_dice(pred, ref, 3, "mean")) == pytest.approx(tutorial_case_dice(pred, ref, 3))


def test_an_organ_absent_from_both_counts_for_organs_and_is_skipped_by_the_tutorial():
    pred, ref = swapped_organs()  # label 3 appears in neither map
    assert organs_mean(pred, ref, 4) == pytest.approx((0.5 + 0.5 + 1.0) / 3)  # medssl: both empty → Dice 1
    per_class = tutorial_dice(pred, ref, 4)
    assert math.isnan(per_class[3])  # MONAI: no reference voxels → NaN, left out of the mean
    assert tutorial_case_dice(pred, ref, 4) == pytest.approx(2 / 3)  # unchanged by the absent class
    np.testing.assert_allclose(monai_dice(pred, ref, 4, "none").numpy()[0], per_class, equal_nan=True)
    assert float(monai_dice(pred, ref, 4, "mean")) == pytest.approx(2 / 3)


def test_an_organ_predicted_but_absent_from_the_reference_costs_nothing_in_the_tutorial():
    pred, ref = swapped_organs()
    pred[3, 3, 0:4] = 3  # 4 background voxels predicted as organ 3, which the reference lacks
    organ_rows = evaluate_case(pred, ref, (1, 1, 1), {1: "a", 2: "b", 3: "c"})
    assert organ_rows[2]["dice"] == 0.0  # medssl: a false organ scores 0
    assert organs_mean(pred, ref, 4) == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    background = 2 * 44 / (48 + 44)  # 48 reference background voxels, 44 predicted, all correct
    expected = [background, 0.5, 0.5, math.nan]
    np.testing.assert_allclose(tutorial_dice(pred, ref, 4), expected, equal_nan=True)
    np.testing.assert_allclose(monai_dice(pred, ref, 4, "none").numpy()[0], expected, equal_nan=True)
    assert tutorial_case_dice(pred, ref, 4) == pytest.approx((background + 1.0) / 3)


def test_tutorial_mean_matches_monai_aggregation_over_cases_and_the_notebook_running_mean():
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    perfect = np.zeros((4, 4, 4), np.int64)
    perfect[0, 0, 0] = 1  # one class present besides background, both perfect
    cases = [swapped_organs(), (perfect, perfect.copy()), swapped_organs()]
    scores = [tutorial_case_dice(p, r, 3) for p, r in cases]
    assert scores == pytest.approx([2 / 3, 1.0, 2 / 3])
    metric = DiceMetric(include_background=True, reduction="mean")
    running = []  # ssl_finetune.ipynb: aggregate() after every case, no reset, then the mean of those values
    for p, r in cases:
        metric(y_pred=one_hot(torch.as_tensor(p)[None, None], 3), y=one_hot(torch.as_tensor(r)[None, None], 3))
        running.append(float(metric.aggregate()))
    assert tutorial_mean(scores) == pytest.approx(running[-1]) == pytest.approx(7 / 9)  # mean of per-case means
    # pooling all non-NaN (case, class) values instead would give (2 + 0.5 * 4 + 2) / 8 = 0.75: not MONAI's number
    assert tutorial_running_mean(scores) == pytest.approx(float(np.mean(running)))
    assert tutorial_running_mean(scores) == pytest.approx((2 / 3 + 5 / 6 + 7 / 9) / 3)
    assert tutorial_mean([math.nan]) == 0.0 and tutorial_mean([0.5, math.nan]) == 0.5


def test_tutorial_dice_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\(2, 2, 2\) differs"):
        tutorial_dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), 2)
    with pytest.raises(ValueError, match=r"reference label values \[5\] lie outside \[0, 3\)"):
        tutorial_dice(np.zeros((2, 2, 2)), np.full((2, 2, 2), 5), 3)
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        tutorial_dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), 0)


def test_evaluate_folder_tutorial_convention_reports_both_numbers(dataset, tmp_path):
    out = tmp_path / "scores.csv"
    organs_md = evaluate_folder(dataset["pred"], dataset["datalist"], out)
    organs_csv = out.read_text()
    md = evaluate_folder(dataset["pred"], dataset["datalist"], out, convention="tutorial")
    assert out.read_text() == organs_csv  # the CSV does not depend on the convention
    assert md.startswith(organs_md)  # the per-organ numbers stay first; the tutorial's come beside them
    assert "Convention (organs, the primary number)" in organs_md and "Tutorial convention" not in organs_md
    rows = read_rows(out)
    expected = []
    for i in range(3):
        pred = np.asarray(nib.load(dataset["pred"] / f"case{i}_seg.nii.gz").dataobj)
        ref = np.asarray(nib.load(dataset["labels"] / f"case{i}.nii.gz").dataobj)
        expected.append(float(monai_dice(pred, ref, 3, "mean")))  # the tutorial's number for the case, by MONAI
        got = [float(r["case_dice_tutorial"]) for r in rows if r["case"] == f"case{i}"]
        assert got == pytest.approx([expected[-1]] * 2, abs=1e-5)  # the case's score on each of its rows
        assert f"| case{i} | {expected[-1]:.3f} |" in md
    assert f"| mean | {np.mean(expected):.3f} |" in md
    assert "Convention (tutorial)" in md and "overlap 0.25" in md
    assert f"in this order: {tutorial_running_mean(expected):.3f}" in md
    with pytest.raises(ValueError, match="convention must be one of .*'background'"):
        evaluate_folder(dataset["pred"], dataset["datalist"], out, convention="background")


def test_cli_evaluate_names_its_convention(dataset, tmp_path, capsys):
    from medssl.cli import main

    args = ["evaluate", "--pred", str(dataset["pred"]), "--ref", str(dataset["datalist"])]
    assert main([*args, "--out", str(tmp_path / "a.csv")]) == 0
    text = capsys.readouterr().out
    assert text.rstrip().endswith("convention: organs") and "Tutorial convention" not in text
    assert main([*args, "--out", str(tmp_path / "b.csv"), "--convention", "tutorial"]) == 0
    text = capsys.readouterr().out
    assert text.rstrip().endswith("convention: tutorial") and "| mean |" in text
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(tmp_path / "c.csv"), "--convention", "all"])
    assert exc.value.code == 2
    assert "invalid choice: 'all'" in capsys.readouterr().err
    assert not (tmp_path / "c.csv").exists()
