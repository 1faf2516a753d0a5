"""GPU path: the training steps and the data pipeline on a CUDA device, against the fp32 tutorial recipe.

Runs in about 5 minutes on one GPU (``--budget-s``, default 240 s of timed rounds, caps the repetitions) and
writes the step table of ``ssl_step`` / ``finetune_step`` (``runs/bench/cuda.md``). Per workload
(``--workloads``; same initial weights, same batches in the same order, interleaved):

* ``ssl``: ViTAutoEnc ViT-B/16 at 96³, the recipe's 4 volumes × 2 crops = 8 crops per step (``--batch``);
* ``finetune``: UNETR ViT-B/16 at 96³, 14 classes, the recipe's 4 crops per step;

with the cases

* ``baseline``: the tutorial loop in fp32 on the device (contiguous memory, ``cudnn.benchmark`` off);
* ``medssl``: the bundle's trainer (``TwoViewSSLTrainer`` / ``SupervisedSegTrainer``) in precision ``auto``
  (:mod:`medssl.precision`: bf16 autocast where the GPU supports bf16, else fp16 AMP with a GradScaler), the
  fast kernels of :func:`medssl.networks.build.make_network`, fused Adam / AdamW, ``optim_set_to_none``,
  channels-last (3-D) network and inputs for UNETR, ``cudnn.benchmark`` on;
* ``medssl+compile`` (``--compile``): ``medssl`` with the forward compiled (:mod:`medssl.compile`).

The loader table (``--no-loader`` skips it) compares crops/s of the recipe's loader (``CacheDataset`` of the
deterministic preprocessing, random crops on the CPU, ``DataLoader``) with the GPU pipeline MONAI's fast-training
tutorial uses (the cached volumes moved to the device once by ``EnsureTyped(device=...)``, ``RandCropByPosNegLabeld``
on the device, ``ThreadDataLoader(num_workers=0)``), on CT phantom volumes.

On a CPU (``--device cpu --tiny``) it runs the same code with tiny models: the smoke run ``tests/test_bench.py``
does. Example::

    python -m bench cuda                      # one GPU, about 5 minutes
    python -m bench cuda --device cpu --tiny  # smoke run
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.timing import (
    Stats,
    bench_parser,
    load_average,
    machine_facts,
    markdown_table,
    set_threads,
    start_load,
    write_report,
)
from bench.workloads import Cycle, count_flops, seg_batches, ssl_batches, unetr_kwargs, vit_autoenc_kwargs

__all__ = ["RECIPE_BATCH", "WORKLOADS", "build_cases", "loader_rates", "main", "timed_rounds"]

WORKLOADS = ("ssl", "finetune")
#: crops per step of the recipes (ssl_pretrain.yaml: 4 volumes × 2 crops; btcv_unetr.yaml: 4 crops)
RECIPE_BATCH = {"ssl": 8, "finetune": 4}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(batch: dict, device, channels_last: bool = False) -> dict:
    import torch

    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return {k: v.to(device, non_blocking=True).contiguous(memory_format=fmt) for k, v in batch.items()}


class _DeviceCycle(Cycle):
    """:class:`Cycle` over batches already on the device (moved once: the step, not the copy, is timed)."""

    def __init__(self, batches: list[dict], device, channels_last: bool = False) -> None:
        super().__init__([_to(b, device, channels_last) for b in batches])


def _baseline_step(workload: str, model, batches: Cycle, losses: list[float]) -> Callable[[], None]:
    import torch
    from monai.losses import ContrastiveLoss, DiceCELoss

    if workload == "ssl":
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        recon, contrast = torch.nn.L1Loss(), ContrastiveLoss(temperature=0.05)

        def loss_of(batch):
            out1, _ = model(batch["image"])
            out2, _ = model(batch["image_2"])
            r = recon(out1, batch["gt_image"])
            return r + contrast(out1.flatten(start_dim=1), out2.flatten(start_dim=1)) * r
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

        def loss_of(batch):
            return dice_ce(model(batch["image"]), batch["label"])

    def step() -> None:
        model.train()
        opt.zero_grad()
        loss = loss_of(next(batches))
        loss.backward()
        opt.step()
        losses.append(loss.item())

    return step


def _medssl_step(
    workload: str, model, batches: Cycle, losses: list[float], device, tmp: str, compile: bool
) -> Callable[[], None]:
    import torch
    from ignite.engine import Events
    from monai.losses import DiceCELoss

    from medssl.handlers import NonFiniteLossGuard
    from medssl.networks.build import make_network

    model = make_network(model, device, compile="true" if compile else "false", output_dir=tmp)
    guard = [NonFiniteLossGuard(output_dir=tmp)]
    if workload == "ssl":
        from medssl.engines.ssl import TwoViewSSLTrainer
        from medssl.losses.ssl import ReconstructionContrastiveLoss

        opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
        trainer = TwoViewSSLTrainer(device=device, max_epochs=1, train_data_loader=batches, network=model,
                                    optimizer=opt, loss_function=ReconstructionContrastiveLoss(temperature=0.05),
                                    precision="auto", epoch_length=1, train_handlers=guard,
                                    optim_set_to_none=True)  # fmt: skip
    else:
        from medssl.engines.supervised import SupervisedSegTrainer

        model = model.to(memory_format=torch.channels_last_3d)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5, fused=True)
        trainer = SupervisedSegTrainer(device=device, train_data_loader=batches, network=model, optimizer=opt,
                                       loss_function=DiceCELoss(to_onehot_y=True, softmax=True), max_epochs=1,
                                       precision="auto", epoch_length=1, train_handlers=guard,
                                       optim_set_to_none=True)  # fmt: skip
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))

    def step() -> None:
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            trainer.run()
        finally:
            torch.backends.cudnn.benchmark = benchmark

    return step


def build_cases(
    workload: str, device, tiny: bool, batch: int, seed: int, tmp: str, compile: bool = False
) -> tuple[dict[str, Callable[[], None]], dict[str, list[float]], int]:
    """Step functions of one workload's cases on one initial model; returns ``(steps, losses, flops per step)``."""
    import torch
    from monai.networks.nets import UNETR as MonaiUNETR
    from monai.networks.nets import ViTAutoEnc

    from medssl.networks.unetr import UNETR

    if workload == "ssl":
        batches = ssl_batches(4, batch, 32 if tiny else 96, seed)
        torch.manual_seed(seed)
        model0 = ViTAutoEnc(**vit_autoenc_kwargs(tiny))

        def medssl_model():
            return copy.deepcopy(model0)

        def fwd_bwd():
            m, x = copy.deepcopy(model0).to(device), _to(batches[0], device)
            (m(x["image"])[0].sum() + m(x["image_2"])[0].sum()).backward()
    elif workload == "finetune":
        kwargs = unetr_kwargs(tiny)
        batches = seg_batches(4, batch, kwargs["img_size"][0], kwargs["out_channels"], seed)
        torch.manual_seed(seed)
        model0 = MonaiUNETR(**kwargs)

        def medssl_model():
            m = UNETR(**kwargs, num_layers=12, patch_size=16)
            m.load_state_dict(model0.state_dict(), strict=True)
            return m

        def fwd_bwd():
            copy.deepcopy(model0).to(device)(batches[0]["image"].to(device)).sum().backward()
    else:
        raise ValueError(f"unknown workload {workload!r} (use {', '.join(WORKLOADS)})")
    flops = count_flops(fwd_bwd)
    names = ["baseline", "medssl"] + (["medssl+compile"] if compile else [])
    steps: dict[str, Callable[[], None]] = {}
    losses: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        if name == "baseline":
            model = copy.deepcopy(model0).to(device)
            fn = _baseline_step(workload, model, _DeviceCycle(batches, device), losses[name])
        else:
            cycle = _DeviceCycle(batches, device, channels_last=workload == "finetune")
            fn = _medssl_step(workload, medssl_model(), cycle, losses[name], device, tmp, name == "medssl+compile")

        def synced(fn=fn) -> None:
            fn()
            _sync(device)

        steps[name] = synced
    return steps, losses, flops


def timed_rounds(
    cases: dict[str, Callable[[], None]], reps: int, budget_s: float, device
) -> tuple[dict[str, Stats], dict[str, float]]:
    """Interleaved timed rounds (at least one, at most ``reps``, stopping once ``budget_s`` is spent).

    Returns:
        ``(seconds per case, peak device memory in GiB per case)`` (memory only on CUDA, else empty).
    """
    import torch

    seconds: dict[str, list[float]] = {name: [] for name in cases}
    peak: dict[str, float] = {}
    spent = 0.0
    for rep in range(reps):
        for name, fn in cases.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            seconds[name].append(elapsed)
            spent += elapsed
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
            print(f"rep {rep + 1} {name:15s} {elapsed:7.3f} s", flush=True)
        if spent >= budget_s:
            break
    return {name: Stats(v) for name, v in seconds.items()}, peak


def loader_rates(device, tiny: bool, batch: int, seed: int, tmp: str, epochs: int) -> dict[str, Stats]:
    """Crops/s of the recipe's CPU loader and of the GPU pipeline (see the module docstring), ``epochs`` each."""
    from monai.data import CacheDataset, DataLoader, ThreadDataLoader
    from monai.transforms import Compose, EnsureTyped, RandCropByPosNegLabeld, SpatialPadd

    from medssl.data.phantoms import generate_phantom_dataset
    from medssl.data.records import labeled_records
    from medssl.transforms.presets import preprocessing_from_summary, preprocessing_summary

    roi = 32 if tiny else 96
    shape = (64, 64, 40) if tiny else (192, 192, 112)
    datalist = generate_phantom_dataset("ct-abdomen", Path(tmp) / "ct", cases=4, unlabeled=0, seed=seed, shape=shape)
    records = labeled_records(datalist, "training")
    summary = preprocessing_summary(spacing=(1.5, 1.5, 2.0), a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True,
                                    crop_foreground=True, roi_size=[roi] * 3)  # fmt: skip
    keys = ["image", "label"]
    pre = [*preprocessing_from_summary(summary, keys=keys), SpatialPadd(keys, [roi] * 3)]

    def crop():
        c = RandCropByPosNegLabeld(keys, "label", [roi] * 3, pos=1, neg=1, num_samples=batch, image_key="image",
                                   image_threshold=0)  # fmt: skip
        c.set_random_state(seed)
        return c

    cpu = CacheDataset(records, Compose([*pre, EnsureTyped(keys, track_meta=False), crop()]), cache_rate=1.0,
                       num_workers=0, progress=False)  # fmt: skip
    gpu = CacheDataset(records, Compose([*pre, EnsureTyped(keys, device=device, track_meta=False), crop()]),
                       cache_rate=1.0, num_workers=0, progress=False)  # fmt: skip
    loaders = {
        "DataLoader, CPU crops (recipe)": DataLoader(cpu, batch_size=1, shuffle=True, num_workers=0),
        "ThreadDataLoader, crops on the device": ThreadDataLoader(gpu, batch_size=1, shuffle=True, num_workers=0),
    }
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(epochs):
        for name, loader in loaders.items():
            start, crops = time.perf_counter(), 0
            for item in loader:
                crops += int(item["image"].to(device).shape[0])
            _sync(device)
            rates[name].append(crops / (time.perf_counter() - start))
    return {name: Stats(v) for name, v in rates.items()}


def main(argv: list[str] | None = None) -> int:
    import torch

    p = bench_parser("cuda", __doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--batch", type=int, default=None, help="crops per step (default: the recipe's; 1 with --tiny)")
    p.add_argument("--compile", action="store_true", help="add the medssl+compile case")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="stop the timed rounds once this many seconds are spent, shared by the workloads (default 240)")  # fmt: skip
    p.add_argument("--no-loader", action="store_true", help="skip the loader table")
    p.set_defaults(reps=20, warmup=2)
    args = p.parse_args(argv)
    set_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu (and --tiny for a smoke run)", file=sys.stderr)
        return 2
    budget = args.budget_s / len(args.workloads)
    before = start_load(args.allow_loaded)
    tables, data_runs = [], {}
    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        for workload in args.workloads:
            batch = args.batch or (1 if args.tiny else RECIPE_BATCH[workload])
            steps, losses, flops = build_cases(workload, device, args.tiny, batch, args.seed, tmp, args.compile)
            first: dict[str, float] = {}
            for rep in range(args.warmup):
                for name, fn in steps.items():
                    start = time.perf_counter()
                    fn()
                    if rep == 0:
                        first[name] = time.perf_counter() - start
            seconds, peak = timed_rounds(steps, args.reps, budget, device)
            base = seconds["baseline"]
            rows = [[name, s.fmt(3), s.inverted(batch).fmt(2), f"{base.median / s.median:.2f}×",
                     f"{flops / s.median / 1e9:.0f}", f"{peak[name]:.2f}" if name in peak else "–",
                     f"{first[name]:.2f}" if name in first else "–", len(s.values)]
                    for name, s in seconds.items()]  # fmt: skip
            headers = ["case", "s / step", "samples/s", "speed-up", "GFLOP/s", "peak GiB", "first step s", "reps"]
            title = {"ssl": "SSL step (ViTAutoEnc)", "finetune": "fine-tuning step (UNETR)"}[workload]
            tables.append(f"### {title}, {batch} crops per step, {flops / 1e9:.1f} GFLOP per step\n\n"
                          f"{markdown_table(headers, rows)}\n\nFirst losses: "
                          + "; ".join(f"{k} {', '.join(f'{v:.4f}' for v in vals[:4])}" for k, vals in losses.items()))  # fmt: skip
            data_runs[workload] = {"batch": batch, "flops_per_step": flops, "peak_gib": peak,
                                   "first_step_seconds": first, "losses": losses,
                                   "seconds": {k: v.as_dict() for k, v in seconds.items()}}  # fmt: skip
        loader = None
        if not args.no_loader:
            loader = loader_rates(device, args.tiny, 1 if args.tiny else 4, args.seed, tmp, epochs=2)
            rows = [[name, s.fmt(1), f"{s.median / min(v.median for v in loader.values()):.2f}×"]
                    for name, s in loader.items()]  # fmt: skip
            tables.append(f"### Loader (CT phantom training volumes, 2 epochs)\n\n"
                          f"{markdown_table(['loader', 'crops/s', 'vs slowest'], rows)}")  # fmt: skip
    after = load_average()
    from medssl.precision import describe_precision

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    cmd = (f"python -m bench cuda --device {args.device}{' --tiny' if args.tiny else ''} --reps {args.reps} "
           f"--warmup {args.warmup} --budget-s {args.budget_s:g}{' --compile' if args.compile else ''}")  # fmt: skip
    body = (
        f"Device {name}; {describe_precision('auto', device)}. Median (min–max) of the timed rounds (at most "
        f"{args.reps}, stopped after {args.budget_s:g} s in all) after {args.warmup} warm-up round(s), interleaved; "
        f"the step includes the device synchronisation.\n\n" + "\n\n".join(tables) + f"\n\nCommand: `{cmd}`\n"
    )
    data = {"machine": machine_facts(), "load_average": {"before": before, "after": after}, "args": vars(args),
            "device": str(device), "device_name": name, "workloads": data_runs,
            "loader": {k: v.as_dict() for k, v in loader.items()} if loader else None}  # fmt: skip
    write_report("cuda", f"GPU path ({name})", body, data, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
