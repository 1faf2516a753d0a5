"""medssl.transforms."""
