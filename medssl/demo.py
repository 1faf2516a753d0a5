"""``make demo``: what pretraining buys at one or two labeled volumes, on phantom data, CPU, in minutes.

The demo is a small label-efficiency study that trains real models:

* data: a CT-abdomen phantom (96×96×48 voxels, five organs: spleen, both kidneys, liver, stomach), 8 training
  volumes (the labeled pool), 2 validation volumes, resampled to 2×2×4 mm;
* methods: UNETR from scratch, and UNETR whose ViT encoder starts from ``assets/ssl_vit_ct_cpu.pt`` (the
  shipped SSL checkpoint, pretrained by ``make assets`` on 32 unlabeled phantoms of another seed: pretraining is
  the offline step);
* the same iteration budget for every cell, 2 seeds (a seed draws the labeled subset and the training run), cells
  trained two at a time in one-thread processes (``medssl study --jobs 2``);
* the reference a model must beat: the oracle intensity-threshold baseline (the best global HU window per organ,
  fitted on the very case it is scored on).

Every trained model is evaluated once, at the end of its budget (``val_interval`` = budget, so no checkpoint is
chosen on the cases the table reports). Then the best cell's model segments a held-out phantom through
``medssl infer`` and ``medssl evaluate``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["DEMO_ORGANS", "DEMO_SHAPE", "run_demo", "main"]

log = logging.getLogger("medssl.demo")

DEMO_SHAPE = (96, 96, 48)
DEMO_ORGANS = ("spleen", "right kidney", "left kidney", "liver", "stomach")
DEMO_BUDGET = 300
DEMO_LABELED = (1, 2)


def _step(title: str, fn: Callable[[], object]) -> object:
    print(f"\n== {title}", flush=True)
    start = time.perf_counter()
    result = fn()
    print(f"   done in {time.perf_counter() - start:.1f} s", flush=True)
    return result


def threshold_baseline(datalist: str | Path, key: str = "validation") -> float:
    """Mean over ``key``'s cases of the mean organ Dice of the oracle intensity threshold (see phantoms)."""
    import nibabel as nib
    import numpy as np

    from medssl.data.datalist import load_datalist
    from medssl.data.phantoms import intensity_threshold_baseline

    dl = load_datalist(datalist)
    scores = []
    for item in dl.items(key):
        img = np.asarray(nib.load(item["image"]).dataobj)
        lab = np.asarray(nib.load(item["label"]).dataobj)
        per_organ = intensity_threshold_baseline(img, lab, dl.labels)
        scores.append(float(np.nanmean(list(per_organ.values()))))
    return float(np.mean(scores))


def run_demo(
    out_dir: str | Path = "demo",
    *,
    seed: int = 0,
    budget: int = DEMO_BUDGET,
    seeds: int = 2,
    jobs: int = 2,
    precision: str = "auto",
) -> dict[str, object]:
    """Run every demo step into ``out_dir`` and return the paths and numbers it produced."""
    from medssl import resources
    from medssl.assets import SSL_ASSET
    from medssl.data.datalist import check_datalist, load_datalist
    from medssl.data.phantoms import ensure_phantom
    from medssl.errors import ConfigError
    from medssl.inference import infer
    from medssl.metrics import evaluate_folder
    from medssl.study import StudyConfig, default_bundles_dir, run_study

    out = Path(out_dir)
    bundles = default_bundles_dir()
    asset = resources.assets_dir() / SSL_ASSET
    if not asset.is_file():
        raise ConfigError(asset, "the demo's SSL checkpoint is missing; run `make assets` to rebuild it")
    results: dict[str, object] = {}
    organs = ", ".join(DEMO_ORGANS)

    ct = _step(
        f"CT-abdomen phantom {DEMO_SHAPE}, organs: {organs}; 8 training + 2 validation volumes",
        lambda: ensure_phantom(
            "ct-abdomen", out / "ct_phantom", cases=10, unlabeled=0, seed=seed, shape=DEMO_SHAPE, organs=DEMO_ORGANS
        ),
    )
    heldout = _step(
        "a held-out CT phantom (another seed) for inference",
        lambda: ensure_phantom(
            "ct-abdomen",
            out / "ct_heldout",
            cases=2,
            unlabeled=0,
            seed=seed + 2000,
            shape=DEMO_SHAPE,
            organs=DEMO_ORGANS,
        ),  # fmt: skip
    )
    report = _step(f"medssl check {ct}", lambda: check_datalist(ct))
    print(report)
    results["ct_datalist"] = ct

    baseline = _step(
        "oracle intensity-threshold baseline on the validation volumes (what learning must beat)",
        lambda: threshold_baseline(ct),
    )
    print(f"   mean organ Dice of the best global HU window per organ: {baseline:.3f}")
    results["threshold_baseline_dice"] = baseline

    from medssl.precision import resolve_precision

    used = resolve_precision(precision, "cpu")
    title = (
        f"UNETR (ViT 2x96 on 4^3 patches, decoder width 16), {budget} iterations of 2 crops 32^3 at 2x2x4 mm "
        f"(random affine augmentation), "
        f"{precision} -> {used} on CPU; CT phantom {DEMO_SHAPE[0]}x{DEMO_SHAPE[1]}x{DEMO_SHAPE[2]}, organs: {organs}; "
        f"'pretrained' starts from {SSL_ASSET} (make assets); validation: 2 volumes, final model"
    )
    study_cfg = StudyConfig(
        datalist=str(ct),
        out=str(out / "study"),
        labeled=list(DEMO_LABELED),
        methods=["scratch", "pretrained"],
        seeds=seeds,
        budget=budget,
        pretrained=str(asset),
        overlays=[str(bundles / "cpu_study.yaml")],
        overrides={"num_classes": len(DEMO_ORGANS) + 1, "num_samples": 2},
        val_interval=budget,
        device="cpu",
        precision=precision,
        jobs=jobs,
        title=title,
        reference={"oracle intensity threshold": baseline},
    )
    paths = _step(
        f"label-efficiency study: {' / '.join(map(str, DEMO_LABELED))} labeled x scratch / pretrained x {seeds} "
        f"seeds, {budget} iterations each, {jobs} at a time (medssl study)",
        lambda: run_study(study_cfg),
    )
    results["study"] = paths

    best = _best_cell(out / "study")
    model = best / "model.pt"
    held_items = load_datalist(heldout).items("validation")
    _step(
        f"medssl infer --model {model} on the held-out phantom",
        lambda: infer(model, [it["image"] for it in held_items], out / "infer", precision=precision, progress=False),
    )
    summary = _step(
        "medssl evaluate on the held-out phantom",
        lambda: evaluate_folder(out / "infer", heldout, out / "infer" / "metrics.csv", key="validation"),
    )
    print(summary)
    results["heldout_metrics"] = out / "infer" / "metrics.csv"

    pngs = sorted(out.rglob("*.png"))
    print("\nPNG files written by the demo:")
    for png in pngs:
        print(f"  {png}")
    results["pngs"] = pngs
    print(
        "\nPhantoms at CPU scale: the table shows that the models learn and what the shipped pretraining does at "
        "this budget, not what it buys on BTCV. `make evidence` runs the full study; `medssl study` runs it on "
        "your data."
    )
    return results


def _best_cell(study_dir: Path) -> Path:
    """The cell whose validation mean Dice is the highest (for the inference step only; the table has them all)."""
    import json

    import numpy as np

    best, best_dice = None, -1.0
    for done in sorted((study_dir / "cells").glob("*/done.json")):
        rows = json.loads(done.read_text(encoding="utf-8"))["rows"]
        dice = float(np.mean([float(r["dice"]) for r in rows]))
        if dice > best_dice:
            best, best_dice = done.parent, dice
    if best is None:
        raise RuntimeError(f"no finished cell under {study_dir}")
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medssl.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", default="demo", help="output folder (default: demo/)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default: 0)")
    parser.add_argument("--seeds", type=int, default=2, help="study seeds (default: 2)")
    parser.add_argument("--budget", type=int, default=DEMO_BUDGET, help=f"iterations per run (default: {DEMO_BUDGET})")
    parser.add_argument("--jobs", type=int, default=2, help="cells trained at once (default: 2)")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16 (default: auto)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from medssl.errors import run_reporting_errors

    start = time.perf_counter()
    code = run_reporting_errors(run_demo, args.out, seed=args.seed, budget=args.budget, seeds=args.seeds,
                                jobs=args.jobs, precision=args.precision)  # fmt: skip
    if code:
        return code
    print(f"\nmedssl demo finished in {time.perf_counter() - start:.0f} s; outputs under {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
