"""``make demo``: the end-to-end showcase on phantom data, CPU, in minutes.

Each step prints what it made. Steps that later issues add (pretraining, the study, inference) run through the
same public functions and bundles a user calls.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["run_demo", "main"]

log = logging.getLogger("medssl.demo")


def _step(title: str, fn: Callable[[], object]) -> object:
    print(f"\n== {title}", flush=True)
    start = time.perf_counter()
    result = fn()
    print(f"   done in {time.perf_counter() - start:.1f} s", flush=True)
    return result


def run_demo(out_dir: str | Path = "demo", *, seed: int = 0) -> dict[str, object]:
    """Run every demo step into ``out_dir`` and return the paths and numbers it produced."""
    import nibabel as nib
    import numpy as np

    from medssl.data.datalist import check_datalist, load_datalist
    from medssl.data.phantoms import BTCV_LABELS, ensure_phantom, intensity_threshold_baseline

    out = Path(out_dir)
    results: dict[str, object] = {}

    ct = _step(
        "CT-abdomen phantom (13 BTCV organs): 6 labeled + 4 unlabeled cases",
        lambda: ensure_phantom("ct-abdomen", out / "ct_phantom", cases=6, unlabeled=4, seed=seed),
    )
    la = _step(
        "LA-MRI phantom (LA 2018 layout, NRRD → prepared NIfTI): 6 labeled + 4 unlabeled cases",
        lambda: ensure_phantom("la-mri", out / "la_phantom", cases=6, unlabeled=4, seed=seed),
    )
    for name, datalist in (("ct", ct), ("la", la)):
        report = _step(f"medssl check {datalist}", lambda d=datalist: check_datalist(d))
        print(report)
        results[f"{name}_datalist"] = datalist

    def baseline() -> float:
        items = load_datalist(ct).items("validation")
        scores = []
        for item in items:
            img = np.asarray(nib.load(item["image"]).dataobj)
            lab = np.asarray(nib.load(item["label"]).dataobj)
            per_organ = intensity_threshold_baseline(img, lab, BTCV_LABELS)
            scores.append(float(np.mean(list(per_organ.values()))))
        return float(np.mean(scores))

    score = _step("oracle intensity-threshold baseline on CT validation cases (what learning must beat)", baseline)
    print(f"   mean organ Dice of the best global HU window per organ: {score:.3f}")
    results["threshold_baseline_dice"] = score
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medssl.demo", description=__doc__)
    parser.add_argument("--out", default="demo", help="output folder (default: demo/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    run_demo(args.out, seed=args.seed)
    print(f"\nmedssl demo finished in {time.perf_counter() - start:.0f} s; outputs under {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
