"""Float64 loop oracles: the judges of every implementation.

Written as plain scalar loops straight from the contract in ``shared/design.md`` §3, sharing no
code with ``src/deformable``. They are slow on purpose and only meant for small shapes.
"""

from __future__ import annotations

import math

import torch


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def bilinear(img, y: float, x: float):
    """Sample ``img`` [C, H, W] (float64) at (y, x) with torchvision's deformable rule -> [C]."""
    channels, height, width = img.shape
    if not (y > -1 and y < height and x > -1 and x < width):
        if math.isnan(y) or math.isnan(x):
            return torch.full((channels,), math.nan, dtype=torch.float64)
        return torch.zeros(channels, dtype=torch.float64)
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    value = torch.zeros(channels, dtype=torch.float64)
    for cy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for cx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= cy < height and 0 <= cx < width:
                value = value + wy * wx * img[:, cy, cx].double()
    return value


def deform_conv2d_oracle(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Deformable convolution v1/v2 by loops, in float64. Shapes as torchvision.ops.deform_conv2d."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    input, offset, weight = input.double(), offset.double(), weight.double()
    batch, in_channels = input.shape[:2]
    out_channels, group_in, kh, kw = weight.shape
    groups = in_channels // group_in
    group_out = out_channels // groups
    out_h, out_w = offset.shape[-2:]
    kernel = kh * kw
    offset_groups = offset.shape[1] // (2 * kernel)
    channels_per_offset_group = in_channels // offset_groups
    out = torch.zeros(batch, out_channels, out_h, out_w, dtype=torch.float64)
    for n in range(batch):
        for oy in range(out_h):
            for ox in range(out_w):
                column = torch.zeros(in_channels, kh, kw, dtype=torch.float64)
                for g in range(offset_groups):
                    channels = slice(g * channels_per_offset_group, (g + 1) * channels_per_offset_group)
                    for i in range(kh):
                        for j in range(kw):
                            k = g * kernel + i * kw + j
                            dy = offset[n, 2 * k, oy, ox].item()
                            dx = offset[n, 2 * k + 1, oy, ox].item()
                            y = oy * stride[0] - padding[0] + i * dilation[0] + dy
                            x = ox * stride[1] - padding[1] + j * dilation[1] + dx
                            value = bilinear(input[n, channels], y, x)
                            if mask is not None:
                                value = value * mask[n, k, oy, ox].double()
                            column[channels, i, j] = value
                for wg in range(groups):
                    rows = slice(wg * group_out, (wg + 1) * group_out)
                    cols = column[wg * group_in : (wg + 1) * group_in]
                    out[n, rows, oy, ox] = (weight[rows] * cols).sum(dim=(1, 2, 3))
    if bias is not None:
        out = out + bias.double().view(1, -1, 1, 1)
    return out


def finite_difference_grad(fn, tensors, index: int, grad_output, eps: float = 1e-6):
    """Central finite-difference gradient of <fn(*tensors), grad_output> w.r.t. ``tensors[index]``."""
    base = [t.detach().double().clone() if t is not None else None for t in tensors]
    target = base[index]
    grad = torch.zeros_like(target)
    flat, flat_grad = target.view(-1), grad.view(-1)
    for e in range(flat.numel()):
        old = flat[e].item()
        flat[e] = old + eps
        plus = (fn(*base) * grad_output).sum().item()
        flat[e] = old - eps
        minus = (fn(*base) * grad_output).sum().item()
        flat[e] = old
        flat_grad[e] = (plus - minus) / (2 * eps)
    return grad


def deform_roi_pool_oracle(
    input,
    rois,
    offset=None,
    mask=None,
    output_size=7,
    spatial_scale=1.0,
    sampling_ratio=0,
    gamma=0.1,
    aligned=False,
):
    """(Modulated) deformable RoI pooling by loops, in float64. Shapes as ``deform_roi_pool``.

    Bins, adaptive grid and bilinear rule are torchvision's roi_align (CPU kernel) ones; offset
    [K, 2, ph, pw] (channel 0 = x, 1 = y) moves a bin by gamma * offset * (roi_width, roi_height);
    mask [K, 1, ph, pw] multiplies the bin.
    """
    ph, pw = _pair(output_size)
    input = input.double()
    channels, height, width = input.shape[1:]

    def sample(img, y, x):
        # roi_align's rule: outside [-1, size] is 0; otherwise clamp to the map, blend four neighbours.
        if math.isnan(y) or math.isnan(x):
            return torch.full((channels,), math.nan, dtype=torch.float64)
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return torch.zeros(channels, dtype=torch.float64)
        y, x = max(y, 0.0), max(x, 0.0)
        y_low, x_low = int(y), int(x)
        if y_low >= height - 1:
            y_low = y_high = height - 1
            y = float(y_low)
        else:
            y_high = y_low + 1
        if x_low >= width - 1:
            x_low = x_high = width - 1
            x = float(x_low)
        else:
            x_high = x_low + 1
        ly, lx = y - y_low, x - x_low
        hy, hx = 1.0 - ly, 1.0 - lx
        return (
            hy * hx * img[:, y_low, x_low]
            + hy * lx * img[:, y_low, x_high]
            + ly * hx * img[:, y_high, x_low]
            + ly * lx * img[:, y_high, x_high]
        )

    shift = 0.5 if aligned else 0.0
    out = torch.zeros(rois.shape[0], channels, ph, pw, dtype=torch.float64)
    for k in range(rois.shape[0]):
        b, x1, y1, x2, y2 = (float(v) for v in rois[k].double())
        start_w, start_h = x1 * spatial_scale - shift, y1 * spatial_scale - shift
        roi_w = x2 * spatial_scale - shift - start_w
        roi_h = y2 * spatial_scale - shift - start_h
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / ph, roi_w / pw
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / ph)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pw)
        count = max(grid_h * grid_w, 1)
        for i in range(ph):
            for j in range(pw):
                top, left = start_h, start_w
                if offset is not None:
                    left += gamma * roi_w * float(offset[k, 0, i, j])
                    top += gamma * roi_h * float(offset[k, 1, i, j])
                total = torch.zeros(channels, dtype=torch.float64)
                for iy in range(grid_h):
                    y = top + i * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = left + j * bin_w + (ix + 0.5) * bin_w / grid_w
                        total = total + sample(input[int(b)], y, x)
                value = total / count
                if mask is not None:
                    value = value * float(mask[k, 0, i, j])
                out[k, :, i, j] = value
    return out
