"""PNG artefacts (image grids, overlays, the study plot) are written atomically like checkpoints."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from medssl.atomic import atomic_save_figure  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_figure_is_written_whole_and_a_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "views.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    atomic_save_figure(fig, path)
    first = path.read_bytes()
    assert first.startswith(PNG_MAGIC)

    # a savefig that dies half way: it has written part of a PNG into whatever it was given (a path or a file)
    # when the disk fills up; a plain fig.savefig(path) would leave the truncated PNG in place of the old one
    real_savefig = fig.savefig

    def dies_half_way(target, **kwargs):
        data = first[: len(first) // 2]
        if hasattr(target, "write"):
            target.write(data)
        else:
            with open(target, "wb") as f:
                f.write(data)
        raise OSError("No space left on device")

    fig.savefig = dies_half_way
    with pytest.raises(OSError, match="No space left"):
        atomic_save_figure(fig, path)
    fig.savefig = real_savefig
    plt.close(fig)
    assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["views.png"]


def test_image_grid_writer_leaves_only_the_png(tmp_path):
    import numpy as np

    from medssl.handlers.images import save_image_grid

    out = save_image_grid(tmp_path / "grid.png", {"a": np.random.rand(1, 8, 8, 8), "b": np.random.rand(1, 8, 8, 8)})
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
