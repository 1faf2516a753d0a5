"""The label-efficiency study: how much do pretraining and unlabeled data help at a given label budget?

For each labeled count ``n`` and seed ``s`` the study draws a labeled subset of the datalist's ``training`` items
(nested: for one seed, the subset of a smaller count is contained in that of a larger one), moves the other
training images to ``unlabeled``, trains every method with the same iteration budget through the bundles, segments
the ``validation`` images with :class:`medssl.inference.Predictor`, and scores them with :mod:`medssl.metrics`.

Methods and the bundles that run them (``task`` is ``btcv`` for multi-organ CT, ``la`` for the left atrium):

=========================== ==================================================== =========================
method                      btcv                                                 la
=========================== ==================================================== =========================
scratch                     btcv_unetr.yaml                                      la_vnet.yaml
pretrained                  btcv_unetr.yaml + ``pretrained_ckpt``                (no ViT: not available)
mean_teacher                mean_teacher.yaml + mean_teacher_btcv.yaml           mean_teacher.yaml
pretrained_mean_teacher     mean_teacher.yaml + mean_teacher_btcv.yaml + ckpt    (not available)
=========================== ==================================================== =========================

Every cell (method × count × seed) runs in its own process and folder under ``out/cells``; a finished cell is
skipped on rerun and a killed one resumes from its ``last.pt``. Outputs: ``results.csv`` (one row per method ×
count × seed × case × class), ``results.md`` (mean ± sd over seeds of the mean foreground Dice, and the gain over
scratch) and ``results.png`` (Dice against labeled count, one line per method, error bars over seeds).

Example::

    medssl study --datalist data/ct_phantom/datalist.json --labeled 2 4 --methods scratch pretrained \\
        --pretrained runs/ssl_pretrain/model.pt --seeds 2 --budget 200 --out runs/study --overlay bundles/tiny.yaml
"""

from __future__ import annotations

import csv
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from medssl import resources
from medssl.atomic import atomic_save_figure, atomic_write_text
from medssl.errors import ConfigError, MedsslError

__all__ = [
    "METHODS",
    "StudyConfig",
    "nested_subsets",
    "cell_datalist",
    "aggregate",
    "render_table",
    "plot_results",
    "run_study",
]

log = logging.getLogger(__name__)

METHODS = ("scratch", "pretrained", "mean_teacher", "pretrained_mean_teacher")
_STAGE = {"scratch": "finetune", "pretrained": "finetune", "mean_teacher": "mean_teacher"}
_STAGE["pretrained_mean_teacher"] = "mean_teacher"
BUNDLES = {
    ("btcv", "finetune"): ("btcv_unetr.yaml",),
    ("btcv", "mean_teacher"): ("mean_teacher.yaml", "mean_teacher_btcv.yaml"),
    ("la", "finetune"): ("la_vnet.yaml",),
    ("la", "mean_teacher"): ("mean_teacher.yaml",),
}
# one row per method × count × seed × case × class: the metric columns of medssl.metrics
RESULT_COLUMNS = ("method", "labeled", "seed", "case", "label", "name", "dice", "jaccard", "hd95_mm", "asd_mm")


def default_bundles_dir() -> Path:
    """``bundles/`` of the medssl home (see :mod:`medssl.resources`)."""
    return resources.bundles_dir()


@dataclass
class StudyConfig:
    """Everything a study needs; the YAML form of ``medssl study --config`` has exactly these keys.

    Args:
        datalist: Decathlon datalist with ``training`` (labeled pool) and ``validation`` items.
        out: output folder (created; reused to resume).
        labeled: labeled counts to try, each ≤ the number of training items.
        methods: subset of :data:`METHODS`.
        seeds: number of seeds (0, 1, …) or an explicit list.
        budget: training iterations per cell (``max_iterations`` of every bundle).
        dataset_dir: base of the datalist's relative paths (default: its folder).
        pretrained: ViT checkpoint for the ``pretrained*`` methods.
        pretrain_bundle: bundle config file(s) to pretrain one when ``pretrained`` is not given.
        task: ``btcv`` or ``la``; default from the datalist's labels (2 labels → la, else btcv).
        overlays: bundle overlays applied to every run (e.g. ``bundles/tiny.yaml``).
        overrides: extra bundle id overrides applied to every run (pretraining included).
        val_interval: validation interval (iterations) of the study's training runs; default: the bundles'.
        device / precision: passed to the bundles and to inference (precision ``auto``: see medssl.precision).
        bundles_dir: where the bundle files are (default: the checkout's ``bundles/``).
    """

    datalist: str
    out: str
    labeled: list[int] = field(default_factory=lambda: [2, 4, 8])
    methods: list[str] = field(default_factory=lambda: ["scratch", "pretrained", "mean_teacher"])
    seeds: int | list[int] = 3
    budget: int = 1000
    dataset_dir: str | None = None
    pretrained: str | None = None
    pretrain_bundle: list[str] | None = None
    task: str | None = None
    overlays: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    val_interval: int | None = None
    device: str = "auto"
    precision: str = "auto"
    bundles_dir: str | None = None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **cli: Any) -> StudyConfig:
        """Read the YAML form; non-None ``cli`` values override it."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(path, f"cannot read study config: {str(e).splitlines()[0]}") from e
        if not isinstance(data, dict):
            raise ConfigError(path, f"study config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(path, f"unknown study keys {unknown} (known: {sorted(known)})")
        data.update({k: v for k, v in cli.items() if v is not None})
        missing = [k for k in ("datalist", "out") if k not in data]
        if missing:
            raise ConfigError(path, f"study config lacks {missing}")
        return cls(**data)

    @property
    def seed_list(self) -> list[int]:
        return list(range(int(self.seeds))) if isinstance(self.seeds, int) else [int(s) for s in self.seeds]


def nested_subsets(num_items: int, counts: Sequence[int], seed: int) -> dict[int, list[int]]:
    """Indices of the labeled subset for each count; for one seed, smaller subsets lie inside larger ones.

    One permutation per seed is drawn and each count takes its prefix, so nesting holds by construction.
    """
    bad = [n for n in counts if not 1 <= int(n) <= num_items]
    if bad:
        raise ConfigError("labeled", f"labeled counts {bad} outside 1..{num_items} (training items available)")
    order = np.random.default_rng(int(seed)).permutation(num_items)
    return {int(n): sorted(int(i) for i in order[: int(n)]) for n in counts}


def cell_datalist(base: Mapping[str, Any], labeled_idx: Sequence[int], labels: Mapping[int, str]) -> dict[str, Any]:
    """A datalist for one cell: the subset under ``training``, the other training images under ``unlabeled``."""
    training = base["training"]
    chosen = set(labeled_idx)
    return {
        "name": "medssl-study-cell",
        "labels": {str(k): v for k, v in labels.items()},
        "training": [dict(training[i]) for i in sorted(chosen)],
        "unlabeled": [{"image": training[i]["image"]} for i in range(len(training)) if i not in chosen]
        + [{"image": it["image"]} for it in base.get("unlabeled", [])],
        "validation": [dict(it) for it in base["validation"]],
    }


# ------------------------------------------------------------------------------------------- running


def _bundle_command(files: Sequence[Path], overrides: Mapping[str, Any]) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training"]
    cmd += ["--config_file", json.dumps([str(f) for f in files])]
    meta = files[0].parent / "metadata.json"
    if meta.is_file():
        cmd += ["--meta_file", str(meta)]
    for key, value in overrides.items():
        # fire parses the value: JSON-encode non-strings (None → null is not Python, so spell None)
        text = "None" if value is None else value if isinstance(value, str) else json.dumps(value)
        cmd += [f"--{key}", text]
    return cmd


def _run_logged(cmd: Sequence[str], log_path: Path, what: str) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        raise MedsslError(log_path, f"{what} failed (exit {proc.returncode}): {' | '.join(tail)[-400:]}")


def _mark(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(dict(payload), indent=2) + "\n")


def _infer_task(labels: Mapping[int, str]) -> str:
    return "la" if len(labels) == 2 else "btcv"


def _pretrained_checkpoint(cfg: StudyConfig, bundles: Path, base_overrides: Mapping[str, Any], out: Path) -> str:
    if cfg.pretrained:
        if not Path(cfg.pretrained).is_file():
            raise ConfigError(cfg.pretrained, "pretrained checkpoint does not exist")
        return str(Path(cfg.pretrained).resolve())
    if not cfg.pretrain_bundle:
        raise ConfigError("pretrained", "methods need a pretrained ViT: give --pretrained CKPT or --pretrain-bundle")
    run_dir = out / "pretrain"
    ckpt = run_dir / "model.pt"
    if not (run_dir / "done.json").is_file():
        files = [Path(p).resolve() for p in cfg.pretrain_bundle] + [Path(p).resolve() for p in cfg.overlays]
        overrides = {**base_overrides, "output_dir": str(run_dir), "resume": "true"}
        print(f"pretraining the ViT with {', '.join(p.name for p in files)} → {ckpt}", flush=True)
        _run_logged(_bundle_command(files, overrides), run_dir / "run.log", "SSL pretraining")
        _mark(run_dir / "done.json", {"checkpoint": str(ckpt)})
    return str(ckpt)


def _evaluate_cell(cell_dir: Path, datalist_path: Path, cfg: StudyConfig) -> list[dict[str, str]]:
    from medssl.inference import Predictor
    from medssl.metrics import evaluate_folder

    items = json.loads(datalist_path.read_text(encoding="utf-8"))["validation"]
    predictor = Predictor(cell_dir / "model.pt", device=cfg.device, precision=cfg.precision, progress=False)
    predictor.predict_paths([it["image"] for it in items], cell_dir / "pred")
    evaluate_folder(cell_dir / "pred", datalist_path, cell_dir / "metrics.csv", key="validation")
    with open(cell_dir / "metrics.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def run_study(cfg: StudyConfig) -> dict[str, Path]:
    """Run (or resume) a study; returns the paths of ``results.csv``, ``results.md`` and ``results.png``."""
    from medssl.data.datalist import load_datalist

    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ConfigError("methods", f"unknown methods {unknown} (use {', '.join(METHODS)})")
    if int(cfg.budget) < 1:
        raise ConfigError("budget", f"budget must be ≥ 1 iteration, got {cfg.budget}")
    dl = load_datalist(cfg.datalist, dataset_dir=cfg.dataset_dir)
    if not dl.labels:
        raise ConfigError(cfg.datalist, "the datalist declares no 'labels'; the study needs the class names")
    train_items, val_items = dl.items("training"), dl.items("validation")
    if not val_items:
        raise ConfigError(cfg.datalist, "no 'validation' items: the study evaluates on the validation split")
    base = {"training": train_items, "validation": val_items}
    if "unlabeled" in dl.keys():
        base["unlabeled"] = dl.items("unlabeled")
    task = cfg.task or _infer_task(dl.labels)
    if task not in ("btcv", "la"):
        raise ConfigError("task", f"unknown task {task!r} (use btcv or la)")
    if task == "la" and any(m.startswith("pretrained") for m in cfg.methods):
        raise ConfigError("methods", "the LA task trains a V-Net, which has no ViT to pretrain: drop 'pretrained*'")
    bundles = Path(cfg.bundles_dir) if cfg.bundles_dir else default_bundles_dir()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _mark(out / "study.json", asdict(cfg))

    common = {"bundle_root": str(bundles.parent), "device": cfg.device, "precision": cfg.precision}
    common.update(cfg.overrides)
    pretrained = None
    if any(m.startswith("pretrained") for m in cfg.methods):
        pre_overrides = {**common, "datalist": str(dl.path), "dataset_dir": str(dl.dataset_dir)}
        pretrained = _pretrained_checkpoint(cfg, bundles, pre_overrides, out)

    cells = [(m, n, s) for s in cfg.seed_list for n in sorted(cfg.labeled) for m in cfg.methods]
    subsets = {s: nested_subsets(len(train_items), cfg.labeled, s) for s in cfg.seed_list}
    rows: list[dict[str, Any]] = []
    durations: list[float] = []
    start = time.perf_counter()
    for k, (method, n, seed) in enumerate(cells, 1):
        cell_dir = out / "cells" / f"{method}_n{n}_seed{seed}"
        done = cell_dir / "done.json"
        tag = f"[{k}/{len(cells)}] {method} n={n} seed={seed}"
        if done.is_file():
            cell_rows = json.loads(done.read_text(encoding="utf-8"))["rows"]
            print(f"{tag}: finished earlier, skipped", flush=True)
        else:
            t0 = time.perf_counter()
            datalist_path = cell_dir / "datalist.json"
            _mark(datalist_path, cell_datalist(base, subsets[seed][n], dl.labels))
            if not (cell_dir / "trained.json").is_file():
                files = [bundles / f for f in BUNDLES[(task, _STAGE[method])]]
                files += [Path(p).resolve() for p in cfg.overlays]
                overrides = {
                    **common,
                    "datalist": str(datalist_path),
                    "dataset_dir": str(cell_dir),
                    "output_dir": str(cell_dir),
                    "seed": int(seed),
                    "max_iterations": int(cfg.budget),
                    "pretrained_ckpt": pretrained if method.startswith("pretrained") else None,
                    "resume": "true",  # a killed cell continues from its last.pt
                }
                if cfg.val_interval is not None:
                    overrides["val_interval"] = int(cfg.val_interval)
                _run_logged(_bundle_command(files, overrides), cell_dir / "train.log", f"training cell {tag}")
                _mark(cell_dir / "trained.json", {"budget": int(cfg.budget)})
            cell_rows = _evaluate_cell(cell_dir, datalist_path, cfg)
            _mark(done, {"rows": cell_rows})
            durations.append(time.perf_counter() - t0)
            dice = float(np.mean([float(r["dice"]) for r in cell_rows]))
            remaining = statistics.median(durations) * sum(
                1 for m, nn, s in cells[k:] if not (out / "cells" / f"{m}_n{nn}_seed{s}" / "done.json").is_file()
            )
            print(
                f"{tag}: mean Dice {dice:.3f} in {_fmt_seconds(durations[-1])} | elapsed "
                f"{_fmt_seconds(time.perf_counter() - start)} | ~{_fmt_seconds(remaining)} left",
                flush=True,
            )
        rows += [
            {"method": method, "labeled": n, "seed": seed, **{c: r[c] for c in RESULT_COLUMNS[3:]}} for r in cell_rows
        ]

    return write_results(rows, out, methods=cfg.methods, counts=sorted(cfg.labeled))


# ------------------------------------------------------------------------------------------ reporting


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], list[float]]:
    """Mean foreground Dice per (method, labeled count), one value per seed (cases × classes averaged)."""
    per_seed: dict[tuple[str, int, int], list[float]] = {}
    for r in rows:
        key = (str(r["method"]), int(r["labeled"]), int(r["seed"]))
        per_seed.setdefault(key, []).append(float(r["dice"]))
    out: dict[tuple[str, int], list[float]] = {}
    for (method, n, _seed), values in sorted(per_seed.items()):
        out.setdefault((method, n), []).append(float(np.mean(values)))
    return out


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def render_table(agg: Mapping[tuple[str, int], Sequence[float]], methods: Sequence[str], counts: Sequence[int]) -> str:
    """Markdown: mean ± sd Dice (%) per method and count, and the gain over scratch in Dice points and percent."""
    head = "| method | " + " | ".join(f"{n} labeled" for n in counts) + " |"
    lines = [head, "|---|" + "---|" * len(counts)]
    for m in methods:
        cells = []
        for n in counts:
            if (m, n) not in agg:
                cells.append("–")
                continue
            mean, sd = _mean_sd(agg[(m, n)])
            text = f"{100 * mean:.1f} ± {100 * sd:.1f}"
            if m != "scratch" and ("scratch", n) in agg:
                ref = float(np.mean(agg[("scratch", n)]))
                gain = f"{100 * (mean - ref):+.1f}"
                rel = f"{100 * (mean - ref) / ref:+.0f} %" if ref > 0 else "n/a"
                text += f" ({gain}; {rel})"
            cells.append(text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    seeds = max((len(v) for v in agg.values()), default=0)
    lines.append("")
    lines.append(
        f"Mean foreground Dice (%) on the validation split, mean ± sd over {seeds} seed(s); in brackets the gain over "
        "scratch at the same labeled count in Dice points and relative to scratch."
    )
    return "\n".join(lines) + "\n"


def plot_results(
    agg: Mapping[tuple[str, int], Sequence[float]], methods: Sequence[str], counts: Sequence[int], path: Path
) -> Path:
    """Dice against labeled count, one line per method, error bars = sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m in methods:
        xs = [n for n in counts if (m, n) in agg]
        if not xs:
            continue
        stats = [_mean_sd(agg[(m, n)]) for n in xs]
        ax.errorbar(xs, [100 * s[0] for s in stats], yerr=[100 * s[1] for s in stats], marker="o", capsize=3, label=m)
    ax.set_xlabel("labeled training volumes")
    ax.set_ylabel("mean foreground Dice (%)")
    ax.set_xticks(list(counts))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("label efficiency")
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


def write_results(
    rows: Sequence[Mapping[str, Any]], out: Path, *, methods: Sequence[str], counts: Sequence[int]
) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and ``results.png`` into ``out``."""
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: r[c] for c in RESULT_COLUMNS} for r in rows)
    paths = {"csv": atomic_write_text(out / "results.csv", buf.getvalue())}
    agg = aggregate(rows)
    table = render_table(agg, methods, counts)
    paths["md"] = atomic_write_text(out / "results.md", "# Label-efficiency study\n\n" + table)
    paths["png"] = plot_results(agg, methods, counts, out / "results.png")
    print("\n" + table, flush=True)
    return paths
