"""One rank of the 2-process tests in this folder; started by ``python -m torch.distributed.run``.

    python -m torch.distributed.run --nproc_per_node=2 --master_port P tests/distributed/_ddp_worker.py MODE OUT

MODE ``step``: one SGD step of :class:`~medssl.engines.ssl.TwoViewSSLTrainer` on a DDP-wrapped tiny ViTAutoEnc with
NT-Xent negatives gathered across ranks; each rank saves its loss parts and weights to ``OUT/rank<r>.pt``.
MODE ``nan``: three steps; rank 1's second batch holds a NaN (negatives not gathered, so rank 0's loss stays
finite); each rank writes the error it stopped with to ``OUT/rank<r>.err`` and exits with status 3.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

IMG, PATCH, PER_RANK, LR = 16, 4, 2, 0.1


def tiny_vit() -> torch.nn.Module:
    from monai.networks.nets import ViTAutoEnc

    torch.manual_seed(0)
    return ViTAutoEnc(
        in_channels=1, img_size=IMG, patch_size=PATCH, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2,
        proj_type="conv",
    )  # fmt: skip


def samples(n: int) -> dict[str, torch.Tensor]:
    """``n`` clean crops and two noisy views of each, the same on every rank (a fixed generator)."""
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(n, 1, IMG, IMG, IMG, generator=g)
    return {
        "gt_image": clean,
        "image": clean + 0.1 * torch.randn(clean.shape, generator=g),
        "image_2": clean + 0.1 * torch.randn(clean.shape, generator=g),
    }


def main(mode: str, out: Path) -> int:
    from medssl import dist
    from medssl.engines import distributed
    from medssl.engines.ssl import TwoViewSSLTrainer
    from medssl.handlers import NonFiniteLossGuard
    from medssl.handlers.guards import NonFiniteLossError
    from medssl.losses.ssl import ReconstructionContrastiveLoss

    device = distributed.init_distributed("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    net = tiny_vit()
    data = samples(PER_RANK * world)
    mine = {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in data.items()}
    batches = [mine] if mode == "step" else [mine, {k: v.clone() for k, v in mine.items()}, mine]
    if mode == "nan" and rank == 1:
        batches[1]["image"][0, 0, 0, 0, 0] = float("nan")
    trainer = TwoViewSSLTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=batches,
        network=distributed.wrap_ddp(net, device),
        optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        loss_function=ReconstructionContrastiveLoss(temperature=0.5, gather_distributed=mode == "step"),
        precision="fp32",
        train_handlers=[NonFiniteLossGuard(output_dir=str(out))],
    )
    try:
        distributed.run(trainer)
    except NonFiniteLossError as e:
        (out / f"rank{rank}.err").write_text(str(e))
        return 3
    o = trainer.state.output
    parts = {k: float(o[k]) for k in ("loss", "loss_reconstruction", "loss_contrastive")}
    torch.save({"parts": parts, "state_dict": net.state_dict()}, out / f"rank{rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
