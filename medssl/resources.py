"""Where medssl finds its bundles and reference splits.

``bundles/`` and ``json_splits/`` are plain folders next to the package in the source tree, not package data: users
read, copy and overlay the YAML files, and ``python -m monai.bundle run`` takes them as paths. An editable install
(``pip install -e .``) finds them through the package's own location; a regular install (a wheel, the Docker
images under ``docker/``) cannot, so the folder holding them is looked up in this order:

1. the ``MEDSSL_HOME`` environment variable (the Docker images set it to the copied source tree);
2. the source checkout this package was imported from;
3. the current working directory (``python -m monai.bundle`` runs from the repository root).
"""

from __future__ import annotations

import os
from pathlib import Path

from medssl.errors import ConfigError

__all__ = ["HOME_ENV", "assets_dir", "bundles_dir", "project_home", "splits_dir"]

HOME_ENV = "MEDSSL_HOME"


def _has(root: Path, name: str) -> bool:
    return (root / name).is_dir()


def project_home(required: str = "bundles") -> Path:
    """The folder that holds ``required`` (``"bundles"`` or ``"json_splits"``), found as the module docstring says.

    Raises:
        ConfigError: ``MEDSSL_HOME`` is set but lacks ``required`` (a wrong setting is never silently bypassed), or
            no candidate folder has it.
    """
    env = os.environ.get(HOME_ENV)
    if env:
        root = Path(env).expanduser().resolve()
        if not _has(root, required):
            raise ConfigError(root, f"{HOME_ENV} points here but there is no {required}/ folder")
        return root
    candidates = [Path(__file__).resolve().parents[1], Path.cwd()]
    for root in candidates:
        if _has(root, required):
            return root
    raise ConfigError(
        candidates[-1],
        f"no {required}/ folder found (looked in {', '.join(str(c) for c in candidates)}); set {HOME_ENV} to a "
        "medssl source tree or run from one",
    )


def bundles_dir() -> Path:
    """``bundles/`` of the medssl home."""
    return project_home("bundles") / "bundles"


def splits_dir() -> Path:
    """``json_splits/`` of the medssl home."""
    return project_home("json_splits") / "json_splits"


def assets_dir() -> Path:
    """``assets/`` of the medssl home: small checkpoints made by ``make assets`` (see :mod:`medssl.assets`)."""
    return project_home("assets") / "assets"
