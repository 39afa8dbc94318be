"""Readable pure-PyTorch (modulated) deformable RoI pooling, differentiated by autograd.

The executable specification of ``deform_roi_pool`` (see ``shared/design.md`` §3): one RoI at a
time, written to be read rather than to be fast.  For every RoI ``k`` and bin ``(i, j)``:

    roi_start = (x1, y1) * spatial_scale - (0.5 if aligned else 0)
    roi_size  = (x2, y2) * spatial_scale - (0.5 if aligned else 0) - roi_start   (>= 1 if not aligned)
    bin_size  = roi_size / output_size
    grid      = sampling_ratio, or ceil(roi_size / output_size) when sampling_ratio <= 0 (at most 4096)
    start     = roi_start + gamma * offset[k, :, i, j] * roi_size       (offset channel 0 = x, 1 = y)
    sample (iy, ix) at  y = start_y + i * bin_h + (iy + 0.5) * bin_h / grid_h   (x likewise)
    out[k, :, i, j] = mask[k, 0, i, j] * mean over the grid of bilinear(input[batch_k], y, x)

``bilinear`` is roi_align's rule: a sample with y < -1, y > H, x < -1 or x > W is 0; otherwise
y <= 0 reads row 0, y >= H - 1 reads row H - 1, and in between the usual four-neighbour blend.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._roi_aten import _MAX_GRID, compute_dtype


def _bilinear(feature: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Sample ``feature`` [C, H, W] at positions ``y``, ``x`` (broadcastable) with roi_align's rule."""
    height, width = feature.shape[-2:]
    y, x = torch.broadcast_tensors(y, x)
    inside = (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
    nan = torch.isnan(y) | torch.isnan(x)
    # Positions outside (and NaN) are parked at 0 so that the indices below stay valid.
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y = torch.where(y <= 0, torch.zeros_like(y), y)
    x = torch.where(x <= 0, torch.zeros_like(x), x)
    y_low = y.detach().long().clamp(max=height - 1)
    x_low = x.detach().long().clamp(max=width - 1)
    # At the last row (column) the sample reads that row alone.
    y = torch.where(y_low >= height - 1, y_low.to(y.dtype), y)
    x = torch.where(x_low >= width - 1, x_low.to(x.dtype), x)
    y_high = (y_low + 1).clamp(max=height - 1)
    x_high = (x_low + 1).clamp(max=width - 1)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    value = (
        hy * hx * feature[:, y_low, x_low]
        + hy * lx * feature[:, y_low, x_high]
        + ly * hx * feature[:, y_high, x_low]
        + ly * lx * feature[:, y_high, x_high]
    )
    value = torch.where(inside, value, torch.zeros_like(value))
    # A NaN position (from a NaN offset) makes its sample, and so its bin, NaN.
    return torch.where(nan, torch.full_like(value, math.nan), value)


def deform_roi_pool_reference(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    mask: Tensor | None,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    aligned: bool,
) -> Tensor:
    """Deformable RoI pooling by autograd-friendly PyTorch ops; arguments already validated."""
    dtype = compute_dtype(input.dtype)
    features = input.to(dtype)
    shift = 0.5 if aligned else 0.0
    outputs = []
    for k in range(rois.shape[0]):
        batch, x1, y1, x2, y2 = rois[k].detach().to(dtype)
        roi_start_w = x1 * spatial_scale - shift
        roi_start_h = y1 * spatial_scale - shift
        roi_width = x2 * spatial_scale - shift - roi_start_w
        roi_height = y2 * spatial_scale - shift - roi_start_h
        if not aligned:
            roi_width = roi_width.clamp(min=1.0)
            roi_height = roi_height.clamp(min=1.0)
        bin_h = roi_height / pooled_height
        bin_w = roi_width / pooled_width
        if sampling_ratio > 0:
            grid_h = grid_w = sampling_ratio
        else:
            # The same cap as the fast paths (MAX_SAMPLING_RATIO samples per bin side).
            grid_h = min(max(math.ceil(roi_height.item() / pooled_height), 0), _MAX_GRID)
            grid_w = min(max(math.ceil(roi_width.item() / pooled_width), 0), _MAX_GRID)

        # Top-left corner of every bin, [ph, pw], moved by the offsets.
        i = torch.arange(pooled_height, dtype=dtype, device=input.device)[:, None]
        j = torch.arange(pooled_width, dtype=dtype, device=input.device)[None, :]
        start_h = roi_start_h.expand(pooled_height, pooled_width)
        start_w = roi_start_w.expand(pooled_height, pooled_width)
        if offset is not None:
            start_w = start_w + gamma * roi_width * offset[k, 0].to(dtype)
            start_h = start_h + gamma * roi_height * offset[k, 1].to(dtype)
        top = start_h + i * bin_h
        left = start_w + j * bin_w

        # Sample positions [ph, pw, grid_h, grid_w] and the mean over the grid.
        iy = torch.arange(grid_h, dtype=dtype, device=input.device)
        ix = torch.arange(grid_w, dtype=dtype, device=input.device)
        y = top[:, :, None, None] + ((iy + 0.5) * bin_h / grid_h)[:, None]
        x = left[:, :, None, None] + ((ix + 0.5) * bin_w / grid_w)[None, :]
        samples = _bilinear(features[int(batch)], y, x)  # [C, ph, pw, grid_h, grid_w]
        value = samples.sum(dim=(-1, -2)) / max(grid_h * grid_w, 1)
        if mask is not None:
            value = value * mask[k, 0].to(dtype)
        outputs.append(value)
    if not outputs:
        # No RoI: an empty result that still belongs to the graph (its gradient is zero).
        return input.new_zeros((0, input.shape[1], pooled_height, pooled_width)) + input.flatten()[:0].sum()
    return torch.stack(outputs).to(input.dtype)
