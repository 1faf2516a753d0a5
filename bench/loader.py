"""Data pipeline throughput: crops/s the SSL training loader delivers against crops/s the model consumes.

The loader is ssl_pretrain.yaml's own ``train#dataloader`` (``CacheDataset`` with the deterministic
preprocessing cached: load, orientation, 2 mm spacing, HU window, foreground crop; then per item the random
96³ crops and the two corrupted views), built with ``monai.bundle.ConfigParser`` on a CT phantom dataset written
to a temporary folder. One measured unit is one epoch over the loader (worker start-up included, as in
training); cases differ in ``num_workers`` and are interleaved. The model's rate is the median samples/s of
``medssl+levers`` (else ``medssl``) from ``<out-dir>/ssl_step.json`` when it exists for the same size, else
measured here (2 repetitions of the ``medssl+levers`` step at ``--model-batch``).

Example::

    python -m bench loader --reps 3 --workers 0 2 4
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from bench.timing import (
    bench_parser,
    interleaved,
    load_average,
    machine_facts,
    markdown_table,
    set_threads,
    start_load,
    write_report,
)

__all__ = ["build_loader", "main", "model_rate"]

ROOT = Path(__file__).resolve().parents[1]


def build_loader(dataset_dir: Path, roi: int, num_workers: int, batch_size: int, num_samples: int, seed: int):
    """ssl_pretrain.yaml's training ``DataLoader`` (and its dataset) for ``dataset_dir``/datalist.json."""
    from monai.bundle import ConfigParser

    from medssl.engines.utils import seed_everything

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "ssl_pretrain.yaml"))
    parser.update({"bundle_root": str(ROOT), "dataset_dir": str(dataset_dir),
                   "datalist": str(dataset_dir / "datalist.json"), "roi_size": [roi] * 3,
                   "num_workers": num_workers, "batch_size": batch_size, "num_samples": num_samples,
                   "cache_rate": 1.0})  # fmt: skip
    seed_everything(seed)
    return parser.get_parsed_content("train#dataloader")


def model_rate(out_dir: Path, tiny: bool, batch: int, seed: int) -> tuple[float, str]:
    """Crops/s one SSL training step consumes: from ``ssl_step.json`` if it matches, else measured now."""
    report = out_dir / "ssl_step.json"
    if report.is_file():
        data = json.loads(report.read_text())
        if bool(data.get("args", {}).get("tiny")) == tiny:
            for case in ("medssl+levers", "medssl"):
                if case in data.get("seconds", {}):
                    rate = data["batch"] / data["seconds"][case]["median"]
                    return rate, f"{case} in {report} (batch {data['batch']})"
    from bench.ssl_step import build_cases

    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        steps, _, _, _ = build_cases(("medssl+levers",), tiny, batch, seed, tmp)
        seconds = interleaved(steps, reps=2, warmup=1)["medssl+levers"]
    return batch / seconds.median, f"medssl+levers measured here (batch {batch}, 2 reps)"


def main(argv: list[str] | None = None) -> int:
    import time

    from medssl.data.phantoms import generate_phantom_dataset

    p = bench_parser("loader", __doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="num_workers cases (default: 0 2 4)")
    p.add_argument("--shape", type=int, nargs=3, default=None, help="phantom voxels (default: 192 192 64)")
    p.add_argument("--volumes", type=int, default=8, help="training volumes (default: 8)")
    p.add_argument("--batch-size", type=int, default=4, help="volumes per batch (bundle: 4)")
    p.add_argument("--num-samples", type=int, default=2, help="crops per volume (bundle: 2)")
    p.add_argument("--model-batch", type=int, default=2, help="crops per step when the model rate is measured")
    p.set_defaults(reps=3)
    args = p.parse_args(argv)
    set_threads(args.threads)
    roi = 32 if args.tiny else 96
    shape = args.shape or ([64, 64, 24] if args.tiny else [192, 192, 64])
    before = start_load(args.allow_loaded)
    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        start = time.perf_counter()
        datalist = generate_phantom_dataset("ct-abdomen", Path(tmp) / "ct", cases=2, unlabeled=max(0, args.volumes - 1),
                                            seed=args.seed, shape=shape)  # fmt: skip
        data_dir = Path(datalist).parent
        generated = time.perf_counter() - start
        loaders, cache_seconds, crops = {}, {}, {}
        for w in args.workers:
            start = time.perf_counter()
            loaders[f"num_workers={w}"] = build_loader(data_dir, roi, w, args.batch_size, args.num_samples, args.seed)
            cache_seconds[f"num_workers={w}"] = time.perf_counter() - start

        def epoch(name: str) -> None:
            crops[name] = sum(int(batch["image"].shape[0]) for batch in loaders[name])

        cases = {name: (lambda name=name: epoch(name)) for name in loaders}
        seconds = interleaved(cases, reps=args.reps, warmup=args.warmup)
    rate, source = model_rate(Path(args.out_dir), args.tiny, args.model_batch, args.seed)
    after = load_average()
    rows = []
    for name, s in seconds.items():
        delivered = s.inverted(crops[name])
        rows.append([name, f"{cache_seconds[name]:.1f}", crops[name], s.fmt(2), delivered.fmt(2),
                     f"{delivered.median / rate:.1f}×", args.reps])  # fmt: skip
    headers = ["loader", "cache fill (s)", "crops / epoch", "s / epoch", "crops/s", "÷ model crops/s", "reps"]
    cmd = f"python -m bench loader{' --tiny' if args.tiny else ''} --reps {args.reps} --workers " + " ".join(
        str(w) for w in args.workers
    )
    body = (
        f"ssl_pretrain.yaml's train loader, {args.volumes} CT phantom volumes of {'×'.join(map(str, shape))} voxels "
        f"(generated in {generated:.1f} s), roi {roi}³, batch {args.batch_size} volumes × {args.num_samples} crops. "
        f"Model consumption: {rate:.3f} crops/s ({source}). Median (min–max) over {args.reps} interleaved epochs.\n\n"
        f"{markdown_table(headers, rows)}\n\nCommand: `{cmd}`\n"
    )
    data = {"machine": machine_facts(), "load_average": {"before": before, "after": after}, "args": vars(args),
            "model_crops_per_s": rate, "model_rate_source": source, "crops_per_epoch": crops,
            "cache_seconds": cache_seconds, "seconds": {k: v.as_dict() for k, v in seconds.items()}}  # fmt: skip
    write_report("loader", "SSL data pipeline throughput", body, data, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
