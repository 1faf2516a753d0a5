import csv
import json
import logging

import numpy as np
import pytest

from medssl.errors import ConfigError
from medssl.study import (
    StudyConfig,
    aggregate,
    aggregate_tutorial,
    cell_datalist,
    nested_subsets,
    render_table,
    run_study,
    write_results,
)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_subsets_are_nested_and_deterministic(seed):
    subsets = nested_subsets(10, [2, 4, 8], seed)
    assert [len(subsets[n]) for n in (2, 4, 8)] == [2, 4, 8]
    assert set(subsets[2]) <= set(subsets[4]) <= set(subsets[8])
    assert subsets == nested_subsets(10, [8, 2, 4], seed)  # order of counts does not matter


def test_subsets_differ_between_seeds_and_reject_bad_counts():
    draws = {tuple(nested_subsets(12, [4], s)[4]) for s in range(6)}
    assert len(draws) > 1
    with pytest.raises(ConfigError, match=r"\[11\]"):
        nested_subsets(10, [2, 11], 0)


def test_cell_datalist_moves_the_rest_to_unlabeled():
    base = {
        "training": [{"image": f"i{k}", "label": f"l{k}"} for k in range(5)],
        "validation": [{"image": "v", "label": "vl"}],
        "unlabeled": [{"image": "u0"}],
    }
    dl = cell_datalist(base, [1, 3], {0: "background", 1: "organ"})
    assert [it["image"] for it in dl["training"]] == ["i1", "i3"]
    assert [it["image"] for it in dl["unlabeled"]] == ["i0", "i2", "i4", "u0"]
    assert all("label" not in it for it in dl["unlabeled"])
    assert dl["validation"] == base["validation"]
    assert dl["labels"] == {"0": "background", "1": "organ"}


def _rows(spec):
    """spec: {(method, n, seed): [dice per case×class]}"""
    rows = []
    for (m, n, s), values in spec.items():
        for k, d in enumerate(values):
            rows.append(
                {
                    "method": m,
                    "labeled": n,
                    "seed": s,
                    "case": f"c{k}",
                    "label": 1,
                    "name": "organ",
                    "dice": d,
                    "jaccard": d / (2 - d),
                    "hd95_mm": 1.0,
                    "asd_mm": 0.5,
                }
            )
    return rows


def test_result_columns_follow_the_metrics_module():
    from medssl.metrics import COLUMNS
    from medssl.study import RESULT_COLUMNS

    assert set(RESULT_COLUMNS[3:]) <= set(COLUMNS)


def test_aggregation_and_table_on_hand_made_results(tmp_path):
    rows = _rows(
        {
            ("scratch", 2, 0): [0.4, 0.6],
            ("scratch", 2, 1): [0.6, 0.6],
            ("pretrained", 2, 0): [0.6, 0.8],
            ("pretrained", 2, 1): [0.8, 0.8],
        }
    )
    agg = aggregate(rows)
    assert agg[("scratch", 2)] == pytest.approx([0.5, 0.6])
    assert agg[("pretrained", 2)] == pytest.approx([0.7, 0.8])
    table = render_table(agg, ["scratch", "pretrained"], [2])
    sd = 100 * np.std([0.5, 0.6], ddof=1)
    assert f"| scratch | 55.0 ± {sd:.1f} |" in table
    # +20 Dice points over scratch's 55 → +36 %
    assert f"| pretrained | 75.0 ± {sd:.1f} (+20.0; +36 %) |" in table
    paths = write_results(rows, tmp_path, methods=["scratch", "pretrained"], counts=[2])
    with open(paths["csv"]) as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows)
    assert paths["png"].stat().st_size > 1000
    assert "pretrained" in paths["md"].read_text()


def test_results_carry_the_tutorial_convention_where_the_cells_have_it(tmp_path):
    rows = _rows(
        {
            ("scratch", 2, 0): [0.4, 0.6],
            ("scratch", 2, 1): [0.6, 0.6],
            ("pretrained", 2, 0): [0.6, 0.8],  # scored before the column existed: no tutorial value
        }
    )
    tutorial = {
        ("scratch", 0, "c0"): 0.7,
        ("scratch", 0, "c1"): 0.9,
        ("scratch", 1, "c0"): 0.8,
        ("scratch", 1, "c1"): 0.8,
    }
    for r in rows:
        key = (r["method"], r["seed"], r["case"])
        if key in tutorial:
            r["case_dice_tutorial"] = tutorial[key]
    assert aggregate_tutorial(rows) == {("scratch", 2): pytest.approx([0.8, 0.8])}  # mean over cases, per seed
    paths = write_results(rows, tmp_path, methods=["scratch", "pretrained"], counts=[2])
    with open(paths["csv"]) as f:
        written = list(csv.DictReader(f))
    assert [r["case_dice_tutorial"] for r in written] == ["0.7", "0.9", "0.8", "0.8", "", ""]
    md = paths["md"].read_text()
    assert "| pretrained | 70.0 ± 0.0 (+15.0; +27 %) |" in md  # the main table as before
    sd = 100 * np.std([0.5, 0.6], ddof=1)
    assert f"| scratch | 2 | 55.0 ± {sd:.1f} | 80.0 ± 0.0 (2 seed(s)) |" in md  # beside the main number
    tutorial_table = md[md.index("tutorial convention (with background)") :]
    assert "| pretrained |" not in tutorial_table  # no tutorial value, no row
    assert md.index("| method | 2 labeled |") < md.index("tutorial convention (with background)")
    # cells without the column at all (an older done.json) still write and leave the table out
    plain = _rows({("scratch", 2, 0): [0.5]})
    md = write_results(plain, tmp_path / "old", methods=["scratch"], counts=[2])["md"].read_text()
    assert "tutorial convention" not in md


def _phantom_like_datalist(tmp_path, n_train=4):
    dl = {
        "labels": {"0": "background", "1": "organ"},
        "training": [{"image": f"img{k}.nii.gz", "label": f"lab{k}.nii.gz"} for k in range(n_train)],
        "validation": [{"image": "v.nii.gz", "label": "vl.nii.gz"}],
    }
    for item in dl["training"] + dl["validation"]:
        for p in item.values():
            (tmp_path / p).write_bytes(b"")
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(dl))
    return path


def _fake_runs(monkeypatch, dice=0.5):
    """Replace training and evaluation by stubs; returns the list of trainings run (their ``what``)."""
    ran = []

    def fake_run(cmd, log_path, what, threads=None):
        ran.append(what)
        (log_path.parent / "model.pt").write_bytes(b"")

    def fake_eval(cell_dir, dl, cfg):
        method, n, seed = cell_dir.name.rsplit("_", 2)
        return _rows({(method, int(n[1:]), int(seed[4:])): [dice]})

    monkeypatch.setattr("medssl.study._run_logged", fake_run)
    monkeypatch.setattr("medssl.study._evaluate_cell", fake_eval)
    return ran


def test_resume_skips_finished_cells(tmp_path, monkeypatch):
    datalist = _phantom_like_datalist(tmp_path)
    out = tmp_path / "study"
    ran = _fake_runs(monkeypatch, dice=0.3)
    run_study(StudyConfig(datalist=str(datalist), out=str(out), labeled=[1], methods=["scratch"], seeds=1, budget=3))
    assert ran == ["training cell [1/1] scratch n=1 seed=0"]
    ran.clear()
    _fake_runs(monkeypatch, dice=0.5)
    monkeypatch.setattr("medssl.study._run_logged", lambda cmd, log_path, what, threads=None: ran.append(what))
    # the n=1 cell finished earlier: only the new n=2 cell may run, and n=1 keeps its earlier result (30 %)
    cfg = StudyConfig(datalist=str(datalist), out=str(out), labeled=[1, 2], methods=["scratch"], seeds=1, budget=3)
    paths = run_study(cfg)
    assert ran == ["training cell [2/2] scratch n=2 seed=0"]
    assert (out / "cells" / "scratch_n2_seed0" / "done.json").is_file()
    ran.clear()
    run_study(cfg)  # everything finished: nothing runs again
    assert ran == []
    assert "| scratch | 30.0 ± 0.0 | 50.0 ± 0.0 |" in paths["md"].read_text()


def test_cells_report_k_of_n_with_eta_only_where_progress_is_on(tmp_path, monkeypatch, caplog):
    datalist = _phantom_like_datalist(tmp_path)
    _fake_runs(monkeypatch, dice=0.3)
    cfg = StudyConfig(datalist=str(datalist), out=str(tmp_path / "a"), labeled=[1, 2], methods=["scratch"], budget=3)
    with caplog.at_level(logging.WARNING, logger="medssl"):  # what a redirected stderr gets from the CLI
        run_study(cfg)
    assert not [r for r in caplog.records if r.name == "medssl.progress"]
    cfg = StudyConfig(datalist=str(datalist), out=str(tmp_path / "b"), labeled=[1, 2], methods=["scratch"], budget=3)
    with caplog.at_level(logging.INFO, logger="medssl"):  # a terminal or --verbose
        run_study(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "medssl.progress"]
    assert len(lines) == 2 * cfg.seeds
    assert lines[0].startswith(f"study: cell 1/{2 * cfg.seeds} scratch n=1 seed=0: mean Dice 0.300 in ")
    assert "ETA" in lines[0] and lines[-1].endswith("ETA 0s)")


def _btcv_like_datalist(tmp_path):
    path = _phantom_like_datalist(tmp_path)
    dl = json.loads(path.read_text())
    dl["labels"] = {"0": "background", "1": "liver", "2": "spleen"}
    path.write_text(json.dumps(dl))
    return path


@pytest.mark.parametrize("change", ["budget", "overlay", "overrides", "datalist", "val_interval"])
def test_rerun_with_other_settings_is_refused_naming_cell_and_keys(tmp_path, monkeypatch, change):
    datalist = _phantom_like_datalist(tmp_path)
    overlay = tmp_path / "tiny.yaml"
    overlay.write_text("max_epochs: 1\n")
    out = tmp_path / "study"
    kw = dict(datalist=str(datalist), out=str(out), labeled=[1], methods=["scratch"], seeds=1, budget=3)
    kw["overlays"] = [str(overlay)]
    ran = _fake_runs(monkeypatch)
    run_study(StudyConfig(**kw))
    assert len(ran) == 1
    key = {"budget": "budget", "overlay": "overlays", "overrides": "overrides", "datalist": "datalist"}
    key["val_interval"] = "val_interval"
    if change == "budget":
        kw["budget"] = 4
    elif change == "overlay":
        overlay.write_text("max_epochs: 2\n")  # same file name, other content
    elif change == "overrides":
        kw["overrides"] = {"roi_size": [16, 16, 16]}
    elif change == "datalist":
        dl = json.loads(datalist.read_text())
        dl["unlabeled"] = [{"image": "u.nii.gz"}]  # the cell's unlabeled pool changes
        (tmp_path / "u.nii.gz").write_bytes(b"")
        datalist.write_text(json.dumps(dl))
    else:
        kw["val_interval"] = 2
    ran.clear()
    with pytest.raises(ConfigError, match=rf"scratch_n1_seed0.*{key[change]} differ.*--redo-changed") as err:
        run_study(StudyConfig(**kw))
    assert ran == [] and "\n" not in str(err.value)
    # redo_changed recomputes the cell with the new settings and records both invocations
    run_study(StudyConfig(**kw, redo_changed=True))
    assert ran == ["training cell [1/1] scratch n=1 seed=0"]
    history = json.loads((out / "study.json").read_text())["history"]
    assert len(history) == 2 and history[1]["redone"] == ["scratch_n1_seed0"]
    ran.clear()
    run_study(StudyConfig(**kw))  # the new settings are now the cell's own: no refusal, nothing reruns
    assert ran == []


def test_redo_changed_recomputes_only_the_cells_whose_pretrained_checkpoint_changed(tmp_path, monkeypatch):
    datalist = _btcv_like_datalist(tmp_path)
    ckpt = tmp_path / "vit.pt"
    ckpt.write_bytes(b"weights v1")
    out = tmp_path / "study"
    kw = dict(datalist=str(datalist), out=str(out), labeled=[1], seeds=1, budget=3, pretrained=str(ckpt))
    kw["methods"] = ["scratch", "pretrained"]
    ran = _fake_runs(monkeypatch)
    run_study(StudyConfig(**kw))
    assert len(ran) == 2
    ckpt.write_bytes(b"weights v2")  # same path, other content
    ran.clear()
    with pytest.raises(ConfigError, match=r"pretrained_n1_seed0.*: pretrained differ"):
        run_study(StudyConfig(**kw))
    run_study(StudyConfig(**kw, redo_changed=True))
    assert ran == ["training cell [2/2] pretrained n=1 seed=0"]


def test_cells_without_fingerprint_are_not_trusted(tmp_path, monkeypatch):
    datalist = _phantom_like_datalist(tmp_path)
    out = tmp_path / "study"
    legacy = out / "cells" / "scratch_n1_seed0"
    legacy.mkdir(parents=True)
    (legacy / "done.json").write_text(json.dumps({"rows": _rows({("scratch", 1, 0): [0.9]})}))
    ran = _fake_runs(monkeypatch)
    cfg = StudyConfig(datalist=str(datalist), out=str(out), labeled=[1], methods=["scratch"], seeds=1, budget=3)
    with pytest.raises(ConfigError, match="no cell.json"):
        run_study(cfg)
    assert ran == []


def test_cli_refuses_changed_settings_with_exit_2(tmp_path, monkeypatch, capsys):
    from medssl.cli import main

    datalist = _phantom_like_datalist(tmp_path)
    out = tmp_path / "study"
    ran = _fake_runs(monkeypatch)
    args = ["study", "--datalist", str(datalist), "--out", str(out), "--labeled", "1", "--methods", "scratch"]
    args += ["--seeds", "1", "--budget", "3"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args[:-1] + ["4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medssl: error: ") and "scratch_n1_seed0" in err and "budget" in err
    assert len(err.splitlines()) == 1
    assert main(args[:-1] + ["4", "--redo-changed"]) == 0
    assert len(ran) == 2


def test_pretrained_methods_need_a_checkpoint(tmp_path):
    datalist = _phantom_like_datalist(tmp_path)
    cfg = StudyConfig(datalist=str(datalist), out=str(tmp_path / "s"), labeled=[1], methods=["pretrained"], seeds=1)
    with pytest.raises(ConfigError, match="pretrain"):
        run_study(cfg)


def test_yaml_form_rejects_unknown_keys(tmp_path):
    cfg = tmp_path / "study.yaml"
    cfg.write_text("datalist: d.json\nout: o\nlabelled: [2]\n")
    with pytest.raises(ConfigError, match="labelled"):
        StudyConfig.from_yaml(cfg)
    cfg.write_text("datalist: d.json\nout: o\nlabeled: [2, 3]\nseeds: [5]\n")
    loaded = StudyConfig.from_yaml(cfg, budget=7)
    assert loaded.labeled == [2, 3] and loaded.seed_list == [5] and loaded.budget == 7


def test_very_small_study_runs_end_to_end(ct_phantom, tmp_path, repo_root):
    """1 labeled count, 2 methods, 1 seed, 3 iterations: real bundles, inference and metrics."""
    cfg = StudyConfig(
        datalist=str(ct_phantom),
        out=str(tmp_path / "study"),
        labeled=[1],
        methods=["scratch", "mean_teacher"],
        seeds=1,
        budget=3,
        overlays=[str(repo_root / "bundles" / "tiny.yaml")],
        overrides={"cache_rate": 1.0, "num_workers": 0},
        val_interval=3,
        device="cpu",
        precision="auto",
    )
    paths = run_study(cfg)
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    n_val = len(json.loads(ct_phantom.read_text())["validation"])
    # one row per method x case x foreground class (13 organs)
    assert len(rows) == 2 * n_val * 13
    assert {r["method"] for r in rows} == {"scratch", "mean_teacher"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    for method in ("scratch", "mean_teacher"):
        cell = tmp_path / "study" / "cells" / f"{method}_n1_seed0"
        assert (cell / "model.pt").is_file() and (cell / "done.json").is_file()
        assert len(json.loads((cell / "datalist.json").read_text())["training"]) == 1
    assert "| scratch |" in paths["md"].read_text() and paths["png"].stat().st_size > 1000
