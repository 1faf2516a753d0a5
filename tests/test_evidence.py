"""make evidence: the committed configuration is valid, a partial run says so, the report names the machine."""

import csv
import json

import pytest

from medssl import evidence
from medssl.data.phantoms.common import validation_count
from medssl.study import METHODS, StudyConfig
from tests.test_study import _rows


@pytest.mark.parametrize("task", sorted(evidence.EVIDENCE))
def test_evidence_configuration_builds_valid_studies(task):
    spec = evidence.EVIDENCE[task]
    cfg = StudyConfig(datalist="d.json", out="o", **spec["study"])
    assert set(cfg.methods) <= set(METHODS) and cfg.seed_list == [0, 1, 2]
    assert set(cfg.method_overrides) <= set(cfg.methods)
    # the design: CT at three labeled counts with all four methods, LA with supervised / MT / UA-MT
    expected = {"ct": ["scratch", "pretrained", "mean_teacher", "mean_teacher_no_consistency",
                       "pretrained_mean_teacher"],
                "la": ["scratch", "mean_teacher", "ua_mt"], "ct_acquisition": ["scratch"]}  # fmt: skip
    # the control runs Mean Teacher's batches: its overrides equal Mean Teacher's
    if "mean_teacher_no_consistency" in cfg.methods:
        assert cfg.method_overrides["mean_teacher_no_consistency"] == cfg.method_overrides["mean_teacher"]
    assert cfg.methods == expected[task]
    assert len(cfg.labeled) == (3 if task == "ct" else 1)
    # the acquisition study: random (the control) against entropy on the CT study's phantom and settings
    if task == "ct_acquisition":
        assert cfg.acquisition == ["random", "entropy"] and spec["phantom"] == "ct"
        assert cfg.overrides == evidence.EVIDENCE["ct"]["study"]["overrides"] and cfg.budget == 300
        cases = evidence.EVIDENCE["ct"]["phantom"]["cases"]
        assert 1 + cfg.rounds * cfg.step <= cases - validation_count(cases)  # the labeled pool suffices


def test_the_acquisition_study_gets_its_own_csv_and_panel_on_the_ct_phantom(tmp_path, monkeypatch):
    from medssl.study_acquisition import ACQUISITION_COLUMNS

    seen = []

    def fake_study(cfg):
        seen.append(cfg.datalist)
        out = tmp_path / "study"
        out.mkdir(exist_ok=True)
        rows = [{"strategy": st, "round": k, "labeled": 1 + k, "seed": 0, "case": "c", "label": 1, "name": "o",
                 "dice": 0.2 + 0.1 * k, "jaccard": 0.1, "hd95_mm": 1, "asd_mm": 1} for st in cfg.acquisition
                for k in range(3)]  # fmt: skip
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ACQUISITION_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        (out / "results.md").write_text("# Acquisition study\n\n| strategy | 1 annotated (round 0) |\n")
        return {"csv": out / "results.csv", "md": out / "results.md"}

    monkeypatch.setattr("medssl.study_acquisition.run_acquisition", fake_study)
    monkeypatch.setattr("medssl.demo.threshold_baseline", lambda datalist: 0.25)
    monkeypatch.setattr("medssl.data.phantoms.ensure_phantom", lambda kind, folder, **kw: folder / "datalist.json")
    paths = evidence.run_evidence(tmp_path / "runs", tmp_path / "docs", only=["ct_acquisition"], seeds=1, budget=3)
    assert seen == [str(tmp_path / "runs" / "ct_phantom" / "datalist.json")]  # the CT study's phantom
    with open(paths["ct_acquisition"]) as f:
        rows = list(csv.DictReader(f))
    assert paths["ct_acquisition"].name == "acquisition.csv" and {r["strategy"] for r in rows} == {"random", "entropy"}
    assert "## CT_ACQUISITION" in paths["md"].read_text() and paths["png"].stat().st_size > 1000


def test_partial_run_writes_a_report_marked_partial(tmp_path, monkeypatch):
    def fake_study(cfg):
        out = tmp_path / "study"
        out.mkdir(exist_ok=True)
        rows = _rows({(m, n, s): [0.5 + 0.1 * (m != "scratch")] for m in cfg.methods for n in cfg.labeled
                      for s in cfg.seed_list})  # fmt: skip
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / "results.md").write_text("# Label-efficiency study\n\n| method | 1 labeled |\n")
        return {"csv": out / "results.csv", "md": out / "results.md"}

    monkeypatch.setattr("medssl.study.run_study", fake_study)
    monkeypatch.setattr("medssl.demo.threshold_baseline", lambda datalist: 0.25)
    monkeypatch.setattr("os.getloadavg", lambda: (1.5, 1.0, 0.5))
    paths = evidence.run_evidence(tmp_path / "runs", tmp_path / "docs", only=["ct"], labeled=[1], seeds=2, budget=3)
    md = paths["md"].read_text()
    assert "PARTIAL" in md and "CPU capability" in md and "precision auto ->" in md
    assert "load average at the start 1.50: LOADED" in md and "diagnosis.md" in md
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == {"ct"} and {r["labeled"] for r in rows} == {"1"}
    assert json.loads((tmp_path / "docs" / "run.json").read_text())["full"] is False
    assert paths["png"].stat().st_size > 1000


def test_entry_points_report_user_errors_as_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from medssl import assets, demo

    monkeypatch.setenv("MEDSSL_HOME", str(tmp_path))  # no bundles/ there: a ConfigError naming the folder
    for main in (evidence.main, assets.main, demo.main):
        assert main(["--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("medssl: error: ") and str(tmp_path) in err[0]
