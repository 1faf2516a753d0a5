"""Loss of the first N steps: medssl against the baseline loop, same initial weights, same batches, same order.

Uses the cases of ``bench.ssl_step`` and ``bench.finetune_step`` with their tiny models (32³; the base models
would take hours for a curve on a CPU). Each case runs ``--steps`` steps in turn (no timing). The verdict
compares the mean loss over the second half of the steps: medssl "no worse" when it is at most
``(1 + --tolerance)`` × the baseline's.

Example::

    python -m bench loss_curve --steps 30
"""

from __future__ import annotations

import statistics
import sys
import tempfile

from bench.timing import (
    bench_parser,
    load_average,
    machine_facts,
    markdown_table,
    set_threads,
    start_load,
    write_report,
)

__all__ = ["main", "run_curves"]


def run_curves(which: str, steps: int, batch: int, seed: int) -> dict[str, list[float]]:
    """Losses per step of every case of ``which`` (``"ssl"`` or ``"finetune"``) on the tiny model."""
    if which == "ssl":
        from bench.ssl_step import CASES, build_cases
    else:
        from bench.finetune_step import CASES, build_cases
    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        fns, losses, _, _ = build_cases(CASES, True, batch, seed, tmp, n_batches=min(steps, 16))
        for name, fn in fns.items():
            for _ in range(steps):
                fn()
            print(f"{which} {name:14s} " + " ".join(f"{v:.4f}" for v in losses[name]), flush=True)
    return losses


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("loss_curve", __doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="steps per case (default: 30; 3 with --tiny)")
    p.add_argument("--batch", type=int, default=2, help="crops per step (default: 2)")
    p.add_argument("--which", nargs="+", default=["ssl", "finetune"], choices=["ssl", "finetune"])
    p.add_argument("--tolerance", type=float, default=0.02, help="allowed relative excess of medssl's mean loss")
    args = p.parse_args(argv)
    set_threads(args.threads)
    steps = args.steps or (3 if args.tiny else 30)
    before = start_load(args.allow_loaded)
    curves = {which: run_curves(which, steps, args.batch, args.seed) for which in args.which}
    after = load_average()
    rows, verdicts = [], {}
    half = max(1, steps // 2)
    for which, losses in curves.items():
        base = statistics.fmean(losses["baseline"][-half:])
        for name, values in losses.items():
            tail = statistics.fmean(values[-half:])
            ok = tail <= base * (1 + args.tolerance)
            if name != "baseline":
                verdicts[f"{which}/{name}"] = ok
            rows.append([which, name, f"{values[0]:.4f}", f"{values[-1]:.4f}", f"{tail:.4f}",
                         f"{tail / base - 1:+.1%}", "–" if name == "baseline" else ("yes" if ok else "NO")])  # fmt: skip
    headers = ["recipe", "case", "loss step 1", f"loss step {steps}", f"mean of last {half}", "vs baseline",
               "no worse"]  # fmt: skip
    cmd = f"python -m bench loss_curve{' --tiny' if args.tiny else ''} --steps {steps} --batch {args.batch}"
    body = (
        f"Tiny models (ViTAutoEnc / UNETR at 32³), {args.batch} crops per step, {steps} steps, "
        f"{min(steps, 16)} distinct batches cycled, seed {args.seed}; tolerance {args.tolerance:.0%}.\n\n"
        f"{markdown_table(headers, rows)}\n\nCommand: `{cmd}`\n"
    )
    data = {"machine": machine_facts(), "load_average": {"before": before, "after": after}, "args": vars(args),
            "losses": curves, "no_worse": verdicts}  # fmt: skip
    write_report("loss_curve", "Loss curve, first steps", body, data, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
