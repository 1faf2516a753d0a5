"""Reading bundle values: what a MONAI config or a command line hands medssl (``--resume true`` is a string)."""

from __future__ import annotations

from typing import Any

from medssl.errors import ConfigError

__all__ = ["as_bool"]


def as_bool(value: Any, name: str = "value") -> bool:
    """A config flag as a bool; command lines give strings (``--resume true`` arrives as ``"true"``).

    Raises:
        ConfigError: anything but a bool, 0/1 or true/false/yes/no/on/off.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", "null", ""):
        return False
    raise ConfigError(name, f"expected true or false, got {value!r}")
