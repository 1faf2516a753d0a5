"""Inference benchmark: medssl's :class:`~medssl.inference.Predictor` against the usual MONAI recipe.

One synthetic CT-like volume (:func:`medssl.data.phantoms.make_ct_abdomen`, resized spacing), one fixed
network (UNETR base config by default: ViT-B/16, 96³ roi, 14 classes, random weights with a fixed seed), and
for every repetition two separate worker processes, so that each one's peak RSS is its own:

* ``baseline``: :func:`medssl.inference.reference.monai_reference_labels`: MONAI preprocessing, fp32
  ``sliding_window_inference(overlap=0.5, sw_batch_size=4)``, softmax, ``Invertd`` on the probabilities, argmax;
* ``recipe_same``: the fair baseline: the same MONAI recipe with medssl's precision (``auto`` resolved as the
  Predictor does; bf16 as autocast) and medssl's windows (``--overlap``, gaussian blending), inverting labels
  (argmax, then nearest ``Invertd``) instead of 14 channels of probabilities. baseline → recipe_same is what
  bf16, window count and label inversion give; recipe_same → medssl is what medssl's slab pipeline adds;
* ``medssl``: ``Predictor(precision=auto, overlap=0.25, mode=gaussian)`` (the ``medssl infer`` defaults: what a
  user gets; ``--precision bf16`` or ``fp32`` to time one precision).

Both are timed from reading the file to labels on the input grid (writing excluded). The report gives the
median and min–max wall time and peak RSS per pipeline, their ratios, and the agreement of the two label maps
(mean Dice over the foreground classes present in either, and the fraction of equal voxels).

Example::

    python -m bench inference --shape 512 512 200 --spacing 0.75 0.75 2.0 --repeats 1 --out bench/inference.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["KINDS", "main", "unetr_config", "prepare", "label_agreement"]

#: the pipelines, in the order they run in every repetition (see the module docstring)
KINDS = ["baseline", "recipe_same", "medssl"]


def unetr_config(size: str, roi: int, classes: int = 14) -> dict:
    """``_target_`` config of UNETR ``base`` (the paper's ViT-B/16) or ``tiny`` (CPU smoke size)."""
    common = {"_target_": "medssl.networks.unetr.UNETR", "in_channels": 1, "out_channels": classes}
    if size == "base":
        return {**common, "img_size": [roi] * 3, "patch_size": 16, "hidden_size": 768, "mlp_dim": 3072,
                "num_layers": 12, "num_heads": 12, "feature_size": 16}  # fmt: skip
    if size == "tiny":
        return {**common, "img_size": [roi] * 3, "patch_size": 16, "hidden_size": 96, "mlp_dim": 192,
                "num_layers": 2, "num_heads": 4, "feature_size": 8}  # fmt: skip
    raise ValueError(f"unknown model size {size!r} (use base or tiny)")


def _train(net, image: np.ndarray, label: np.ndarray, affine: np.ndarray, pre: dict, roi: int, steps: int, seed: int):
    """A few Adam steps on random roi crops of the (preprocessed) volume, so the logits are not random noise."""
    import torch
    from monai.data import MetaTensor
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from medssl.transforms.presets import preprocessing_from_summary

    chain = preprocessing_from_summary(pre, keys=("image", "label"), crop_foreground=False)
    chain = Compose([t for t in chain if not isinstance(t, (LoadImaged, EnsureChannelFirstd))])
    aff = torch.as_tensor(affine)
    data = chain({"image": MetaTensor(torch.from_numpy(image[None].astype(np.float32)), affine=aff),
                  "label": MetaTensor(torch.from_numpy(label[None].astype(np.float32)), affine=aff)})  # fmt: skip
    x, y = data["image"].as_tensor(), data["label"].as_tensor()
    rng = np.random.default_rng(seed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()
    for step in range(steps):
        starts = [[int(rng.integers(0, max(s - roi, 0) + 1)) for s in x.shape[1:]] for _ in range(2)]
        xb = torch.stack([x[:, a : a + roi, b : b + roi, c : c + roi] for a, b, c in starts])
        yb = torch.stack([y[:, a : a + roi, b : b + roi, c : c + roi] for a, b, c in starts])
        loss = loss_fn(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"train step {step + 1}/{steps} loss {loss.item():.3f}")
    net.eval()


def prepare(workdir: Path, shape, spacing, model: str, roi: int, seed: int, train_steps: int = 0) -> tuple[Path, Path]:
    """Write the synthetic volume and the checkpoint; returns ``(volume path, checkpoint path)``."""
    import nibabel as nib
    import torch

    from medssl.checkpoint import build_network, save_checkpoint
    from medssl.data.phantoms import BTCV_LABELS, make_ct_abdomen
    from medssl.transforms.presets import preprocessing_summary

    image, label, affine = make_ct_abdomen(seed, shape=shape)
    affine = np.array(affine, dtype=np.float64)
    affine[:3, :3] = np.diag(spacing)  # a typical CT spacing instead of the phantom's random one
    volume = workdir / "ct.nii.gz"
    img = nib.Nifti1Image(image, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, volume)
    config = unetr_config(model, roi, classes=len(BTCV_LABELS))
    torch.manual_seed(seed)
    net = build_network({"network": config}, load_weights=False)
    ckpt = workdir / "model.pt"
    pre = preprocessing_summary(spacing=(1.5, 1.5, 2.0), a_min=-175, a_max=250, roi_size=[roi] * 3)
    if train_steps:
        _train(net, image, label, affine, pre, roi, train_steps, seed)
    labels = dict(BTCV_LABELS)
    save_checkpoint(ckpt, network=config, state_dict=net.state_dict(), stage="bench", preprocessing=pre, labels=labels)
    return volume, ckpt


def label_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Agreement of two label maps.

    ``dice``: mean Dice over the foreground classes present in either map (a class one map lacks scores 0);
    ``dice_pooled``: Dice of the foreground voxels that carry the same class, pooled over classes
    (``2 Σ|A_c ∩ B_c| / Σ(|A_c| + |B_c|)``); ``voxels_equal``: fraction of equal voxels.
    """
    dices, inter, total = [], 0, 0
    for c in np.union1d(np.unique(a), np.unique(b)):
        if c == 0:
            continue
        x, y = a == c, b == c
        i, n = int(np.logical_and(x, y).sum()), int(x.sum() + y.sum())
        dices.append(2.0 * i / n)
        inter, total = inter + i, total + n
    return {
        "dice": float(np.mean(dices)) if dices else float("nan"),
        "dice_pooled": 2.0 * inter / total if total else float("nan"),
        "voxels_equal": float(np.mean(a == b)),
    }


def _worker(args: argparse.Namespace) -> int:
    """One timed run in this process; prints a JSON line with seconds and peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    from medssl.checkpoint import build_network, load_checkpoint
    from medssl.inference import Predictor
    from medssl.inference.reference import monai_reference_labels
    from medssl.inference.volume import read_volume

    start = time.perf_counter()
    if args.worker in ("baseline", "recipe_same"):
        from medssl.precision import resolve_precision

        ckpt = load_checkpoint(args.checkpoint)
        net = build_network(ckpt).eval()
        same = args.worker == "recipe_same"
        labels = monai_reference_labels(
            args.volume, net, ckpt["preprocessing"], ckpt["preprocessing"]["roi_size"],
            overlap=args.overlap if same else 0.5, sw_batch_size=4, mode="gaussian" if same else "constant",
            precision=resolve_precision(args.precision, "cpu", training=False) if same else "fp32",
            invert="labels" if same else "probabilities",
        )  # fmt: skip
    else:
        predictor = Predictor(args.checkpoint, device="cpu", precision=args.precision, overlap=args.overlap,
                              sw_batch_size=4, mode="gaussian", progress=False)  # fmt: skip
        labels = predictor.predict_volume(read_volume(args.volume)).labels
    seconds = time.perf_counter() - start
    np.save(args.labels_out, labels)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))
    return 0


def _run(kind: str, volume: Path, ckpt: Path, labels_out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "bench.inference", "--worker", kind, "--volume", str(volume),
           "--checkpoint", str(ckpt), "--labels-out", str(labels_out), "--threads", str(args.threads),
           "--precision", args.precision, "--overlap", str(args.overlap)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stats(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} (min {min(values):.1f}, max {max(values):.1f})"


def main(argv: list[str] | None = None) -> int:
    from bench.timing import ALLOW_LOADED_HELP

    p = argparse.ArgumentParser(prog="python -m bench inference", description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200], help="volume voxels (x y z)")
    p.add_argument("--spacing", type=float, nargs=3, default=[0.75, 0.75, 2.0], help="volume spacing in mm")
    p.add_argument("--model", choices=["base", "tiny"], default="base", help="UNETR size (default: base)")
    p.add_argument("--roi", type=int, default=96, help="sliding-window roi (default: 96)")
    p.add_argument("--repeats", type=int, default=1, help="repetitions of each pipeline")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--precision", default="auto", help="medssl precision (default: auto, as medssl infer)")
    p.add_argument("--overlap", type=float, default=0.25, help="medssl overlap (default: 0.25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=0, help="train the network on the volume first (default: 0)")
    p.add_argument("--workdir", default=None, help="keep inputs and label maps here (default: temporary)")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--only", choices=KINDS, default=None, help="run one pipeline (needs --reuse)")
    p.add_argument("--no-recipe-same", action="store_true", help="skip the same-precision, same-windows recipe case")
    p.add_argument("--allow-loaded", action="store_true", help=ALLOW_LOADED_HELP)
    p.add_argument("--reuse", action="store_true", help="reuse the volume, model and label maps in --workdir")
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--volume", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    from bench.timing import load_average, machine_facts, report_loaded, start_load

    before = start_load(args.allow_loaded)

    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.reuse:
            volume, ckpt = workdir / "ct.nii.gz", workdir / "model.pt"
        else:
            volume, ckpt = prepare(workdir, args.shape, args.spacing, args.model, args.roi, args.seed, args.train_steps)
        kinds = [args.only] if args.only else [k for k in KINDS if not (args.no_recipe_same and k == "recipe_same")]
        results: dict[str, list[dict]] = {k: [] for k in kinds}
        for rep in range(args.repeats):
            for kind in kinds:
                r = _run(kind, volume, ckpt, workdir / f"{kind}.npy", args)
                results[kind].append(r)
                print(f"rep {rep + 1}/{args.repeats} {kind:8s} {r['seconds']:8.1f} s  {r['peak_rss'] / 2**30:6.2f} GiB")
        after = load_average()
        agreement = label_agreement(np.load(workdir / "baseline.npy"), np.load(workdir / "medssl.npy"))
        same = workdir / "recipe_same.npy"
        fresh = "recipe_same" in results or args.reuse  # never a stale map of an earlier run in --workdir
        same_agreement = (
            label_agreement(np.load(same), np.load(workdir / "medssl.npy")) if fresh and same.is_file() else None
        )
    if len(results) == 1:
        if args.out:
            Path(args.out).write_text(json.dumps({"config": vars(args), "runs": results, **agreement}, indent=2) + "\n")
        print(f"agreement of the kept baseline and medssl labels: {agreement}")
        if same_agreement is not None:
            print(f"agreement of the kept recipe_same and medssl labels: {same_agreement}")
        return 0
    from medssl.precision import precision_record

    machine = {**machine_facts(), "torch_threads": args.threads,
               "precision_auto_inference": precision_record("auto", "cpu", training=False)}  # fmt: skip
    load = {"before": before, "after": after}
    loaded = report_loaded(load, machine["usable_cores"])
    t = {k: [r["seconds"] for r in v] for k, v in results.items()}
    m = {k: [r["peak_rss"] / 2**30 for r in v] for k, v in results.items()}
    summary = {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "volume", "checkpoint", "labels_out")},
        "runs": results,
        "speedup": statistics.median(t["baseline"]) / statistics.median(t["medssl"]),
        "memory_ratio": statistics.median(m["medssl"]) / statistics.median(m["baseline"]),
        **agreement,
        "recipe_same_vs_medssl": same_agreement,
        "machine": machine,
        "load_average": load,
        "loaded": loaded,
    }
    if "recipe_same" in t:  # what medssl's slab pipeline adds at the same precision and windows
        summary["speedup_vs_recipe_same"] = statistics.median(t["recipe_same"]) / statistics.median(t["medssl"])
    print(
        f"{machine['cpu']}, CPU capability {machine['cpu_capability']}, {args.threads} torch threads per worker; "
        f"precision auto -> {machine['precision_auto_inference']['used']} for inference; load average before "
        f"{before}, after {after}" + (" -- LOADED: not an idle-machine measurement" if loaded else "")
    )
    print("wall time (s)   " + "   ".join(f"{k} {_stats(v)}" for k, v in t.items()))
    print("peak RSS (GiB)  " + "   ".join(f"{k} {_stats(v)}" for k, v in m.items()))
    print(f"speed-up {summary['speedup']:.2f}x   memory medssl/baseline {summary['memory_ratio']:.2f}")
    print(
        f"agreement: mean foreground Dice {agreement['dice']:.4f}, pooled foreground Dice "
        f"{agreement['dice_pooled']:.4f}, equal voxels {agreement['voxels_equal']:.4f}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
