"""Reading bundle values: flags as command lines give them."""

from __future__ import annotations

import pytest

from medssl.config import as_bool
from medssl.errors import ConfigError


@pytest.mark.parametrize("value, expected", [(True, True), ("true", True), ("False", False), (0, False), ("on", True)])
def test_as_bool(value, expected):
    assert as_bool(value) is expected


def test_as_bool_rejects_other_values():
    with pytest.raises(ConfigError, match="'maybe'"):
        as_bool("maybe", "resume")
