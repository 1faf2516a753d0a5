"""medssl: label-efficient 3D medical image segmentation on MONAI.

Nothing heavy is imported here: ``import medssl`` must stay cheap so that the CLI answers ``--help`` fast.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
