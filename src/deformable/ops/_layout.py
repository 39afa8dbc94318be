"""The memory-format rule every deformable-convolution route follows."""

from __future__ import annotations

import torch
from torch import Tensor


def memory_format_of(t: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor stored channels-last (and not also NCHW-contiguous, as with a
    single channel), else contiguous_format: the format the op returns its output (that of the input)
    and each gradient (that of its tensor) in, on every backend, as ``F.conv2d`` does."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
