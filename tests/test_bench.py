"""Every benchmark runs at ``--tiny --reps 1`` and writes its table, so bench/ cannot rot (no timing asserted)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# --allow-loaded: the tests must run on a shared machine too (the refusal itself is tested below)
FAST = ["--tiny", "--reps", "1", "--warmup", "0", "--threads", "1", "--allow-loaded"]
RUNS = {
    "matmul": [],
    "ssl_step": ["--batch", "1"],
    "finetune_step": ["--batch", "1"],
    "loader": ["--workers", "0", "--volumes", "2", "--batch-size", "2", "--model-batch", "1"],
    "loss_curve": ["--steps", "2", "--batch", "1"],
    "precision": [],
    "cuda": ["--device", "cpu", "--batch", "1"],
}


@pytest.fixture(autouse=True)
def _restore_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _check_report(out: Path, name: str) -> dict:
    md = (out / f"{name}.md").read_text()
    data = json.loads((out / f"{name}.json").read_text())
    assert md.startswith("## ") and "|---|" in md and "Command: `python -m bench " in md
    assert data["machine"]["cpu"] and data["machine"]["torch"]
    assert set(data["load_average"]) == {"before", "after"}
    assert isinstance(data["loaded"], bool) and ("**Loaded machine**" in md) == data["loaded"]
    # every report states the CPU capability and what precision auto chose here
    auto = data["machine"]["precision_auto"]
    assert data["machine"]["cpu_capability"] and auto["requested"] == "auto" and auto["used"] in ("bf16", "fp32")
    assert f"CPU capability {data['machine']['cpu_capability']}; precision auto -> {auto['used']} (" in md
    return data


@pytest.mark.parametrize("name", list(RUNS))
def test_benchmark_writes_its_table(name, tmp_path):
    module = importlib.import_module(f"bench.{name}")
    assert module.main([*FAST, *RUNS[name], "--out-dir", str(tmp_path)]) == 0
    data = _check_report(tmp_path, name)
    assert data["machine"]["torch_threads"] == 1
    if name in ("ssl_step", "finetune_step"):
        assert set(data["seconds"]) == {"baseline", "medssl", "medssl+levers", "medssl default"}
        assert all(s["median"] > 0 for s in data["seconds"].values())
        assert data["flops_per_step"] > 0
        # the first step of every case sees the same weights and batch: the losses agree to bf16 rounding
        firsts = [v[0] for v in data["losses"].values()]
        assert max(firsts) - min(firsts) < 0.1 * abs(firsts[0]) + 1e-3
    if name == "loss_curve":
        assert set(data["losses"]) == {"ssl", "finetune"}
        assert all(len(v) == 2 for curves in data["losses"].values() for v in curves.values())
    if name == "matmul":
        assert all(r["bf16"]["median"] > 0 and r["fp32"]["median"] > 0 for r in data["results"].values())
    if name == "precision":
        from medssl.precision import native_cpu_bf16

        cases = {"medssl default", "fp32"} | ({"bf16"} if native_cpu_bf16() else set())  # slow bf16 skipped
        assert all(set(data["seconds"][w]) == cases for w in ("validation", "infer"))
    if name == "cuda":
        assert data["device"] == "cpu" and set(data["workloads"]) == {"ssl", "finetune"}
        for run in data["workloads"].values():
            assert set(run["seconds"]) == {"baseline", "medssl"} and run["flops_per_step"] > 0
            firsts = [v[0] for v in run["losses"].values()]
            assert max(firsts) - min(firsts) < 0.1 * abs(firsts[0]) + 1e-3
        assert len(data["loader"]) == 2 and all(s["median"] > 0 for s in data["loader"].values())
    if name == "loader":
        assert data["model_crops_per_s"] > 0 and data["crops_per_epoch"] == {"num_workers=0": 4}


def test_inference_benchmark_tiny(tmp_path):
    from bench.__main__ import main

    work = ["--workdir", str(tmp_path / "work")]
    args = ["inference", "--tiny", "--reps", "1", "--threads", "1", "--allow-loaded", "--out-dir", str(tmp_path)]
    assert main([*args, *work]) == 0
    data = _check_report(tmp_path, "inference")
    assert data["speedup"] > 0 and 0 <= data["voxels_equal"] <= 1
    # the fair baseline: the recipe with medssl's precision and windows, labels inverted
    assert set(data["runs"]) == {"baseline", "recipe_same", "medssl"}
    assert 0 <= data["recipe_same_vs_medssl"]["voxels_equal"] <= 1
    assert "| recipe_same" in (tmp_path / "inference.md").read_text()
    # again on the kept volume without recipe_same: its kept map is compared, no speed-up against it is claimed
    again = tmp_path / "again"
    assert main([*args[:-1], str(again), *work, "--reuse", "--no-recipe-same", "--overlap", "0.5"]) == 0
    data = _check_report(again, "inference")
    assert set(data["runs"]) == {"baseline", "medssl"} and "speedup_vs_recipe_same" not in data
    text = (again / "inference.md").read_text()
    assert "kept from an earlier run" in text and "--overlap 0.5" in text


@pytest.mark.parametrize(("name", "recipe"), [("ssl_step", 8), ("finetune_step", 4)])
def test_step_benchmarks_run_at_the_recipe_batch(name, recipe, tmp_path):
    module = importlib.import_module(f"bench.{name}")
    args = [*FAST, "--recipe-batch", "--cases", "medssl+levers", "--out-dir", str(tmp_path)]
    assert module.main(args) == 0
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert (
        data["batch"] == recipe == module.RECIPE_BATCH and f"--batch {recipe} " in (tmp_path / f"{name}.md").read_text()
    )


def test_a_loaded_machine_is_refused_unless_allowed(monkeypatch, tmp_path, capsys):
    import bench.timing
    from bench.__main__ import main

    cores = bench.timing.usable_cores()
    monkeypatch.setattr(bench.timing, "load_average", lambda: [cores + 1.5, 1.0, 1.0])
    monkeypatch.setattr(bench.timing, "IDLE_WAIT_S", 0.0)
    args = ["matmul", "--tiny", "--reps", "1", "--warmup", "0", "--threads", "1", "--out-dir", str(tmp_path)]
    assert main(args) == bench.timing.LOADED_EXIT
    assert "--allow-loaded" in capsys.readouterr().err and not list(tmp_path.iterdir())
    assert main([*args, "--allow-loaded"]) == 0
    data = _check_report(tmp_path, "matmul")
    assert data["loaded"]
    rows = [line for line in (tmp_path / "matmul.md").read_text().splitlines() if line.startswith("| square")]
    assert rows and all("(loaded)" in row for row in rows)


def test_start_waits_for_an_idle_machine(monkeypatch, capsys):
    """Idle = 1-minute load below 1: the start waits while a previous run's load decays, and refuses a busy one."""
    import bench.timing

    loads = iter([[1.8, 1.0, 0.5], [1.3, 1.0, 0.5], [0.7, 0.9, 0.5]])
    slept: list[float] = []
    monkeypatch.setattr(bench.timing, "load_average", lambda: next(loads))
    monkeypatch.setattr("time.sleep", slept.append)
    assert bench.timing.start_load(wait_s=60) == [0.7, 0.9, 0.5]
    assert len(slept) == 2 and "waiting up to 60 s" in capsys.readouterr().err
    # below the core count but not idle, for longer than the wait: refused, and the message names the load
    monkeypatch.setattr(bench.timing, "load_average", lambda: [1.2, 1.1, 1.0])
    with pytest.raises(bench.timing.MachineLoaded, match="1.20"):
        bench.timing.start_load(wait_s=0)
    assert bench.timing.start_load(allow_loaded=True) == [1.2, 1.1, 1.0]


def test_a_report_is_marked_loaded_by_its_start_or_its_end():
    from bench.timing import report_loaded

    assert not report_loaded({"before": [0.4, 0.3, 0.2], "after": [1.9, 1.0, 0.5]}, cores=2)  # its own 2 threads
    assert report_loaded({"before": [1.0, 0.3, 0.2], "after": [1.9, 1.0, 0.5]}, cores=2)  # not idle at the start
    assert not report_loaded({"before": [0.4, 0.3, 0.2], "after": [2.02, 1.6, 1.2]}, cores=2)  # measured: its own
    assert report_loaded({"before": [0.4, 0.3, 0.2], "after": [2.9, 1.0, 0.5]}, cores=2)  # others joined


def test_bench_main_rejects_unknown_names(capsys):
    from bench.__main__ import main

    assert main(["nope"]) == 2
    assert "usage: python -m bench" in capsys.readouterr().err


def test_machine_facts_record_an_instruction_set_limit(monkeypatch, tmp_path):
    from bench.timing import machine_facts, write_report

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    m = machine_facts()
    assert m["isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    data = {"machine": m, "load_average": {"before": [0.1, 0.1, 0.1], "after": [0.5, 0.3, 0.2]}}
    write_report("limits", "Limits", "| a |\n|---|\n| 1 |\n", data, tmp_path)
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in (tmp_path / "limits.md").read_text()
