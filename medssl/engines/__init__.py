"""medssl.engines."""
