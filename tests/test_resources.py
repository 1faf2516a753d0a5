"""medssl.resources: MEDSSL_HOME first (and never silently bypassed), then the checkout, then the cwd."""

from __future__ import annotations

import pytest

from medssl import resources
from medssl.errors import ConfigError


def test_checkout_is_found_without_medssl_home(monkeypatch, tmp_path):
    monkeypatch.delenv(resources.HOME_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # the cwd has no bundles/: the checkout the package was imported from is used
    assert (resources.bundles_dir() / "ssl_pretrain.yaml").is_file()
    assert (resources.splits_dir() / "btcv").is_dir()


def test_medssl_home_wins_over_the_checkout(monkeypatch, tmp_path):
    (tmp_path / "bundles").mkdir()
    (tmp_path / "json_splits").mkdir()
    monkeypatch.setenv(resources.HOME_ENV, str(tmp_path))
    assert resources.bundles_dir() == tmp_path.resolve() / "bundles"
    assert resources.splits_dir() == tmp_path.resolve() / "json_splits"


def test_wrong_medssl_home_is_an_error_naming_it(monkeypatch, tmp_path):
    (tmp_path / "bundles").mkdir()
    monkeypatch.setenv(resources.HOME_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="no json_splits/ folder") as info:
        resources.splits_dir()
    assert str(tmp_path) in str(info.value)
