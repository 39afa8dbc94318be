"""Deformable RoI pooling (DCNv1) and modulated deformable RoI pooling (DCNv2).

``deform_roi_pool`` validates its arguments, picks a backend and runs it:

* ``"reference"``: :mod:`._roi_reference`, readable PyTorch differentiated by autograd;
* ``"aten"``: :mod:`._roi_aten`, the fast vectorised path, registered (with the Triton backend) as
  the custom operator ``torch.ops.deformable.deform_roi_pool`` (with a fake kernel and an autograd
  formula whose backward is itself the custom operator ``deformable::deform_roi_pool_backward``, so
  ``torch.compile(fullgraph=True)`` traces both directions).  It runs on every device and is the
  automatic choice except for CUDA tensors;
* ``"triton"``: :mod:`._triton.deform_roi_pool`, one fused kernel per direction; the automatic
  choice for CUDA tensors (except under deterministic algorithms: its input gradient uses atomics).

Both fast backends are reached through the custom operators above (what ``torch.compile``, export and
tracing see) or, in plain eager mode, through an ``autograd.Function`` that skips the custom-op
dispatcher's per-call cost. A backward run with ``create_graph=True`` (double backward) goes through
the reference instead, which autograd can differentiate again (:mod:`._double_backward`).
"""

from __future__ import annotations

import importlib
import math
import numbers
import os

import torch
from torch import Tensor

from . import _roi_aten, _roi_reference
from ._backend import ENV_VAR, resolve_backend
from ._double_backward import builds_graph, gradients_with_graph
from ._func_route import differentiating, make_transformable, under_torch_func, vmapped_first, vmapped_folded
from .deform_conv import _FLOAT_DTYPES, _is_integer, _plain_eager, _records_graph, autocast_enabled

#: Largest ``sampling_ratio``: the cap of the adaptive grid (samples per bin side), 4096.
MAX_SAMPLING_RATIO = _roi_aten._MAX_GRID

__all__ = ["deform_roi_pool"]


# --------------------------------------------------------------------------------------------------
# Backends, custom operators and the eager route
# --------------------------------------------------------------------------------------------------


def _implementation(backend: str):
    """The module holding ``deform_roi_pool_forward``/``_backward`` of a fast backend."""
    if backend == "triton":
        return importlib.import_module("deformable.ops._triton.deform_roi_pool")
    return _roi_aten


@torch.library.custom_op("deformable::deform_roi_pool", mutates_args=())
def _deform_roi_pool_op(
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
    backend: str,
) -> Tensor:
    return _implementation(backend).deform_roi_pool_forward(
        input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma, aligned
    )


@_deform_roi_pool_op.register_fake
def _(
    input,
    rois,
    offset,
    mask,
    pooled_height,
    pooled_width,
    spatial_scale,
    sampling_ratio,
    gamma,
    aligned,
    backend,
):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("deformable::deform_roi_pool_backward", mutates_args=())
def _deform_roi_pool_backward_op(
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
    backend: str,
    need_input: bool,
    need_offset: bool,
    need_mask: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    grads = _implementation(backend).deform_roi_pool_backward(
        grad_output, input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio,
        gamma, aligned, need_input, need_offset, need_mask,
    )  # fmt: skip
    # Custom operators cannot return None: a gradient that was not asked for is an empty tensor.
    grad_input, grad_offset, grad_mask = (input.new_empty(0) if g is None else g for g in grads)
    return grad_input, grad_offset, grad_mask


@_deform_roi_pool_backward_op.register_fake
def _(grad_output, input, rois, offset, mask, *params_backend_and_needs):
    need_input, need_offset, need_mask = params_backend_and_needs[-3:]
    grad_input = _roi_aten.grad_input_like(input) if need_input else input.new_empty(0)
    grad_offset = torch.empty_like(offset) if need_offset and offset is not None else input.new_empty(0)
    grad_mask = torch.empty_like(mask) if need_mask and mask is not None else input.new_empty(0)
    return grad_input, grad_offset, grad_mask


def _needs(ctx, offset, mask) -> tuple[bool, bool, bool]:
    need_input, _, need_offset, need_mask = ctx.needs_input_grad[:4]
    return need_input, need_offset and offset is not None, need_mask and mask is not None


def _backward_with_graph(grad_output, input, rois, offset, mask, params, needs):
    """(grad_input, grad_offset, grad_mask) as a differentiable graph (double backward), through the
    reference; ``params`` are the seven pooling parameters, the backend last."""

    def forward(input: Tensor, offset: Tensor | None, mask: Tensor | None) -> Tensor:
        return _roi_reference.deform_roi_pool_reference(input, rois, offset, mask, *params[:-1])

    return gradients_with_graph(forward, grad_output, (input, offset, mask), needs)


def _setup_context(ctx, inputs, output):
    input, rois, offset, mask, *params = inputs
    ctx.save_for_backward(input, rois, offset, mask)
    ctx.params = params  # the seven parameters, the backend last


def _backward(ctx, grad_output):
    input, rois, offset, mask = ctx.saved_tensors
    need_input, need_offset, need_mask = _needs(ctx, offset, mask)
    grad_input = grad_offset = grad_mask = None
    if builds_graph(grad_output, input, offset, mask):
        needs = (need_input, need_offset, need_mask)
        grad_input, grad_offset, grad_mask = _backward_with_graph(
            grad_output, input, rois, offset, mask, ctx.params, needs
        )
    elif need_input or need_offset or need_mask:
        grad_input, grad_offset, grad_mask = _deform_roi_pool_backward_op(
            grad_output.contiguous(),
            input,
            rois,
            offset,
            mask,
            *ctx.params,
            need_input,
            need_offset,
            need_mask,
        )
    return (
        grad_input if need_input else None,
        None,
        grad_offset if need_offset else None,
        grad_mask if need_mask else None,
        *([None] * len(ctx.params)),
    )


_deform_roi_pool_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.register_vmap("deformable::deform_roi_pool")
def _deform_roi_pool_vmap(info, in_dims, input, rois, offset, mask, *params):
    """One call for the whole vmapped batch: B feature batches of N images become B*N images, each
    sample's RoIs (shared or its own) are renumbered onto its images, and the RoIs, offsets and masks
    of all samples are stacked: [B*K, C, ph, pw] out, viewed as [B, K, C, ph, pw]."""
    size = info.batch_size
    # [B, K, 5]; renumbered in fp32/fp64, where image indices stay exact (bf16's stop at 256).
    rois = vmapped_first(rois, in_dims[1], size).to(
        torch.float64 if rois.dtype == torch.float64 else torch.float32
    )
    if in_dims[0] is not None:
        input = vmapped_first(input, in_dims[0], size)  # [B, N, C, H, W]
        images = input.shape[1]
        shift = torch.arange(size, device=rois.device, dtype=rois.dtype) * images
        rois = torch.cat([rois[..., :1] + shift[:, None, None], rois[..., 1:]], dim=-1)
        input = input.flatten(0, 1)
    count = rois.shape[1]
    offset, mask = vmapped_folded(offset, in_dims[2], size), vmapped_folded(mask, in_dims[3], size)
    out = _deform_roi_pool_op(input, rois.flatten(0, 1), offset, mask, *params)
    return out.reshape(size, count, *out.shape[1:]), 0


class _DeformRoIPoolFunction(torch.autograd.Function):
    """The eager-mode route: what the custom op does, without its dispatcher (see deform_conv)."""

    @staticmethod
    def forward(ctx, input, rois, offset, mask, *params):
        ctx.save_for_backward(input, rois, offset, mask)
        ctx.params = params
        return _implementation(params[-1]).deform_roi_pool_forward(input, rois, offset, mask, *params[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        input, rois, offset, mask = ctx.saved_tensors
        need_input, need_offset, need_mask = _needs(ctx, offset, mask)
        grads = (None, None, None)
        if builds_graph(grad_output, input, offset, mask):
            grads = _backward_with_graph(
                grad_output, input, rois, offset, mask, ctx.params, (need_input, need_offset, need_mask)
            )
        elif need_input or need_offset or need_mask:
            *params, backend = ctx.params
            grads = _implementation(backend).deform_roi_pool_backward(
                grad_output.contiguous(),
                input,
                rois,
                offset,
                mask,
                *params,
                need_input,
                need_offset,
                need_mask,
            )
        grad_input, grad_offset, grad_mask = grads
        return grad_input, None, grad_offset, grad_mask, *([None] * len(ctx.params))


def _reference_in_op_order(input, rois, offset, mask, *params_and_backend) -> Tensor:
    return _roi_reference.deform_roi_pool_reference(input, rois, offset, mask, *params_and_backend[:-1])


# The route under torch.func (see _func_route): input, offset and mask are differentiable, rois not.
_DeformRoIPoolTransformable = make_transformable(
    "_DeformRoIPoolTransformable", _deform_roi_pool_op, _reference_in_op_order, (0, 2, 3)
)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _output_size(output_size) -> tuple[int, int]:
    if _is_integer(output_size):
        size = (int(output_size), int(output_size))
    elif (
        isinstance(output_size, tuple | list) and len(output_size) == 2 and all(map(_is_integer, output_size))
    ):
        size = (int(output_size[0]), int(output_size[1]))
    else:
        raise TypeError(f"output_size must be an int or a pair of ints (height, width), got {output_size!r}")
    if min(size) < 1:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    return size


def _check_tensor(name: str, value, input: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(value).__name__}")
    if value.dtype != input.dtype:
        raise TypeError(f"{name} must have the dtype of input ({input.dtype}), got {value.dtype}")
    if value.device != input.device:
        raise ValueError(f"{name} must be on the device of input ({input.device}), got {value.device}")
    if tuple(value.shape) != shape:
        raise ValueError(
            f"{name} must have shape [K, {shape[1]}, output_height, output_width] = {list(shape)}, "
            f"got {list(value.shape)}"
        )


def _capturing(input: Tensor) -> bool:
    """Whether the RoI values cannot be read: a CUDA graph is being captured (a host synchronisation
    would abort the capture), or the tensors are on the meta device (shapes only)."""
    if input.device.type == "meta":
        return True
    return input.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _vmapped(t: Tensor) -> bool:
    """Whether any torch.func wrapper of ``t`` is vmap's (``t`` differs between vmapped samples)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _plain_values(rois: Tensor) -> Tensor:
    """``rois`` itself, or under torch.func the plain tensor beneath its wrappers, with the RoIs of
    every vmapped sample as rows of one [B*K, 5] tensor (a wrapped tensor's values cannot be read)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(rois):
        if functorch.is_batchedtensor(rois):
            rois = functorch.get_unwrapped(rois).movedim(functorch.maybe_get_bdim(rois), 0).flatten(0, -2)
        else:
            rois = functorch.get_unwrapped(rois)
    return rois


def _check_roi_values(rois: Tensor, batch_size: int) -> None:
    """Data-dependent checks of the RoIs (one host synchronisation)."""
    rois = _plain_values(rois)
    if rois.shape[0] == 0:
        return
    batch = rois[:, 0]
    flags = torch.stack(
        (
            (~torch.isfinite(rois)).any(),
            (batch != torch.round(batch)).any(),
            ((batch < 0) | (batch >= batch_size)).any(),
        )
    ).tolist()
    if flags[0]:
        raise ValueError("rois must be finite, got NaN or infinite coordinates")
    if flags[1]:
        bad = batch[batch != torch.round(batch)][0].item()
        raise ValueError(f"rois[:, 0] must hold integer batch indices, got {bad}")
    if flags[2]:
        bad = batch[(batch < 0) | (batch >= batch_size)][0].item()
        if batch_size == 0:
            raise ValueError(f"input has no images (batch size 0), but rois[:, 0] names image {bad:g}")
        raise ValueError(f"rois[:, 0] must be a batch index in [0, {batch_size - 1}], got {bad:g}")


def _validate(input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma, aligned):
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must have shape [N, C, H, W], got {list(input.shape)}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            "input must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {input.dtype}"
        )
    if input.shape[2] < 1 or input.shape[3] < 1:
        raise ValueError(f"input must have non-empty spatial dimensions, got {list(input.shape)}")
    if not isinstance(rois, Tensor):
        raise TypeError(f"rois must be a Tensor of shape [K, 5], got {type(rois).__name__}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must have shape [K, 5] (batch_index, x1, y1, x2, y2), got {list(rois.shape)}")
    if not rois.is_floating_point():
        raise TypeError(f"rois must be a floating-point tensor, got {rois.dtype}")
    if rois.device != input.device:
        raise ValueError(f"rois must be on the device of input ({input.device}), got {rois.device}")
    pooled_height, pooled_width = validate_pooling_parameters(
        output_size, spatial_scale, sampling_ratio, gamma, aligned
    )
    num_rois = rois.shape[0]
    if offset is not None:
        _check_tensor("offset", offset, input, (num_rois, 2, pooled_height, pooled_width))
    if mask is not None:
        _check_tensor("mask", mask, input, (num_rois, 1, pooled_height, pooled_width))
    if not torch.compiler.is_compiling() and not _capturing(input):
        _check_roi_values(rois, input.shape[0])
    return pooled_height, pooled_width


def validate_pooling_parameters(
    output_size, spatial_scale, sampling_ratio, gamma, aligned
) -> tuple[int, int]:
    """Check ``deform_roi_pool``'s scalar arguments (TypeError/ValueError naming the argument); returns
    the output size as (ph, pw). Also what the pooling modules check at construction."""
    pooled_height, pooled_width = _output_size(output_size)
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, numbers.Real):
        raise TypeError(f"spatial_scale must be a positive float, got {spatial_scale!r}")
    if not (math.isfinite(spatial_scale) and float(spatial_scale) > 0):
        raise ValueError(f"spatial_scale must be a positive finite float, got {spatial_scale!r}")
    if not _is_integer(sampling_ratio):
        raise TypeError(
            "sampling_ratio must be an int (> 0: samples per bin side, <= 0: adaptive), "
            f"got {sampling_ratio!r}"
        )
    if int(sampling_ratio) > MAX_SAMPLING_RATIO:  # the adaptive grid's cap; beyond it sizes overflow
        raise ValueError(
            f"sampling_ratio must be at most {MAX_SAMPLING_RATIO} samples per bin side (<= 0: adaptive), "
            f"got {sampling_ratio}"
        )
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gamma must be a finite float, got {gamma!r}")
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite float, got {gamma!r}")
    if not isinstance(aligned, bool):
        raise TypeError(f"aligned must be a bool, got {aligned!r}")
    return pooled_height, pooled_width


def _select_backend(backend: str | None, device: torch.device, needs_grad: bool) -> str:
    """The backend for tensors on ``device``: as deform_conv2d's choice, except that the Triton backward's
    atomics are not repeatable, so under deterministic algorithms, when a gradient may be taken
    (``needs_grad``), the automatic choice is "aten" and an explicit "triton" a ValueError."""
    chosen = resolve_backend(backend, device)
    if chosen == "triton" and needs_grad and torch.are_deterministic_algorithms_enabled():
        if backend is None and not os.environ.get(ENV_VAR):
            return "aten"
        raise ValueError(
            "deform_roi_pool with backend='triton' has no deterministic backward (its input gradient is "
            "accumulated with atomics) and torch.use_deterministic_algorithms(True) is set: use "
            "backend='aten', whose backward is deterministic (or run without gradients)"
        )
    return chosen


# --------------------------------------------------------------------------------------------------
# Public operator
# --------------------------------------------------------------------------------------------------


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None = None,
    mask: Tensor | None = None,
    output_size: int | tuple[int, int] = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    aligned: bool = False,
    *,
    backend: str | None = None,
) -> Tensor:
    """(Modulated) deformable RoI pooling; RoIAlign when ``offset`` and ``mask`` are None.

    Each RoI is divided into ``output_size`` bins exactly as ``torchvision.ops.roi_align`` divides it
    (same ``aligned`` convention, same adaptive sampling grid, same bilinear rule); each bin is the mean
    of a grid of bilinear samples, moved by ``gamma * offset * (roi_width, roi_height)`` and multiplied
    by ``mask``.

    Args:
        input: features ``[N, C, H, W]`` (float64, float32, float16 or bfloat16).
        rois: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in image coordinates (any floating
            dtype; positions are computed in float32, or float64 for float64 input).
        offset: ``[K, 2, ph, pw]`` normalised bin offsets, channel 0 = x, channel 1 = y, or None. The
            shift in feature-map units is ``gamma * offset * roi_size``, with the RoI size as
            roi_align computes it (after ``spatial_scale``; clamped to >= 1 when ``aligned=False``).
        mask: ``[K, 1, ph, pw]`` multiplier of each bin (applied as given, no sigmoid), or None.
            ``offset`` and ``mask`` must have the dtype of ``input``, except under autocast, where they
            are cast to it.
        output_size: ``(ph, pw)`` or one int for both.
        spatial_scale: feature-map size / image size (e.g. 1/16).
        sampling_ratio: samples per bin side; ``<= 0`` means adaptive, ``ceil(roi_size / output_size)``.
        gamma: scale of the normalised offsets (0.1 in the papers).
        aligned: False = roi_align's legacy convention (torchvision's detectors); True = the half-pixel
            shift of Detectron2 and mmcv's deformable RoI pooling.
        backend: ``"reference"``, ``"aten"``, ``"triton"`` or None (automatic: ``DEFORMABLE_BACKEND``,
            else "triton" for CUDA tensors when Triton is installed and "aten" otherwise; "aten" under
            ``torch.use_deterministic_algorithms(True)`` when a gradient may be taken, as Triton's
            input gradient uses atomics).

    Returns:
        ``[K, C, ph, pw]`` in the dtype of ``input`` (low precision accumulates in float32).
        Differentiable in ``input``, ``offset`` and ``mask`` (not in ``rois``).

    Raises:
        TypeError, ValueError: an argument has the wrong type, shape, dtype, device or value; the
            message names it. The RoIs' values (finite, integer batch indices in range) cost one
            host synchronisation to check, so the check is skipped while torch.compile traces and
            while a CUDA graph is captured.
            ``backend="triton"`` requested under deterministic algorithms for tensors that require
            gradients (a ValueError).
    """
    if isinstance(input, Tensor) and autocast_enabled(input.device.type):
        # Under autocast the offset branch may run in another precision than the features: compute in
        # the features' dtype (fp16/bf16 accumulate in fp32), as outside autocast.
        offset = offset.to(input.dtype) if isinstance(offset, Tensor) else offset
        mask = mask.to(input.dtype) if isinstance(mask, Tensor) else mask
    pooled_height, pooled_width = _validate(
        input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma, aligned
    )
    args = (pooled_height, pooled_width, float(spatial_scale), int(sampling_ratio), float(gamma), aligned)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (input, offset, mask)
    )
    chosen = _select_backend(backend, input.device, needs_grad)
    if chosen == "reference":
        # A loop over RoIs whose sampling grids depend on their values (.item()): it runs eagerly, and
        # under torch.func with shared rois, but a compiler or tracer would freeze one call's grids.
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or (under_torch_func() and _vmapped(rois)):
            raise ValueError(
                "backend 'reference' (DEFORMABLE_BACKEND or backend=) loops over the RoIs' values: it "
                "cannot be compiled, traced or vmapped over rois; use backend='aten' there"
            )
        return _roi_reference.deform_roi_pool_reference(input, rois, offset, mask, *args)
    if _plain_eager(input, rois, offset, mask):
        # Inference: the backend directly (as deform_conv2d). rois too: a box regression that requires
        # a gradient makes the output require one (its gradient None), as the custom op does.
        if not _records_graph(input, rois, offset, mask):
            return _implementation(chosen).deform_roi_pool_forward(input, rois, offset, mask, *args)
        return _DeformRoIPoolFunction.apply(input, rois, offset, mask, *args, chosen)
    if under_torch_func():
        if differentiating() and _vmapped(rois):
            raise NotImplementedError(
                "deform_roi_pool: torch.func derivatives with vmapped (per-sample) rois are not supported "
                "(the reference they come from has data-dependent shapes); vmap over the features, "
                "offsets and masks with shared rois, or loop over the samples"
            )
        return _DeformRoIPoolTransformable.apply(input, rois, offset, mask, *args, chosen)
    return _deform_roi_pool_op(input, rois, offset, mask, *args, chosen)
