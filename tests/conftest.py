"""Shared fixtures: small phantom datasets generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Two cores: one intra-op thread per test process keeps timings predictable.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_CT_SHAPE = (64, 64, 32)
SMALL_LA_SHAPE = (64, 64, 40)


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.native_bf16`` tests where bf16 is not native: they would run 50-300x slower there."""
    from medssl.precision import cpu_capability, native_cpu_bf16

    if native_cpu_bf16():
        return
    skip = pytest.mark.skip(
        reason=f"needs native bf16; this CPU (capability {cpu_capability()}) runs bf16 convolutions 50-300x slower"
    )
    for item in items:
        if "native_bf16" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def ct_phantom(tmp_path_factory) -> Path:
    """Datalist of a small CT-abdomen phantom: 4 labeled (3 training + 1 validation) and 2 unlabeled cases."""
    from medssl.data.phantoms import generate_phantom_dataset

    out = tmp_path_factory.mktemp("ct_phantom")
    return Path(generate_phantom_dataset("ct-abdomen", out, cases=4, unlabeled=2, seed=0, shape=SMALL_CT_SHAPE))


@pytest.fixture(scope="session")
def la_phantom(tmp_path_factory) -> Path:
    """Datalist of a small LA-MRI phantom: 4 labeled and 2 unlabeled cases."""
    from medssl.data.phantoms import generate_phantom_dataset

    out = tmp_path_factory.mktemp("la_phantom")
    return Path(generate_phantom_dataset("la-mri", out, cases=4, unlabeled=2, seed=0, shape=SMALL_LA_SHAPE))
