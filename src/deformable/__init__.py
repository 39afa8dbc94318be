"""deformable: Deformable ConvNets v1/v2 for PyTorch, with no compiler needed."""

from . import nn, ops
from .ops import deform_conv2d, deform_roi_pool

__version__ = "0.1.0"

__all__ = ["__version__", "deform_conv2d", "deform_roi_pool", "nn", "ops"]
