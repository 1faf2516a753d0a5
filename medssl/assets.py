"""``make assets``: the small SSL-pretrained ViT that ``make demo`` fine-tunes, rebuilt by one committed command.

Pretraining is the offline step in practice (a team pretrains once on its unlabeled archive, then fine-tunes many
times), so the demo does not pretrain: it starts from ``assets/ssl_vit_ct_cpu.pt``. This module makes that file,
deterministically from the phantom generator and a seed: an unlabeled CT phantom pool of other seeds than the
demo's data, ``bundles/ssl_pretrain.yaml`` with ``bundles/cpu_study.yaml`` in fp32 (bf16 rounding differs between
CPU kinds), one process. Next to the checkpoint, ``ssl_vit_ct_cpu.json`` records the command, the commit, the
SHA-256, the machine and the validation reconstruction L1 per validation.

Example::

    python -m medssl.assets --out assets          # what `make assets` runs
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medssl.study_fingerprint import file_sha256

__all__ = ["SSL_ASSET", "ASSET_POOL", "make_ssl_asset", "main"]

log = logging.getLogger(__name__)

SSL_ASSET = "ssl_vit_ct_cpu.pt"
# the pretraining pool: unlabeled phantoms of seed 1000 (the demo's data are seed 0), the demo's shape
ASSET_POOL = {"seed": 1000, "cases": 2, "unlabeled": 32, "shape": (96, 96, 48)}
ASSET_EPOCHS = 40  # 9 iterations of 4 volumes x 2 crops x 2 views per epoch (34 volumes)
ASSET_THREADS = 2


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _val_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "val_metrics.csv"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [{k: (float(v) if k != "iteration" and k != "epoch" else int(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]  # fmt: skip


def make_ssl_asset(
    out_dir: str | os.PathLike = "assets",
    *,
    work_dir: str | os.PathLike = "runs/assets",
    epochs: int = ASSET_EPOCHS,
    seed: int = 0,
    threads: int = ASSET_THREADS,
) -> Path:
    """Pretrain the demo's ViT and write ``out_dir/ssl_vit_ct_cpu.pt`` plus its ``.json`` record.

    Args:
        out_dir: where the asset goes (the repository's ``assets/``).
        work_dir: the phantom pool and the pretraining run (resumable: a rerun continues from its ``last.pt``).
        epochs: pretraining epochs.
        seed: the bundle's seed.
        threads: torch threads of the pretraining process.

    Returns:
        The checkpoint's path.
    """
    from medssl import resources
    from medssl.checkpoint import load_checkpoint
    from medssl.data.phantoms import ensure_phantom
    from medssl.precision import cpu_model
    from medssl.study import _bundle_command, _run_logged

    out, work = Path(out_dir), Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundles = resources.bundles_dir()  # before any work: a wrong MEDSSL_HOME fails at once
    pool = ensure_phantom("ct-abdomen", work / "ssl_pool", **{**ASSET_POOL, "shape": tuple(ASSET_POOL["shape"])})
    files = [bundles / "ssl_pretrain.yaml", bundles / "cpu_study.yaml"]
    run_dir = work / "ssl_pretrain"
    overrides = {
        "bundle_root": str(bundles.parent),
        "dataset_dir": str(pool.parent),
        "output_dir": str(run_dir),
        "precision": "fp32",
        "device": "cpu",
        "seed": int(seed),
        "batch_size": 4,
        "num_samples": 2,
        "max_epochs": int(epochs),
        "val_interval": 10,
        "resume": "true",
    }
    cmd = _bundle_command(files, overrides)
    print(f"pretraining the demo ViT: {epochs} epochs on {pool} (log: {run_dir / 'run.log'})", flush=True)
    start = time.perf_counter()
    _run_logged(cmd, run_dir / "run.log", "SSL pretraining of the demo asset", threads)
    seconds = time.perf_counter() - start

    target = out / SSL_ASSET
    ckpt = load_checkpoint(run_dir / "model.pt")  # validates the format before it is published
    shutil.copyfile(run_dir / "model.pt", target)
    import torch

    record = {
        "file": SSL_ASSET,
        "sha256": file_sha256(target),
        "bytes": target.stat().st_size,
        "made_by": "make assets  (python -m medssl.assets --out assets)",
        "bundle_command": " ".join(cmd[1:]),
        "commit": _git_commit(resources.project_home("bundles")),
        "pool": {"kind": "ct-abdomen", **ASSET_POOL, "shape": list(ASSET_POOL["shape"])},
        "epochs": int(epochs),
        "progress": ckpt.get("progress"),
        "network": ckpt.get("network"),
        "preprocessing": ckpt.get("preprocessing"),
        "validation_l1": _val_history(run_dir),
        "machine": {
            "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": int(threads),
        },
        "versions": ckpt.get("versions"),
        "wall_seconds": round(seconds, 1),
    }
    (out / (Path(SSL_ASSET).stem + ".json")).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {target} ({record['bytes'] / 1e6:.1f} MB, sha256 {record['sha256'][:12]}…) in {seconds:.0f} s")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medssl.assets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", default="assets", help="output folder (default: assets/)")
    parser.add_argument("--work", default="runs/assets", help="phantom pool and run folder (default: runs/assets/)")
    parser.add_argument(
        "--epochs", type=int, default=ASSET_EPOCHS, help=f"pretraining epochs (default: {ASSET_EPOCHS})"
    )
    parser.add_argument("--threads", type=int, default=ASSET_THREADS, help="torch threads (default: 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from medssl.errors import run_reporting_errors

    return run_reporting_errors(make_ssl_asset, args.out, work_dir=args.work, epochs=args.epochs, threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())
