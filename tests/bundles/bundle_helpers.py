"""Helpers shared by the bundle tests (imported as ``tests.bundles.bundle_helpers``; pytest puts the repo on the path)."""

from __future__ import annotations

from pathlib import Path


def overrides(data: Path, out: Path, **extra) -> dict:
    """Bundle ids that point a run at the dataset folder ``data`` and the output folder ``out``."""
    return {"bundle_root": str(out.parent), "dataset_dir": str(data), "output_dir": str(out), **extra}


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the TensorBoard event files in ``folder``: tag -> [(step, value)], in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(folder.glob("events.out.tfevents.*")):
        ea = EventAccumulator(str(f))
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in ea.Scalars(tag))
    return {tag: sorted(series, key=lambda point: point[0]) for tag, series in found.items()}
