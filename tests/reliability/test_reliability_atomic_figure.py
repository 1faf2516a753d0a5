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

    # a savefig that dies half way (here: an unknown keyword, raised inside matplotlib's writer)
    with pytest.raises(TypeError):
        atomic_save_figure(fig, path, not_a_savefig_option=1)
    plt.close(fig)
    assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["views.png"]


def test_image_grid_writer_leaves_only_the_png(tmp_path):
    import numpy as np

    from medssl.engines.handlers import save_image_grid

    out = save_image_grid(tmp_path / "grid.png", {"a": np.random.rand(1, 8, 8, 8), "b": np.random.rand(1, 8, 8, 8)})
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
