"""Deformable RoI pooling as standard ONNX ops, written once for both exporters.

Bin (i, j) of RoI k in a deformable pooling is roi_align of the bin-sized box that starts at the bin's
moved corner, so the whole op is one ``RoiAlign`` (opset 16+) with a 1x1 output over K*ph*pw boxes.
``coordinate_transformation_mode="half_pixel"`` with ``spatial_scale=1`` takes the boxes in feature-map
units without roi_align's clamping of the size to >= 1 (a bin may be smaller than a pixel). The
bilinear rule (roi_align's: clamp to the border, 0 beyond one pixel outside), the sample grid and the
average are RoiAlign's own, hence torchvision's.

``build`` takes an *emitter* ``op`` whose methods are ONNX op types (``op.Add(a, b)``,
``op.Gather(x, i, axis=1)``, ``op.Constant(value_ints=[...])``): ONNX Script's opset module for the
dynamo exporter, a small adapter around the TorchScript graph for the legacy one.
"""

from __future__ import annotations

# How far (in ulps of the box corners) an adaptive bin size is kept from an integer so that the
# runtime's rounding of the corners cannot change its sample count: the runtime's width
# (x2 - 0.5) - (x1 - 0.5), with x2 = x1 + size, is off by at most about 2 ulps.
_ULPS = 2.0


def build(
    op,
    input,
    rois,
    offset,
    mask,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    aligned: bool,
    double: bool,
):
    """``deformable::deform_roi_pool`` (arguments as the op's; ``double``: input is float64)."""
    ph, pw = int(pooled_height), int(pooled_width)

    def scalar(value):
        return op.CastLike(op.Constant(value_float=float(value)), input)

    def ints(*values):
        return op.Constant(value_ints=list(values))

    def column(index):  # column ``index`` of the RoIs as [K, 1, 1]
        return op.Unsqueeze(op.Gather(rois, ints(index), axis=1), ints(2))

    rois = op.CastLike(rois, input)
    scale, half = scalar(spatial_scale), scalar(0.5 if aligned else 0.0)

    # The RoI as roi_align sees it, in feature-map units, [K, 1, 1] each, in roi_align's order of operations.
    start_w = op.Sub(op.Mul(column(1), scale), half)
    start_h = op.Sub(op.Mul(column(2), scale), half)
    width = op.Sub(op.Sub(op.Mul(column(3), scale), half), start_w)
    height = op.Sub(op.Sub(op.Mul(column(4), scale), half), start_h)
    if not aligned:
        width, height = op.Max(width, scalar(1.0)), op.Max(height, scalar(1.0))
    bin_w, bin_h = op.Div(width, scalar(pw)), op.Div(height, scalar(ph))

    # Top-left corner of every bin, [K, ph, pw], moved by gamma * offset * roi size.
    left, top = start_w, start_h
    if offset is not None:
        offset = op.CastLike(offset, input)
        offset_x = op.Squeeze(op.Slice(offset, ints(0), ints(1), ints(1)), ints(1))  # [K, ph, pw]
        offset_y = op.Squeeze(op.Slice(offset, ints(1), ints(2), ints(1)), ints(1))
        left = op.Add(left, op.Mul(op.Mul(scalar(gamma), width), offset_x))
        top = op.Add(top, op.Mul(op.Mul(scalar(gamma), height), offset_y))
    cols = op.Reshape(op.CastLike(op.Range(*_range(op, pw)), input), ints(1, 1, pw))
    rows = op.Reshape(op.CastLike(op.Range(*_range(op, ph)), input), ints(1, ph, 1))
    left = op.Add(left, op.Mul(cols, bin_w))
    top = op.Add(top, op.Mul(rows, bin_h))
    shape = op.Shape(op.Add(left, top))  # [K, ph, pw]
    left, top = op.Expand(left, shape), op.Expand(top, shape)
    box_w, box_h = op.Expand(bin_w, shape), op.Expand(bin_h, shape)
    if sampling_ratio <= 0:
        # Adaptive: RoiAlign takes ceil(box size) samples per side, which must be roi_align's
        # ceil(roi size / output size). The runtime re-derives the size from the box corners with
        # rounding, so a size within a few ulps of an integer is nudged inside its interval, about
        # the bin's centre (the samples move by at most half the nudge).
        ulp = 2.0**-52 if double else 2.0**-23
        safe_w = _keep_ceil(op, box_w, left, ulp, scalar)
        safe_h = _keep_ceil(op, box_h, top, ulp, scalar)
        left = op.Add(left, op.Mul(op.Sub(box_w, safe_w), scalar(0.5)))
        top = op.Add(top, op.Mul(op.Sub(box_h, safe_h), scalar(0.5)))
        box_w, box_h = safe_w, safe_h
    x1 = op.Add(left, scalar(0.5))  # half_pixel mode subtracts 0.5 again
    y1 = op.Add(top, scalar(0.5))
    x2, y2 = op.Add(x1, box_w), op.Add(y1, box_h)
    corners = [op.Unsqueeze(c, ints(3)) for c in (x1, y1, x2, y2)]
    boxes = op.Reshape(op.Concat(*corners, axis=3), ints(-1, 4))
    batch = op.Cast(op.Reshape(op.Gather(rois, ints(0), axis=1), ints(-1)), to=7)  # int64 [K]
    batch = op.Reshape(op.Expand(op.Unsqueeze(batch, ints(1)), ints(1, ph * pw)), ints(-1))
    pooled = op.RoiAlign(
        input,
        boxes,
        batch,
        coordinate_transformation_mode="half_pixel",
        mode="avg",
        output_height=1,
        output_width=1,
        sampling_ratio=max(int(sampling_ratio), 0),
        spatial_scale=1.0,
    )  # [K*ph*pw, C, 1, 1]
    pooled = op.Transpose(op.Flatten(pooled, axis=1), perm=[1, 0])  # [C, K*ph*pw]
    pooled = op.Reshape(pooled, ints(0, -1, ph, pw))  # [C, K, ph, pw] (0: keep C)
    pooled = op.Transpose(pooled, perm=[1, 0, 2, 3])  # [K, C, ph, pw]
    if mask is not None:
        pooled = op.Mul(pooled, op.CastLike(mask, input))
    return pooled


def _range(op, stop: int):
    return op.Constant(value_int=0), op.Constant(value_int=stop), op.Constant(value_int=1)


def _keep_ceil(op, size, corner, ulp: float, scalar):
    """``size`` moved by at most a few ulps of the corner so that ceil(size) survives the runtime's
    rounding of the box corners: clamped into [ceil(size) - 1 + eps, ceil(size) - eps]."""
    magnitude = op.Add(op.Add(op.Abs(corner), op.Abs(size)), scalar(1.0))
    eps = op.Min(op.Mul(magnitude, scalar(_ULPS * ulp)), scalar(0.25))  # at most a quarter sample
    samples = op.Ceil(size)
    low = op.Add(op.Sub(samples, scalar(1.0)), eps)
    return op.Max(op.Min(size, op.Sub(samples, eps)), low)
