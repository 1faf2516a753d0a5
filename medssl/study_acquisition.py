"""The study's acquisition axis: how much Dice does each annotated volume buy, chosen by each strategy?

``medssl study --acquisition random entropy`` (``StudyConfig.acquisition``) replaces the label-efficiency grid by
active-learning rounds, the phantom's labels playing the annotator:

* round 0 trains the study's one method on the smallest labeled subset (the study's first labeled count, the same
  cases for every strategy: one shared cell per seed);
* each later round ``r`` scores the cases of the labeled pool not yet annotated (their labels hidden: only the
  images are scored) with the previous round's ``model.pt`` by :func:`medssl.suggest.score_volumes`, picks ``step``
  of them by :func:`medssl.suggest.select`, moves them into the cell's ``training`` list
  (:func:`round_datalist`, written per cell; the study's datalist is never touched) and trains again from scratch
  with the same budget. ``random`` draws with the seed ``1000 * seed + r``, so a round's draw is fixed by the
  study's seed and the round.

Cells are ``(strategy, seed, round)``; a round depends on the previous round of the same strategy and seed. Each
cell's fingerprint (:mod:`medssl.study_fingerprint`) holds the case list it trains on, the cases chosen for it and
the previous round's fingerprint, so a rerun reuses a finished cell only when the same cases were chosen by the same
chain; the volumes' scores are cached beside the model that scored them (``<previous cell>/.suggest_cache``), so
resuming does not segment the pool again.

Outputs in ``out``: ``results.csv`` (one row per strategy × round × seed × case × class), ``rounds.csv`` (the cases
each strategy added per round and seed), ``results.md`` (mean ± sd Dice per strategy against the number of annotated
volumes, the Dice points per added volume, and the paired gain of each strategy over ``random`` at each round, per
seed) and ``results.png``.

Example::

    medssl study --datalist data/ct_phantom/datalist.json --acquisition random entropy --labeled 1 --rounds 2 \\
        --step 1 --seeds 3 --budget 300 --out runs/acquisition --overlay bundles/tiny.yaml
"""

from __future__ import annotations

import csv
import io
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from medssl import study
from medssl.atomic import atomic_write_text
from medssl.errors import ConfigError
from medssl.progress import Progress, format_seconds
from medssl.study import RESULT_COLUMNS, StudyConfig
from medssl.study_fingerprint import append_history, claim_cells, content_sha256, file_sha256, fingerprint

__all__ = ["ACQUISITION_COLUMNS", "round_datalist", "acquisition_table", "write_acquisition_results", "run_acquisition"]

log = logging.getLogger(__name__)

# one row per strategy × round × seed × case × class
ACQUISITION_COLUMNS = ("strategy", "round", "labeled", "seed", *RESULT_COLUMNS[3:])
BASELINE = "random"


def round_datalist(
    base: Mapping[str, Any], labeled_idx: Sequence[int], chosen_idx: Sequence[int], labels: Mapping[int, str]
) -> dict[str, Any]:
    """The datalist of the next round: the chosen cases of the pool join the labeled ones.

    Args:
        base: the study's datalist (``training`` = the labeled pool, ``validation``, optional ``unlabeled``).
        labeled_idx: indices into ``base["training"]`` annotated so far.
        chosen_idx: indices of the cases annotated in this round (not yet labeled, distinct).
        labels: class index → name.

    Returns:
        a new datalist (``base`` is not modified): ``training`` = the labeled and chosen cases, ``unlabeled`` = the
        rest of the pool (images only) and the base's own unlabeled images.

    Raises:
        ConfigError: a chosen index is already labeled, repeated or outside the pool.
    """
    pool = len(base["training"])
    done = set(int(i) for i in labeled_idx)
    chosen = [int(i) for i in chosen_idx]
    bad = [i for i in chosen if i in done or not 0 <= i < pool]
    if bad or len(set(chosen)) != len(chosen):
        raise ConfigError(
            "acquisition", f"chosen cases {chosen} must be distinct, in 0..{pool - 1} and not labeled {sorted(done)}"
        )
    return study.cell_datalist(base, sorted(done | set(chosen)), labels)


def _cell_name(method: str, strategy: str | None, rnd: int, seed: int) -> str:
    return f"{method}_r0_seed{seed}" if rnd == 0 else f"{method}_{strategy}_r{rnd}_seed{seed}"


def _case(item: Mapping[str, Any]) -> str:
    from medssl.inference.volume import case_name

    return case_name(item["image"])


class _Chain:
    """One strategy's rounds for one seed: the labeled indices so far and the previous cell."""

    def __init__(self, strategy: str, seed: int, start: list[int], first: str) -> None:
        self.strategy, self.seed = strategy, seed
        self.labeled = list(start)
        self.previous = first  # cell folder name of the last finished round
        self.added: list[list[int]] = []


def run_acquisition(cfg: StudyConfig) -> dict[str, Path]:
    """Run (or resume) the acquisition rounds of ``cfg`` (``medssl study --acquisition``).

    Args:
        cfg: the study; ``acquisition``, ``rounds``, ``step`` and ``diversity`` shape the rounds, ``methods`` names
            the one method trained, ``min(labeled)`` is round 0's labeled count; the other keys as for
            :func:`medssl.study.run_study`.

    Returns:
        the paths of ``results.csv``, ``rounds.csv``, ``results.md`` and ``results.png``.

    Raises:
        ConfigError: no or unknown strategies, not exactly one method, rounds / step out of range for the pool, and
            whatever :func:`medssl.study.run_study` refuses.
    """
    from medssl.suggest import STRATEGIES

    strategies = list(dict.fromkeys(cfg.acquisition))
    unknown = [s for s in strategies if s not in STRATEGIES or s == "teacher_student"]
    if unknown or not strategies:
        usable = [s for s in STRATEGIES if s != "teacher_student"]
        raise ConfigError("acquisition", f"unknown strategies {unknown} (use {', '.join(usable)})")
    if len(cfg.methods) != 1:
        raise ConfigError("methods", f"the acquisition study trains one method, got {cfg.methods} (e.g. scratch)")
    method = cfg.methods[0]
    dl, base, task, bundles, out, common = study._study_inputs(cfg)
    labels = dl.labels
    rounds, step = int(cfg.rounds), int(cfg.step)
    pool = len(base["training"])
    n0 = min(int(n) for n in cfg.labeled)
    if rounds < 1 or step < 1 or n0 + rounds * step > pool:
        raise ConfigError(
            "rounds",
            f"{n0} labeled + {rounds} round(s) x {step} need {n0 + rounds * step} training cases, the pool has {pool}",
        )
    cells_root = out / "cells"
    pretrained = None
    if method.startswith("pretrained"):
        pre = {**common, "datalist": str(dl.path), "dataset_dir": str(dl.dataset_dir)}
        pretrained = study._pretrained_checkpoint(cfg, bundles, pre, out)
    settings = {
        "bundles": [bundles / f for f in study.BUNDLES[(task, study._STAGE[method])]],
        "overlays": [Path(p).resolve() for p in cfg.overlays],
        "overrides": {
            **cfg.overrides,
            **study.METHOD_OVERRIDES.get(method, {}),
            **cfg.method_overrides.get(method, {}),
        },
        "pretrained": None if pretrained is None else "sha256:" + file_sha256(pretrained),
        "budget": int(cfg.budget),
        "val_interval": cfg.val_interval,
        "precision": cfg.precision,
    }
    fps: dict[str, dict[str, Any]] = {}
    redone: list[str] = []
    claim_lock = threading.Lock()  # chains claim their rounds from worker threads

    def claim(name: str, datalist: Mapping[str, Any], seed: int, **extra: Any) -> None:
        fp = fingerprint(datalist=datalist, seed=int(seed), **settings, **extra)
        with claim_lock:
            redone.extend(claim_cells(cells_root, {name: fp}, redo_changed=cfg.redo_changed))
            fps[name] = fp

    seeds = cfg.seed_list
    starts = {s: study.nested_subsets(pool, [n0], s)[n0] for s in seeds}
    for s in seeds:  # round 0 is known before anything runs: check its settings first
        claim(_cell_name(method, None, 0, s), study.cell_datalist(base, starts[s], labels), s, acquisition_round=0)

    jobs = max(1, int(cfg.jobs))
    threads = study._threads(cfg, jobs)
    results: dict[str, list[dict[str, str]]] = {}
    total = len(seeds) * (1 + rounds * len(strategies))
    progress = Progress(total, "acquisition", unit="cell")
    running: dict[str, Path] = {}  # the training cells' logs, for the periodic "running: ..." line
    lock = threading.Lock()

    def train_and_score(name: str, datalist: Mapping[str, Any], seed: int, tag: str) -> None:
        cell_dir = cells_root / name
        t0 = time.perf_counter()
        done = cell_dir / "done.json"
        if done.is_file():
            results[name] = json.loads(done.read_text(encoding="utf-8"))["rows"]
            log.info("%s: finished earlier, reused", tag)
            progress.advance(f"{tag}: reused")
            return
        study._mark(cell_dir / "datalist.json", datalist)
        if not (cell_dir / "trained.json").is_file():
            files, overrides = study._cell_run(cfg, bundles, task, method, common, cell_dir, seed, pretrained)
            log.info("%s: training %d labeled (%d thread(s))", tag, len(datalist["training"]), threads)
            with lock:
                running[tag] = cell_dir / "train.log"
            try:
                command = study._bundle_command(files, overrides)
                study._run_logged(command, cell_dir / "train.log", f"training cell {tag}", threads)
            finally:
                with lock:
                    running.pop(tag, None)
            study._mark(cell_dir / "trained.json", {"budget": int(cfg.budget)})
        rows = study._evaluate_cell(cell_dir, cell_dir / "datalist.json", cfg)
        study._mark(done, {"rows": rows})
        results[name] = rows
        dice = float(np.mean([float(r["dice"]) for r in rows]))
        progress.advance(f"{tag}: mean Dice {dice:.3f} in {format_seconds(time.perf_counter() - t0)}")

    def choose(chain: _Chain, rnd: int) -> list[int]:
        """Score the pool's unannotated cases with the previous round's model; the indices of those chosen."""
        from medssl.suggest import score_volumes, select

        rest = [i for i in range(pool) if i not in set(chain.labeled)]
        records = [{"image": base["training"][i]["image"]} for i in rest]  # labels hidden
        # in the previous round's folder (already claimed; its model keys the entries): the new cell's folder must
        # stay empty until its fingerprint is claimed
        cache = cells_root / chain.previous / ".suggest_cache"
        log.info("round %d %s seed %d: scoring %d volume(s)", rnd, chain.strategy, chain.seed, len(records))
        with study._EVAL_LOCK:
            scores = score_volumes(
                cells_root / chain.previous / "model.pt",
                records,
                chain.strategy,
                seed=1000 * chain.seed + rnd,
                cache_dir=cache,
                device=cfg.device,
                precision=cfg.precision,
            )
        chosen = select(scores, step, diversity=float(cfg.diversity))
        by_image = {str(base["training"][i]["image"]): i for i in rest}
        return [by_image[str(c.score.image)] for c in chosen]

    def run_chain(chain: _Chain) -> None:
        for rnd in range(1, rounds + 1):
            name = _cell_name(method, chain.strategy, rnd, chain.seed)
            added = choose(chain, rnd)
            datalist = round_datalist(base, chain.labeled, added, labels)
            claim(
                name,
                datalist,
                chain.seed,
                acquisition_round=rnd,
                strategy=chain.strategy,
                diversity=float(cfg.diversity),
                chosen=[_case(base["training"][i]) for i in added],
                previous=content_sha256(fps[chain.previous]),
            )
            cases = ", ".join(_case(base["training"][i]) for i in added)
            tag = f"{chain.strategy} round {rnd} seed {chain.seed} (+{cases})"
            train_and_score(name, datalist, chain.seed, tag)
            chain.labeled = sorted(set(chain.labeled) | set(added))
            chain.added.append(added)
            chain.previous = name

    chains = [_Chain(st, s, starts[s], _cell_name(method, None, 0, s)) for s in seeds for st in strategies]
    with progress, study._LiveProgress(running, lock), ThreadPoolExecutor(max_workers=jobs) as pool_exec:
        round0 = [(_cell_name(method, None, 0, s), study.cell_datalist(base, starts[s], labels), s) for s in seeds]
        tags = [f"round 0 seed {s} ({n0} labeled)" for s in seeds]
        study._wait_all([pool_exec.submit(train_and_score, *cell, tag) for cell, tag in zip(round0, tags)])
        study._wait_all([pool_exec.submit(run_chain, chain) for chain in chains])
    append_history(out / "study.json", {"config": asdict(cfg), "cells": fps, "redone": redone})

    rows: list[dict[str, Any]] = []
    picks: list[dict[str, Any]] = []
    for chain in chains:
        labeled = list(starts[chain.seed])
        for rnd in range(rounds + 1):
            name = _cell_name(method, chain.strategy, rnd, chain.seed)
            if rnd:
                labeled = sorted(set(labeled) | set(chain.added[rnd - 1]))
            head = {"strategy": chain.strategy, "round": rnd, "labeled": len(labeled), "seed": chain.seed}
            rows += [{**head, **{c: r.get(c, "") for c in RESULT_COLUMNS[3:]}} for r in results[name]]
            added = chain.added[rnd - 1] if rnd else labeled
            picks.append(
                {
                    **head,
                    "added": ";".join(_case(base["training"][i]) for i in added),
                    "labeled_cases": ";".join(_case(base["training"][i]) for i in labeled),
                }
            )
    return write_acquisition_results(rows, picks, out, strategies=strategies, title=cfg.title)


def _as_method(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    # the study's aggregation keys on "method": here the strategy plays it
    return [{**r, "method": r["strategy"]} for r in rows]


def acquisition_table(rows: Sequence[Mapping[str, Any]], strategies: Sequence[str]) -> str:
    """Markdown: mean ± sd Dice (%) per strategy and number of annotated volumes, and the Dice points per volume
    added after round 0 (per seed ``(Dice_last - Dice_0) / (n_last - n_0)``, then mean ± sd)."""
    agg = study.aggregate(_as_method(rows))
    counts = sorted({int(r["labeled"]) for r in rows})
    rounds = {int(r["labeled"]): int(r["round"]) for r in rows}
    head = "| strategy | " + " | ".join(f"{n} annotated (round {rounds[n]})" for n in counts) + " | per added volume |"
    lines = [head, "|---|" + "---|" * (len(counts) + 1)]
    per_seed: dict[tuple[str, int, int], list[float]] = {}
    for r in rows:
        per_seed.setdefault((str(r["strategy"]), int(r["labeled"]), int(r["seed"])), []).append(float(r["dice"]))
    for st in strategies:
        cells = []
        for n in counts:
            cells.append(
                "–"
                if (st, n) not in agg
                else "{:.1f} ± {:.1f}".format(*(100 * v for v in study._mean_sd(agg[(st, n)])))
            )
        first, last = counts[0], counts[-1]
        slopes = [
            (np.mean(per_seed[(st, last, s)]) - np.mean(per_seed[(st, first, s)])) / (last - first)
            for (m, n, s) in per_seed
            if m == st and n == last and (st, first, s) in per_seed and last > first
        ]
        slope = (
            "–"
            if not slopes
            else "{:+.1f} ± {:.1f}".format(*(100 * v for v in study._mean_sd([float(x) for x in slopes])))
        )
        lines.append(f"| {st} | " + " | ".join(cells) + f" | {slope} |")
    seeds = max((len(v) for v in agg.values()), default=0)
    lines += [
        "",
        f"Mean foreground Dice (%) on the validation split against the number of annotated training volumes, mean ± sd "
        f"over {seeds} seed(s); round 0 is the same cell for every strategy. Per added volume: Dice points gained from "
        "round 0 to the last round divided by the volumes added, per seed, then mean ± sd.",
    ]
    return "\n".join(lines) + "\n"


def write_acquisition_results(
    rows: Sequence[Mapping[str, Any]],
    picks: Sequence[Mapping[str, Any]],
    out: Path,
    *,
    strategies: Sequence[str],
    title: str | None = None,
) -> dict[str, Path]:
    """Write ``results.csv``, ``rounds.csv``, ``results.md`` and ``results.png`` into ``out`` and print the tables."""
    paths = {"csv": atomic_write_text(out / "results.csv", _csv(rows, ACQUISITION_COLUMNS))}
    paths["rounds"] = atomic_write_text(
        out / "rounds.csv", _csv(picks, ("strategy", "seed", "round", "labeled", "added", "labeled_cases"))
    )
    counts = sorted({int(r["labeled"]) for r in rows})
    table = acquisition_table(rows, strategies)
    others = [s for s in strategies if s != BASELINE]
    if BASELINE in strategies and others:
        gains = study.paired_gains(_as_method(rows), others, counts[1:], baseline=BASELINE)
        text = study.render_gains(
            gains,
            baseline=BASELINE,
            columns=("strategy", "annotated"),
            pairing="the same round-0 volumes, as many annotated volumes, the same budget",
        )
        if text:
            table += "\nPaired gain over random at each round:\n\n" + text
    table += "\nThe cases each strategy added, per round and seed: `rounds.csv`.\n"
    head = (title + "\n\n") if title else ""
    paths["md"] = atomic_write_text(out / "results.md", "# Acquisition study\n\n" + head + table)
    paths["png"] = study.plot_results(
        study.aggregate(_as_method(rows)), strategies, counts, out / "results.png", title=title or "acquisition"
    )
    print("\n" + head + table, flush=True)
    return paths


def _csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
