"""``deform_conv2d``: deformable convolution v1 (no mask) and v2 (modulated), any device.

The public function validates its arguments, applies autocast, picks a backend and calls either the
readable reference (plain PyTorch, autograd) or the backend's forward/backward. Those are reached in
one of two ways that run the same code: the custom op ``deformable::deform_conv2d``, whose forward
and backward are themselves custom ops with fake kernels, so ``torch.compile(fullgraph=True)``,
export and tracing see one op; and, in plain eager mode, an ``autograd.Function`` that calls the
backend directly. The second exists for speed: the custom-op dispatcher costs tens of microseconds
per call in Python, which on a GPU is more than the kernels of a small convolution take.

A backward run with ``create_graph=True`` (double backward) recomputes the op with the reference and
differentiates that instead of calling the backend's backward (:mod:`._double_backward`).

Under torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, hessian, vmap and their compositions) a
third route applies (:mod:`._func_route`): the custom op (batched under vmap by its own rule: one call
for vmapped inputs) differentiated as the reference is.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import numbers
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import _aten
from ._backend import resolve_backend
from ._double_backward import builds_graph, gradients_with_graph
from ._func_route import make_transformable, under_torch_func, vmapped_first, vmapped_folded
from ._layout import memory_format_of
from ._reference import deform_conv2d_reference

IntPair = int | tuple[int, int]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.cache  # called twice per forward+backward: an import lookup costs microseconds
def _implementation(backend: str):
    """The module holding ``forward``/``backward`` of a custom-op backend."""
    if backend == "aten":
        return _aten
    if backend == "triton":
        return importlib.import_module("deformable.ops._triton.deform_conv")
    raise ValueError(f"backend must be 'aten' or 'triton' inside the custom op, got {backend!r}")


# --------------------------------------------------------------------------------------------------
# Validation


def _is_integer(value) -> bool:
    """An int, or an integer of another kind (numpy's) as ``F.conv2d`` accepts; never a bool."""
    return type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    if type(value) is int and value >= minimum:  # the usual case, first
        return value, value
    if _is_integer(value):
        value = (int(value), int(value))
    elif isinstance(value, Sequence) and not isinstance(value, str):
        value = tuple(value)
        if len(value) != 2 or not all(_is_integer(v) for v in value):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        value = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        expected = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def _check_tensor(t, name: str, ndim: int, like: Tensor | None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} must be on the input's device {like.device}, got {t.device}")
        if t.dtype != like.dtype:
            raise TypeError(f"{name} must have the input's dtype {like.dtype}, got {t.dtype}")


def check_output_size(
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """The output's (height, width) for an input of spatial ``size``; a ValueError if it is empty."""
    out_h = (size[0] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (size[1] + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"the output would be empty: input spatial size {tuple(size)} with kernel {tuple(kernel)}, "
            f"stride {stride}, padding {padding}, dilation {dilation} gives {(out_h, out_w)}"
        )
    return out_h, out_w


def _tensors_agree(input, offset, weight, bias, mask) -> bool:
    """Whether the tensor arguments pass :func:`_check_tensor`, decided in one expression: the usual
    case, so that a valid call pays for the per-argument checks (which name the culprit) only when
    something is wrong."""
    if not (isinstance(input, Tensor) and isinstance(offset, Tensor) and isinstance(weight, Tensor)):
        return False
    dtype, device = input.dtype, input.device
    return (
        dtype in _FLOAT_DTYPES
        and input.dim() == 4 and offset.dim() == 4 and weight.dim() == 4
        and offset.dtype == dtype and weight.dtype == dtype
        and offset.device == device and weight.device == device
        and (mask is None or (
            isinstance(mask, Tensor) and mask.dim() == 4 and mask.dtype == dtype and mask.device == device
        ))
        and (bias is None or (
            isinstance(bias, Tensor) and bias.dim() == 1 and bias.dtype == dtype and bias.device == device
        ))
    )  # fmt: skip


def _validate(
    input, offset, weight, bias, stride, padding, dilation, mask
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Check every argument; return (stride, padding, dilation) as pairs."""
    tensors_checked = _tensors_agree(input, offset, weight, bias, mask)
    if not tensors_checked:
        _check_tensor(input, "input", 4, None)
        _check_tensor(offset, "offset", 4, input)
        _check_tensor(weight, "weight", 4, input)
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)

    batch, in_channels, height, width = input.shape
    out_channels, group_in, kh, kw = weight.shape
    if in_channels == 0:
        raise ValueError(f"input must have at least one channel, got shape {tuple(input.shape)}")
    if kh == 0 or kw == 0 or group_in == 0:
        raise ValueError(
            f"weight must have non-zero input channels and kernel size, got {tuple(weight.shape)}"
        )
    if in_channels % group_in:
        raise ValueError(
            f"input channels ({in_channels}) must be divisible by weight.shape[1] ({group_in}), "
            f"the input channels per weight group"
        )
    groups = in_channels // group_in
    if out_channels % groups:
        raise ValueError(
            f"weight.shape[0] ({out_channels}) must be divisible by the weight groups ({groups})"
        )
    out_h, out_w = check_output_size((height, width), (kh, kw), stride, padding, dilation)
    kernel = kh * kw
    offset_batch, offset_channels, offset_h, offset_w = offset.shape
    if offset_batch != batch:
        raise ValueError(f"offset batch size must equal the input's ({batch}), got {offset_batch}")
    if offset_channels == 0 or offset_channels % (2 * kernel):
        raise ValueError(
            f"offset channels must be a positive multiple of 2*kh*kw = {2 * kernel}, got {offset_channels}"
        )
    offset_groups = offset_channels // (2 * kernel)
    if in_channels % offset_groups:
        raise ValueError(
            f"input channels ({in_channels}) must be divisible by the offset groups ({offset_groups} = "
            f"offset channels {offset_channels} / (2*{kh}*{kw}))"
        )
    if offset_h != out_h or offset_w != out_w:
        raise ValueError(
            f"offset spatial size must be the output size {(out_h, out_w)}, got {(offset_h, offset_w)}"
        )
    if mask is not None:
        if not tensors_checked:
            _check_tensor(mask, "mask", 4, input)
        expected = (batch, offset_groups * kernel, out_h, out_w)
        if mask.shape != expected:  # a torch.Size is a tuple
            raise ValueError(
                f"mask must have shape {expected} (offset groups * kh * kw channels), got {tuple(mask.shape)}"
            )
    if bias is not None:
        if not tensors_checked:
            _check_tensor(bias, "bias", 1, input)
        if bias.shape[0] != out_channels:
            raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
    return stride, padding, dilation


# --------------------------------------------------------------------------------------------------
# Custom ops


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for device types autocast does not know
    (``meta``, for shape inference), where PyTorch raises instead."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _no_autocast(t: Tensor):
    """Implementations choose their own precisions: autocast must not recast their inner ops."""
    if not autocast_enabled(t.device.type):
        return contextlib.nullcontext()  # entering torch.autocast costs microseconds per call
    return torch.autocast(t.device.type, enabled=False)


# What both routes (the custom ops and the eager autograd.Function) run.


# The routes through a backend's own backward return the output and the gradients in the memory
# format of their tensors (memory_format_of: channels_last or contiguous), whatever the backend; the
# fake kernels say the same. (Under torch.func, and on the reference backend, autograd's gradients.)


def _in_format_of(t: Tensor, like: Tensor) -> Tensor:
    if t.is_contiguous() and like.is_contiguous():  # the usual case, in two calls
        return t
    return t.contiguous(memory_format=memory_format_of(like))


def _grads_in_formats(grads, tensors) -> list:
    """Each gradient (None where not computed) in the memory format of its tensor."""
    return [g if g is None or t is None else _in_format_of(g, t) for g, t in zip(grads, tensors, strict=True)]


@functools.cache
def _keeps_formats(backend: str) -> bool:
    """Whether the backend returns the output and gradients in their tensors' memory formats itself
    (``RESULTS_IN_FORMATS``: the Triton backend), so that the routes need not check them."""
    return getattr(_implementation(backend), "RESULTS_IN_FORMATS", False)


def _call_without_autocast(t: Tensor, fn, *args):
    """``fn(*args)`` with autocast off on ``t``'s device type, as :func:`_no_autocast` does for a
    block, but entering no context at all where autocast is off (a context costs microseconds)."""
    if autocast_enabled(t.device.type):
        with torch.autocast(t.device.type, enabled=False):
            return fn(*args)
    return fn(*args)


def _run_forward(input, offset, mask, weight, bias, stride, padding, dilation, backend: str) -> Tensor:
    out = _call_without_autocast(
        input, _implementation(backend).forward,
        input, offset, mask, weight, bias, tuple(stride), tuple(padding), tuple(dilation),
    )  # fmt: skip
    return out if _keeps_formats(backend) else _in_format_of(out, input)


def _run_backward(grad_output, input, offset, mask, weight, stride, padding, dilation, output_mask, backend):
    grads = _call_without_autocast(
        input, _implementation(backend).backward, grad_output, input, offset, mask, weight,
        tuple(stride), tuple(padding), tuple(dilation), tuple(output_mask),
    )  # fmt: skip
    if _keeps_formats(backend):
        return grads
    return (*_grads_in_formats(grads[:4], (input, offset, mask, weight)), grads[4])


def _backward_with_graph(grad_output, input, offset, mask, weight, stride, padding, dilation, output_mask):
    """The five gradients as a differentiable graph (double backward), through the reference."""

    def forward(input: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor) -> Tensor:
        return deform_conv2d_reference(
            input, offset, weight, None, tuple(stride), tuple(padding), tuple(dilation), mask
        )

    with _no_autocast(input):
        grads = gradients_with_graph(forward, grad_output, (input, offset, mask, weight), output_mask[:4])
        grad_bias = grad_output.sum(dim=(0, 2, 3)) if output_mask[4] else None
    return (*_grads_in_formats(grads, (input, offset, mask, weight)), grad_bias)


def _save_for_backward(ctx, input, offset, mask, weight, bias, stride, padding, dilation, backend) -> None:
    ctx.save_for_backward(input, offset, mask, weight)
    ctx.params = (stride, padding, dilation, backend, bias is not None)


def _output_mask(ctx, mask: Tensor | None, has_bias: bool) -> list[bool]:
    """Which of (input, offset, mask, weight, bias) gradients autograd needs and exist."""
    needs = ctx.needs_input_grad
    return [needs[0], needs[1], mask is not None and needs[2], needs[3], has_bias and needs[4]]


@torch.library.custom_op("deformable::deform_conv2d", mutates_args=())
def _deform_conv2d_op(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
) -> Tensor:
    return _run_forward(input, offset, mask, weight, bias, stride, padding, dilation, backend)


@_deform_conv2d_op.register_fake
def _(input, offset, mask, weight, bias, stride, padding, dilation, backend):
    shape = (input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])
    return input.new_empty(shape).contiguous(memory_format=memory_format_of(input))


@torch.library.custom_op("deformable::deform_conv2d_backward", mutates_args=())
def _deform_conv2d_backward_op(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    output_mask: Sequence[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _run_backward(
        grad_output, input, offset, mask, weight, stride, padding, dilation, output_mask, backend
    )
    # Custom ops return tensors only: a gradient that was not asked for comes back empty.
    grad_input, grad_offset, grad_mask, grad_weight, grad_bias = (
        input.new_empty(0) if g is None else g for g in grads
    )
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias


@_deform_conv2d_backward_op.register_fake
def _(grad_output, input, offset, mask, weight, stride, padding, dilation, output_mask, backend):
    need_input, need_offset, need_mask, need_weight, need_bias = output_mask
    empty = input.new_empty(0)

    def like(t: Tensor) -> Tensor:
        return torch.empty_like(t, memory_format=memory_format_of(t))

    return (
        like(input) if need_input else empty,
        like(offset) if need_offset else empty,
        like(mask) if (need_mask and mask is not None) else empty,
        like(weight) if need_weight else empty,
        weight.new_empty(weight.shape[0]) if need_bias else empty,
    )


def _setup_context(ctx, inputs, output):
    _save_for_backward(ctx, *inputs)


def _backward(ctx, grad_output):
    input, offset, mask, weight = ctx.saved_tensors
    stride, padding, dilation, backend, has_bias = ctx.params
    output_mask = _output_mask(ctx, mask, has_bias)
    if builds_graph(grad_output, input, offset, mask, weight):
        grads = _backward_with_graph(
            grad_output, input, offset, mask, weight, stride, padding, dilation, output_mask
        )
        return (*grads, None, None, None, None)
    grads = _deform_conv2d_backward_op(
        grad_output, input, offset, mask, weight, stride, padding, dilation, output_mask, backend
    )
    grad_input, grad_offset, grad_mask, grad_weight, grad_bias = (
        g if wanted else None for g, wanted in zip(grads, output_mask, strict=True)
    )
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias, None, None, None, None


_deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# torch.func: batching rules and a differentiable route


def _per_sample(op, info, in_dims, args: tuple) -> tuple[Tensor, int]:
    """The batching rule of last resort: ``op`` once per vmapped sample, outputs stacked (dim 0)."""
    outputs = []
    for b in range(info.batch_size):
        sample = [
            a.select(d, b) if isinstance(a, Tensor) and d is not None else a
            for a, d in zip(args, in_dims, strict=True)
        ]
        outputs.append(op(*sample))
    return torch.stack(outputs), 0


@torch.library.register_vmap("deformable::deform_conv2d")
def _deform_conv2d_vmap(info, in_dims, input, offset, mask, weight, bias, stride, padding, dilation, backend):
    """vmap over input/offset/mask folds the vmapped dimension into the batch (one call); a vmapped
    weight or bias (per-sample parameters) runs one call per sample."""
    args = (input, offset, mask, weight, bias, stride, padding, dilation, backend)
    if in_dims[3] is not None or in_dims[4] is not None:
        return _per_sample(_deform_conv2d_op, info, in_dims, args)
    size = info.batch_size
    input = vmapped_first(input, in_dims[0], size)  # [B, N, C, H, W]
    out = _deform_conv2d_op(
        input.flatten(0, 1), vmapped_folded(offset, in_dims[1], size), vmapped_folded(mask, in_dims[2], size),
        weight, bias, stride, padding, dilation, backend,
    )  # fmt: skip
    return out.unflatten(0, input.shape[:2]), 0


def _op_with_pairs(input, offset, mask, weight, bias, stride, padding, dilation, backend) -> Tensor:
    return _deform_conv2d_op(
        input, offset, mask, weight, bias, list(stride), list(padding), list(dilation), backend
    )


def _reference_in_op_order(input, offset, mask, weight, bias, stride, padding, dilation, backend) -> Tensor:
    return deform_conv2d_reference(
        input, offset, weight, bias, tuple(stride), tuple(padding), tuple(dilation), mask
    )


# input, offset, mask, weight and bias are differentiable.
_DeformConv2dTransformable = make_transformable(
    "_DeformConv2dTransformable", _op_with_pairs, _reference_in_op_order, (0, 1, 2, 3, 4)
)


# --------------------------------------------------------------------------------------------------
# Public API


class _DeformConv2dFunction(torch.autograd.Function):
    """The eager-mode route to a backend: what the custom op does, without its dispatcher."""

    @staticmethod
    def forward(ctx, input, offset, mask, weight, bias, stride, padding, dilation, backend):
        ctx.save_for_backward(input, offset, mask, weight)  # as _save_for_backward, one call less
        ctx.params = (stride, padding, dilation, backend, bias is not None)
        return _run_forward(input, offset, mask, weight, bias, stride, padding, dilation, backend)

    @staticmethod
    def backward(ctx, grad_output):
        input, offset, mask, weight = ctx.saved_tensors
        stride, padding, dilation, backend, has_bias = ctx.params
        needs = ctx.needs_input_grad  # as _output_mask, one call less
        output_mask = (needs[0], needs[1], mask is not None and needs[2], needs[3], has_bias and needs[4])
        if builds_graph(grad_output, input, offset, mask, weight):
            grads = _backward_with_graph(
                grad_output, input, offset, mask, weight, stride, padding, dilation, output_mask
            )
            return (*grads, None, None, None, None)
        grads = _run_backward(
            grad_output, input, offset, mask, weight, stride, padding, dilation, output_mask, backend
        )
        return (*grads, None, None, None, None)


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _plain_eager(input: Tensor, *tensors: Tensor | None) -> bool:
    """True when nothing but eager autograd will see this call: no compiler, tracer, functorch
    transform, dispatch mode, tensor subclass or meta tensor (those need the custom op, whose fake
    kernel gives meta tensors their output shapes). ``input``'s device is the others' (validated)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() > 0 or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    if type(input) not in _PLAIN_TENSOR_TYPES:
        return False
    for t in tensors:  # a loop: all() of a generator would cost a frame per call
        if t is not None and type(t) not in _PLAIN_TENSOR_TYPES:
            return False
    return not input.is_meta


def _records_graph(*tensors: Tensor | None) -> bool:
    """Whether autograd may record a call on these tensors: grad mode on and one of them requiring a
    gradient, or forward-mode AD active (dual tensors: the autograd.Function then says it has no jvp
    rather than dropping the tangents). Where neither (inference, torch.no_grad), the eager route calls
    the backend directly: an autograd.Function would only add its own host time."""
    if _forward_ad.__dict__.get("_current_level", -1) >= 0:
        return True
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # noqa: SIM110 (a loop: any() of a generator costs a frame per call)
        if t is not None and t.requires_grad:
            return True
    return False


def _autocast(tensors: list, device_type: str) -> list:
    """Under torch.autocast, run in the autocast dtype (not silently in fp32).

    As autocast does for its own ops, fp32/fp16/bf16 tensors are cast and anything else (float64,
    non-tensors, left for validation to reject) passes through: so a layer's fp32 weight meets the
    bf16 activations of the layer before it.
    """
    if not autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    castable = (torch.float32, torch.float16, torch.bfloat16)
    return [t.to(dtype) if isinstance(t, Tensor) and t.dtype in castable else t for t in tensors]


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Tensor | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Deformable convolution v1 (``mask=None``) and v2 (modulated), as torchvision's op.

    Args:
        input: [N, C_in, H, W].
        offset: [N, 2*G*kh*kw, H_out, W_out]. Channel ``2*(g*kh*kw + i*kw + j)`` is the y offset of
            kernel tap (i, j) in offset group g, the next channel its x offset. Input channel c
            belongs to offset group ``c // (C_in / G)``.
        weight: [C_out, C_in / groups, kh, kw]; the weight groups are ``C_in / weight.shape[1]``.
        bias: [C_out] or None.
        stride, padding, dilation: ints or (h, w) pairs, as for ``torch.nn.functional.conv2d``.
        mask: [N, G*kh*kw, H_out, W_out] modulation scalars, applied as given (no sigmoid), or None.
        backend: "reference", "aten" or "triton"; None reads ``DEFORMABLE_BACKEND``, then picks
            Triton for CUDA tensors when available and the ATen path otherwise.

    Returns:
        [N, C_out, H_out, W_out] in the input's dtype (fp16/bf16 accumulate in fp32).

    The sample of tap (i, j) at output (oy, ox) is taken at
    ``y = oy*stride_h - pad_h + i*dil_h + dy``, ``x = ox*stride_w - pad_w + j*dil_w + dx`` by bilinear
    interpolation; a sample with y <= -1, y >= H, x <= -1 or x >= W is 0, and neighbours outside the
    map count as 0. As in torchvision, a sample at exactly y = -1 (x = -1), where zero offsets put a
    padding tap, has the one-sided offset gradient from inside the map.
    """
    if isinstance(input, Tensor):
        input, offset, weight, bias, mask = _autocast([input, offset, weight, bias, mask], input.device.type)
    stride, padding, dilation = _validate(input, offset, weight, bias, stride, padding, dilation, mask)
    backend = resolve_backend(backend, input.device)
    if backend == "reference":
        with _no_autocast(input):
            out = deform_conv2d_reference(input, offset, weight, bias, stride, padding, dilation, mask)
        return out.contiguous(memory_format=memory_format_of(input))
    if _plain_eager(input, offset, mask, weight, bias):
        if not _records_graph(input, offset, mask, weight, bias):  # inference: no autograd node at all
            return _run_forward(input, offset, mask, weight, bias, stride, padding, dilation, backend)
        return _DeformConv2dFunction.apply(
            input, offset, mask, weight, bias, stride, padding, dilation, backend
        )
    if under_torch_func():
        return _DeformConv2dTransformable.apply(
            input, offset, mask, weight, bias, stride, padding, dilation, backend
        )
    return _deform_conv2d_op(
        input, offset, mask, weight, bias, list(stride), list(padding), list(dilation), backend
    )
