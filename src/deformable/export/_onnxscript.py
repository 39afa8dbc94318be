"""ONNX translations of the deformable custom ops for the dynamo exporter (torch.onnx.export(dynamo=True)).

Each function is an ONNX Script *trace-only* function: the exporter calls it with the graph values of
the op's arguments (named as in the op's schema) and it emits standard ``ai.onnx`` nodes.

* ``deformable::deform_conv2d`` -> one ``DeformConv`` (opset 19+). The layouts agree with ours
  (torchvision's): offset ``[N, G*kh*kw*2, oH, oW]`` as (y, x) pairs, group-major then kernel
  row-major; mask ``[N, G*kh*kw, oH, oW]``; input channel c in offset group ``c // (C / G)``; samples
  outside the map read 0 (bilinear, zero padding).
* ``deformable::deform_roi_pool`` -> ``RoiAlign`` (opset 16+) with a 1x1 output over one box per
  (RoI, bin), built by :mod:`._roi_graph`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnxscript
from onnxscript import opset19 as op

from . import _roi_graph


def _static_dim(value, axis: int, what: str) -> int:
    dim = value.shape[axis] if value.shape is not None else None
    if not isinstance(dim, int):
        raise ValueError(
            f"deformable::deform_conv2d: ONNX DeformConv needs a static {what} (axis {axis}), got {dim!r}"
        )
    return dim


def deform_conv2d(
    input,
    offset,
    mask,
    weight,
    bias,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
):
    """``deformable::deform_conv2d`` as ONNX ``DeformConv`` (``backend`` has no meaning in ONNX)."""
    in_channels = _static_dim(input, 1, "number of input channels")
    group_in = _static_dim(weight, 1, "weight.shape[1]")
    kh, kw = _static_dim(weight, 2, "kernel height"), _static_dim(weight, 3, "kernel width")
    offset_channels = _static_dim(offset, 1, "number of offset channels")
    pad_h, pad_w = int(padding[0]), int(padding[1])
    return op.DeformConv(
        input,
        weight,
        offset,
        bias,
        mask,
        dilations=[int(d) for d in dilation],
        group=in_channels // group_in,
        kernel_shape=[kh, kw],
        offset_group=offset_channels // (2 * kh * kw),
        pads=[pad_h, pad_w, pad_h, pad_w],  # ONNX: [top, left, bottom, right]
        strides=[int(s) for s in stride],
    )


def deform_roi_pool(
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
    backend: str = "aten",
):
    """``deformable::deform_roi_pool`` as ``RoiAlign`` over the K*ph*pw moved bins (see ``_roi_graph``);
    ``backend`` picks the PyTorch implementation and does not change the graph."""
    double = getattr(input.dtype, "name", "") == "DOUBLE"
    return _roi_graph.build(
        op, input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma,
        aligned, double,
    )  # fmt: skip


#: qualified op name -> translation
TRANSLATIONS: dict[str, Callable[..., object]] = {
    "deformable::deform_conv2d": deform_conv2d,
    "deformable::deform_roi_pool": deform_roi_pool,
}


def traced(function):
    """``function`` as an ONNX Script trace-only function (what the exporter's tables hold)."""
    return onnxscript.TracedOnnxFunction(op, function)
