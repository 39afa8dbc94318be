"""Small networks shared by the analysis tests."""

from __future__ import annotations

import torch
from torch import nn

from deformable.nn import DCNv1, DCNv2


def stack(kind: str = "regular", *, bias: bool = True, dtype=torch.float64, seed: int = 0) -> nn.Sequential:
    """conv 3x3 -> tanh -> conv 3x3 stride 2 dilation 2 -> tanh -> conv 3x3: 3 -> 4 -> 4 -> 2 channels.

    ``kind`` chooses the layers "2" and "4": regular ``nn.Conv2d``, ``DCNv1`` or ``DCNv2``; the module names
    are the same for all kinds. Geometry: layer "4" (the last conv) has stride 2 and a theoretical receptive
    field of +-5 pixels around image position 2 * (y, x).
    """
    torch.manual_seed(seed)
    first = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
    middle = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, bias=bias)
    last = nn.Conv2d(4, 2, 3, padding=1, bias=bias)
    if kind == "v1":
        middle, last = DCNv1.from_conv2d(middle), DCNv1.from_conv2d(last)
    elif kind == "v2":
        middle, last = DCNv2.from_conv2d(middle), DCNv2.from_conv2d(last)
    elif kind != "regular":
        raise ValueError(kind)
    return nn.Sequential(first, nn.Tanh(), middle, nn.Tanh(), last).to(dtype)


def randomise_offsets(model: nn.Module, scale: float = 0.3, seed: int = 1) -> nn.Module:
    """Give every DCN layer non-zero, input-dependent offsets (and masks)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DCNv1 | DCNv2):
                weight = module.conv_offset.weight
                weight.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * scale)
                bias = module.conv_offset.bias
                bias.copy_(torch.randn(bias.shape, generator=generator, dtype=bias.dtype) * scale)
    return model
