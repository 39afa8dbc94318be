"""Fast vectorised (modulated) deformable RoI pooling built from ATen kernels, with its own backward.

The feature map is viewed as a table of rows, one row of ``C`` channels per pixel
(``[N*H*W, C]``, channels-last).  Every bilinear sample of every bin contributes four rows
(its four integer neighbours) with four weights, so a whole bin is one weighted bag of rows, and
the forward pass is a single :func:`torch.nn.functional.embedding_bag` over all bins:

    out[bin, :] = sum over the bin's samples s and corners c of  w[s, c] * table[idx[s, c], :]

``w`` carries the bilinear weight, ``1 / count`` of the bin and the mask.  The backward pass uses
the same plan (recomputed, never stored):

* ``grad_input`` is the transposed bag: the corners sorted (stably) by the pixel they read, then one
  ``embedding_bag`` over the rows of ``grad_output`` with one bag per pixel;
* the offset and mask gradients need, for every corner, ``d[s, c] = <grad_output[bin], table[idx]>``,
  which ATen computes without materialising the gathered rows
  (``_embedding_bag_per_sample_weights_backward``); they are then reduced per bin.

All reductions run in a fixed order, so the CPU path is bitwise repeatable.  Work is chunked over
RoIs so that the temporaries stay under the ``aten`` memory budget (``set_memory_budget``).  fp16 and
bf16 features are computed in fp32 and the result cast back.

Sampling follows ``torchvision.ops.roi_align`` exactly: bins, the adaptive grid
``ceil(roi_size / output_size)``, and its bilinear rule (a sample with ``y < -1``, ``y > H``,
``x < -1`` or ``x > W`` is 0; otherwise ``y <= 0`` reads row 0 and ``y >= H - 1`` reads row ``H - 1``).
A bin is moved by ``gamma * offset * (roi_width, roi_height)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._aten import get_memory_budget

# Temporaries per planned sample at the backward's peak: four int64 corner indices, their weights, the
# sort of the corners by pixel, positions and bookkeeping.  A chunk plans at most
# memory_budget / _BYTES_PER_SAMPLE samples (the budget deform_conv2d's aten path uses too).
_BYTES_PER_SAMPLE = 320
# Upper bound of the adaptive grid per side: keeps absurd RoIs (e.g. 1e9 pixels wide) from asking
# for more samples than memory holds.  Realistic RoIs need a few samples per side.
_MAX_GRID = 1 << 12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: float64 stays, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class _RoiGeometry:
    """Per-RoI quantities, exactly as roi_align computes them (all [K])."""

    batch: Tensor  # int64 batch index (clamped into range; the public op validates it)
    start_h: Tensor
    start_w: Tensor
    height: Tensor  # RoI height in feature-map units (clamped >= 1 when not aligned)
    width: Tensor
    bin_h: Tensor
    bin_w: Tensor
    grid_h: Tensor  # int64 samples per bin side (>= 0)
    grid_w: Tensor


def roi_geometry(
    rois: Tensor,
    batch_size: int,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    dtype: torch.dtype,
) -> _RoiGeometry:
    """Start, size, bin size and sampling grid of every RoI, in the order of operations roi_align uses."""
    rois = rois.detach().to(dtype)
    shift = 0.5 if aligned else 0.0
    start_w = rois[:, 1] * spatial_scale - shift
    start_h = rois[:, 2] * spatial_scale - shift
    width = rois[:, 3] * spatial_scale - shift - start_w
    height = rois[:, 4] * spatial_scale - shift - start_h
    if not aligned:
        width = width.clamp(min=1.0)
        height = height.clamp(min=1.0)
    bin_h = height / pooled_height
    bin_w = width / pooled_width
    if sampling_ratio > 0:
        grid_h = torch.full_like(rois[:, 0], sampling_ratio, dtype=torch.int64)
        grid_w = grid_h
    else:
        # NaN or infinite sizes (rejected by the public op) become an empty grid here.
        grid_h = torch.ceil(height / pooled_height).nan_to_num(0.0, 0.0, 0.0).clamp(0, _MAX_GRID).long()
        grid_w = torch.ceil(width / pooled_width).nan_to_num(0.0, 0.0, 0.0).clamp(0, _MAX_GRID).long()
    batch = rois[:, 0].nan_to_num(0.0).clamp(0, max(batch_size - 1, 0)).long()
    return _RoiGeometry(batch, start_h, start_w, height, width, bin_h, bin_w, grid_h, grid_w)


def _chunks(samples_per_roi: Tensor) -> list[tuple[int, int]]:
    """Split RoIs [0, K) into consecutive ranges that fit the memory budget (at least one RoI each)."""
    limit = max(1, get_memory_budget() // _BYTES_PER_SAMPLE)
    counts = samples_per_roi.tolist()
    ranges, start, total = [], 0, 0
    for k, n in enumerate(counts):
        if k > start and total + n > limit:
            ranges.append((start, k))
            start, total = k, 0
        total += n
    if start < len(counts):
        ranges.append((start, len(counts)))
    return ranges


@dataclass
class _Plan:
    """Every bilinear sample of one chunk of RoIs, ordered bin by bin, sample by sample.

    The four corners of a sample factor into rows x columns: ``index[s] = rows[s, i] + cols[s, j]`` and
    ``weight[s] = scale[s] * wy[s, i] * wx[s, j]`` for ``(i, j)`` in (low, high)^2, flattened to 4 entries.
    """

    index: Tensor  # [T, 4] int64 rows of the [N*H*W, C] table
    wy: Tensor  # [T, 2] (1 - ly, ly)
    wx: Tensor  # [T, 2] (1 - lx, lx)
    scale: Tensor  # [T] 1 / count inside the map, 0 outside, NaN for NaN positions (no mask)
    bag_offsets: Tensor  # [B] start of each bin's bag in index.view(-1)
    sample_offsets: Tensor  # [B] start of each bin's samples in [T]
    sample_bin: Tensor  # [T] bin (0 <= bin < B) of each sample
    dy: Tensor | None  # [T] d y / d offset_y where the clamped position follows y, else 0 (with grads)
    dx: Tensor | None

    def weight(self, mask_samples: Tensor | None, nan_positions_as_zero: bool = False) -> Tensor:
        """[T * 4] corner weights, the mask (per sample) included.

        ``nan_positions_as_zero`` gives NaN positions weight 0 instead of NaN: the input gradient uses
        it, so that a NaN offset does not spill NaN into the pixel its samples are parked on.
        """
        scale = torch.nan_to_num(self.scale, nan=0.0) if nan_positions_as_zero else self.scale
        scale = scale if mask_samples is None else scale * mask_samples
        return ((self.wy * scale[:, None])[:, :, None] * self.wx[:, None, :]).reshape(-1)


def _segment_ids(ends: Tensor, total: int) -> Tensor:
    """[total] segment number of every element, given the cumulative (exclusive) ends of the segments.

    What ``repeat_interleave(arange(len(ends)), lengths)`` computes, but deterministic on every device
    and without the parallel region ATen's CPU ``repeat_interleave`` opens even for tiny inputs.
    """
    return torch.searchsorted(ends, torch.arange(total, device=ends.device), right=True)


def _axis(position: Tensor, size: int, dtype: torch.dtype):
    """roi_align's rule along one axis, for positions already known to lie in [-1, size]."""
    position = position.clamp(min=0.0)
    low = position.long().clamp(max=size - 1)
    edge = low >= size - 1
    high = torch.where(edge, low, low + 1)
    frac = torch.where(edge, 0.0, position - low.to(dtype))
    follows = (position > 0) & ~edge  # where the clamped position moves with the sample
    return low, high, torch.stack((1.0 - frac, frac), dim=1), follows


def _plan(
    geo: _RoiGeometry,
    k0: int,
    k1: int,
    offset: Tensor | None,
    height: int,
    width: int,
    pooled_height: int,
    pooled_width: int,
    gamma: float,
    dtype: torch.dtype,
    with_position_grads: bool,
) -> _Plan:
    """Build the corner indices and weights of RoIs [k0, k1)."""
    device = geo.batch.device
    bins = pooled_height * pooled_width
    grid_h, grid_w = geo.grid_h[k0:k1], geo.grid_w[k0:k1]
    per_bin = grid_h * grid_w
    num_rois = k1 - k0
    per_roi = per_bin * bins
    total = int(per_roi.sum())
    roi_end = torch.cumsum(per_roi, 0)
    roi_first = roi_end - per_roi

    # Per bin: where its samples start and the top-left corner of the (shifted) bin.
    bin_ids = torch.arange(bins, device=device)
    sample_offsets = (roi_first[:, None] + bin_ids[None, :] * per_bin[:, None]).reshape(-1)
    py = (bin_ids // pooled_width).to(dtype)
    px = (bin_ids % pooled_width).to(dtype)
    start_h = geo.start_h[k0:k1, None]
    start_w = geo.start_w[k0:k1, None]
    if offset is not None:
        off = offset[k0:k1].detach().to(dtype).reshape(num_rois, 2, bins)
        start_w = start_w + gamma * geo.width[k0:k1, None] * off[:, 0]
        start_h = start_h + gamma * geo.height[k0:k1, None] * off[:, 1]
    bin_y0 = (start_h + py[None, :] * geo.bin_h[k0:k1, None]).reshape(-1)  # [B]
    bin_x0 = (start_w + px[None, :] * geo.bin_w[k0:k1, None]).reshape(-1)

    # Per-RoI values every sample needs, gathered in two passes (integers, floats).
    per_roi_int = torch.stack((roi_first, per_bin, grid_w, geo.batch[k0:k1] * (height * width)), dim=1)
    per_roi_float = torch.stack(
        (
            geo.bin_h[k0:k1],
            grid_h.to(dtype),
            geo.bin_w[k0:k1],
            grid_w.to(dtype),
            1.0 / per_bin.clamp(min=1).to(dtype),
            gamma * geo.height[k0:k1],
            gamma * geo.width[k0:k1],
        ),
        dim=1,
    )

    # Per sample: its RoI, bin and grid cell (iy, ix).
    roi = _segment_ids(roi_end, total)
    first, n, gw, base = per_roi_int.index_select(0, roi).unbind(1)
    bin_h, gh_f, bin_w, gw_f, inv_count, shift_h, shift_w = per_roi_float.index_select(0, roi).unbind(1)
    local = torch.arange(total, device=device) - first
    bin_in_roi = local // n
    cell = local - bin_in_roi * n
    iy = cell // gw
    ix = cell - iy * gw
    sample_bin = roi * bins + bin_in_roi
    # Same order of operations as roi_align: start + p * bin + (i + 0.5) * bin / grid.
    y = bin_y0.index_select(0, sample_bin) + (iy.to(dtype) + 0.5) * bin_h / gh_f
    x = bin_x0.index_select(0, sample_bin) + (ix.to(dtype) + 0.5) * bin_w / gw_f

    # roi_align's bilinear rule; positions outside (or NaN) are parked at 0 with weight 0 (or NaN).
    nan = torch.isnan(y) | torch.isnan(x)
    inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    y_low, y_high, wy, follows_y = _axis(torch.where(inside, y, 0.0), height, dtype)
    x_low, x_high, wx, follows_x = _axis(torch.where(inside, x, 0.0), width, dtype)
    scale = torch.where(inside, inv_count, 0.0)
    scale = torch.where(nan, torch.nan, scale)
    rows = torch.stack((y_low, y_high), dim=1) * width + base[:, None]
    cols = torch.stack((x_low, x_high), dim=1)
    index = (rows[:, :, None] + cols[:, None, :]).reshape(total, 4)

    dy = dx = None
    if with_position_grads:
        dy = follows_y.to(dtype) * shift_h
        dx = follows_x.to(dtype) * shift_w
    return _Plan(index, wy, wx, scale, sample_offsets * 4, sample_offsets, sample_bin, dy, dx)


def _table(input: Tensor, dtype: torch.dtype) -> Tensor:
    """The feature map as [N*H*W, C] rows (a view when it already is channels-last in ``dtype``)."""
    n, c, h, w = input.shape
    rows = input.detach().to(dtype=dtype, memory_format=torch.channels_last).permute(0, 2, 3, 1)
    return rows.reshape(n * h * w, c).contiguous()


def _segment_sum(values: Tensor, offsets: Tensor) -> Tensor:
    """Sums of the consecutive segments of ``values`` [T, F] that start at ``offsets`` [B]: [B, F].

    An ``embedding_bag`` over the rows in order: deterministic, unlike a scatter-add on CUDA.
    """
    rows = torch.arange(values.shape[0], device=values.device)
    return F.embedding_bag(rows, values, offsets, mode="sum")


def _prepare(input, rois, pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned):
    dtype = compute_dtype(input.dtype)
    geo = roi_geometry(
        rois, input.shape[0], pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned, dtype
    )
    samples = geo.grid_h * geo.grid_w * (pooled_height * pooled_width)
    return dtype, geo, _chunks(samples)


def deform_roi_pool_forward(
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
    """Forward pass of the fast path; shapes as ``deform_roi_pool``. No autograd."""
    num_rois, channels, height, width = rois.shape[0], *input.shape[1:]
    if num_rois == 0 or channels == 0:
        return input.new_zeros((num_rois, channels, pooled_height, pooled_width))
    out = input.new_empty((num_rois, channels, pooled_height, pooled_width))  # every chunk is written
    dtype, geo, chunks = _prepare(
        input, rois, pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned
    )
    table = _table(input, dtype)
    for k0, k1 in chunks:
        plan = _plan(geo, k0, k1, offset, height, width, pooled_height, pooled_width, gamma, dtype, False)
        rows = F.embedding_bag(
            plan.index.view(-1),
            table,
            plan.bag_offsets,
            mode="sum",
            per_sample_weights=plan.weight(_mask_samples(mask, k0, k1, plan, dtype)),
        )
        out[k0:k1] = rows.view(k1 - k0, pooled_height, pooled_width, channels).permute(0, 3, 1, 2)
    return out


def grad_input_like(input: Tensor) -> Tensor:
    """An uninitialised tensor shaped like ``input`` with the channels-last strides the backward returns."""
    n, c, h, w = input.shape
    return input.new_empty((n, h, w, c)).permute(0, 3, 1, 2)


def deform_roi_pool_backward(
    grad_output: Tensor,
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
    need_input: bool,
    need_offset: bool,
    need_mask: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients w.r.t. input (channels-last strides), offset and mask; None where not needed."""
    batch, channels, height, width = input.shape
    num_rois = rois.shape[0]
    need_offset = need_offset and offset is not None
    need_mask = need_mask and mask is not None
    dtype = compute_dtype(input.dtype)
    grad_in = grad_off = grad_mask = None
    if need_offset:
        grad_off = torch.zeros((num_rois, 2, pooled_height, pooled_width), dtype=dtype, device=input.device)
    if need_mask:
        grad_mask = torch.zeros((num_rois, 1, pooled_height, pooled_width), dtype=dtype, device=input.device)
    if num_rois > 0 and channels > 0 and (need_input or need_offset or need_mask):
        dtype, geo, chunks = _prepare(
            input, rois, pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned
        )
        table = _table(input, dtype) if (need_offset or need_mask) else None
        for k0, k1 in chunks:
            plan = _plan(
                geo, k0, k1, offset, height, width, pooled_height, pooled_width, gamma, dtype, need_offset
            )
            grad_rows = grad_output[k0:k1].to(dtype).permute(0, 2, 3, 1).reshape(-1, channels).contiguous()
            mask_samples = _mask_samples(mask, k0, k1, plan, dtype)
            if need_input:
                weight = plan.weight(mask_samples, nan_positions_as_zero=True)
                chunk = _grad_table(grad_rows, plan, weight, batch * height * width)
                grad_in = chunk if grad_in is None else grad_in.add_(chunk)
            if need_offset or need_mask:
                assert table is not None  # built when the offset or mask needs its gradient
                _offset_mask_grads(grad_rows, table, plan, mask_samples, k0, k1, grad_off, grad_mask)
    if need_input:
        if grad_in is None:
            grad_in = input.new_zeros((batch * height * width, channels), dtype=dtype)
        grad_in = grad_in.view(batch, height, width, channels).permute(0, 3, 1, 2).to(input.dtype)
    if grad_off is not None and offset is not None:
        grad_off = grad_off.to(offset.dtype)
    if grad_mask is not None and mask is not None:
        grad_mask = grad_mask.to(mask.dtype)
    return grad_in, grad_off, grad_mask


def _mask_samples(mask: Tensor | None, k0: int, k1: int, plan: _Plan, dtype: torch.dtype) -> Tensor | None:
    """The mask value of every sample's bin, or None."""
    if mask is None:
        return None
    return mask[k0:k1].detach().to(dtype).reshape(-1).index_select(0, plan.sample_bin)


def _grad_table(grad_rows: Tensor, plan: _Plan, weight: Tensor, num_pixels: int) -> Tensor:
    """[num_pixels, C]: for every pixel, the sum of weight * grad_rows[bin] over the corners reading it.

    The transposed bag: corners sorted (stably) by pixel, then one embedding_bag over the rows of
    grad_output with one bag per pixel. Deterministic; nothing of size corners x channels is built.
    """
    index = plan.index.view(-1)
    sorted_index, order = torch.sort(index, stable=True)
    corner_bin = plan.sample_bin.index_select(0, torch.div(order, 4, rounding_mode="floor"))
    pixel_offsets = torch.searchsorted(sorted_index, torch.arange(num_pixels, device=index.device))
    return F.embedding_bag(
        corner_bin, grad_rows, pixel_offsets, mode="sum", per_sample_weights=weight.index_select(0, order)
    )


def _offset_mask_grads(
    grad_rows: Tensor,
    table: Tensor,
    plan: _Plan,
    mask_samples: Tensor | None,
    k0: int,
    k1: int,
    grad_off: Tensor | None,
    grad_mask: Tensor | None,
) -> None:
    """Per-bin offset and mask gradients of RoIs [k0, k1), written into ``grad_off`` / ``grad_mask``."""
    # contiguous: with one sample the reshape stays a stride-0 view, which the kernel refuses.
    corner_bin = plan.sample_bin[:, None].expand(-1, 4).reshape(-1).contiguous()
    # dots[s, i, j] = <grad_output[bin(s)], table[index[s, i, j]]> = d loss / d weight of the corner.
    dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_rows, table, plan.index.view(-1), plan.bag_offsets, corner_bin, 0
    ).view(-1, 2, 2)
    by_row = (dots * plan.wx[:, None, :]).sum(2)  # [T, 2]: low row, high row
    columns = []
    if grad_off is not None:
        assert plan.dx is not None and plan.dy is not None  # planned with need_offset
        by_col = (dots * plan.wy[:, :, None]).sum(1)  # [T, 2]: low column, high column
        scale = plan.scale if mask_samples is None else plan.scale * mask_samples
        columns.append(scale * plan.dx * (by_col[:, 1] - by_col[:, 0]))
        columns.append(scale * plan.dy * (by_row[:, 1] - by_row[:, 0]))
    if grad_mask is not None:
        columns.append(plan.scale * (by_row * plan.wy).sum(1))
    sums = _segment_sum(torch.stack(columns, dim=1), plan.sample_offsets)  # [bins, columns]
    sums = sums.view(k1 - k0, -1, len(columns)).transpose(1, 2)
    if grad_off is not None:
        grad_off[k0:k1] = sums[:, :2].reshape(grad_off[k0:k1].shape)
    if grad_mask is not None:
        grad_mask[k0:k1] = sums[:, -1:].reshape(grad_mask[k0:k1].shape)
