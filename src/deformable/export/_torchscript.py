"""Symbolic functions for the legacy TorchScript exporter (``torch.onnx.export(dynamo=False)``).

PyTorch deprecates this exporter in favour of the dynamo one but still ships it, and it is the one that
exports torchvision's detection models (whose NMS and box bookkeeping torch.export cannot capture):
registering these lets models traced with it export without extra steps too.
"""

from __future__ import annotations

import torch
from torch.onnx import symbolic_helper

from . import _roi_graph
from ._common import MIN_OPSET

__all__ = ["register"]


def _static_sizes(value, what: str) -> list[int]:
    sizes = symbolic_helper._get_tensor_sizes(value)
    if sizes is None:
        raise ValueError(f"deformable::deform_conv2d: ONNX DeformConv needs a known {what} shape")
    return sizes


def _deform_conv2d(g, input, offset, mask, weight, bias, stride, padding, dilation, backend):
    stride = symbolic_helper._parse_arg(stride, "is")
    padding = symbolic_helper._parse_arg(padding, "is")
    dilation = symbolic_helper._parse_arg(dilation, "is")
    in_channels = _static_sizes(input, "input")[1]
    out_channels, group_in, kh, kw = _static_sizes(weight, "weight")
    offset_channels = _static_sizes(offset, "offset")[1]
    if None in (in_channels, out_channels, group_in, kh, kw, offset_channels):
        raise ValueError("deformable::deform_conv2d: ONNX DeformConv needs static channel and kernel sizes")
    inputs = [input, weight, offset]
    has_bias = not symbolic_helper._is_none(bias)
    has_mask = not symbolic_helper._is_none(mask)
    if has_bias:
        inputs.append(bias)
    elif has_mask:  # the optional bias precedes the mask: a zero bias keeps the positions
        zeros = g.op("ConstantOfShape", g.op("Constant", value_t=torch.tensor([out_channels])))
        inputs.append(g.op("CastLike", zeros, input))
    if has_mask:
        inputs.append(mask)
    return g.op(
        "DeformConv",
        *inputs,
        dilations_i=list(dilation),
        group_i=in_channels // group_in,
        kernel_shape_i=[kh, kw],
        offset_group_i=offset_channels // (2 * kh * kw),
        pads_i=[padding[0], padding[1], padding[0], padding[1]],  # [top, left, bottom, right]
        strides_i=list(stride),
    )


class _Emitter:
    """ONNX ops as methods on a TorchScript graph, for :func:`._roi_graph.build`."""

    def __init__(self, g) -> None:
        self._g = g

    def Constant(self, value_ints=None, value_int=None, value_float=None):
        if value_ints is not None:
            value = torch.tensor(value_ints, dtype=torch.int64)
        elif value_int is not None:
            value = torch.tensor(value_int, dtype=torch.int64)
        else:
            value = torch.tensor(value_float, dtype=torch.float32)
        return self._g.op("Constant", value_t=value)

    def __getattr__(self, op_type: str):
        def emit(*inputs, **attributes):
            return self._g.op(op_type, *inputs, **{_attribute_name(k, v): v for k, v in attributes.items()})

        return emit


def _attribute_name(name: str, value) -> str:
    sample = value[0] if isinstance(value, (list, tuple)) and value else value
    if isinstance(sample, str):
        return f"{name}_s"
    if isinstance(sample, float):
        return f"{name}_f"
    return f"{name}_i"


def _deform_roi_pool(
    g, input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma, aligned,
    backend=None,
):  # fmt: skip
    # ``backend`` picks the PyTorch implementation; the ONNX graph is the same for every backend.
    parse = symbolic_helper._parse_arg
    return _roi_graph.build(
        _Emitter(g),
        input,
        rois,
        None if symbolic_helper._is_none(offset) else offset,
        None if symbolic_helper._is_none(mask) else mask,
        parse(pooled_height, "i"),
        parse(pooled_width, "i"),
        parse(spatial_scale, "f"),
        parse(sampling_ratio, "i"),
        parse(gamma, "f"),
        bool(parse(aligned, "b")),
        input.type().scalarType() == "Double",
    )


_SYMBOLICS = {
    "deformable::deform_conv2d": _deform_conv2d,
    "deformable::deform_roi_pool": _deform_roi_pool,
}


def register() -> bool:
    """Register the symbolics with ``torch.onnx.register_custom_op_symbolic``; False if torch lacks it."""
    register_symbolic = getattr(torch.onnx, "register_custom_op_symbolic", None)
    if register_symbolic is None:
        return False
    for name, symbolic in _SYMBOLICS.items():
        register_symbolic(name, symbolic, MIN_OPSET)
    return True
