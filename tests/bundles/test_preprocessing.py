"""Preprocessing is declared once per bundle: the chains a bundle trains and validates with start with exactly the
chain that its checkpoint summary rebuilds (what ``medssl infer`` replays), transform by transform."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from monai.transforms import Compose, Randomizable, SpatialPadd

from medssl.transforms.presets import preprocessing_from_summary

REPO = Path(__file__).resolve().parents[2]

# bundle -> (config files, transform ids to check, keys the chain loads)
BUNDLES = {
    "ssl_pretrain": (["ssl_pretrain.yaml"], ["train#transform", "validate#transform"], ["image"]),
    "btcv_unetr": (["supervised.yaml", "btcv_unetr.yaml"], ["train#transform", "validate#transform"], None),
    "la_vnet": (["supervised.yaml", "la_vnet.yaml"], ["train#transform", "validate#transform"], None),
    "mean_teacher": (["mean_teacher.yaml"], ["train#transform", "validate#transform"], None),
    "mean_teacher_btcv": (
        ["mean_teacher.yaml", "mean_teacher_btcv.yaml"],
        ["train#transform", "validate#transform"],
        None,
    ),
}
PRIMITIVES = (bool, int, float, str, type(None))


def _flat(value, depth: int = 0):
    """A comparable description of a transform's settings: primitives, arrays and nested MONAI transforms."""
    if isinstance(value, PRIMITIVES):
        return value
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, np.ndarray):
        return ("array", value.tolist())
    if isinstance(value, (list, tuple)):
        return tuple(_flat(v, depth) for v in value)
    module = type(value).__module__ or ""
    if depth < 3 and module.startswith("monai.transforms") and hasattr(value, "__dict__"):
        return (
            type(value).__name__,
            tuple(
                (k, _flat(v, depth + 1))
                for k, v in sorted(vars(value).items())
                if k not in ("R", "_rand_state") and not inspect.isroutine(v)
            ),
        )
    return type(value).__name__


def _describe(chain) -> list[str]:
    """One string per transform (NaN-safe); ``allow_missing_keys`` is how a chain treats absent labels, not
    preprocessing, so it is left out."""
    return [
        repr(_flat(t)).replace("('allow_missing_keys', True), ", "").replace("('allow_missing_keys', False), ", "")
        for t in chain
    ]


def _deterministic_prefix(transform) -> list:
    """The transforms before the first random one, without the padding to roi_size that training adds."""
    items = transform.transforms if isinstance(transform, Compose) else list(transform)
    prefix = []
    for t in items:
        if isinstance(t, Randomizable):
            break
        if not isinstance(t, SpatialPadd):
            prefix.append(t)
    return prefix


def _parsed(files):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / f) for f in files])
    return parser


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_training_chains_start_with_the_chain_of_the_checkpoint_summary(name):
    files, ids, keys = BUNDLES[name]
    parser = _parsed(files)
    summary = parser.get_parsed_content("preprocessing_summary")
    for tid in ids:
        chain = _deterministic_prefix(parser.get_parsed_content(tid))
        first = chain[0]
        chain_keys = list(first.keys)
        expected = preprocessing_from_summary(summary, keys=keys or chain_keys, allow_missing_keys=True)
        assert _describe(chain) == _describe(expected), f"{name} {tid}: chain differs from the summary's"


def test_the_comparison_sees_a_chain_that_departs_from_the_summary():
    """A chain with another intensity window than its summary is caught (the check above can fail)."""
    parser = _parsed(["supervised.yaml", "btcv_unetr.yaml"])
    summary = parser.get_parsed_content("preprocessing_summary")
    other = dict(summary, intensity=dict(summary["intensity"], a_min=-100.0))
    same = _describe(preprocessing_from_summary(summary, keys=["image", "label"]))
    departed = _describe(preprocessing_from_summary(other, keys=["image", "label"]))
    assert same != departed
    assert _describe(_deterministic_prefix(parser.get_parsed_content("validate#transform"))) == same
