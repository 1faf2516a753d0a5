import copy
import csv
import json

import pytest

from medssl.errors import ConfigError
from medssl.study import StudyConfig, run_study
from medssl.study_acquisition import acquisition_table, round_datalist, run_acquisition

BASE = {
    "training": [{"image": f"/d/img{k}.nii.gz", "label": f"/d/lab{k}.nii.gz"} for k in range(5)],
    "validation": [{"image": "/d/v.nii.gz", "label": "/d/vl.nii.gz"}],
    "unlabeled": [{"image": "/d/u0.nii.gz"}],
}
LABELS = {0: "background", 1: "organ"}


def test_round_datalist_moves_exactly_the_chosen_cases_and_leaves_the_base_untouched():
    before = copy.deepcopy(BASE)
    dl = round_datalist(BASE, [1], [3, 0], LABELS)
    assert [it["image"] for it in dl["training"]] == ["/d/img0.nii.gz", "/d/img1.nii.gz", "/d/img3.nii.gz"]
    assert all("label" in it for it in dl["training"])  # the annotator's labels come with them
    assert [it["image"] for it in dl["unlabeled"]] == ["/d/img2.nii.gz", "/d/img4.nii.gz", "/d/u0.nii.gz"]
    assert all("label" not in it for it in dl["unlabeled"])
    assert dl["validation"] == BASE["validation"]
    assert BASE == before
    dl["training"][0]["image"] = "changed"  # a copy: writing the round's datalist cannot reach the base
    assert BASE == before


@pytest.mark.parametrize("chosen", [[1], [2, 2], [5], [-1]])
def test_round_datalist_refuses_labeled_repeated_or_foreign_cases(chosen):
    with pytest.raises(ConfigError, match=r"chosen cases .* not labeled \[1\]"):
        round_datalist(BASE, [1], chosen, LABELS)


def test_acquisition_table_reports_rounds_and_dice_per_added_volume():
    rows = []
    for strategy, values in {"random": [0.2, 0.3, 0.4], "entropy": [0.2, 0.4, 0.6]}.items():
        for rnd, dice in enumerate(values):
            rows.append({"strategy": strategy, "round": rnd, "labeled": 1 + rnd, "seed": 0, "dice": dice})
    table = acquisition_table(rows, ["random", "entropy"])
    assert "| strategy | 1 annotated (round 0) | 2 annotated (round 1) | 3 annotated (round 2) |" in table
    assert "| random | 20.0 ± 0.0 | 30.0 ± 0.0 | 40.0 ± 0.0 | +10.0 ± 0.0 |" in table
    assert "| entropy | 20.0 ± 0.0 | 40.0 ± 0.0 | 60.0 ± 0.0 | +20.0 ± 0.0 |" in table


def test_acquisition_needs_one_method_and_a_pool_for_its_rounds(ct_phantom, tmp_path):
    kw = dict(datalist=str(ct_phantom), out=str(tmp_path / "s"), labeled=[1], seeds=1, acquisition=["random"])
    with pytest.raises(ConfigError, match="one method"):
        run_acquisition(StudyConfig(**kw, methods=["scratch", "mean_teacher"]))
    with pytest.raises(ConfigError, match="need 4 training cases, the pool has 3"):
        run_acquisition(StudyConfig(**kw, methods=["scratch"], rounds=3))
    with pytest.raises(ConfigError, match="unknown strategies"):
        run_acquisition(StudyConfig(**{**kw, "acquisition": ["loudest"]}, methods=["scratch"]))
    with pytest.raises(ConfigError, match="run_acquisition"):  # the label grid refuses rounds it does not run
        run_study(StudyConfig(**kw, methods=["scratch"]))


def _rounds(path):
    with open(path) as f:
        return {(r["strategy"], int(r["round"])): r for r in csv.DictReader(f)}


def test_tiny_acquisition_study_runs_end_to_end_and_resumes(ct_phantom, tmp_path, repo_root, monkeypatch):
    """random and entropy, 1 seed, 1 labeled + 2 rounds of +1, 2 iterations per cell: real bundles, scoring, metrics."""
    cfg = StudyConfig(
        datalist=str(ct_phantom),
        out=str(tmp_path / "study"),
        labeled=[1],
        methods=["scratch"],
        seeds=1,
        budget=2,
        overlays=[str(repo_root / "bundles" / "tiny.yaml")],
        overrides={"num_workers": 0},
        val_interval=2,
        device="cpu",
        precision="fp32",
        acquisition=["random", "entropy"],
        rounds=2,
        step=1,
        jobs=2,  # the two strategies' rounds run side by side (one thread each)
    )
    before = ct_phantom.read_text()
    paths = run_acquisition(cfg)
    assert ct_phantom.read_text() == before  # the study's datalist is never touched
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert {(r["strategy"], r["round"], r["labeled"]) for r in rows} == {
        (s, str(k), str(1 + k)) for s in ("random", "entropy") for k in range(3)
    }
    md = paths["md"].read_text()
    assert "| random |" in md and "| entropy |" in md and "3 annotated (round 2)" in md
    assert "Paired gain over random at each round" in md and "| entropy | 3 |" in md
    picks = _rounds(paths["rounds"])
    for s in ("random", "entropy"):
        start = set(picks[(s, 0)]["labeled_cases"].split(";"))
        assert picks[(s, 0)]["labeled_cases"] == picks[("random", 0)]["labeled_cases"]  # one round 0 for all
        added = [picks[(s, k)]["added"] for k in (1, 2)]
        assert all(a and a not in start for a in added) and added[0] != added[1]
        assert set(picks[(s, 2)]["labeled_cases"].split(";")) == start | set(added)
        cell = tmp_path / "study" / "cells" / f"scratch_{s}_r2_seed0"
        assert len(json.loads((cell / "datalist.json").read_text())["training"]) == 3
        assert json.loads((cell / "cell.json").read_text())["keys"]["chosen"] == [added[1]]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr("medssl.study._run_logged", no_training)
    again = run_acquisition(cfg)  # the same choices (deterministic), every cell reused
    assert _rounds(again["rounds"]) == picks
    assert again["csv"].read_text() == paths["csv"].read_text()


def test_cli_runs_the_acquisition_axis_with_scratch_by_default(tmp_path, monkeypatch, capsys):
    from medssl.cli import main
    from tests.test_study import _fake_runs, _phantom_like_datalist

    datalist = _phantom_like_datalist(tmp_path, n_train=4)
    ran = _fake_runs(monkeypatch, dice=0.4)
    out = tmp_path / "study"
    args = ["study", "--datalist", str(datalist), "--out", str(out), "--labeled", "2", "--seeds", "2"]
    args += ["--budget", "3", "--acquisition", "random", "--rounds", "1", "--step", "2"]
    assert main(args) == 0
    # round 0 of each seed first, then one round per seed; random needs no network to choose
    assert sorted(ran[:2]) == [f"training cell round 0 seed {s} (2 labeled)" for s in (0, 1)]
    assert sorted(w.split(" (+")[0] for w in ran[2:]) == [f"training cell random round 1 seed {s}" for s in (0, 1)]
    picks = _rounds(out / "rounds.csv")
    assert picks[("random", 1)]["labeled"] == "4"  # the whole pool after one round of 2
    assert main(args[:-1] + ["3"]) == 2  # 2 + 1 x 3 exceeds the pool of 4: one line, exit 2
    assert "pool has 4" in capsys.readouterr().err
