"""``python -m bench NAME [options]`` runs one benchmark (``--help`` after the name); ``all`` runs every one.

``all`` passes ``--tiny``, ``--reps N``, ``--threads N`` and ``--out-dir D`` on to each benchmark; ``inference``
(which has its own options) maps them: ``--tiny`` → a 64×64×32 volume and the tiny UNETR, ``--reps`` →
``--repeats``, ``--out-dir D`` → ``--out D/inference.json`` (default ``runs/bench/inference.json``). Without
arguments it runs ``all``, as ``make bench`` does.

``cuda`` (:mod:`bench.cuda`) is the GPU path (AMP, channels-last, cudnn.benchmark, CacheDataset +
ThreadDataLoader); ``all`` runs it only where CUDA is available.

A benchmark starts only on an idle machine: it waits up to 3 minutes for the 1-minute load average to fall below 1
and otherwise refuses (exit status 3, no report; see :func:`bench.timing.start_load`) unless ``--allow-loaded``,
which marks its report "loaded".
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = {
    "matmul": "bench.matmul",
    "ssl_step": "bench.ssl_step",
    "finetune_step": "bench.finetune_step",
    "inference": "bench.inference",
    "loader": "bench.loader",
    "loss_curve": "bench.loss_curve",
    "precision": "bench.precision",
    "cuda": "bench.cuda",
}


def _inference_args(argv: list[str]) -> list[str]:
    """Map the shared options onto ``bench.inference``'s own ones."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--tiny":
            out += ["--shape", "64", "64", "32", "--model", "tiny", "--roi", "32"]
        elif a == "--reps":
            out += ["--repeats", next(it)]
        elif a == "--threads":
            out += ["--threads", next(it)]
        elif a == "--out-dir":
            out += ["--out", f"{next(it)}/inference.json"]
        elif a == "--warmup":
            next(it)  # every inference repetition is a fresh process: no warm-up to skip
        else:
            out.append(a)  # inference's own options pass through
    if "--out" not in out:
        out += ["--out", "runs/bench/inference.json"]
    return out


def _inference_report(json_path: Path, before: list[float]) -> None:
    """Write ``inference.md`` next to ``bench.inference``'s JSON (which it writes itself)."""
    import json

    from bench.timing import Stats, load_average, machine_facts, markdown_table, write_report

    data = json.loads(json_path.read_text())
    t = {k: Stats([r["seconds"] for r in v]) for k, v in data["runs"].items()}
    m = {k: Stats([r["peak_rss"] / 2**30 for r in v]) for k, v in data["runs"].items()}
    rows = [[k, t[k].fmt(1), m[k].fmt(2), f"{t['baseline'].median / t[k].median:.2f}×",
             f"{m[k].median / m['baseline'].median:.2f}", len(t[k].values)] for k in t]  # fmt: skip
    table = markdown_table(["pipeline", "wall s", "peak RSS GiB", "speed-up", "memory ratio", "reps"], rows)
    cfg = data["config"]
    cmd = (f"python -m bench inference --shape {' '.join(map(str, cfg['shape']))} "
           f"--spacing {' '.join(map(str, cfg['spacing']))} --model {cfg['model']} --roi {cfg['roi']} "
           f"--overlap {cfg['overlap']} --precision {cfg['precision']} --train-steps {cfg['train_steps']} "
           f"--repeats {cfg['repeats']} --threads {cfg['threads']}")  # fmt: skip
    used = (data.get("machine") or {}).get("precision_auto_inference") or {}
    resolved = f" -> {used['used']} for inference" if cfg["precision"] == "auto" and used.get("used") else ""
    same = data.get("recipe_same_vs_medssl")
    speed = data.get("speedup_vs_recipe_same")  # absent when recipe_same was not run (its kept map may be)
    same_line = (f" recipe_same vs medssl (same precision and windows): mean foreground Dice {same['dice']:.4f}, "
                 f"equal voxels {same['voxels_equal']:.4f}" + (f"; medssl {speed:.2f}× faster than recipe_same (the "
                 "slab pipeline's share)." if speed else " (recipe_same's map kept from an earlier run).")
                 if same else "")  # fmt: skip
    body = (f"baseline: MONAI recipe, fp32, overlap 0.5, constant, probabilities inverted; recipe_same: the recipe "
            f"with medssl's precision ({cfg['precision']}{resolved}) and windows (overlap {cfg['overlap']}, gaussian), labels "
            f"inverted (nearest); medssl: Predictor.\n\n{table}\n\nAgreement with the baseline: mean foreground Dice "
            f"{data['dice']:.4f}, equal voxels {data['voxels_equal']:.4f}.{same_line}\n\nCommand: `{cmd}`\n")  # fmt: skip
    # bench.inference records the machine and the load it started at (after waiting for an idle machine)
    data = {**data, "machine": data.get("machine") or machine_facts(),
            "load_average": data.get("load_average") or {"before": before, "after": load_average()}}  # fmt: skip
    write_report("inference", "Inference (one volume, baseline vs medssl)", body, data, json_path.parent)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_inference(argv: list[str]) -> int:
    import importlib

    from bench.timing import load_average

    rest = _inference_args(argv)
    out = Path(rest[rest.index("--out") + 1])
    out.parent.mkdir(parents=True, exist_ok=True)
    before = load_average()
    rc = int(importlib.import_module(BENCHMARKS["inference"]).main(rest) or 0)
    if rc == 0 and "--only" not in rest and out.is_file():
        _inference_report(out, before)
    return rc


def main(argv: list[str] | None = None) -> int:
    from bench.timing import LOADED_EXIT, MachineLoaded

    try:
        return _main(argv)
    except MachineLoaded:  # start_load printed why
        return LOADED_EXIT


def _main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["all"]
    if argv[0] in ("-h", "--help") or argv[0] not in (*BENCHMARKS, "all"):
        print(f"usage: python -m bench {{{','.join(BENCHMARKS)},all}} [options]", file=sys.stderr)
        return 0 if argv[0] in ("-h", "--help") else 2
    if argv[0] == "inference":
        return _run_inference(argv[1:])
    if argv[0] != "all":
        return int(importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:]) or 0)
    rc = 0
    for name, module in BENCHMARKS.items():
        if name == "cuda" and not _cuda_available():
            print("==== cuda: skipped (no CUDA device)", flush=True)
            continue
        print(f"==== {name}", flush=True)
        if name == "inference":
            rc = max(rc, _run_inference(argv[1:]))
        else:
            rc = max(rc, int(importlib.import_module(module).main(argv[1:]) or 0))
    return rc


if __name__ == "__main__":
    sys.exit(main())
