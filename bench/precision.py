"""Precision: what ``auto`` gives against ``fp32`` and ``bf16`` on this machine, for validation and ``medssl infer``.

Two workloads, each in three cases timed interleaved in one process (``medssl default`` ``fp32`` ``bf16``
``medssl default`` ...):

* ``validation``: btcv_unetr.yaml's validation pass with ``tiny.yaml``'s UNETR (hidden 96, 2 layers, feature
  size 8, roi 32³; patch matmuls and fused attention as the bundle), sliding window overlap 0.5 and 4 windows per
  call through :class:`medssl.engines.supervised.AutocastInferer`, over one preprocessed CT phantom, argmax
  included;
* ``infer``: ``medssl infer``'s work on one CT phantom file with a checkpoint of that UNETR: building
  :class:`medssl.inference.Predictor`, reading, preprocessing, sliding window (overlap 0.25), labels back on
  the input grid (writing excluded).

The acceptance of issue 15: ``medssl default`` within 1.2× of ``fp32`` where bf16 is not native, and of the
faster of ``fp32`` / ``bf16`` where it is. Without native bf16 the ``bf16`` case is skipped unless
``--with-slow-bf16`` (it is 50–300× slower there).

Example::

    python -m bench precision --threads 1 --reps 5
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.timing import (
    Stats,
    bench_parser,
    interleaved,
    load_average,
    machine_facts,
    markdown_table,
    set_threads,
    start_load,
    write_report,
)

__all__ = ["CASES", "main"]

CASES = {"medssl default": "auto", "fp32": "fp32", "bf16": "bf16"}


def _tiny_unetr(classes: int):
    import torch

    from bench.workloads import unetr_kwargs
    from medssl.networks.attention import use_fused_attention
    from medssl.networks.patch_conv import use_patch_matmul
    from medssl.networks.unetr import UNETR

    torch.manual_seed(0)
    return use_fused_attention(use_patch_matmul(UNETR(**unetr_kwargs(True, classes), num_layers=2, patch_size=16)))


def validation_cases(image, precisions: dict[str, str]) -> dict[str, Callable[[], None]]:
    """One sliding-window validation pass of the tiny UNETR over ``image`` (1, 1, X, Y, Z) per precision."""
    import torch
    from monai.inferers import SlidingWindowInferer

    from medssl.engines.supervised import AutocastInferer

    net = _tiny_unetr(14).eval()

    def case(precision: str) -> Callable[[], None]:
        inferer = AutocastInferer(SlidingWindowInferer([32] * 3, sw_batch_size=4, overlap=0.5), "cpu", precision)

        def run() -> None:
            with torch.no_grad():
                inferer(image, net).argmax(1)

        return run

    return {name: case(p) for name, p in precisions.items()}


def infer_cases(volume: Path, checkpoint: Path, precisions: dict[str, str]) -> dict[str, Callable[[], None]]:
    """``medssl infer``'s work on ``volume`` with ``checkpoint`` per precision (a fresh Predictor each call)."""
    from medssl.inference import Predictor
    from medssl.inference.volume import read_volume

    def case(precision: str) -> Callable[[], None]:
        def run() -> None:
            predictor = Predictor(checkpoint, device="cpu", precision=precision, progress=False)
            predictor.predict_volume(read_volume(volume))

        return run

    return {name: case(p) for name, p in precisions.items()}


def _phantom_inputs(workdir: Path, shape, seed: int):
    """The checkpoint and NIfTI volume ``infer`` reads, and the preprocessed image ``validation`` slides over."""
    import torch

    from bench.inference import prepare
    from medssl.checkpoint import load_checkpoint
    from medssl.inference import Predictor
    from medssl.inference.volume import read_volume

    volume, ckpt = prepare(workdir, shape, (1.5, 1.5, 2.0), "tiny", 32, seed)
    predictor = Predictor(load_checkpoint(ckpt), device="cpu", precision="fp32", progress=False)
    image, _ = predictor._preprocess(read_volume(volume))
    return volume, ckpt, torch.as_tensor(image)[None]


def main(argv: list[str] | None = None) -> int:
    from medssl.precision import describe_precision, native_cpu_bf16, precision_record

    p = bench_parser("precision", __doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[80, 80, 120], help="phantom voxels (default: 80 80 120)")
    p.add_argument("--with-slow-bf16", action="store_true", help="time bf16 even where it is not native")
    args = p.parse_args(argv)
    set_threads(args.threads)
    shape = [48, 48, 32] if args.tiny else args.shape
    precisions = dict(CASES)
    if not native_cpu_bf16() and not args.with_slow_bf16:
        del precisions["bf16"]
    before = start_load(args.allow_loaded)
    seconds: dict[str, dict[str, Stats]] = {}
    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        volume, ckpt, image = _phantom_inputs(Path(tmp), shape, args.seed)
        workloads = {
            "validation": validation_cases(image, precisions),
            "infer": infer_cases(volume, ckpt, precisions),
        }
        for name, cases in workloads.items():
            seconds[name] = interleaved(cases, reps=args.reps, warmup=args.warmup,
                                        on_done=lambda c, r, s, n=name: print(f"{n} rep {r + 1} {c:15s} {s:7.2f} s",
                                                                              flush=True))  # fmt: skip
    after = load_average()
    rows = []
    for name, stats in seconds.items():
        fp32 = stats["fp32"].median
        best = min(s.median for k, s in stats.items() if k != "medssl default")
        for case, s in stats.items():
            rows.append([name, case, s.fmt(2), f"{s.median / fp32:.2f}", f"{s.median / best:.2f}", args.reps])
    headers = ["workload", "case", "s (median, min–max)", "÷ fp32", "÷ best of fp32 / bf16", "reps"]
    cmd = f"python -m bench precision{' --tiny' if args.tiny else ''} --reps {args.reps} --threads {args.threads}"
    body = (
        f"{describe_precision('auto', 'cpu')}. Tiny UNETR (tiny.yaml), CT phantom {' × '.join(map(str, shape))} "
        f"voxels; validation: overlap 0.5 on the preprocessed volume; infer: Predictor defaults (overlap 0.25) from "
        f"the file. Interleaved, {args.warmup} warm-up round(s).\n\n{markdown_table(headers, rows)}\n\n"
        f"Command: `{cmd}`\n"
    )
    data = {
        "machine": machine_facts(),
        "load_average": {"before": before, "after": after},
        "args": vars(args),
        "precision_auto": precision_record("auto", "cpu"),
        "seconds": {w: {k: v.as_dict() for k, v in s.items()} for w, s in seconds.items()},
    }
    write_report("precision", "Precision: medssl default (auto) against fp32 and bf16", body, data, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
