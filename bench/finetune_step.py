"""UNETR fine-tuning step: the published BTCV recipe as a plain PyTorch loop against medssl's trainer.

Cases (same weights, same batches in the same order, interleaved A B C A B C ...):

* ``baseline``: the MONAI BTCV UNETR tutorial loop (Hatamizadeh et al. 2022): ``monai.networks.nets.UNETR``
  (ViT-B/16, 96³, feature size 16, instance norm, residual blocks), fp32, ``AdamW(lr=1e-4, weight_decay=1e-5)``,
  ``DiceCELoss(to_onehot_y=True, softmax=True)``, ``loss.item()`` every step;
* ``medssl``: btcv_unetr.yaml's code path: :class:`medssl.engines.supervised.SupervisedSegTrainer` (bf16
  autocast) on :class:`medssl.networks.unetr.UNETR` (its default taps are MONAI's blocks 4 / 7 / 10) and the
  baseline's state dict (the same function as MONAI's UNETR), the bundle's ``NonFiniteLossGuard``;
* ``medssl+levers``: the same with :func:`medssl.networks.patch_conv.use_patch_matmul`,
  :func:`medssl.networks.attention.use_fused_attention`, ``AdamW(fused=True)`` and ``optim_set_to_none=True``;
* ``medssl default``: ``medssl+levers`` in precision ``auto`` (btcv_unetr.yaml as a user runs it: bf16 only where
  this CPU runs it fast, see :mod:`medssl.precision`), so its ratio to the fp32 baseline is what a user gets;
* ``medssl+compile`` (only when named in ``--cases``): ``medssl+levers`` with the network's forward compiled
  (:func:`medssl.compile.compile_network`; the warm-up step pays the compile: "first step s").
* ``medssl default+compile`` (only when named): ``medssl default`` compiled, the case ``compile: auto`` decides
  for where ``auto`` trains in fp32.

samples/s counts 96³ crops (the recipe takes 4 crops of one volume per step: ``--recipe-batch``; the default 1 is
what 3 interleaved fp32 repetitions allow on a 2-core CPU; ``--batch``).

Example::

    python -m bench finetune_step --batch 1 --reps 3
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
from bench.workloads import Cycle, count_flops, seg_batches, unetr_kwargs

__all__ = ["CASES", "build_cases", "main"]

CASES = ("baseline", "medssl", "medssl+levers", "medssl default")
#: cases run only when ``--cases`` names them
EXTRA_CASES = ("medssl+compile", "medssl default+compile")
#: crops per step of the recipe (btcv_unetr.yaml: num_samples 4 of one volume)
RECIPE_BATCH = 4
LR, WEIGHT_DECAY = 1e-4, 1e-5


def _baseline_step(model, batches: Cycle, losses: list[float]) -> Callable[[], None]:
    import torch
    from monai.losses import DiceCELoss

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def step() -> None:
        batch = next(batches)
        model.train()
        opt.zero_grad()
        loss = loss_fn(model(batch["image"]), batch["label"])
        loss.backward()
        opt.step()
        losses.append(loss.item())

    return step


def _medssl_step(
    model, batches: Cycle, losses: list[float], levers: bool, tmp: str, precision: str = "bf16", compile: bool = False
) -> Callable[[], None]:
    import torch
    from ignite.engine import Events
    from monai.losses import DiceCELoss

    from medssl.engines.supervised import SupervisedSegTrainer
    from medssl.handlers import NonFiniteLossGuard
    from medssl.networks.attention import use_fused_attention
    from medssl.networks.patch_conv import use_patch_matmul

    if levers:
        use_fused_attention(use_patch_matmul(model))
    if compile:
        from medssl.compile import compile_network

        compile_network(model, "true", "cpu", tmp)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=levers or None)
    trainer = SupervisedSegTrainer(device="cpu", train_data_loader=batches, network=model, optimizer=opt,
                                   loss_function=DiceCELoss(to_onehot_y=True, softmax=True), max_epochs=1,
                                   precision=precision, epoch_length=1,
                                   train_handlers=[NonFiniteLossGuard(output_dir=tmp)], optim_set_to_none=levers)  # fmt: skip
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    return trainer.run


def build_cases(
    names: tuple[str, ...], tiny: bool, batch: int, seed: int, tmp: str, n_batches: int = 4
) -> tuple[dict[str, Callable[[], None]], dict[str, list[float]], Any, list[dict]]:
    """Step functions of the named cases on one initial model; returns ``(steps, losses, model0, batches)``."""
    import torch
    from monai.networks.nets import UNETR as MonaiUNETR

    from medssl.networks.unetr import UNETR

    kwargs = unetr_kwargs(tiny)
    batches = seg_batches(n_batches, batch, kwargs["img_size"][0], kwargs["out_channels"], seed)
    torch.manual_seed(seed)
    model0 = MonaiUNETR(**kwargs)
    steps: dict[str, Callable[[], None]] = {}
    losses: dict[str, list[float]] = {}
    for name in names:
        if name not in CASES + EXTRA_CASES:
            raise ValueError(f"unknown case {name!r} (use {', '.join(CASES + EXTRA_CASES)})")
        losses[name] = []
        if name == "baseline":
            steps[name] = _baseline_step(copy.deepcopy(model0), Cycle(batches), losses[name])
            continue
        model = UNETR(**kwargs, num_layers=12, patch_size=16)
        model.load_state_dict(model0.state_dict(), strict=True)
        precision = "auto" if name.startswith("medssl default") else "bf16"
        steps[name] = _medssl_step(model, Cycle(batches), losses[name], name != "medssl", tmp, precision,
                                   compile=name.endswith("+compile"))  # fmt: skip
    return steps, losses, model0, batches


def step_flops(model0, batches: list[dict]) -> int:
    """FLOPs of one training step (forward + backward of the network on one batch)."""

    def fwd_bwd() -> None:
        copy.deepcopy(model0)(batches[0]["image"]).sum().backward()

    return count_flops(fwd_bwd)


def main(argv: list[str] | None = None) -> int:
    from bench.ssl_step import first_steps, profile

    p = bench_parser("finetune_step", __doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="crops per step (default: 1; the recipe: 4)")
    p.add_argument("--recipe-batch", action="store_true", help=f"the recipe's {RECIPE_BATCH} crops per step")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES + EXTRA_CASES)
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table per case instead of timing")
    p.set_defaults(reps=3)  # a base-size step takes about a minute on 2 cores
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.recipe_batch and args.batch:
        p.error("--batch and --recipe-batch exclude each other")
    batch = RECIPE_BATCH if args.recipe_batch else (args.batch or 1)
    before = start_load(args.allow_loaded)
    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        steps, losses, model0, batches = build_cases(tuple(args.cases), args.tiny, batch, args.seed, tmp)
        if args.profile:
            body = profile(steps)
            data = {"machine": machine_facts(), "load_average": {"before": before, "after": load_average()},
                    "args": vars(args)}  # fmt: skip
            write_report("finetune_step_profile", f"Fine-tuning step profile (batch {batch})", body, data, args.out_dir)
            return 0
        flops = step_flops(model0, batches)
        first = first_steps(steps) if args.warmup >= 1 else {}
        seconds = interleaved(steps, reps=args.reps, warmup=max(0, args.warmup - 1),
                              on_done=lambda c, r, s: print(f"rep {r + 1} {c:14s} {s:7.2f} s", flush=True))  # fmt: skip
    after = load_average()
    base = seconds.get("baseline")
    rows = [[name, s.fmt(2), s.inverted(batch).fmt(3), f"{base.median / s.median:.2f}×" if base else "–",
             f"{flops / s.median / 1e9:.0f}", f"{first[name]:.2f}" if name in first else "–", args.reps]
            for name, s in seconds.items()]  # fmt: skip
    headers = ["case", "s / step", "samples/s", "speed-up", "GFLOP/s", "first step s", "reps"]
    cmd = (f"python -m bench finetune_step{' --tiny' if args.tiny else ''} --batch {batch} --reps {args.reps} "
           f"--threads {args.threads} --cases {' '.join(repr(c) if ' ' in c else c for c in args.cases)}")  # fmt: skip
    model = "tiny UNETR (32³, hidden 96, feature size 8)" if args.tiny else "UNETR ViT-B/16 at 96³, feature size 16"
    body = (
        f"{model}, 14 classes, {batch} crops per step; {flops / 1e9:.1f} GFLOP per step (forward + backward, "
        f"flop_counter). Median (min–max) over {args.reps} interleaved repetitions after {args.warmup} warm-up.\n\n"
        f"{markdown_table(headers, rows)}\n\nFirst losses: "
        + "; ".join(f"{k} {', '.join(f'{v:.4f}' for v in vals[:4])}" for k, vals in losses.items())
        + f"\n\nCommand: `{cmd}`\n"
    )
    data = {"machine": machine_facts(), "load_average": {"before": before, "after": after}, "args": vars(args),
            "batch": batch, "flops_per_step": flops, "seconds": {k: v.as_dict() for k, v in seconds.items()},
            "first_step_seconds": first, "losses": losses}  # fmt: skip
    write_report("finetune_step", "UNETR fine-tuning step", body, data, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
