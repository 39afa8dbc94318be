"""Triton (modulated) deformable RoI pooling: the ``"triton"`` backend of ``deform_roi_pool``.

Same semantics and signatures as :mod:`deformable.ops._roi_aten` (arguments validated by the public
op). One program per (RoI, bin) gathers the bin's bilinear samples as channel vectors from a
channels-last copy of the features (``_deform_roi_pool_kernels.py``). The input gradient is scattered
with fp32 atomics (fp64 for float64), so it is not bitwise repeatable: under
``torch.use_deterministic_algorithms(True)`` the public op uses the ATen backend instead, whose
backward is deterministic. Offset and mask gradients are owned by their bin's program and are
deterministic.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._roi_aten import _MAX_GRID, compute_dtype
from . import _deform_roi_pool_kernels as _k
from ._launch import device_guard, launch
from ._relayout import to_rows
from .deform_conv import _INT32_SAFE, _pow2, _tl_compute_dtype


@functools.lru_cache(maxsize=64)
def _params(spatial_scale: float, gamma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(spatial_scale, gamma) as a tensor in the compute dtype (a float64 run needs exact scalars);
    cached because a host-to-device copy per call would cost more than the kernel."""
    return torch.tensor([spatial_scale, gamma], dtype=dtype, device=device)


def _launch_args(input: Tensor, rois: Tensor, pooled_height: int, pooled_width: int) -> dict:
    num_rois, channels = rois.shape[0], input.shape[1]
    sizes = (input.numel() + channels, num_rois * channels * pooled_height * pooled_width, num_rois * 5)
    block_c = _pow2(channels, 16, 256)
    return {
        "PH": pooled_height, "PW": pooled_width, "CT": _tl_compute_dtype(input.dtype),
        "INDEX64": max(sizes) >= _INT32_SAFE, "BLOCK_C": block_c, "num_warps": 4 if block_c >= 128 else 2,
    }  # fmt: skip


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
    """[K, C, ph, pw] in the input's dtype; arguments as ``_roi_aten.deform_roi_pool_forward``."""
    num_rois, channels, height, width = rois.shape[0], *input.shape[1:]
    out = torch.empty(
        (num_rois, channels, pooled_height, pooled_width), dtype=input.dtype, device=input.device
    )
    if out.numel() == 0 or input.numel() == 0:
        return out.zero_()
    x = to_rows(input)
    params = _params(float(spatial_scale), float(gamma), compute_dtype(input.dtype), input.device)
    rois_c = rois.contiguous()
    offset_c = offset.contiguous() if offset is not None else rois_c
    mask_c = mask.contiguous() if mask is not None else rois_c
    with device_guard(input):
        launch(
            _k.deform_roi_pool_fwd_kernel, (num_rois * pooled_height * pooled_width,),
            x, rois_c, params, offset_c, mask_c, out,
            input.shape[0], height, width, channels, int(sampling_ratio), _MAX_GRID,
            ALIGNED=bool(aligned), HAS_OFFSET=offset is not None, HAS_MASK=mask is not None,
            **_launch_args(input, rois, pooled_height, pooled_width),
        )  # fmt: skip
    return out


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
    """(grad_input [N, C, H, W] with channels-last strides, grad_offset, grad_mask), None where not
    requested or absent."""
    need_offset = need_offset and offset is not None
    need_mask = need_mask and mask is not None
    acc = compute_dtype(input.dtype)
    num_rois, channels, height, width = rois.shape[0], *input.shape[1:]
    device = input.device
    gx = (
        torch.zeros((input.shape[0], height, width, channels), dtype=acc, device=device)
        if need_input
        else None
    )
    grad_offset = (
        torch.empty_like(offset, memory_format=torch.contiguous_format)
        if need_offset and offset is not None
        else None
    )
    grad_mask = (
        torch.empty_like(mask, memory_format=torch.contiguous_format)
        if need_mask and mask is not None
        else None
    )
    if num_rois > 0 and input.numel() > 0 and (need_input or need_offset or need_mask):
        x = to_rows(input)
        params = _params(float(spatial_scale), float(gamma), acc, device)
        rois_c = rois.contiguous()
        dummy = rois_c
        with device_guard(input):
            launch(
                _k.deform_roi_pool_bwd_kernel, (num_rois * pooled_height * pooled_width,),
                x, rois_c, params,
                offset.contiguous() if offset is not None else dummy,
                mask.contiguous() if mask is not None else dummy,
                grad_output.contiguous(),
                gx if gx is not None else dummy,
                grad_offset if grad_offset is not None else dummy,
                grad_mask if grad_mask is not None else dummy,
                input.shape[0], height, width, channels, int(sampling_ratio), _MAX_GRID,
                ALIGNED=bool(aligned), HAS_OFFSET=offset is not None, HAS_MASK=mask is not None,
                NEED_INPUT=need_input, NEED_OFFSET=need_offset, NEED_MASK=need_mask,
                **_launch_args(input, rois, pooled_height, pooled_width),
            )  # fmt: skip
    else:  # nothing to launch: every requested gradient is 0
        for g in (grad_offset, grad_mask):
            if g is not None:
                g.zero_()
    # Channels-last strides, as the ATen backend's (and the op's fake kernel's) grad_input: no copy.
    grad_input = gx.to(input.dtype).permute(0, 3, 1, 2) if gx is not None else None
    return grad_input, grad_offset, grad_mask
