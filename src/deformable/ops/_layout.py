"""The memory-format rule every deformable-convolution route follows."""

from __future__ import annotations

import torch
from torch import Tensor


def memory_format_of(t: Tensor) -> torch.memory_format:
    """The memory format the op gives a result shaped like ``t``: its output (like the input) and each
    gradient (like its tensor), as ``F.conv2d`` does.

    channels_last for a 4-D tensor stored channels-last, or, not being dense, with the channels
    innermost (a channel slice of a channels_last map, such as the offsets a DCNv2 layer cuts from its
    prediction: so their gradient joins the mask's in the layout of the layer); contiguous_format
    otherwise, also for a tensor that is both (a single channel).
    """
    if t.dim() != 4 or t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    _, c, h, w = t.shape
    _, sc, sh, sw = t.stride()
    if c > 1 and (h == 1 or sc < sh) and (w == 1 or sc < sw):
        return torch.channels_last
    return torch.contiguous_format
