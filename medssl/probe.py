"""Linear probe of a ViT encoder: do its frozen patch tokens tell the organs apart?

The diagnosis behind the evidence's question "why does SSL pretraining not help?": an encoder whose frozen tokens
separate organs better than a random encoder's has learned something a fine-tuning can start from; one that does
not has not (or has learned it for other inputs, e.g. another intensity window).

Each labeled volume is preprocessed (the CT preset with a chosen window), cut into ROI-sized tiles and passed
through the encoder's patch embedding and blocks. Every patch token is labeled with the majority class of its
``patch³`` voxels (tokens whose majority covers less than ``purity`` of the patch are left out: they straddle a
border). A multinomial logistic regression (class-weighted cross-entropy, full batch, standardised features) is
fitted on the tokens of the first volumes and scored on the rest as **balanced accuracy** (mean recall over the
classes present), the usual probe score when background dominates.

Example::

    python -m medssl.probe --datalist runs/probe/dataset.json --encoder assets/ssl_vit_ct_cpu.pt --random 3
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "patch_fractions",
    "vit_tokens",
    "fit_linear_probe",
    "probe_tokens",
    "probe_encoder",
    "reconstruction_check",
    "main",
]


def patch_fractions(label: torch.Tensor, patch: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class fractions and voxel counts of every ``patch³`` block of a label volume.

    Args:
        label: integer labels ``(D, H, W)`` (``-1`` marks padding), each dimension divisible by ``patch``.
        patch: the encoder's patch size.
        num_classes: classes ``0 .. num_classes - 1``.

    Returns:
        ``(fractions (tokens, num_classes), voxels (tokens,))`` in the encoder's token order (row-major over the
        patch grid); fractions are over the patch's labeled voxels (rows of fully padded patches are zero).
    """
    if any(s % patch for s in label.shape):
        raise ValueError(f"label shape {tuple(label.shape)} is not divisible by the patch size {patch}")
    valid = (label >= 0).float()
    onehot = F.one_hot(label.clamp(min=0).long(), num_classes).permute(3, 0, 1, 2).float() * valid
    counts = F.avg_pool3d(onehot[None], patch, divisor_override=1)[0]  # (C, d, h, w) voxels of each class
    counts = counts.reshape(num_classes, -1).T
    voxels = counts.sum(1)
    return counts / voxels.clamp(min=1)[:, None], voxels


@torch.no_grad()
def vit_tokens(encoder: nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
    """Patch tokens of a ViT / ViTAutoEnc after the embedding and after every block (the last one normed).

    Args:
        encoder: a module with ``patch_embedding``, ``blocks`` and ``norm`` (MONAI's ViT and ViTAutoEnc).
        image: ``(B, C, *roi)``.

    Returns:
        ``[embedding, block 1, …, block L (after norm)]``, each ``(B, tokens, hidden)``.
    """
    x = encoder.patch_embedding(image)
    out = [x]
    for i, blk in enumerate(encoder.blocks):
        x = blk(x)
        out.append(encoder.norm(x) if i == len(encoder.blocks) - 1 else x)
    return out


def fit_linear_probe(
    train_x: torch.Tensor,
    train_f: torch.Tensor,
    train_n: torch.Tensor,
    test_x: torch.Tensor,
    test_f: torch.Tensor,
    test_n: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 0.05,
    l2: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Linear segmentation probe: a multinomial logistic regression from a token to its patch's voxels' classes.

    Trained with the voxel-weighted, class-balanced cross-entropy against the patch's class fractions (the same
    loss as per-voxel cross-entropy when every voxel takes its patch's token); scored as the Dice of every class
    on the test voxels when each patch's voxels take the token's predicted class.

    Args:
        train_x, test_x: token features ``(tokens, hidden)``.
        train_f, test_f: class fractions ``(tokens, classes)`` (:func:`patch_fractions`).
        train_n, test_n: labeled voxels per token.
        steps, lr, l2: full-batch Adam steps, learning rate and L2 penalty on the weights.
        seed: the head's initialisation.

    Returns:
        ``{"dice": {class: Dice}, "mean_dice": mean over foreground classes present, "train_mean_dice"}``.
    """
    num_classes = train_f.shape[1]
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    voxels = (train_f * train_n[:, None]).sum(0)
    present = voxels > 0
    weight = torch.where(present, voxels.sum() / (voxels.clamp(min=1) * present.sum()), torch.zeros(()))
    target = train_f * train_n[:, None] * weight  # voxel counts, class-balanced
    target = target / target.sum()
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = -(target * F.log_softmax(head(xtr), 1)).sum() + l2 * head.weight.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        dice = _dice(head(xte).argmax(1), test_f, test_n)
        train_dice = _dice(head(xtr).argmax(1), train_f, train_n)
    return {"dice": dice, "mean_dice": _fg_mean(dice), "train_mean_dice": _fg_mean(train_dice)}


def _dice(pred: torch.Tensor, fractions: torch.Tensor, voxels: torch.Tensor) -> dict[int, float]:
    """Per-class voxel Dice when every voxel of a patch takes the patch's predicted class."""
    counts = fractions * voxels[:, None]  # true voxels of each class per token
    out = {}
    for c in range(fractions.shape[1]):
        true = counts[:, c].sum()
        if true > 0:
            hit = pred == c
            out[c] = float(2 * counts[hit, c].sum() / (voxels[hit].sum() + true))
    return out


def _fg_mean(dice: Mapping[int, float]) -> float:
    fg = [v for c, v in dice.items() if c > 0]
    return float(np.mean(fg)) if fg else float("nan")


def _tiles(image: torch.Tensor, label: torch.Tensor, roi: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``(1, D, H, W)`` image (zeros) and label (``-1``) to multiples of ``roi`` and cut them into tiles."""
    pad = []
    for s, r in zip(reversed(image.shape[1:]), reversed(roi)):
        pad += [0, (-s) % r]
    image = F.pad(image, pad, value=0.0)
    label = F.pad(label.float(), pad, value=-1.0).long()
    tiles_i, tiles_l = [], []
    d, h, w = image.shape[1:]
    for z in range(0, d, roi[0]):
        for y in range(0, h, roi[1]):
            for x in range(0, w, roi[2]):
                tiles_i.append(image[:, z : z + roi[0], y : y + roi[1], x : x + roi[2]])
                tiles_l.append(label[0, z : z + roi[0], y : y + roi[1], x : x + roi[2]])
    return torch.stack(tiles_i), torch.stack(tiles_l)


def load_volumes(
    records: Sequence[Mapping[str, str]], window: tuple[float, float], spacing: Sequence[float]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Preprocess labeled records with the CT preset (RAS, ``spacing``, HU ``window`` → 0..1, foreground crop)."""
    from monai.transforms import Compose

    from medssl.transforms.presets import ct_preprocessing

    chain = Compose(ct_preprocessing(("image", "label"), spacing=tuple(spacing), a_min=window[0], a_max=window[1]))
    out = []
    for rec in records:
        d = chain({"image": rec["image"], "label": rec["label"]})
        out.append(
            (torch.as_tensor(np.asarray(d["image"]), dtype=torch.float32), torch.as_tensor(np.asarray(d["label"])))
        )
    return out


def probe_tokens(
    encoder: nn.Module,
    volumes: Sequence[tuple[torch.Tensor, torch.Tensor]],
    roi: Sequence[int],
    patch: int,
    num_classes: int,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen tokens (one tensor per depth), their class fractions, voxel counts and volume index, over all tiles.

    Tokens of fully padded patches are left out.
    """
    feats: list[list[torch.Tensor]] = []
    fracs, counts, owner = [], [], []
    encoder.eval()
    for v, (image, label) in enumerate(volumes):
        tiles, tile_labels = _tiles(image, label, roi)
        depths = vit_tokens(encoder, tiles)
        if not feats:
            feats = [[] for _ in depths]
        for t in range(tiles.shape[0]):
            f, n = patch_fractions(tile_labels[t], patch, num_classes)
            keep = n > 0
            for k, x in enumerate(depths):
                feats[k].append(x[t][keep])
            fracs.append(f[keep])
            counts.append(n[keep])
            owner.append(torch.full((int(keep.sum()),), v))
    return [torch.cat(f) for f in feats], torch.cat(fracs), torch.cat(counts), torch.cat(owner)


def probe_encoder(
    encoder: nn.Module,
    volumes: Sequence[tuple[torch.Tensor, torch.Tensor]],
    n_train: int,
    *,
    roi: Sequence[int],
    patch: int,
    num_classes: int,
) -> list[dict[str, Any]]:
    """Probe every depth of ``encoder``: train on the first ``n_train`` volumes, test on the rest."""
    feats, frac, n, owner = probe_tokens(encoder, volumes, roi, patch, num_classes)
    tr, te = owner < n_train, owner >= n_train
    return [
        {"depth": depth, **fit_linear_probe(x[tr], frac[tr], n[tr], x[te], frac[te], n[te])}
        for depth, x in enumerate(feats)
    ]


@torch.no_grad()
def reconstruction_check(
    ckpt_path: str | Path,
    records: Sequence[Mapping[str, str]],
    view_kwargs: Mapping[str, Any],
    *,
    crops_per_volume: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """L1 of an SSL checkpoint's reconstruction of corrupted views against two trivial reconstructions.

    The crops and views are drawn as the SSL bundle draws them (its own preprocessing from the checkpoint's
    summary, random ROI crops, :func:`medssl.transforms.views.ssl_two_view_transforms` with ``view_kwargs``),
    deterministically for ``seed``. ``identity`` returns the corrupted view unchanged, ``mean`` the crop's mean
    intensity: a reconstruction that does not beat ``identity`` has learned nothing the view did not show.

    Returns:
        ``{"model": L1, "identity": L1, "mean": L1, "crops": n}`` (mean absolute error over all voxels).
    """
    from monai.transforms import Compose, RandSpatialCropSamplesd, SpatialPadd

    from medssl.checkpoint import build_network, load_checkpoint
    from medssl.transforms.presets import preprocessing_from_summary
    from medssl.transforms.views import ssl_two_view_transforms

    ckpt = load_checkpoint(ckpt_path)
    net = build_network(ckpt, where=ckpt_path).eval()
    roi = [int(x) for x in ckpt["network"]["img_size"]]
    chain = Compose(
        preprocessing_from_summary(ckpt["preprocessing"], ("image",))
        + [
            SpatialPadd(keys="image", spatial_size=roi),
            RandSpatialCropSamplesd(keys="image", roi_size=roi, num_samples=crops_per_volume, random_size=False),
        ]
        + ssl_two_view_transforms(**dict(view_kwargs))
    )
    chain.set_random_state(seed=seed)
    totals = {"model": 0.0, "identity": 0.0, "mean": 0.0}
    n = 0
    for rec in records:
        for item in chain({"image": rec["image"]}):
            view = torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32)[None]
            clean = torch.as_tensor(np.asarray(item["gt_image"]), dtype=torch.float32)[None]
            recon = net(view)
            recon = recon[0] if isinstance(recon, (tuple, list)) else recon
            totals["model"] += float((recon - clean).abs().mean())
            totals["identity"] += float((view - clean).abs().mean())
            totals["mean"] += float((clean - clean.mean()).abs().mean())
            n += 1
    return {**{k: v / max(n, 1) for k, v in totals.items()}, "crops": n}


def encoder_names(paths: Sequence[str | Path]) -> list[str]:
    """Short unique names for checkpoint paths: the file name, or ``folder/file`` where file names repeat."""
    names = [Path(p).name for p in paths]
    return [f"{Path(p).parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def patch_oracle(
    volumes: Sequence[tuple[torch.Tensor, torch.Tensor]],
    n_train: int,
    *,
    roi: Sequence[int],
    patch: int,
    num_classes: int,
) -> dict[str, Any]:
    """The probe's ceiling: test-volume Dice when every patch takes its own majority class (a perfect token)."""
    fracs, counts = [], []
    for image, label in volumes[n_train:]:
        _, tile_labels = _tiles(image, label, roi)
        for t in range(tile_labels.shape[0]):
            f, n = patch_fractions(tile_labels[t], patch, num_classes)
            fracs.append(f[n > 0])
            counts.append(n[n > 0])
    frac, n = torch.cat(fracs), torch.cat(counts)
    dice = _dice(frac.argmax(1), frac, n)
    return {"dice": dice, "mean_dice": _fg_mean(dice)}


def _vit_from(source: str | None, network: Mapping[str, Any], seed: int) -> nn.Module:
    from medssl.checkpoint import build_network, load_checkpoint

    if source is None:
        torch.manual_seed(seed)
        return build_network({"network": dict(network)}, load_weights=False)
    return build_network(load_checkpoint(source), where=source)


def run_probe(
    datalist: str | Path,
    encoders: Sequence[str],
    *,
    random_seeds: int = 3,
    windows: Sequence[tuple[float, float]] = ((-175.0, 250.0),),
    spacing: Sequence[float] = (2.0, 2.0, 4.0),
    n_train: int | None = None,
    key: str = "training",
) -> list[dict[str, Any]]:
    """Probe pretrained encoders (medssl SSL checkpoints) and ``random_seeds`` random ones of the same network.

    Returns one row per (encoder, window, depth) with the test balanced accuracy.
    """
    from medssl.checkpoint import load_checkpoint
    from medssl.data.datalist import load_datalist

    data = load_datalist(datalist, keys=[key])
    records = [r for r in data.data[key] if "label" in r]
    num_classes = max(data.labels) + 1 if data.labels else 14
    if not encoders:
        raise ValueError("name at least one pretrained encoder checkpoint")
    network = load_checkpoint(encoders[0])["network"]
    patch = int(network["patch_size"])
    roi = [int(s) for s in network["img_size"]]
    n_train = n_train if n_train is not None else (2 * len(records)) // 3
    sources: list[tuple[str, str | None, int]] = [(n, e, 0) for n, e in zip(encoder_names(encoders), encoders)]
    sources += [(f"random (seed {s})", None, s) for s in range(random_seeds)]
    rows = []
    for window in windows:
        volumes = load_volumes(records, window, spacing)
        oracle = patch_oracle(volumes, n_train, roi=roi, patch=patch, num_classes=num_classes)
        rows.append({"encoder": "patch oracle", "window": list(window), "depth": -1, **oracle})
        for name, src, seed in sources:
            net = _vit_from(src, network, seed)
            for r in probe_encoder(net, volumes, n_train, roi=roi, patch=patch, num_classes=num_classes):
                rows.append({"encoder": name, "window": list(window), **r})
                dice = " ".join(f"{c}:{d:.2f}" for c, d in r["dice"].items())
                print(f"{name:20s} window {window} depth {r['depth']}: mean Dice {r['mean_dice']:.3f} "
                      f"(train {r['train_mean_dice']:.3f}) [{dice}]", flush=True)  # fmt: skip
    return rows


_VIEW_IDS = {
    "inpaint_prob": "inpaint_prob",
    "in_holes": "inpaint_holes",
    "in_min_size": "inpaint_min_size",
    "in_max_size": "inpaint_max_size",
    "out_holes": "outpaint_holes",
    "out_min_size": "outpaint_min_size",
    "out_max_size": "outpaint_max_size",
    "shuffle_prob": "shuffle_prob",
    "shuffle_holes": "shuffle_holes",
    "shuffle_size": "shuffle_size",
}


def view_settings(config_files: Sequence[str | Path]) -> dict[str, Any]:
    """The SSL view settings of a bundle and its overlays (later files win), as ``ssl_view_transforms`` kwargs."""
    import yaml

    merged: dict[str, Any] = {}
    for f in config_files:
        merged.update(yaml.safe_load(Path(f).read_text(encoding="utf-8")) or {})
    return {arg: merged[key] for arg, key in _VIEW_IDS.items() if key in merged}


def write_report(
    path: str | Path, rows: Sequence[Mapping[str, Any]], recon: Mapping[str, Mapping[str, float]], header: str
) -> Path:
    """``ssl_diagnosis.md``: probe Dice per encoder and depth (random encoders as mean ± sd) and the L1 table."""
    from medssl.atomic import atomic_write_text

    lines = [header, "", "## Linear segmentation probe (frozen tokens, test volumes)", ""]
    oracle = [r for r in rows if r["encoder"] == "patch oracle"]
    rows = [r for r in rows if r["encoder"] != "patch oracle"]
    windows = sorted({tuple(r["window"]) for r in rows})
    depths = sorted({r["depth"] for r in rows})
    names = list(dict.fromkeys("random" if r["encoder"].startswith("random") else r["encoder"] for r in rows))
    lines.append("| encoder | window (HU) | " + " | ".join(_depth_name(d, depths) for d in depths) + " |")
    lines.append("|---|---|" + "---|" * len(depths))
    for name in names:
        for w in windows:
            cells = []
            for d in depths:
                vals = [
                    r["mean_dice"] * 100
                    for r in rows
                    if tuple(r["window"]) == w
                    and r["depth"] == d
                    and (r["encoder"] == name or (name == "random" and r["encoder"].startswith("random")))
                ]
                cells.append(f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}")
            label = f"random (n={len(vals)})" if name == "random" else name
            lines.append(f"| {label} | {w[0]:g}..{w[1]:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean foreground Dice (%) of a linear classifier on frozen patch tokens, each patch's voxels taking the "
        "token's class. Its ceiling, every patch taking its own majority class: "
        + ", ".join(f"{r['mean_dice'] * 100:.1f} (window {r['window'][0]:g}..{r['window'][1]:g})" for r in oracle)
        + ".",
        "",
        "## Reconstruction of corrupted views (L1, lower is better)",
        "",
        "| checkpoint | model | identity (the view itself) | crop mean | crops |",
        "|---|---|---|---|---|",
    ]
    for name, r in recon.items():
        lines.append(f"| {name} | {r['model']:.4f} | {r['identity']:.4f} | {r['mean']:.4f} | {r['crops']} |")
    return atomic_write_text(Path(path), "\n".join(lines) + "\n")


def _depth_name(d: int, depths: Sequence[int]) -> str:
    if d == 0:
        return "patch embedding"
    return f"block {d}" + (" (normed)" if d == max(depths) else "")


def main(argv: Sequence[str] | None = None) -> int:
    from medssl.errors import run_reporting_errors

    p = argparse.ArgumentParser(prog="python -m medssl.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--datalist", required=True, help="Decathlon datalist with labeled CT volumes")
    p.add_argument("--encoder", nargs="+", required=True, help="medssl SSL checkpoints (ViTAutoEnc)")
    p.add_argument("--random", type=int, default=3, help="random encoders of the same network (default: 3)")
    p.add_argument("--window", type=float, nargs=2, action="append", help="HU window(s) (default: -175 250)")
    p.add_argument("--key", default="training", help="datalist key of the probed volumes (default: training)")
    p.add_argument("--views", nargs="+", help="SSL bundle files whose view settings the L1 check uses")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args(argv)
    windows = [tuple(w) for w in args.window] if args.window else [(-175.0, 250.0)]

    def _run() -> None:
        from medssl.data.datalist import load_datalist

        rows = run_probe(args.datalist, args.encoder, random_seeds=args.random, windows=windows, key=args.key)
        recon = {}
        if args.views:
            records = load_datalist(args.datalist, keys=[args.key]).data[args.key]
            views = view_settings(args.views)
            for name, e in zip(encoder_names(args.encoder), args.encoder):
                recon[name] = reconstruction_check(e, records, views)
                print(f"{name}: reconstruction L1 {recon[name]}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"probe": rows, "reconstruction": recon}, indent=1) + "\n")
        if args.report:
            cmd = "python -m medssl.probe " + " ".join(sys.argv[1:] if argv is None else argv)
            write_report(args.report, rows, recon, f"# SSL diagnosis\n\nCommand: `{cmd}`")

    return run_reporting_errors(_run)


if __name__ == "__main__":
    sys.exit(main())
