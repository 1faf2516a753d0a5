"""Turn the raw folders of BTCV, TCIA-COVID19 and LA 2018 into Decathlon-format datalists (``medssl prepare``).

Reference splits live in ``json_splits/`` (generated from the published split files by
:func:`write_json_splits`). A preparer applies a reference split when the case names in the raw folder match it:
every file the split names must then exist (all missing files are reported in one :class:`ErrorList`), and
cases outside the split are left out with a warning. When no name matches (a different or synthetic dataset),
the fallback is logged: cases sorted by name, the last 20 % (at least one) go to ``validation``.

One module per dataset, like nnU-Net's dataset conversion: :mod:`~medssl.data.prepare.btcv`,
:mod:`~medssl.data.prepare.tcia`, :mod:`~medssl.data.prepare.la2018` (with its UA-MT protocol,
:mod:`~medssl.data.prepare.la_protocols`); :mod:`~medssl.data.prepare.common` holds what they share and
:mod:`~medssl.data.prepare.splits` regenerates ``json_splits/``.

Output paths are relative to the JSON's folder when the file lies inside it, else absolute.
"""

from __future__ import annotations

import os
from pathlib import Path

from medssl.data.prepare.btcv import BTCV_LABELS, prepare_btcv
from medssl.data.prepare.common import default_splits_dir
from medssl.data.prepare.la2018 import LA_LABELS, prepare_la2018
from medssl.data.prepare.splits import write_json_splits
from medssl.data.prepare.tcia import prepare_tcia
from medssl.errors import ConfigError

__all__ = [
    "BTCV_LABELS",
    "LA_LABELS",
    "default_splits_dir",
    "prepare_dataset",
    "prepare_btcv",
    "prepare_tcia",
    "prepare_la2018",
    "write_json_splits",
]

_PREPARERS = {"btcv": prepare_btcv, "tcia": prepare_tcia, "la2018": prepare_la2018}


def prepare_dataset(
    name: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | None = None,
    protocol: str | None = None,
    crop_seed: int = 0,
) -> Path:
    """Dispatch to :func:`prepare_btcv`, :func:`prepare_tcia` or :func:`prepare_la2018` (``medssl prepare``).

    ``protocol`` (``full`` by default) and ``crop_seed`` apply to ``la2018`` only, which also has ``uamt``.

    Raises:
        ConfigError: an unknown dataset or protocol, or a protocol other than ``full`` for BTCV / TCIA.

    Example::

        prepare_dataset("btcv", "/data/RawData", "data/btcv.json", split="init_6")
        prepare_dataset("la2018", "/data/2018LA/Training Set", "data/la_uamt/datalist.json", protocol="uamt")
    """
    if name not in _PREPARERS:
        raise ConfigError("dataset", f"unknown dataset {name!r}; choose one of {sorted(_PREPARERS)}")
    if name == "la2018":
        return prepare_la2018(root, out, split=split, protocol=protocol, crop_seed=crop_seed)
    if protocol not in (None, "", "full"):
        raise ConfigError("protocol", f"{name} has only the 'full' protocol, got {protocol!r}")
    return _PREPARERS[name](root, out, split=split)
