"""Readable pure-PyTorch deformable convolution: the executable specification.

Every step is an ordinary differentiable PyTorch op, so autograd supplies all gradients. It keeps
the whole im2col columns tensor ([N, C_in, kh*kw, H_out, W_out]) in memory and is meant for
checking the fast paths and for small problems, not for speed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sampling_positions(
    offset: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Absolute sampling coordinates of every kernel tap.

    Args:
        offset: [N, 2*G*kh*kw, H_out, W_out], (dy, dx) pairs, group-major, kernel row-major.

    Returns:
        (y, x), each [N, G, kh*kw, H_out, W_out], in input pixel units.
    """
    kh, kw = kernel_size
    batch, _, out_h, out_w = offset.shape
    pairs = offset.reshape(batch, offset.shape[1] // (2 * kh * kw), kh * kw, 2, out_h, out_w)
    dtype, device = offset.dtype, offset.device
    tap_y = torch.arange(kh, device=device, dtype=dtype).repeat_interleave(kw) * dilation[0]
    tap_x = torch.arange(kw, device=device, dtype=dtype).repeat(kh) * dilation[1]
    grid_y = torch.arange(out_h, device=device, dtype=dtype) * stride[0] - padding[0]
    grid_x = torch.arange(out_w, device=device, dtype=dtype) * stride[1] - padding[1]
    y = tap_y.view(-1, 1, 1) + grid_y.view(1, -1, 1) + pairs[:, :, :, 0]
    x = tap_x.view(-1, 1, 1) + grid_x.view(1, 1, -1) + pairs[:, :, :, 1]
    return y, x


def bilinear_sample(image: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Bilinear samples with the deformable-convolution border rule.

    A sample with y <= -1, y >= H, x <= -1 or x >= W is 0; otherwise each of its four integer
    neighbours outside the map counts as 0. NaN coordinates give NaN samples; infinite ones are
    outside. Nothing is ever read out of bounds. At exactly y = -1 (or x = -1) the sample is 0 but
    differentiable: its coordinate gradient is the one-sided derivative from inside (the top row's
    value, weighted as the floor rule weighs it), as torchvision's; below -1 it is 0.

    Args:
        image: [N, G, C_g, H, W].
        y, x: [N, G, *S] sampling coordinates (S any shape).

    Returns:
        [N, G, C_g, *S].
    """
    batch, groups, channels, height, width = image.shape
    sample_shape = y.shape[2:]
    if height * width == 0:  # no pixel to read: every sample is 0, NaN for a NaN coordinate
        nan = torch.where(y.isnan() | x.isnan(), y + x, torch.zeros_like(y))
        return nan.unsqueeze(2).expand(batch, groups, channels, *sample_shape).to(image.dtype)
    # y = -1 stays: its neighbours at row -1 are off the map and row 0 weighs ly = 0, so the sample is
    # 0, and autograd's derivative (through ly) is torchvision's.
    outside = (y < -1) | (y >= height) | (x < -1) | (x >= width)
    outside &= ~(y.isnan() | x.isnan())  # a NaN coordinate gives NaN, even beside an outside one
    # Parking outside samples at (-2, -2) makes all four neighbours invalid: the sample is 0 and its
    # coordinate gradient is 0, without any inf - inf arithmetic.
    y = torch.where(outside, torch.full_like(y, -2.0), y)
    x = torch.where(outside, torch.full_like(x, -2.0), x)
    # NaN coordinates: index any valid pixel (weights stay NaN, so the sample is NaN).
    y0 = torch.nan_to_num(y, nan=-2.0).floor()
    x0 = torch.nan_to_num(x, nan=-2.0).floor()
    ly, lx = y - y0, x - x0
    flat = image.reshape(batch, groups, channels, height * width)
    value = torch.zeros(batch, groups, channels, sample_shape.numel(), dtype=image.dtype, device=image.device)
    for corner_y, weight_y in ((y0, 1 - ly), (y0 + 1, ly)):
        for corner_x, weight_x in ((x0, 1 - lx), (x0 + 1, lx)):
            inside = (corner_y >= 0) & (corner_y < height) & (corner_x >= 0) & (corner_x < width)
            index = (corner_y.clamp(0, height - 1) * width + corner_x.clamp(0, width - 1)).long()
            index = index.reshape(batch, groups, 1, sample_shape.numel()).expand(-1, -1, channels, -1)
            gathered = flat.gather(3, index)
            inside = inside.reshape(batch, groups, 1, sample_shape.numel())
            corner = torch.where(inside, gathered, torch.zeros_like(gathered))
            value = value + (weight_y * weight_x).reshape(inside.shape) * corner
    return value.view(batch, groups, channels, *sample_shape)


def deform_conv2d_reference(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: Tensor | None,
) -> Tensor:
    """Deformable convolution by explicit im2col + matmul; arguments already validated.

    Shapes as :func:`deformable.ops.deform_conv2d`. fp16/bf16 are computed in fp32 and cast back.
    """
    out_dtype = input.dtype
    compute = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    input, offset, weight = input.to(compute), offset.to(compute), weight.to(compute)
    batch, in_channels, height, width = input.shape
    out_channels, group_in, kh, kw = weight.shape
    groups = in_channels // group_in
    kernel = kh * kw
    offset_groups = offset.shape[1] // (2 * kernel)
    out_h, out_w = offset.shape[-2:]

    y, x = sampling_positions(offset, (kh, kw), stride, padding, dilation)
    image = input.reshape(batch, offset_groups, in_channels // offset_groups, height, width)
    columns = bilinear_sample(image, y, x)  # [N, G, C_g, K, H_out, W_out]
    if mask is not None:
        columns = columns * mask.to(compute).reshape(batch, offset_groups, 1, kernel, out_h, out_w)
    columns = columns.reshape(batch, groups, group_in * kernel, out_h * out_w)
    weight = weight.reshape(groups, out_channels // groups, group_in * kernel)
    # einsum may hand back a permuted layout; the other backends return contiguous outputs.
    out = torch.einsum("gok,ngkp->ngop", weight, columns).contiguous()
    out = out.view(batch, out_channels, out_h, out_w)
    if bias is not None:
        out = out + bias.to(compute).view(1, -1, 1, 1)
    return out.to(out_dtype)
