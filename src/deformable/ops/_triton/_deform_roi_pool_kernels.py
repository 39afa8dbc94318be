"""Triton kernels of (modulated) deformable RoI pooling; the launch code is in ``deform_roi_pool.py``.

One program per (RoI, bin): it owns that bin's output for every channel, and in the backward pass
that bin's offset and mask gradients (plain stores, no atomics). Samples are read from a
channels-last copy of the feature map, so each bilinear corner is one contiguous channel vector.
The arithmetic follows ``_roi_aten._plan`` (roi_align's order of operations) in ``CT``: float32, or
float64 for float64 inputs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bin_geometry(
    rois_ptr, params_ptr, off_ptr, k, i, j, sampling_ratio, max_grid,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, HAS_OFFSET: tl.constexpr, CT: tl.constexpr,
):  # fmt: skip
    """Batch index, top-left corner of the moved bin, bin size, grid, and gamma * RoI size.

    ``params`` holds (spatial_scale, gamma) in CT, so that float64 runs are exact.
    """
    spatial_scale = tl.load(params_ptr)
    gamma = tl.load(params_ptr + 1)
    roi = rois_ptr + k * 5
    batch = tl.load(roi).to(CT)
    shift = 0.5 if ALIGNED else 0.0
    start_w = tl.load(roi + 1).to(CT) * spatial_scale - shift
    start_h = tl.load(roi + 2).to(CT) * spatial_scale - shift
    width = tl.load(roi + 3).to(CT) * spatial_scale - shift - start_w
    height = tl.load(roi + 4).to(CT) * spatial_scale - shift - start_h
    if not ALIGNED:
        width = tl.maximum(width, 1.0)
        height = tl.maximum(height, 1.0)
    bin_h = height / PH
    bin_w = width / PW
    # Adaptive grid: ceil(size / output size), NaN -> 0, clamped to [0, max_grid].
    adaptive_h = tl.ceil(height / PH)
    adaptive_w = tl.ceil(width / PW)
    adaptive_h = tl.minimum(tl.maximum(tl.where(adaptive_h == adaptive_h, adaptive_h, 0.0), 0.0), max_grid)
    adaptive_w = tl.minimum(tl.maximum(tl.where(adaptive_w == adaptive_w, adaptive_w, 0.0), 0.0), max_grid)
    grid_h = tl.where(sampling_ratio > 0, sampling_ratio, adaptive_h.to(tl.int32))
    grid_w = tl.where(sampling_ratio > 0, sampling_ratio, adaptive_w.to(tl.int32))
    shift_h = gamma * height
    shift_w = gamma * width
    if HAS_OFFSET:
        bin_index = (k * 2 * PH + i) * PW + j
        start_w = start_w + shift_w * tl.load(off_ptr + bin_index).to(CT)
        start_h = start_h + shift_h * tl.load(off_ptr + bin_index + PH * PW).to(CT)
    top = start_h + i * bin_h
    left = start_w + j * bin_w
    return batch.to(tl.int32), top, left, bin_h, bin_w, grid_h, grid_w, shift_h, shift_w


@triton.jit
def _axis(position, size, inside, CT: tl.constexpr):
    """roi_align's rule along one axis: low, high, fraction, and whether the clamped position follows."""
    p = tl.maximum(tl.where(inside, position, 0.0), 0.0)
    low = tl.minimum(p.to(tl.int32), size - 1)
    edge = low >= size - 1
    high = tl.where(edge, low, low + 1)
    frac = tl.where(edge, 0.0, p - low.to(CT))
    follows = inside & (p > 0) & (low < size - 1)
    return low, high, frac, follows


@triton.jit
def _corner_rows(n, y_low, y_high, x_low, x_high, H, W, INDEX64: tl.constexpr):
    """Row numbers (pixels) of the four corners in the [N*H*W, C] channels-last table."""
    if INDEX64:
        n = n.to(tl.int64)
    top = (n * H + y_low) * W
    bottom = (n * H + y_high) * W
    return top + x_low, top + x_high, bottom + x_low, bottom + x_high


@triton.jit(do_not_specialize=["N", "H", "W", "sampling_ratio"])
def deform_roi_pool_fwd_kernel(
    x_ptr, rois_ptr, params_ptr, off_ptr, mask_ptr, out_ptr,
    N, H, W, C, sampling_ratio, max_grid,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, HAS_OFFSET: tl.constexpr,
    HAS_MASK: tl.constexpr, CT: tl.constexpr, INDEX64: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[k, :, i, j] = mask * mean over the bin's grid of bilinear(x[batch_k], y, x).

    x: [N, H, W, C] channels-last; rois [K, 5]; offset [K, 2, PH, PW]; mask [K, 1, PH, PW];
    out [K, C, PH, PW]. Grid: (K * PH * PW,).
    """
    pid = tl.program_id(0)
    if INDEX64:
        pid = pid.to(tl.int64)
    k = pid // (PH * PW)
    i = (pid // PW) % PH
    j = pid % PW
    n, top, left, bin_h, bin_w, grid_h, grid_w, _shift_h, _shift_w = _bin_geometry(
        rois_ptr, params_ptr, off_ptr, k, i, j, sampling_ratio, max_grid, PH, PW, ALIGNED, HAS_OFFSET, CT
    )
    scale = 1.0 / tl.maximum(grid_h * grid_w, 1).to(CT)
    if HAS_MASK:
        scale = scale * tl.load(mask_ptr + (k * PH + i) * PW + j).to(CT)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        acc = tl.zeros([BLOCK_C], dtype=CT)
        for iy in range(0, grid_h):
            y = top + (iy + 0.5) * bin_h / grid_h
            for ix in range(0, grid_w):
                x = left + (ix + 0.5) * bin_w / grid_w
                inside = (y >= -1.0) & (y <= H) & (x >= -1.0) & (x <= W)
                y_low, y_high, ly, _follows_y = _axis(y, H, inside, CT)
                x_low, x_high, lx, _follows_x = _axis(x, W, inside, CT)
                r00, r01, r10, r11 = _corner_rows(n, y_low, y_high, x_low, x_high, H, W, INDEX64)
                f00 = tl.load(x_ptr + r00 * C + cols, mask=cmask, other=0.0).to(CT)
                f01 = tl.load(x_ptr + r01 * C + cols, mask=cmask, other=0.0).to(CT)
                f10 = tl.load(x_ptr + r10 * C + cols, mask=cmask, other=0.0).to(CT)
                f11 = tl.load(x_ptr + r11 * C + cols, mask=cmask, other=0.0).to(CT)
                value = (1.0 - ly) * ((1.0 - lx) * f00 + lx * f01) + ly * ((1.0 - lx) * f10 + lx * f11)
                value = tl.where(inside, value, 0.0)
                # A NaN position (from a NaN offset) makes its bin NaN.
                acc += tl.where((y != y) | (x != x), float("nan"), value)
        out_index = ((k * C + cols) * PH + i) * PW + j
        tl.store(out_ptr + out_index, (acc * scale).to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit(do_not_specialize=["N", "H", "W", "sampling_ratio"])
def deform_roi_pool_bwd_kernel(
    x_ptr, rois_ptr, params_ptr, off_ptr, mask_ptr, go_ptr, gx_ptr, goff_ptr, gmask_ptr,
    N, H, W, C, sampling_ratio, max_grid,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, HAS_OFFSET: tl.constexpr,
    HAS_MASK: tl.constexpr, NEED_INPUT: tl.constexpr, NEED_OFFSET: tl.constexpr, NEED_MASK: tl.constexpr,
    CT: tl.constexpr, INDEX64: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Gradients of one (RoI, bin): scattered into gx [N, H, W, C] (CT, atomics), and the bin's own
    offset [K, 2, PH, PW] and mask [K, 1, PH, PW] gradients (plain stores). Grid: (K * PH * PW,)."""
    pid = tl.program_id(0)
    if INDEX64:
        pid = pid.to(tl.int64)
    k = pid // (PH * PW)
    i = (pid // PW) % PH
    j = pid % PW
    n, top, left, bin_h, bin_w, grid_h, grid_w, shift_h, shift_w = _bin_geometry(
        rois_ptr, params_ptr, off_ptr, k, i, j, sampling_ratio, max_grid, PH, PW, ALIGNED, HAS_OFFSET, CT
    )
    inv_count = 1.0 / tl.maximum(grid_h * grid_w, 1).to(CT)
    bin_mask = 1.0
    if HAS_MASK:
        bin_mask = tl.load(mask_ptr + (k * PH + i) * PW + j).to(CT)
    scale = inv_count * bin_mask
    dot_value = tl.zeros([BLOCK_C], dtype=CT)  # sum over samples of g * value (for the mask)
    dot_dy = tl.zeros([BLOCK_C], dtype=CT)  # sum over samples of g * d value / d y
    dot_dx = tl.zeros([BLOCK_C], dtype=CT)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        g = tl.load(go_ptr + ((k * C + cols) * PH + i) * PW + j, mask=cmask, other=0.0).to(CT)
        for iy in range(0, grid_h):
            y = top + (iy + 0.5) * bin_h / grid_h
            for ix in range(0, grid_w):
                x = left + (ix + 0.5) * bin_w / grid_w
                inside = (y >= -1.0) & (y <= H) & (x >= -1.0) & (x <= W)
                nan = (y != y) | (x != x)
                y_low, y_high, ly, follows_y = _axis(y, H, inside, CT)
                x_low, x_high, lx, follows_x = _axis(x, W, inside, CT)
                hy = 1.0 - ly
                hx = 1.0 - lx
                r00, r01, r10, r11 = _corner_rows(n, y_low, y_high, x_low, x_high, H, W, INDEX64)
                if NEED_INPUT:
                    # NaN positions scatter nothing (their samples are parked on pixel 0).
                    gs = g * tl.where(inside & ~nan, scale, 0.0)
                    tl.atomic_add(gx_ptr + r00 * C + cols, gs * (hy * hx), mask=cmask)
                    tl.atomic_add(gx_ptr + r01 * C + cols, gs * (hy * lx), mask=cmask)
                    tl.atomic_add(gx_ptr + r10 * C + cols, gs * (ly * hx), mask=cmask)
                    tl.atomic_add(gx_ptr + r11 * C + cols, gs * (ly * lx), mask=cmask)
                if NEED_OFFSET or NEED_MASK:
                    f00 = tl.load(x_ptr + r00 * C + cols, mask=cmask, other=0.0).to(CT)
                    f01 = tl.load(x_ptr + r01 * C + cols, mask=cmask, other=0.0).to(CT)
                    f10 = tl.load(x_ptr + r10 * C + cols, mask=cmask, other=0.0).to(CT)
                    f11 = tl.load(x_ptr + r11 * C + cols, mask=cmask, other=0.0).to(CT)
                    weight = tl.where(nan, float("nan"), tl.where(inside, 1.0, 0.0))
                    if NEED_MASK:
                        value = hy * (hx * f00 + lx * f01) + ly * (hx * f10 + lx * f11)
                        dot_value += g * (weight * value)
                    if NEED_OFFSET:
                        d_y = hx * (f10 - f00) + lx * (f11 - f01)
                        d_x = hy * (f01 - f00) + ly * (f11 - f10)
                        dot_dy += g * (weight * tl.where(follows_y, 1.0, 0.0) * d_y)
                        dot_dx += g * (weight * tl.where(follows_x, 1.0, 0.0) * d_x)
    if NEED_MASK:
        tl.store(
            gmask_ptr + (k * PH + i) * PW + j,
            (tl.sum(dot_value, 0) * inv_count).to(gmask_ptr.dtype.element_ty),
        )
    if NEED_OFFSET:
        bin_index = (k * 2 * PH + i) * PW + j
        tl.store(goff_ptr + bin_index, (tl.sum(dot_dx, 0) * scale * shift_w).to(goff_ptr.dtype.element_ty))
        tl.store(
            goff_ptr + bin_index + PH * PW,
            (tl.sum(dot_dy, 0) * scale * shift_h).to(goff_ptr.dtype.element_ty),
        )
