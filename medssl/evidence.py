"""``make evidence``: the label-efficiency evidence on phantoms, CT and LA, in one resumable command.

Two studies through :func:`medssl.study.run_study` (every cell is a real bundle run; a rerun skips finished cells
and resumes a killed one), then one report in ``docs/evidence/``:

* **CT** (multi-organ, UNETR): scratch vs SSL-pretrained (the shipped ``assets/ssl_vit_ct_cpu.pt``) vs Mean
  Teacher vs both, and Mean Teacher without its consistency term (the control that separates what the unlabeled
  volumes add from what Mean Teacher's batches do), at 1 / 2 / 4 labeled volumes, 3 seeds, on a five-organ CT phantom of a seed that no setting
  was tuned on, with ``bundles/cpu_study.yaml``; every method sees 2 labeled crops per step;
* **LA** (left atrium, V-Net): supervised vs Mean Teacher vs UA-MT at 2 labeled volumes, 3 seeds; every method
  sees the same labeled crops per step (2), Mean Teacher adds 2 unlabeled ones; no dropout (see
  ``docs/evidence/diagnosis.md``).

* **CT acquisition** (which volumes to label next): starting from 1 labeled volume of the same CT phantom, 2 rounds
  that each annotate 1 more, chosen at random or by the previous round's predictive entropy
  (:mod:`medssl.study_acquisition`), UNETR from scratch with the CT study's settings, 3 seeds; its table is Dice
  against annotated volumes per strategy and the paired gain of entropy over random (``acquisition.csv``).

Every model is scored once, after its full budget (``val_interval`` = budget): no checkpoint is selected on the
validation volumes the tables report. The report states the machine, the commit, the precision and the wall time,
and for each method the per-seed gains over its baseline.

Example::

    python -m medssl.evidence                   # both studies, as `make evidence`
    python -m medssl.evidence --only ct --labeled 1
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["EVIDENCE", "run_evidence", "main"]

log = logging.getLogger(__name__)

# cpu_study.yaml's settings were chosen on validation volumes 10-11 of a 12-case seed-0 phantom; the demo reports
# seed 0's volumes 8-9 (training volumes during that choice), the evidence a seed no choice has seen
_PHANTOM_SEED = 7

EVIDENCE: dict[str, dict[str, Any]] = {
    "ct": {
        "phantom": {
            "kind": "ct-abdomen",
            "seed": _PHANTOM_SEED,
            "cases": 12,
            "unlabeled": 8,
            "shape": (96, 96, 48),
            "organs": ("spleen", "right kidney", "left kidney", "liver", "stomach"),
        },  # fmt: skip
        "study": {
            "labeled": [1, 2, 4],
            # mean_teacher_no_consistency: Mean Teacher's data and batches without the unlabeled loss, the control that
            # tells what the unlabeled volumes add (on the selection phantom they added nothing: docs/evidence/diagnosis.md)
            "methods": [
                "scratch",
                "pretrained",
                "mean_teacher",
                "mean_teacher_no_consistency",
                "pretrained_mean_teacher",
            ],
            "seeds": 3,
            "budget": 300,
            # every method sees 2 labeled crops per step: scratch / pretrained 2 crops of one volume, Mean Teacher
            # 2 labeled + 2 unlabeled (its recipe's split); the consistency ramp-up (40 units) scaled to the
            # budget as the recipe's 40 x 150 is to its 25k iterations
            "overrides": {"num_classes": 6, "num_samples": 2},
            "method_overrides": {
                m: {"batch_size": 4, "consistency_rampup_unit": 8}
                for m in ("mean_teacher", "mean_teacher_no_consistency", "pretrained_mean_teacher")
            },
        },
        "overlays": ["cpu_study.yaml"],
        "title": "CT phantom (5 organs): UNETR scratch / SSL-pretrained / Mean Teacher / both",
    },
    "ct_acquisition": {
        "phantom": "ct",  # the CT study's phantom (the same folder)
        "study": {
            "labeled": [1],
            "methods": ["scratch"],
            "acquisition": ["random", "entropy"],
            "rounds": 2,
            "step": 1,
            "seeds": 3,
            "budget": 300,
            "overrides": {"num_classes": 6, "num_samples": 2},
        },
        "overlays": ["cpu_study.yaml"],
        "title": "CT phantom (5 organs): UNETR from scratch, 1 labeled + 2 rounds of 1 chosen by random / entropy",
    },
    "la": {
        "phantom": {"kind": "la-mri", "seed": _PHANTOM_SEED, "cases": 12, "unlabeled": 8, "shape": (64, 64, 48)},
        "study": {
            "labeled": [2],
            "methods": ["scratch", "mean_teacher", "ua_mt"],
            "seeds": 3,
            "budget": 400,
            # UA-MT's recipe scaled to the budget: lr x0.1 at 40 % of it, consistency ramp-up over the whole run;
            # 32^3 crops of the 64 x 64 x 48 phantom; no loader workers: on 2 cores shared by two cells, the recipe's
            # 4 worker processes per cell halved the iteration rate (measured: 100 iterations of the supervised cell
            # 26 s without workers, 54 s with 4; UA-MT 47 s vs 85 s)
            "overrides": {
                "roi_size": [32, 32, 32],
                "base_filters": 8,
                "batch_size": 4,
                "lr_step_iterations": 160,
                "consistency_rampup_unit": 10,
                "num_workers": 0,
                # the recipe's Dropout3d(0.5) (train_LA.py and UA-MT, 6000 iterations) at a 400-iteration budget kept
                # the V-Net from learning (selection phantom, seed 0, 2 labeled, 3 seeds: supervised 0.60 / 0.42 / 0.75
                # without dropout, 0.45 / 0.00 / 0.70 with it; Mean Teacher 0.73 / 0.42 / 0.73 without, 0.34 / 0.00 /
                # 0.63 with). UA-MT's stochastic teacher passes then differ by the input noise alone.
                "has_dropout": "false",
            },  # fmt: skip
            # the supervised baseline sees the labeled half of Mean Teacher's batch
            "method_overrides": {"scratch": {"batch_size": 2}},
        },
        "overlays": [],  # cpu_study.yaml is the CT grid; LA keeps its native 0.625 mm grid
        "title": "LA phantom: V-Net supervised / Mean Teacher / UA-MT",
    },
}


def _machine(precision: str) -> dict[str, Any]:
    import os

    import torch

    from medssl.precision import cpu_model

    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "precision": precision,
        "torch": torch.__version__,
    }


def run_evidence(
    out_dir: str | Path = "runs/evidence",
    docs_dir: str | Path = "docs/evidence",
    *,
    only: Sequence[str] | None = None,
    labeled: Sequence[int] | None = None,
    seeds: int | None = None,
    budget: int | None = None,
    jobs: int = 2,
    precision: str = "auto",
) -> dict[str, Path]:
    """Run (or resume) the evidence studies and write ``docs_dir/results.{csv,md,png}``.

    ``only``, ``labeled``, ``seeds`` and ``budget`` shrink the run (a partial run says so in its report).
    """
    import os

    from medssl import resources
    from medssl.assets import SSL_ASSET, _git_commit
    from medssl.data.phantoms import ensure_phantom
    from medssl.demo import threshold_baseline
    from medssl.errors import ConfigError
    from medssl.precision import resolve_precision
    from medssl.study import StudyConfig, run_study

    load_start = os.getloadavg()[0]  # the run is alone only when this is below 1 (else the report says "loaded")
    used = resolve_precision(precision, "cpu")
    tasks = list(only or EVIDENCE)
    unknown = [t for t in tasks if t not in EVIDENCE]
    if unknown:
        raise ConfigError("only", f"unknown evidence task(s) {unknown} (use {', '.join(EVIDENCE)})")
    out, docs = Path(out_dir), Path(docs_dir)
    bundles = resources.bundles_dir()
    asset = resources.assets_dir() / SSL_ASSET
    start = time.perf_counter()
    sections: dict[str, dict[str, Any]] = {}
    for task in tasks:
        spec = EVIDENCE[task]
        source = spec["phantom"] if isinstance(spec["phantom"], str) else task  # another study's phantom, reused
        phantom = dict(EVIDENCE[source]["phantom"])
        kind = phantom.pop("kind")
        datalist = ensure_phantom(kind, out / f"{source}_phantom", **phantom)
        study = {**spec["study"]}
        if labeled:
            study["labeled"] = [n for n in study["labeled"] if n in set(labeled)] or list(labeled)
        if seeds:
            study["seeds"] = int(seeds)
        if budget:
            study["budget"] = int(budget)
        reference = {"oracle intensity threshold": threshold_baseline(datalist)}
        cfg = StudyConfig(
            datalist=str(datalist),
            out=str(out / task),
            overlays=[str(bundles / name) for name in spec["overlays"]],
            val_interval=int(study["budget"]),
            device="cpu",
            precision=precision,
            jobs=jobs,
            pretrained=str(asset) if any(m.startswith("pretrained") for m in study["methods"]) else None,
            title=f"{spec['title']}; {study['budget']} iterations; {precision} -> {used} on CPU",
            reference=reference,
            **study,
        )
        print(f"\n== evidence: {task} ({cfg.title})", flush=True)
        t0 = time.perf_counter()
        if cfg.acquisition:
            from medssl.study_acquisition import run_acquisition

            paths = run_acquisition(cfg)
        else:
            paths = run_study(cfg)
        sections[task] = {"cfg": cfg, "paths": paths, "seconds": time.perf_counter() - t0}
    full = not (only or labeled or seeds or budget)
    commit = _git_commit(resources.project_home("bundles"))
    machine = {**_machine(f"{precision} -> {used}"), "load_average_start": round(load_start, 2)}
    return _write_report(docs, sections, machine, commit, time.perf_counter() - start, full)


def _write_report(
    docs: Path,
    sections: Mapping[str, Mapping[str, Any]],
    machine: Mapping[str, Any],
    commit: str | None,
    seconds: float,
    full: bool,
) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medssl.atomic import atomic_save_figure, atomic_write_text
    from medssl.study import aggregate, draw_results

    docs.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = None
    paths_extra: dict[str, Path] = {}
    md = ["# medssl evidence: what pretraining and unlabeled data buy on phantoms", ""]
    md.append(
        f"Run: `make evidence`{'' if full else ' (PARTIAL: a subset of the full configuration)'}; commit "
        f"`{commit}`; machine: {machine['cpu']} ({machine['cores']} cores, torch CPU capability "
        f"{machine['cpu_capability']}), precision {machine['precision']}, torch {machine['torch']}; wall time "
        f"{seconds / 60:.1f} min{_load_note(machine)}."
    )
    md += [
        "",
        "Why a method does or does not deliver here (probe, reconstruction, pretraining length, dropout), measured on "
        "selection phantoms this report does not show: [diagnosis.md](diagnosis.md).",
    ]
    fig, axes = plt.subplots(1, max(1, len(sections)), figsize=(6.4 * max(1, len(sections)), 4.8), dpi=110)
    axes = [axes] if len(sections) == 1 else list(axes)
    for ax, (task, sec) in zip(axes, sections.items()):
        cfg = sec["cfg"]
        with open(sec["paths"]["csv"], encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        table = Path(sec["paths"]["md"]).read_text(encoding="utf-8").split("\n", 2)[2]
        md += ["", f"## {task.upper()}", "", f"Study folder: `{Path(cfg.out)}`; {sec['seconds'] / 60:.1f} min.", ""]
        md.append(table.strip())
        if cfg.acquisition:  # other columns (strategy, round): a CSV of its own; Dice against annotated volumes
            paths_extra[task] = atomic_write_text(
                docs / f"{task.removeprefix('ct_')}.csv", Path(sec["paths"]["csv"]).read_text(encoding="utf-8")
            )
            counts = sorted({int(r["labeled"]) for r in rows})
            draw_results(
                ax, aggregate([{**r, "method": r["strategy"]} for r in rows]), cfg.acquisition, counts, title=cfg.title
            )
            continue
        if writer is None:
            writer = csv.DictWriter(buf, fieldnames=["task", *rows[0].keys()], lineterminator="\n")
            writer.writeheader()
        writer.writerows({"task": task, **r} for r in rows)
        draw_results(ax, aggregate(rows), cfg.methods, sorted(cfg.labeled), title=cfg.title, reference=cfg.reference)
    fig.tight_layout()
    paths = {"csv": atomic_write_text(docs / "results.csv", buf.getvalue()), **paths_extra}
    paths["md"] = atomic_write_text(docs / "results.md", "\n".join(md) + "\n")
    try:
        paths["png"] = atomic_save_figure(fig, docs / "results.png")
    finally:
        plt.close(fig)
    meta = {"commit": commit, "machine": dict(machine), "wall_seconds": round(seconds, 1), "full": full}
    atomic_write_text(docs / "run.json", json.dumps(meta, indent=2) + "\n")
    print(f"\nevidence written to {docs}/results.md (.csv, .png) in {seconds / 60:.1f} min", flush=True)
    return paths


def _load_note(machine: Mapping[str, Any]) -> str:
    load = machine.get("load_average_start")
    if load is None:
        return ""
    return f" (load average at the start {load:.2f}{'' if load < 1 else ': LOADED, other jobs shared the cores'})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medssl.evidence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", default="runs/evidence", help="study folders (default: runs/evidence/)")
    parser.add_argument("--docs", default="docs/evidence", help="report folder (default: docs/evidence/)")
    parser.add_argument("--only", nargs="+", choices=sorted(EVIDENCE), help="run only these studies")
    parser.add_argument("--labeled", type=int, nargs="+", help="only these labeled counts (a partial run)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default: each study's, 3)")
    parser.add_argument("--budget", type=int, help="iterations per cell (default: each study's)")
    parser.add_argument("--jobs", type=int, default=2, help="cells trained at once (default: 2)")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16 (default: auto)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from medssl.errors import run_reporting_errors

    return run_reporting_errors(run_evidence, args.out, args.docs, only=args.only, labeled=args.labeled,
                                seeds=args.seeds, budget=args.budget, jobs=args.jobs, precision=args.precision)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
