"""Functional deformable operators (registered as ``torch.ops.deformable.*``)."""

from ._aten import get_memory_budget, memory_budget, set_memory_budget
from ._backend import BACKENDS, resolve_backend
from .deform_conv import deform_conv2d
from .deform_roi_pool import deform_roi_pool

__all__ = [
    "BACKENDS",
    "deform_conv2d",
    "deform_roi_pool",
    "get_memory_budget",
    "memory_budget",
    "resolve_backend",
    "set_memory_budget",
]
