"""SSL pretraining step: the published recipe as a plain PyTorch loop against medssl's ``TwoViewSSLTrainer``.

Cases (same initial weights, same batches in the same order, interleaved A B C A B C ...):

* ``baseline``: the MONAI ViTAutoEnc tutorial loop (Tang et al. 2022 recipe): fp32, ``torch.optim.Adam(lr=1e-4)``,
  one forward per view, ``L1Loss`` + ``ContrastiveLoss(temperature=0.05)`` · L1 (MONAI's losses), ``loss.item()``
  every step;
* ``medssl``: ssl_pretrain.yaml's code path: :class:`medssl.engines.ssl.TwoViewSSLTrainer` (both views as one
  batch, bf16 autocast), ``Adam(lr=1e-4)``, :class:`medssl.losses.ssl.ReconstructionContrastiveLoss`, the
  bundle's ``NonFiniteLossGuard``;
* ``medssl+levers``: the same trainer and recipe with the levers proposed for the bundle:
  :func:`medssl.networks.patch_conv.use_patch_matmul` (patch embedding and transposed convolutions as matmuls),
  :func:`medssl.networks.attention.use_fused_attention` (SDPA), ``Adam(fused=True)`` and ``optim_set_to_none=True`` (no zero-filling of gradients).
* ``medssl default``: ``medssl+levers`` in precision ``auto`` (the bundle as a user runs it: bf16 only where this
  CPU runs it fast, see :mod:`medssl.precision`), so its ratio to the fp32 baseline is what a user gets;
* ``medssl+compile`` (only when named in ``--cases``): ``medssl+levers`` with the network's forward compiled
  (:func:`medssl.compile.compile_network`, ``compile: true``; the warm-up step pays the compile, whose time the
  report gives separately), to fill :data:`medssl.compile.MEASURED`.
* ``medssl default+compile`` (only when named): ``medssl default`` compiled, the case ``compile: auto`` decides
  for where ``auto`` trains in fp32.

A step trains on ``--batch`` crops (default 2, what 5 interleaved fp32 repetitions allow on a 2-core CPU;
``--recipe-batch``: the recipe's 4 volumes × 2 crops = 8) (each crop gives two views, so the network sees ``2 × batch`` volumes).
samples/s counts crops. Achieved FLOP/s = FLOPs of one step (forward + backward of the network on 2 × batch
volumes, counted with ``torch.utils.flop_counter``) / median seconds, compared with the matmul FLOP/s measured
in the same run in the case's own precision (``bench.matmul``, 2048³: fp32 for the baseline and for ``medssl
default`` where ``auto`` trains in fp32, bf16 otherwise).

Example::

    python -m bench ssl_step --batch 2 --reps 5
    python -m bench ssl_step --profile          # torch.profiler table of one medssl step instead of timing
"""

from __future__ import annotations

import copy
import sys
import tempfile
from collections.abc import Callable
from typing import Any

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
from bench.workloads import Cycle, count_flops, ssl_batches, vit_autoenc_kwargs

__all__ = ["CASES", "build_cases", "main"]

CASES = ("baseline", "medssl", "medssl+levers", "medssl default")
#: cases run only when ``--cases`` names them
EXTRA_CASES = ("medssl+compile", "medssl default+compile")
#: crops per step of the recipe (ssl_pretrain.yaml: batch_size 4 volumes × num_samples 2)
RECIPE_BATCH = 8


def _baseline_step(model, batches: Cycle, lr: float, losses: list[float]) -> Callable[[], None]:
    import torch
    from monai.losses import ContrastiveLoss

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    recon_loss, contrastive_loss = torch.nn.L1Loss(), ContrastiveLoss(temperature=0.05)

    def step() -> None:
        batch = next(batches)
        model.train()
        opt.zero_grad()
        out1, _ = model(batch["image"])
        out2, _ = model(batch["image_2"])
        r = recon_loss(out1, batch["gt_image"])
        c = contrastive_loss(out1.flatten(start_dim=1), out2.flatten(start_dim=1))
        loss = r + c * r
        loss.backward()
        opt.step()
        losses.append(loss.item())

    return step


def _medssl_step(
    model,
    batches: Cycle,
    lr: float,
    losses: list[float],
    fused: bool,
    tmp: str,
    precision: str = "bf16",
    compile: bool = False,
) -> Callable[[], None]:
    import torch
    from ignite.engine import Events

    from medssl.engines.ssl import TwoViewSSLTrainer
    from medssl.handlers import NonFiniteLossGuard
    from medssl.losses.ssl import ReconstructionContrastiveLoss
    from medssl.networks.attention import use_fused_attention
    from medssl.networks.patch_conv import use_patch_matmul

    if fused:
        use_fused_attention(use_patch_matmul(model))
    if compile:
        from medssl.compile import compile_network

        compile_network(model, "true", "cpu", tmp)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=fused or None)
    trainer = TwoViewSSLTrainer(device="cpu", max_epochs=1, train_data_loader=batches, network=model, optimizer=opt,
                                loss_function=ReconstructionContrastiveLoss(temperature=0.05), precision=precision,
                                epoch_length=1, train_handlers=[NonFiniteLossGuard(output_dir=tmp)],
                                optim_set_to_none=fused)  # fmt: skip
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    return trainer.run


def build_cases(
    names: tuple[str, ...], tiny: bool, batch: int, seed: int, tmp: str, n_batches: int = 4, lr: float = 1e-4
) -> tuple[dict[str, Callable[[], None]], dict[str, list[float]], Any, list[dict]]:
    """Step functions of the named cases on one initial model; returns ``(steps, losses, model0, batches)``."""
    import torch
    from monai.networks.nets import ViTAutoEnc

    batches = ssl_batches(n_batches, batch, 32 if tiny else 96, seed)
    torch.manual_seed(seed)
    model0 = ViTAutoEnc(**vit_autoenc_kwargs(tiny))
    steps: dict[str, Callable[[], None]] = {}
    losses: dict[str, list[float]] = {}
    for name in names:
        if name not in CASES + EXTRA_CASES:
            raise ValueError(f"unknown case {name!r} (use {', '.join(CASES + EXTRA_CASES)})")
        model, losses[name] = copy.deepcopy(model0), []
        if name == "baseline":
            steps[name] = _baseline_step(model, Cycle(batches), lr, losses[name])
        else:
            precision = "auto" if name.startswith("medssl default") else "bf16"
            steps[name] = _medssl_step(model, Cycle(batches), lr, losses[name], name != "medssl", tmp, precision,
                                       compile=name.endswith("+compile"))  # fmt: skip
    return steps, losses, model0, batches


def step_flops(model0, batches: list[dict]) -> int:
    """FLOPs of one training step: forward + backward of the network on both views of one batch."""

    def fwd_bwd() -> None:
        model = copy.deepcopy(model0)
        x = batches[0]
        out = model(x["image"])[0].sum() + model(x["image_2"])[0].sum()
        out.backward()

    return count_flops(fwd_bwd)


def first_steps(steps: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Seconds of each case's first step (one warm-up round; a compiled case compiles in it), printed."""
    import time

    first = {}
    for name, fn in steps.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
        print(f"first step {name:14s} {first[name]:7.2f} s", flush=True)
    return first


def profile(steps: dict[str, Callable[[], None]], rows: int = 20) -> str:
    """torch.profiler op table (self CPU time) of one step per case, after one warm-up step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = []
    for name, fn in steps.items():
        fn()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=45)
        out.append(f"### {name}\n\n```\n{table}\n```\n")
    return "\n".join(out)


def case_precision(name: str) -> str:
    """The precision a case trains in: fp32 (baseline), ``auto`` resolved (``medssl default...``), else bf16."""
    if name == "baseline":
        return "fp32"
    if name.startswith("medssl default"):
        from medssl.precision import resolve_precision

        return resolve_precision("auto", "cpu")
    return "bf16"


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("ssl_step", __doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="crops per step (default: 2; the recipe: 4 × 2 = 8)")
    p.add_argument("--recipe-batch", action="store_true", help=f"the recipe's {RECIPE_BATCH} crops per step")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES + EXTRA_CASES)
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table per case instead of timing")
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.recipe_batch and args.batch:
        p.error("--batch and --recipe-batch exclude each other")
    batch = RECIPE_BATCH if args.recipe_batch else (args.batch or 2)
    before = start_load(args.allow_loaded)
    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        steps, losses, model0, batches = build_cases(tuple(args.cases), args.tiny, batch, args.seed, tmp)
        if args.profile:
            body = profile(steps)
            after = load_average()
            data = {"machine": machine_facts(), "load_average": {"before": before, "after": after}, "args": vars(args)}
            write_report("ssl_step_profile", f"SSL step profile (batch {batch})", body, data, args.out_dir)
            return 0
        flops = step_flops(model0, batches)
        from bench.matmul import measure_matmul

        n = 512 if args.tiny else 2048
        peak = measure_matmul({"square": (n, n, n)}, reps=args.reps, warmup=1, calls=1, seed=args.seed)["square"]
        first = first_steps(steps) if args.warmup >= 1 else {}
        seconds = interleaved(steps, reps=args.reps, warmup=max(0, args.warmup - 1),
                              on_done=lambda c, r, s: print(f"rep {r + 1} {c:14s} {s:7.2f} s", flush=True))  # fmt: skip
    after = load_average()
    base = seconds.get("baseline")
    rows = []
    for name, s in seconds.items():
        rate = s.inverted(batch)
        achieved = flops / s.median
        dtype = case_precision(name)
        rows.append([name, s.fmt(2), rate.fmt(3), f"{base.median / s.median:.2f}×" if base else "–",
                     f"{achieved / 1e9:.0f}", f"{achieved / peak[dtype].median:.0%} of {dtype}",
                     f"{first[name]:.2f}" if name in first else "–", args.reps])  # fmt: skip
    headers = ["case", "s / step", "samples/s", "speed-up", "GFLOP/s", "of matmul", "first step s", "reps"]
    cmd = (f"python -m bench ssl_step{' --tiny' if args.tiny else ''} --batch {batch} --reps {args.reps} "
           f"--threads {args.threads} --cases {' '.join(repr(c) if ' ' in c else c for c in args.cases)}")  # fmt: skip
    model = "tiny ViTAutoEnc (32³, hidden 96, 2 layers)" if args.tiny else "ViTAutoEnc ViT-B/16 at 96³"
    body = (
        f"{model}, {batch} crops × 2 views per step; {flops / 1e9:.1f} GFLOP per step (forward + backward, "
        f"flop_counter); matmul {n}³ in the same run: bf16 {peak['bf16'].median / 1e9:.0f} GFLOP/s, "
        f"fp32 {peak['fp32'].median / 1e9:.0f} GFLOP/s. "
        f"Median (min–max) over {args.reps} interleaved repetitions after {args.warmup} warm-up.\n\n"
        f"{markdown_table(headers, rows)}\n\nFirst losses: "
        + "; ".join(f"{k} {', '.join(f'{v:.4f}' for v in vals[:4])}" for k, vals in losses.items())
        + f"\n\nCommand: `{cmd}`\n"
    )
    data = {"machine": machine_facts(), "load_average": {"before": before, "after": after}, "args": vars(args),
            "batch": batch, "flops_per_step": flops, "matmul_flops": {k: v.as_dict() for k, v in peak.items()},
            "seconds": {k: v.as_dict() for k, v in seconds.items()}, "first_step_seconds": first,
            "losses": losses}  # fmt: skip
    write_report("ssl_step", "SSL pretraining step", body, data, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
