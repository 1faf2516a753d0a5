"""medssl study's evidence features: cells in parallel, live progress, per-method overrides, paired gains."""

import json
import threading
import time

import pytest

from medssl.study import (
    METHOD_OVERRIDES,
    StudyConfig,
    _last_progress,
    paired_gains,
    render_gains,
    run_study,
    write_results,
)
from tests.test_study import _phantom_like_datalist, _rows


def test_paired_gains_are_per_seed_differences_against_scratch():
    rows = _rows(
        {
            ("scratch", 1, 0): [0.4, 0.6],  # mean 0.5
            ("scratch", 1, 1): [0.2],
            ("pretrained", 1, 0): [0.7],
            ("pretrained", 1, 1): [0.3],
            ("mean_teacher", 1, 0): [0.45],
            ("mean_teacher", 1, 1): [0.3],
            ("scratch", 1, 2): [0.5],
            ("pretrained", 1, 2): [0.6],
            ("mean_teacher", 1, 2): [0.5],
        }
    )
    gains = paired_gains(rows, ["scratch", "pretrained", "mean_teacher"], [1])
    assert gains[("pretrained", 1)] == pytest.approx({0: 0.2, 1: 0.1, 2: 0.1})
    assert gains[("mean_teacher", 1)] == pytest.approx({0: -0.05, 1: 0.1, 2: 0.0})
    text = render_gains(gains)
    # +13.3 ± 5.8 with every seed positive: beyond the spread; MT's gains change sign: not
    assert "| pretrained | 1 | s0: +20.0, s1: +10.0, s2: +10.0 | +13.3 ± 5.8 | yes |" in text
    assert "| mean_teacher | 1 | s0: -5.0, s1: +10.0, s2: +0.0 | +1.7 ± 7.6 | no |" in text
    two = render_gains({("pretrained", 1): {0: 0.2, 1: 0.1}})
    assert "| +15.0 ± 7.1 | n/a (2 seeds; needs 3) |" in two  # two seeds give no verdict


def test_results_carry_title_reference_and_gains(tmp_path):
    rows = _rows({("scratch", 2, 0): [0.5], ("pretrained", 2, 0): [0.6]})
    paths = write_results(
        rows, tmp_path, methods=["scratch", "pretrained"], counts=[2], title="what was trained",
        reference={"oracle intensity threshold": 0.25},
    )  # fmt: skip
    md = paths["md"].read_text()
    assert md.index("what was trained") < md.index("| method |")
    assert "oracle intensity threshold 25.0" in md and "s0: +10.0" in md
    assert paths["png"].stat().st_size > 1000


def test_the_no_consistency_control_isolates_what_the_unlabeled_loss_adds(tmp_path):
    assert METHOD_OVERRIDES["mean_teacher_no_consistency"] == {"consistency": 0.0}
    cells = {("scratch", 2, s): [0.5] for s in range(3)}
    cells.update({("mean_teacher_no_consistency", 2, s): [0.6] for s in range(3)})
    cells.update({("mean_teacher", 2, s): [0.6 + 0.01 * s] for s in range(3)})
    rows = _rows(cells)
    methods = ["scratch", "mean_teacher", "mean_teacher_no_consistency"]
    over_control = paired_gains(rows, ["mean_teacher"], [2], baseline="mean_teacher_no_consistency")
    assert list(over_control) == [("mean_teacher", 2)]
    assert over_control[("mean_teacher", 2)] == pytest.approx({0: 0.0, 1: 0.01, 2: 0.02})
    md = write_results(rows, tmp_path, methods=methods, counts=[2])["md"].read_text()
    # against scratch Mean Teacher gains 10-12 points; against its own pipeline without consistency 0-2
    assert "| mean_teacher | 2 | s0: +10.0, s1: +11.0, s2: +12.0 | +11.0 ± 1.0 | yes |" in md
    tail = md.split("What the consistency term on unlabeled volumes adds:")[1]
    assert "| mean_teacher | 2 | s0: +0.0, s1: +1.0, s2: +2.0 | +1.0 ± 1.0 | no |" in tail
    assert "minus mean_teacher_no_consistency's" in tail


def test_last_progress_reads_the_newest_status_line(tmp_path):
    log = tmp_path / "train.log"
    assert _last_progress(log) is None  # not there yet
    log.write_text("noise\nmedssl-progress iteration 3/10 loss=1\nmore\nmedssl-progress iteration 7/10 loss=0.5\n")
    assert _last_progress(log) == "iteration 7/10 loss=0.5"


def test_jobs_run_cells_concurrently_with_split_threads_and_method_overrides(tmp_path, monkeypatch):
    datalist = _phantom_like_datalist(tmp_path)
    active, peak, calls = [0], [0], []
    lock = threading.Lock()

    def fake_run(cmd, log_path, what, threads=None):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            calls.append((what, threads, cmd))
        time.sleep(0.3)
        (log_path.parent / "model.pt").write_bytes(b"")
        with lock:
            active[0] -= 1

    monkeypatch.setattr("medssl.study._run_logged", fake_run)
    monkeypatch.setattr("medssl.study._evaluate_cell", lambda cell_dir, dl, cfg: _rows({("scratch", 1, 0): [0.5]}))
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    cfg = StudyConfig(
        datalist=str(datalist), out=str(tmp_path / "study"), labeled=[1, 2], methods=["scratch"], seeds=2,
        budget=3, jobs=2, method_overrides={"scratch": {"batch_size": 2}},
    )  # fmt: skip
    run_study(cfg)
    assert len(calls) == 4 and peak[0] == 2  # two at a time, never more
    assert {threads for _, threads, _ in calls} == {2}  # 4 cores / 2 jobs
    for _, _, cmd in calls:
        assert cmd[cmd.index("--batch_size") + 1] == "2"
    # the override is part of each cell's fingerprint: changing it is refused like any other setting
    cfg.method_overrides = {"scratch": {"batch_size": 4}}
    with pytest.raises(Exception, match="overrides"):
        run_study(cfg)


def test_ua_mt_is_mean_teacher_with_the_uncertainty_mask(tmp_path, monkeypatch):
    assert METHOD_OVERRIDES["ua_mt"] == {"uncertainty": "true"}
    datalist = _phantom_like_datalist(tmp_path)
    seen = []

    def fake_run(cmd, log_path, what, threads=None):
        seen.append(cmd)
        (log_path.parent / "model.pt").write_bytes(b"")

    monkeypatch.setattr("medssl.study._run_logged", fake_run)
    monkeypatch.setattr("medssl.study._evaluate_cell", lambda cell_dir, dl, cfg: _rows({("ua_mt", 1, 0): [0.5]}))
    run_study(StudyConfig(datalist=str(datalist), out=str(tmp_path / "s"), labeled=[1], methods=["ua_mt"], seeds=1,
                          budget=2, task="la"))  # fmt: skip
    (cmd,) = seen
    assert "mean_teacher.yaml" in cmd[cmd.index("--config_file") + 1]
    assert cmd[cmd.index("--uncertainty") + 1] == "true"


def test_ua_mt_is_refused_on_the_multi_organ_task(tmp_path):
    datalist = _phantom_like_datalist(tmp_path)
    dl = json.loads(datalist.read_text())
    dl["labels"] = {"0": "background", "1": "liver", "2": "spleen"}
    datalist.write_text(json.dumps(dl))
    with pytest.raises(Exception, match="ua_mt"):
        run_study(StudyConfig(datalist=str(datalist), out=str(tmp_path / "s"), methods=["ua_mt"], labeled=[1]))


def test_error_bars_stay_inside_the_dice_range_and_methods_sit_side_by_side():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medssl.study import draw_results, error_bar_extent

    means, lower, upper = error_bar_extent([[0.0, 0.1], [0.95, 1.0], [0.4, 0.6]])
    assert means == pytest.approx([5.0, 97.5, 50.0])
    assert lower == pytest.approx([5.0, 3.5355, 14.1421], abs=1e-3)  # clipped at 0 %
    assert upper == pytest.approx([7.0711, 2.5, 14.1421], abs=1e-3)  # clipped at 100 %
    fig, ax = plt.subplots()
    agg = {("scratch", 2): [0.5, 0.6], ("mean_teacher", 2): [0.5, 0.6]}
    draw_results(ax, agg, ["scratch", "mean_teacher"], [2])
    xs = [line.get_xdata()[0] for line in ax.get_lines() if line.get_marker() == "o"]
    plt.close(fig)
    assert len(xs) == 2 and xs[0] < 2 < xs[1]  # same count, same Dice: the markers do not overlap
