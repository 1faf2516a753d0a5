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
mean_teacher_no_consistency as mean_teacher, ``--consistency 0``                 as mean_teacher
pretrained_mean_teacher     mean_teacher.yaml + mean_teacher_btcv.yaml + ckpt    (not available)
ua_mt                       (not available)                                      mean_teacher.yaml + ``--uncertainty true``
=========================== ==================================================== =========================

Every cell (method × count × seed) runs in its own process and folder under ``out/cells``; a finished cell is
skipped on rerun and a killed one resumes from its ``last.pt``. Outputs: ``results.csv`` (one row per method ×
count × seed × case × class), ``results.md`` (mean ± sd over seeds of the mean foreground Dice, and the gain over
scratch) and ``results.png`` (Dice against labeled count, one line per method, error bars over seeds).

The mean foreground Dice stays the study's number. Beside it, ``results.csv`` carries each case's score in the
MONAI BTCV UNETR tutorial's convention (``case_dice_tutorial``: all classes with background, see
:mod:`medssl.metrics`; empty for cells scored before that column existed) and ``results.md`` adds a table of it
where the cells have it. Validation images are segmented at the :class:`~medssl.inference.Predictor`'s default
sliding-window overlap, 0.25, the tutorial's.

Example::

    medssl study --datalist data/ct_phantom/datalist.json --labeled 2 4 --methods scratch pretrained \\
        --pretrained runs/ssl_pretrain/model.pt --seeds 2 --budget 200 --out runs/study --overlay bundles/tiny.yaml
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medssl import resources
from medssl.atomic import atomic_save_figure, atomic_write_text
from medssl.errors import ConfigError, MedsslError
from medssl.metrics import TUTORIAL_COLUMN, tutorial_mean  # the column is optional in a cell's rows (older cells)
from medssl.progress import Progress, format_seconds
from medssl.study_fingerprint import append_history, claim_cells, content_sha256, file_sha256, fingerprint

__all__ = [
    "METHODS",
    "StudyConfig",
    "nested_subsets",
    "cell_datalist",
    "aggregate",
    "aggregate_tutorial",
    "render_table",
    "render_tutorial_table",
    "plot_results",
    "draw_results",
    "error_bar_extent",
    "paired_gains",
    "render_gains",
    "run_study",
]

log = logging.getLogger(__name__)

METHODS = ("scratch", "pretrained", "mean_teacher", "mean_teacher_no_consistency", "pretrained_mean_teacher", "ua_mt")
_STAGE = {"scratch": "finetune", "pretrained": "finetune", "mean_teacher": "mean_teacher"}
_STAGE["pretrained_mean_teacher"] = "mean_teacher"
_STAGE["ua_mt"] = "mean_teacher"
CONTROL = "mean_teacher_no_consistency"
_STAGE[CONTROL] = "mean_teacher"
# what makes a method other than its bundle: UA-MT is Mean Teacher with the uncertainty-masked consistency; the
# control without consistency is Mean Teacher's data and batches with the unlabeled loss switched off, so that the
# difference between the two is what the unlabeled volumes buy
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "ua_mt": {"uncertainty": "true"},
    CONTROL: {"consistency": 0.0},
}
BUNDLES = {
    ("btcv", "finetune"): ("supervised.yaml", "btcv_unetr.yaml"),
    ("btcv", "mean_teacher"): ("mean_teacher.yaml", "mean_teacher_btcv.yaml"),
    ("la", "finetune"): ("supervised.yaml", "la_vnet.yaml"),
    ("la", "mean_teacher"): ("mean_teacher.yaml",),
}
# one row per method × count × seed × case × class: the metric columns of medssl.metrics
RESULT_COLUMNS = (
    "method",
    "labeled",
    "seed",
    "case",
    "label",
    "name",
    "dice",
    "jaccard",
    "hd95_mm",
    "asd_mm",
    TUTORIAL_COLUMN,
)


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
        jobs: cells trained at once, each in its own process (on a CPU, small networks run faster as N
            one-thread processes than as one N-thread process); 1 = one after another.
        threads: torch threads per cell process (``OMP_NUM_THREADS``); default: the CPU count divided by ``jobs``.
        title: what was trained, written above the table (results.md and the terminal).
        reference: named reference scores (mean foreground Dice, 0-1) shown beside the table and as lines in
            the plot, e.g. ``{"oracle intensity threshold": 0.27}``.
        method_overrides: bundle overrides for one method's cells, e.g. the same labeled crops per step for
            ``scratch`` as Mean Teacher's labeled half: ``{"scratch": {"batch_size": 2}}``.
        redo_changed: recompute the cells whose settings differ from those they were computed with (default:
            refuse to mix them, see :mod:`medssl.study_fingerprint`).
        acquisition: active-learning strategies (:data:`medssl.suggest.STRATEGIES`) to compare instead of the
            label-efficiency grid; see :mod:`medssl.study_acquisition` (one method, the smallest labeled count).
        rounds: acquisition rounds after round 0.
        step: volumes annotated per acquisition round.
        diversity: the acquisition's :func:`medssl.suggest.select` diversity weight.
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
    jobs: int = 1
    threads: int | None = None
    title: str | None = None
    reference: dict[str, float] = field(default_factory=dict)
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    redo_changed: bool = False
    acquisition: list[str] = field(default_factory=list)
    rounds: int = 2
    step: int = 1
    diversity: float = 0.5

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
    # MONAI metadata of the last config with one (bundles/metadata/<bundle>.json): an overlay with a network of
    # its own (mean_teacher_btcv.yaml) describes the run, tiny.yaml has none
    meta = next((m for f in reversed(files) if (m := f.parent / "metadata" / f"{f.stem}.json").is_file()), None)
    if meta is not None:
        cmd += ["--meta_file", str(meta)]
    for key, value in overrides.items():
        # fire parses the value: JSON-encode non-strings (None → null is not Python, so spell None)
        text = "None" if value is None else value if isinstance(value, str) else json.dumps(value)
        cmd += [f"--{key}", text]
    return cmd


def _run_logged(cmd: Sequence[str], log_path: Path, what: str, threads: int | None = None) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(int(threads))
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
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
        log.info("pretraining the ViT with %s → %s", ", ".join(p.name for p in files), ckpt)
        _run_logged(_bundle_command(files, overrides), run_dir / "run.log", "SSL pretraining", _threads(cfg, 1))
        _mark(run_dir / "done.json", {"checkpoint": str(ckpt)})
    return str(ckpt)


# evaluation runs in this process: one cell at a time, so parallel cells do not oversubscribe the cores
_EVAL_LOCK = threading.Lock()


def _evaluate_cell(cell_dir: Path, datalist_path: Path, cfg: StudyConfig) -> list[dict[str, str]]:
    from medssl.inference import Predictor
    from medssl.metrics import evaluate_folder

    items = json.loads(datalist_path.read_text(encoding="utf-8"))["validation"]
    with _EVAL_LOCK:
        predictor = Predictor(cell_dir / "model.pt", device=cfg.device, precision=cfg.precision, progress=False)
        predictor.predict_paths([it["image"] for it in items], cell_dir / "pred")
        evaluate_folder(cell_dir / "pred", datalist_path, cell_dir / "metrics.csv", key="validation")
    with open(cell_dir / "metrics.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _threads(cfg: StudyConfig, jobs: int | None = None) -> int:
    """torch threads of one bundle process: ``cfg.threads``, else the cores shared by the concurrent jobs."""
    if cfg.threads:
        return int(cfg.threads)
    return max(1, (os.cpu_count() or 1) // max(1, int(jobs if jobs is not None else cfg.jobs)))


def _last_progress(log_path: Path) -> str | None:
    """The newest ``medssl-progress`` line of a running cell's log (see ``medssl.handlers.ProgressBar``)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [ln for ln in tail.splitlines() if ln.startswith("medssl-progress ")]
    return lines[-1][len("medssl-progress ") :].strip() if lines else None


class _LiveProgress:
    """Logs the running cells' training progress every ``interval`` seconds until stopped (INFO: shown where
    progress is, see :mod:`medssl.progress`)."""

    def __init__(self, running: dict[str, Path], lock: threading.Lock, interval: float = 20.0) -> None:
        self.running, self.lock, self.interval = running, lock, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _LiveProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self.lock:
                parts = [f"{tag} {_last_progress(log) or 'starting'}" for tag, log in self.running.items()]
                if parts:
                    log.info("running: %s", " | ".join(parts))


def _cell_run(
    cfg: StudyConfig,
    bundles: Path,
    task: str,
    method: str,
    common: Mapping[str, Any],
    cell_dir: Path,
    seed: int,
    pretrained: str | None,
) -> tuple[list[Path], dict[str, Any]]:
    """The bundle files and overrides that train one cell on ``cell_dir/datalist.json`` into ``cell_dir``."""
    files = [bundles / f for f in BUNDLES[(task, _STAGE[method])]]
    files += [Path(p).resolve() for p in cfg.overlays]
    overrides = {
        **common,
        "datalist": str(cell_dir / "datalist.json"),
        "dataset_dir": str(cell_dir),
        "output_dir": str(cell_dir),
        "seed": int(seed),
        "max_iterations": int(cfg.budget),
        "pretrained_ckpt": pretrained if method.startswith("pretrained") else None,
        "resume": "true",  # a killed cell continues from its last.pt
    }
    if cfg.val_interval is not None:
        overrides["val_interval"] = int(cfg.val_interval)
    overrides.update(METHOD_OVERRIDES.get(method, {}))
    overrides.update(cfg.method_overrides.get(method, {}))
    return files, overrides


def _wait_all(futures: Sequence[Any]) -> None:
    """Wait for every future; the other cells still finish when one fails, the first failure is raised after."""
    errors = []
    for future in futures:
        try:
            future.result()
        except MedsslError as e:
            errors.append(e)
    if errors:
        raise errors[0]


def _cell_name(method: str, n: int, seed: int) -> str:
    return f"{method}_n{n}_seed{seed}"


def _claim_study(
    cfg: StudyConfig,
    out: Path,
    bundles: Path,
    task: str,
    base: Mapping[str, Any],
    labels: Mapping[int, str],
    cells: Sequence[tuple[str, int, int]],
    subsets: Mapping[int, Mapping[int, list[int]]],
) -> None:
    """Check (or, with ``redo_changed``, reset) every cell's settings before anything runs; log the invocation.

    See :mod:`medssl.study_fingerprint`. The study's own pretraining run is a cell too (``out/pretrain``); the
    cells that use its checkpoint carry its fingerprint, known before it runs.
    """
    overlays = [Path(p).resolve() for p in cfg.overlays]
    settings = {"precision": cfg.precision}
    pretrained = None
    redone: list[str] = []
    if any(m.startswith("pretrained") for m in cfg.methods):
        if cfg.pretrained:
            if not Path(cfg.pretrained).is_file():
                raise ConfigError(cfg.pretrained, "pretrained checkpoint does not exist")
            pretrained = "sha256:" + file_sha256(cfg.pretrained)
        elif cfg.pretrain_bundle:
            pre = fingerprint(
                bundles=[Path(p).resolve() for p in cfg.pretrain_bundle],
                overlays=overlays,
                overrides=cfg.overrides,
                datalist=base,
                pretrained=None,
                **settings,
            )
            redone += claim_cells(out, {"pretrain": pre}, redo_changed=cfg.redo_changed)
            pretrained = "pretrain:" + content_sha256(pre)
    fps = {
        _cell_name(m, n, s): fingerprint(
            bundles=[bundles / f for f in BUNDLES[(task, _STAGE[m])]],
            overlays=overlays,
            overrides={**cfg.overrides, **METHOD_OVERRIDES.get(m, {}), **cfg.method_overrides.get(m, {})},
            datalist=cell_datalist(base, subsets[s][n], labels),
            pretrained=pretrained if m.startswith("pretrained") else None,
            budget=int(cfg.budget),
            val_interval=cfg.val_interval,
            seed=int(s),
            **settings,
        )
        for m, n, s in cells
    }
    redone += claim_cells(out / "cells", fps, redo_changed=cfg.redo_changed)
    append_history(out / "study.json", {"config": asdict(cfg), "cells": fps, "redone": redone})


class _Inputs(NamedTuple):
    """What every study (the label grid or the acquisition rounds) reads and checks before running cells."""

    datalist: Any  # medssl.data.datalist.Datalist
    base: dict[str, Any]  # training / validation / unlabeled items
    task: str
    bundles: Path
    out: Path
    common: dict[str, Any]  # overrides of every run


def _study_inputs(cfg: StudyConfig) -> _Inputs:
    """Check ``cfg`` against its datalist and the task; create the output folder."""
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
    if task == "btcv" and "ua_mt" in cfg.methods:
        raise ConfigError("methods", "ua_mt (UA-MT) is defined for the binary LA task; use mean_teacher on btcv")
    if task == "la" and any(m.startswith("pretrained") for m in cfg.methods):
        raise ConfigError("methods", "the LA task trains a V-Net, which has no ViT to pretrain: drop 'pretrained*'")
    bundles = Path(cfg.bundles_dir) if cfg.bundles_dir else default_bundles_dir()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    common = {"bundle_root": str(bundles.parent), "device": cfg.device, "precision": cfg.precision}
    common.update(cfg.overrides)
    return _Inputs(dl, base, task, bundles, out, common)


def run_study(cfg: StudyConfig) -> dict[str, Path]:
    """Run (or resume) a study; returns the paths of ``results.csv``, ``results.md`` and ``results.png``.

    Raises:
        ConfigError: ``cfg.acquisition`` is set: run it with :func:`medssl.study_acquisition.run_acquisition`.
    """
    if cfg.acquisition:
        raise ConfigError(
            "acquisition", "an acquisition study runs through medssl.study_acquisition.run_acquisition (or the CLI)"
        )
    dl, base, task, bundles, out, common = _study_inputs(cfg)
    train_items = base["training"]
    cells = [(m, n, s) for s in cfg.seed_list for n in sorted(cfg.labeled) for m in cfg.methods]
    subsets = {s: nested_subsets(len(train_items), cfg.labeled, s) for s in cfg.seed_list}
    _claim_study(cfg, out, bundles, task, base, dl.labels, cells, subsets)
    pretrained = None
    if any(m.startswith("pretrained") for m in cfg.methods):
        pre_overrides = {**common, "datalist": str(dl.path), "dataset_dir": str(dl.dataset_dir)}
        pretrained = _pretrained_checkpoint(cfg, bundles, pre_overrides, out)

    jobs = max(1, int(cfg.jobs))
    threads = _threads(cfg, jobs)
    lock = threading.Lock()
    running: dict[str, Path] = {}
    results: dict[tuple[str, int, int], list[dict[str, str]]] = {}

    def run_cell(k: int, method: str, n: int, seed: int) -> None:
        cell_dir = out / "cells" / _cell_name(method, n, seed)
        tag = f"[{k}/{len(cells)}] {method} n={n} seed={seed}"
        t0 = time.perf_counter()
        datalist_path = cell_dir / "datalist.json"
        _mark(datalist_path, cell_datalist(base, subsets[seed][n], dl.labels))
        if not (cell_dir / "trained.json").is_file():
            files, overrides = _cell_run(cfg, bundles, task, method, common, cell_dir, seed, pretrained)
            with lock:
                running[tag] = cell_dir / "train.log"
                log.info("%s: training (%d thread(s))", tag, threads)
            try:
                _run_logged(_bundle_command(files, overrides), cell_dir / "train.log", f"training cell {tag}", threads)
            finally:
                with lock:
                    running.pop(tag, None)
            _mark(cell_dir / "trained.json", {"budget": int(cfg.budget)})
        cell_rows = _evaluate_cell(cell_dir, datalist_path, cfg)
        _mark(cell_dir / "done.json", {"rows": cell_rows})
        with lock:
            results[(method, n, seed)] = cell_rows
            dice = float(np.mean([float(r["dice"]) for r in cell_rows]))
            progress.advance(
                f"{method} n={n} seed={seed}: mean Dice {dice:.3f} in {format_seconds(time.perf_counter() - t0)}"
            )

    pending = []
    for k, (method, n, seed) in enumerate(cells, 1):
        done = out / "cells" / _cell_name(method, n, seed) / "done.json"
        if done.is_file():
            results[(method, n, seed)] = json.loads(done.read_text(encoding="utf-8"))["rows"]
            log.info("[%d/%d] %s n=%d seed=%d: finished earlier, skipped", k, len(cells), method, n, seed)
        else:
            pending.append((k, method, n, seed))
    if pending:
        # "cell k/N, ETA" over the cells left to run; the ETA (mean time per finished cell) holds for parallel jobs
        progress = Progress(len(pending), "study", unit="cell")
        with progress, _LiveProgress(running, lock), ThreadPoolExecutor(max_workers=jobs) as pool:
            _wait_all([pool.submit(run_cell, *cell) for cell in pending])

    rows: list[dict[str, Any]] = []
    for method, n, seed in cells:
        rows += [
            {"method": method, "labeled": n, "seed": seed, **{c: r.get(c, "") for c in RESULT_COLUMNS[3:]}}
            for r in results[(method, n, seed)]
        ]
    return write_results(
        rows, out, methods=cfg.methods, counts=sorted(cfg.labeled), title=cfg.title, reference=cfg.reference
    )


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


def aggregate_tutorial(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], list[float]]:
    """The tutorial-convention Dice per (method, labeled count), one value per seed, where the cells carry it.

    A seed's value is :func:`medssl.metrics.tutorial_mean` of its cases' ``case_dice_tutorial`` (one per case); a
    cell with any row lacking the column (scored before it existed) is left out.
    """
    per_seed: dict[tuple[str, int, int], dict[str, str]] = {}
    incomplete: set[tuple[str, int, int]] = set()
    for r in rows:
        key = (str(r["method"]), int(r["labeled"]), int(r["seed"]))
        value = r.get(TUTORIAL_COLUMN, "")
        if value in ("", None):
            incomplete.add(key)
        else:
            per_seed.setdefault(key, {}).setdefault(str(r["case"]), value)
    out: dict[tuple[str, int], list[float]] = {}
    for (method, n, seed), cases in sorted(per_seed.items()):
        if (method, n, seed) not in incomplete:
            out.setdefault((method, n), []).append(tutorial_mean([float(v) for v in cases.values()]))
    return out


def render_tutorial_table(
    agg: Mapping[tuple[str, int], Sequence[float]],
    tutorial: Mapping[tuple[str, int], Sequence[float]],
    methods: Sequence[str],
    counts: Sequence[int],
) -> str:
    """Markdown: beside the main number (mean foreground Dice), the tutorial convention's, per method and count.

    Empty when no cell carries the tutorial convention.
    """
    keys = [(m, n) for n in counts for m in methods if (m, n) in tutorial]
    if not keys:
        return ""
    lines = [
        "| method | labeled | foreground organs (main table) | tutorial convention (with background) |",
        "|---|---|---|---|",
    ]
    for m, n in keys:
        main = "–" if (m, n) not in agg else "{:.1f} ± {:.1f}".format(*(100 * v for v in _mean_sd(agg[(m, n)])))
        tut = "{:.1f} ± {:.1f}".format(*(100 * v for v in _mean_sd(tutorial[(m, n)])))
        lines.append(f"| {m} | {n} | {main} | {tut} ({len(tutorial[(m, n)])} seed(s)) |")
    lines += [
        "",
        "Tutorial convention: the MONAI BTCV UNETR tutorial's DiceMetric(include_background=True, reduction='mean'): "
        "per case the mean over the classes present in the reference, background included (a class absent from the "
        "reference is skipped even when predicted), then the mean over cases; reported beside the study's number, "
        "never instead of it. Same predictions (sliding-window overlap 0.25, the tutorial's).",
    ]
    return "\n".join(lines) + "\n"


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


def paired_gains(
    rows: Sequence[Mapping[str, Any]], methods: Sequence[str], counts: Sequence[int], baseline: str = "scratch"
) -> dict[tuple[str, int], dict[int, float]]:
    """Per seed, a method's mean foreground Dice minus ``baseline``'s at the same labeled count and seed.

    A seed fixes the labeled subset, so each difference is paired: the same labeled volumes, the same budget.
    """
    per_seed: dict[tuple[str, int, int], list[float]] = {}
    for r in rows:
        per_seed.setdefault((str(r["method"]), int(r["labeled"]), int(r["seed"])), []).append(float(r["dice"]))
    means = {k: float(np.mean(v)) for k, v in per_seed.items()}
    gains: dict[tuple[str, int], dict[int, float]] = {}
    for (method, n, seed), value in sorted(means.items()):
        if method == baseline or (baseline, n, seed) not in means:
            continue
        gains.setdefault((method, n), {})[seed] = value - means[(baseline, n, seed)]
    return {k: v for k, v in gains.items() if k[0] in methods and k[1] in counts}


def render_gains(
    gains: Mapping[tuple[str, int], Mapping[int, float]],
    baseline: str = "scratch",
    *,
    columns: tuple[str, str] = ("method", "labeled"),
    pairing: str = "the same labeled volumes and budget",
) -> str:
    """Markdown: the paired gains per seed over ``baseline``, their mean ± sd, and whether the effect exceeds the
    seed spread; ``columns`` names the first two columns and ``pairing`` what one seed holds equal."""
    if not gains:
        return ""
    lines = [
        f"| {columns[0]} | {columns[1]} | gain per seed (Dice points) | mean ± sd | beyond seed spread |",
        "|---|---|---|---|---|",
    ]
    for (method, n), by_seed in sorted(gains.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        values = [by_seed[s] for s in sorted(by_seed)]
        mean, sd = _mean_sd(values)
        per_seed = ", ".join(f"s{s}: {100 * by_seed[s]:+.1f}" for s in sorted(by_seed))
        # the study's criterion: every seed the same sign and the mean larger than one sd of the per-seed gains
        verdict = f"n/a ({len(values)} seed{'s' if len(values) > 1 else ''}; needs 3)"
        if len(values) >= 3:
            same_sign = all(v > 0 for v in values) or all(v < 0 for v in values)
            verdict = "yes" if same_sign and abs(mean) > sd else "no"
        lines.append(f"| {method} | {n} | {per_seed} | {100 * mean:+.1f} ± {100 * sd:.1f} | {verdict} |")
    lines.append("")
    lines.append(
        f"Gain = the {columns[0]}'s mean foreground Dice minus {baseline}'s with the same seed ({pairing}). "
        "'beyond seed spread': at least 3 seeds, all of one sign, and |mean| > sd of the per-seed gains."
    )
    return "\n".join(lines) + "\n"


def draw_results(
    ax: Any,
    agg: Mapping[tuple[str, int], Sequence[float]],
    methods: Sequence[str],
    counts: Sequence[int],
    *,
    title: str | None = None,
    reference: Mapping[str, float] | None = None,
) -> None:
    """Draw Dice against labeled count on a matplotlib ``ax``: a line per method, error bars = sd over seeds.

    Error bars are clipped to the Dice range [0, 100] % (so asymmetric near its ends), and each method's markers sit
    a little to the side of the labeled count (methods in order, centred on it) so that overlapping ones stay visible.
    """
    import textwrap

    drawn = [m for m in methods if any((m, n) in agg for n in counts)]
    for k, m in enumerate(drawn):
        xs = [n for n in counts if (m, n) in agg]
        means, lower, upper = error_bar_extent([agg[(m, n)] for n in xs])
        # side-by-side offsets in axis-independent units: a fraction of the count (the axis often spans 1..24)
        shift = 0.04 * (k - (len(drawn) - 1) / 2)
        ax.errorbar([n * (1 + shift) for n in xs], means, yerr=[lower, upper], marker="o", capsize=3, label=m)
    for k, (name, value) in enumerate((reference or {}).items()):
        ax.axhline(100 * float(value), color="0.4", linestyle=("--", ":", "-.")[k % 3], linewidth=1, label=name)
    ax.set_xlabel("labeled training volumes")
    ax.set_ylabel("mean foreground Dice (%)")
    ax.set_ylim(bottom=0)
    ax.set_xticks(list(counts))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(textwrap.fill(title or "label efficiency", 70), fontsize=8)


def error_bar_extent(per_count: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Means (%) and the lower / upper error-bar lengths (sd over seeds, %) clipped to the Dice range [0, 100]."""
    means, lower, upper = [], [], []
    for values in per_count:
        mean, sd = (100 * v for v in _mean_sd(values))
        means.append(mean)
        lower.append(min(sd, mean))
        upper.append(min(sd, 100.0 - mean))
    return means, lower, upper


def plot_results(
    agg: Mapping[tuple[str, int], Sequence[float]],
    methods: Sequence[str],
    counts: Sequence[int],
    path: Path,
    *,
    title: str | None = None,
    reference: Mapping[str, float] | None = None,
) -> Path:
    """Dice against labeled count, one line per method, error bars = sd over seeds; references as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    draw_results(ax, agg, methods, counts, title=title, reference=reference)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


def write_results(
    rows: Sequence[Mapping[str, Any]],
    out: Path,
    *,
    methods: Sequence[str],
    counts: Sequence[int],
    title: str | None = None,
    reference: Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and ``results.png`` into ``out`` and print the tables."""
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: r.get(c, "") if c == TUTORIAL_COLUMN else r[c] for c in RESULT_COLUMNS} for r in rows)
    paths = {"csv": atomic_write_text(out / "results.csv", buf.getvalue())}
    agg = aggregate(rows)
    table = render_table(agg, methods, counts)
    if reference:
        table += (
            "\nReference (same validation cases): "
            + "; ".join(f"{name} {100 * float(v):.1f}" for name, v in reference.items())
            + "\n"
        )
    gains = render_gains(paired_gains(rows, methods, counts))
    if gains:
        table += "\n" + gains
    if CONTROL in methods:
        # what the unlabeled volumes' consistency term adds on Mean Teacher's own data and batches
        with_unlabeled = [m for m in methods if _STAGE[m] == "mean_teacher" and m != CONTROL]
        control = render_gains(paired_gains(rows, with_unlabeled, counts, baseline=CONTROL), baseline=CONTROL)
        if control:
            table += "\nWhat the consistency term on unlabeled volumes adds:\n\n" + control
    tutorial = render_tutorial_table(agg, aggregate_tutorial(rows), methods, counts)
    if tutorial:
        table += "\n" + tutorial
    head = (title + "\n\n") if title else ""
    paths["md"] = atomic_write_text(out / "results.md", "# Label-efficiency study\n\n" + head + table)
    paths["png"] = plot_results(agg, methods, counts, out / "results.png", title=title, reference=reference)
    print("\n" + head + table, flush=True)
    return paths
