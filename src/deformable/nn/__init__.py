"""Deformable layers: drop-ins for ``torch.nn.Conv2d`` and RoI pooling modules."""

from .deform_conv import DCNv1, DCNv2, DeformConv2d
from .deform_roi_pool import DeformRoIPool, ModulatedDeformRoIPool, MultiScaleDeformRoIPool

__all__ = [
    "DCNv1",
    "DCNv2",
    "DeformConv2d",
    "DeformRoIPool",
    "ModulatedDeformRoIPool",
    "MultiScaleDeformRoIPool",
]
