"""medssl.networks."""
