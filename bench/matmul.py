"""Matmul throughput of this machine: fp32 against bf16 (AMX on Sapphire Rapids and later), in FLOP/s.

The reference for every "fraction of peak" figure: ``ssl_step`` divides its achieved FLOP/s by the bf16 matmul
FLOP/s measured here. Shapes: a square ``n × n × n`` product and the two ViT-B shapes of a training step at 96³
(216 tokens × batch 4 against the 768 → 3072 MLP weight, and its transpose). One measured unit is ``calls``
products in a row; FLOPs = ``2 m k n`` per product.

Example::

    python -m bench matmul --reps 7
"""

from __future__ import annotations

import sys

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

__all__ = ["main", "measure_matmul"]


def measure_matmul(
    shapes: dict[str, tuple[int, int, int]], reps: int, warmup: int = 1, calls: int = 4, seed: int = 0
) -> dict[str, dict[str, Stats]]:
    """FLOP/s per shape name and dtype (``fp32``, ``bf16``), as :class:`Stats` over ``reps`` interleaved runs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, Stats]] = {}
    for label, (m, k, n) in shapes.items():
        a32, b32 = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        operands = {"fp32": (a32, b32), "bf16": (a32.bfloat16(), b32.bfloat16())}

        def run(a, b):
            for _ in range(calls):
                torch.mm(a, b)

        cases = {dt: (lambda a=a, b=b: run(a, b)) for dt, (a, b) in operands.items()}
        seconds = interleaved(cases, reps=reps, warmup=warmup)
        out[label] = {dt: s.inverted(2.0 * m * k * n * calls) for dt, s in seconds.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("matmul", __doc__.splitlines()[0])
    p.set_defaults(reps=7)
    args = p.parse_args(argv)
    set_threads(args.threads)
    n = 512 if args.tiny else 2048
    tokens = 216 * (1 if args.tiny else 4)
    shapes = {f"square {n}": (n, n, n), f"ViT-B MLP up ({tokens}×768 @ 768×3072)": (tokens, 768, 3072),
              f"ViT-B MLP down ({tokens}×3072 @ 3072×768)": (tokens, 3072, 768)}  # fmt: skip
    before = start_load(args.allow_loaded)
    res = measure_matmul(shapes, reps=args.reps, warmup=args.warmup, calls=1 if args.tiny else 4, seed=args.seed)
    after = load_average()
    rows = []
    for label, by in res.items():
        ratio = by["bf16"].median / by["fp32"].median
        rows.append([label, f"{by['fp32'].median / 1e9:.0f} ({by['fp32'].min / 1e9:.0f}–{by['fp32'].max / 1e9:.0f})",
                     f"{by['bf16'].median / 1e9:.0f} ({by['bf16'].min / 1e9:.0f}–{by['bf16'].max / 1e9:.0f})",
                     f"{ratio:.2f}×", args.reps])  # fmt: skip
    table = markdown_table(["shape (m×k @ k×n)", "fp32 GFLOP/s", "bf16 GFLOP/s", "bf16 / fp32", "reps"], rows)
    cmd = "python -m bench matmul" + (" --tiny" if args.tiny else "") + f" --reps {args.reps} --threads {args.threads}"
    body = f"GFLOP/s, median (min–max), interleaved fp32 / bf16.\n\n{table}\n\nCommand: `{cmd}`\n"
    data = {"machine": machine_facts(), "load_average": {"before": before, "after": after}, "args": vars(args),
            "results": {label: {dt: s.as_dict() for dt, s in by.items()} for label, by in res.items()}}  # fmt: skip
    write_report("matmul", "Matmul throughput (fp32 vs bf16)", body, data, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
