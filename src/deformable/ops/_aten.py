"""Fast deformable convolution from ATen kernels: the ``"aten"`` backend.

How it works, for one chunk of output rows:

1. The input is laid out channels-last, one row per (image, offset group, pixel) with a trailing zero
   row per image: ``rows [B*(G*H*W + 1), C_in/G]``.
2. Every sample (output pixel, kernel tap, offset group) becomes a bag of its four bilinear
   neighbours: four row indices (the zero row where a neighbour is outside the map) and four weights
   (bilinear weight x mask). ``F.embedding_bag(mode="sum")`` turns these into the sampled columns in
   one multi-threaded, vectorised pass (FBGEMM on x86), without materialising the four corners.
3. The columns are ordered (image, output row, output column, tap, channel): a [P, kh*kw*C_in]
   matrix, which a 1x1 convolution with the re-laid-out weight turns into the output (oneDNN runs
   it faster than a plain fp32 GEMM here), weight groups included.

The backward recomputes the columns per chunk (nothing but the inputs is saved), gets the column
gradient from the 1x1 convolution's backward, the weight gradient from one GEMM per weight group, and
the input and per-sample-weight gradients from embedding_bag's own backward (a sorted, deterministic
reduction on CPU). The offset and mask gradients
follow in closed form from the per-sample-weight gradients. Chunks are sized so that the extra memory
of forward + backward stays under the memory budget (:func:`set_memory_budget`), whatever the batch.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._geometry import ConvGeometry

_DEFAULT_BUDGET_BYTES = 256 * 2**20
_budget_bytes: int | None = None


def get_memory_budget() -> int:
    """The workspace budget in bytes (default 256 MiB): of the ``aten`` backend, and of the Triton
    backend's deterministic mode (its per-sample buffers, their sort, the cell sums and the weight
    gradient's partial sums).

    Set with :func:`set_memory_budget`, the :func:`memory_budget` context manager, or the
    ``DEFORMABLE_MEMORY_BUDGET_MB`` environment variable (MiB, fractions allowed).
    """
    if _budget_bytes is not None:
        return _budget_bytes
    env = os.environ.get("DEFORMABLE_MEMORY_BUDGET_MB")
    if env:
        return _budget_from_env(env)
    return _DEFAULT_BUDGET_BYTES


def _budget_from_env(env: str) -> int:
    """The budget in bytes that ``DEFORMABLE_MEMORY_BUDGET_MB=env`` asks for."""
    try:
        mebibytes = float(env)
    except ValueError:
        mebibytes = math.nan
    # NaN fails the comparison; infinity and sub-byte budgets would break the chunking arithmetic.
    if not (math.isfinite(mebibytes) and mebibytes * 2**20 >= 1):
        raise ValueError(
            "DEFORMABLE_MEMORY_BUDGET_MB must be a positive finite number of MiB (at least one byte, "
            f"e.g. 256 or 0.5), got {env!r}"
        )
    return int(mebibytes * 2**20)


def set_memory_budget(num_bytes: int | None) -> None:
    """Set the workspace budget in bytes; None restores the default (or the environment's)."""
    global _budget_bytes
    if num_bytes is not None:
        if isinstance(num_bytes, bool) or not isinstance(num_bytes, int):
            raise TypeError(f"num_bytes must be a positive int or None, got {num_bytes!r}")
        if num_bytes <= 0:
            raise ValueError(f"num_bytes must be a positive int or None, got {num_bytes!r}")
    _budget_bytes = num_bytes


@contextlib.contextmanager
def memory_budget(num_bytes: int) -> Iterator[None]:
    """Context manager form of :func:`set_memory_budget`."""
    previous = _budget_bytes
    set_memory_budget(num_bytes)
    try:
        yield
    finally:
        set_memory_budget(previous)


class _Geometry(ConvGeometry):
    """:class:`ConvGeometry` plus the layout of the channels-last row table."""

    @property
    def image_rows(self) -> int:
        """Rows of one image in the channels-last row table (G*H*W pixels + one zero row)."""
        return self.offset_groups * self.height * self.width + 1


@dataclass(frozen=True)
class _Chunk:
    """Images [n0, n1) and output rows [oy0, oy1) of each."""

    n0: int
    n1: int
    oy0: int
    oy1: int


def _chunks(geo: _Geometry, element_size: int, budget: int) -> list[_Chunk]:
    """Split the output into chunks whose forward + backward workspace fits ``budget`` bytes."""
    taps = geo.kh * geo.kw
    # Per output row: columns, their gradient and the convolution's own workspace (C_in values per
    # sample each), plus the sampling plan and embedding_bag's bookkeeping (~200 bytes per sample
    # and offset group: indices, weights, their gradients and temporaries).
    row_bytes = geo.out_w * taps * (3 * geo.in_channels * element_size + 200 * geo.offset_groups)
    # Per image: the channels-last row table and its gradient, and the re-laid-out input gradient.
    image_bytes = 3 * geo.image_rows * geo.channels_per_offset_group * element_size
    per_image = image_bytes + geo.out_h * row_bytes
    if per_image <= budget:
        step = max(1, budget // per_image)
        return [_Chunk(n, min(n + step, geo.batch), 0, geo.out_h) for n in range(0, geo.batch, step)]
    rows = max(1, (budget - image_bytes) // row_bytes)
    return [
        _Chunk(n, n + 1, oy, min(oy + rows, geo.out_h))
        for n in range(geo.batch)
        for oy in range(0, geo.out_h, rows)
    ]


def _row_table(input: Tensor, geo: _Geometry, chunk: _Chunk, dtype: torch.dtype) -> Tensor:
    """Channels-last rows of the chunk's images: [B*(G*H*W + 1), C_in/G], zero row last per image."""
    images = chunk.n1 - chunk.n0
    table = input.new_empty(images, geo.image_rows, geo.channels_per_offset_group, dtype=dtype)
    pixels = geo.image_rows - 1
    source = input[chunk.n0 : chunk.n1].view(
        images, geo.offset_groups, geo.channels_per_offset_group, geo.height, geo.width
    )
    table[:, :pixels].view(
        images, geo.offset_groups, geo.height, geo.width, geo.channels_per_offset_group
    ).copy_(source.permute(0, 1, 3, 4, 2))
    table[:, pixels].zero_()
    return table.view(-1, geo.channels_per_offset_group)


@dataclass
class _Plan:
    """Bilinear bags of one chunk's samples, ordered (b, oy, ox, i, j, g).

    indices, weights: [S, 4] neighbour rows and bilinear-x-mask weights, corners ordered
    (y0, x0), (y0, x1), (y1, x0), (y1, x1). ly, lx: fractional parts [S]; mask: [S] or None;
    outside: [S] True where the sample lies outside the map (its value and gradients are 0).
    """

    indices: Tensor
    weights: Tensor
    ly: Tensor
    lx: Tensor
    mask: Tensor | None
    outside: Tensor


def _chunk_view(t: Tensor, geo: _Geometry, chunk: _Chunk, parts: int) -> Tensor:
    """Offsets (parts=2) or mask (parts=1) of a chunk as [B, R, W_out, kh, kw, G, parts]."""
    images, rows = chunk.n1 - chunk.n0, chunk.oy1 - chunk.oy0
    sub = t[chunk.n0 : chunk.n1, :, chunk.oy0 : chunk.oy1]
    sub = sub.reshape(images, geo.offset_groups, geo.kh, geo.kw, parts, rows, geo.out_w)
    return sub.permute(0, 5, 6, 2, 3, 1, 4)


def _plan(offset: Tensor, mask: Tensor | None, geo: _Geometry, chunk: _Chunk, dtype: torch.dtype) -> _Plan:
    images, rows = chunk.n1 - chunk.n0, chunk.oy1 - chunk.oy0
    device = offset.device
    pairs = _chunk_view(offset, geo, chunk, 2).to(dtype).contiguous()
    sh, sw = geo.stride
    ph, pw = geo.padding
    dh, dw = geo.dilation
    arange = lambda n: torch.arange(n, device=device, dtype=dtype)  # noqa: E731
    rows_y = ((arange(rows) + chunk.oy0) * sh - ph).view(rows, 1, 1, 1, 1)
    base_y = rows_y + (arange(geo.kh) * dh).view(1, 1, geo.kh, 1, 1)
    cols_x = (arange(geo.out_w) * sw - pw).view(1, geo.out_w, 1, 1, 1)
    base_x = cols_x + (arange(geo.kw) * dw).view(1, 1, 1, geo.kw, 1)
    y = (base_y + pairs[..., 0]).reshape(-1)
    x = (base_x + pairs[..., 1]).reshape(-1)

    height, width = geo.height, geo.width
    # y = -1 (x = -1) is inside: its sample is 0 all the same, its offset gradient torchvision's
    # one-sided derivative (see _reference.bilinear_sample).
    outside = (y < -1) | (y >= height) | (x < -1) | (x >= width)
    outside &= ~(y.isnan() | x.isnan())  # a NaN coordinate gives NaN, even beside an outside one
    # Parked at (-2, -2), all four neighbours of an outside sample are invalid. NaN coordinates
    # (comparisons are False for them) keep NaN weights but index only the zero row.
    y = y.masked_fill(outside, -2.0)
    x = x.masked_fill(outside, -2.0)
    y0 = torch.nan_to_num(y, nan=-2.0).floor()
    x0 = torch.nan_to_num(x, nan=-2.0).floor()
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    weights = torch.stack((hy * hx, hy * lx, ly * hx, ly * lx), dim=1)
    sample_mask = None
    if mask is not None:
        sample_mask = _chunk_view(mask, geo, chunk, 1).to(dtype).reshape(-1)
        weights = weights * sample_mask.unsqueeze(1)

    yi, xi = y0.long(), x0.long()
    per_image = images and (y.numel() // images)
    image = torch.arange(images, device=device).repeat_interleave(per_image)
    group = torch.arange(geo.offset_groups, device=device).repeat(y.numel() // geo.offset_groups)
    image_start = image * geo.image_rows
    pixel_start = image_start + group * (height * width)
    zero_row = image_start + (geo.image_rows - 1)
    corners = []
    for cy, cx in ((yi, xi), (yi, xi + 1), (yi + 1, xi), (yi + 1, xi + 1)):
        inside = (cy >= 0) & (cy < height) & (cx >= 0) & (cx < width)
        corners.append(torch.where(inside, pixel_start + cy * width + cx, zero_row))
    indices = torch.stack(corners, dim=1)
    return _Plan(indices, weights, ly, lx, sample_mask, outside)


def _group_major(columns: Tensor, geo: _Geometry) -> Tensor:
    """Columns [P*K*G, C_g] as the GEMM's [P, K*C_in] matrix, weight-group-major when groups > 1."""
    matrix = columns.view(-1, geo.kh * geo.kw * geo.in_channels)
    if geo.groups == 1:
        return matrix
    per_group = geo.in_channels // geo.groups
    return matrix.view(-1, geo.kh * geo.kw, geo.groups, per_group).transpose(1, 2).reshape(matrix.shape)


def _tap_major(matrix: Tensor, geo: _Geometry) -> Tensor:
    """Inverse of :func:`_group_major`: [P, K*C_in] back to the sample order [P*K*G, C_g]."""
    if geo.groups > 1:
        per_group = geo.in_channels // geo.groups
        matrix = matrix.reshape(-1, geo.groups, geo.kh * geo.kw, per_group).transpose(1, 2)
    return matrix.reshape(-1, geo.channels_per_offset_group)


def _as_image(matrix: Tensor, images: int, rows: int, width: int) -> Tensor:
    """A [B*R*W, C] matrix as the channels-last NCHW view [1, C, B*R, W] (no copy)."""
    return matrix.view(1, images * rows, width, matrix.shape[1]).permute(0, 3, 1, 2)


def _pointwise_weight(weight: Tensor) -> Tensor:
    """[C_out, C_in/groups, kh, kw] as a 1x1 kernel over the columns: [C_out, kh*kw*C_in/groups, 1, 1]."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1, 1, 1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def forward(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """Deformable convolution forward; arguments validated, shapes as ``deform_conv2d``."""
    geo = _Geometry.of(input, offset, weight, stride, padding, dilation)
    dtype = _compute_dtype(input.dtype)
    out = input.new_empty(geo.batch, geo.out_channels, geo.out_h, geo.out_w)
    if out.numel() == 0:
        return out
    pointwise = _pointwise_weight(weight.to(dtype))
    bias_c = None if bias is None else bias.to(dtype)
    element = torch.finfo(dtype).bits // 8
    for chunk in _chunks(geo, element, get_memory_budget()):
        images, rows = chunk.n1 - chunk.n0, chunk.oy1 - chunk.oy0
        table = _row_table(input, geo, chunk, dtype)
        plan = _plan(offset, mask, geo, chunk, dtype)
        columns = F.embedding_bag(plan.indices, table, per_sample_weights=plan.weights, mode="sum")
        matrix = _group_major(columns, geo)
        result = F.conv2d(_as_image(matrix, images, rows, geo.out_w), pointwise, bias_c, groups=geo.groups)
        out[chunk.n0 : chunk.n1, :, chunk.oy0 : chunk.oy1] = result.view(
            geo.out_channels, images, rows, geo.out_w
        ).transpose(0, 1)
    return out


def _sample_gradients(plan: _Plan, grad_weights: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of the sample's (y, x) and mask from those of its four bag weights [S, 4]."""
    g = grad_weights
    ly, lx = plan.ly, plan.lx
    hy, hx = 1 - ly, 1 - lx
    grad_y = (g[:, 2] - g[:, 0]) * hx + (g[:, 3] - g[:, 1]) * lx
    grad_x = (g[:, 1] - g[:, 0]) * hy + (g[:, 3] - g[:, 2]) * ly
    grad_mask = None
    if plan.mask is not None:
        bilinear = torch.stack((hy * hx, hy * lx, ly * hx, ly * lx), dim=1)
        grad_mask = (g * bilinear).sum(1).masked_fill(plan.outside, 0.0)
        grad_y = grad_y * plan.mask
        grad_x = grad_x * plan.mask
    grad_y = grad_y.masked_fill(plan.outside, 0.0)
    grad_x = grad_x.masked_fill(plan.outside, 0.0)
    return grad_y, grad_x, grad_mask


def backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    output_mask: tuple[bool, bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients (input, offset, mask, weight, bias), None where ``output_mask`` is False."""
    grad_output = grad_output.contiguous()
    need_input, need_offset, need_mask, need_weight, need_bias = output_mask
    need_mask = need_mask and mask is not None
    geo = _Geometry.of(input, offset, weight, stride, padding, dilation)
    dtype = _compute_dtype(input.dtype)
    grads = _Gradients(
        input=torch.zeros_like(input, dtype=dtype) if need_input else None,
        offset=torch.zeros_like(offset, dtype=dtype) if need_offset else None,
        mask=torch.zeros_like(mask, dtype=dtype) if need_mask and mask is not None else None,
        weight=torch.zeros_like(weight, dtype=dtype) if need_weight else None,
    )
    grad_bias = grad_output.to(dtype).sum((0, 2, 3)) if need_bias else None
    if grad_output.numel() > 0 and (grads.samples or need_weight):
        pointwise = _pointwise_weight(weight.to(dtype))
        element = torch.finfo(dtype).bits // 8
        for chunk in _chunks(geo, element, get_memory_budget()):
            _backward_chunk(grad_output, input, offset, mask, pointwise, geo, chunk, dtype, grads)
    return (
        _in_dtype_of(grads.input, input),
        _in_dtype_of(grads.offset, offset),
        _in_dtype_of(grads.mask, mask),
        _in_dtype_of(grads.weight, weight),
        _in_dtype_of(grad_bias, weight),
    )


def _in_dtype_of(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    """``grad`` in the dtype of ``like``; None stays None (``like`` is None only when ``grad`` is)."""
    if grad is None:
        return None
    assert like is not None
    return grad.to(like.dtype)


@dataclass
class _Gradients:
    """Gradient accumulators; None for those not requested."""

    input: Tensor | None
    offset: Tensor | None
    mask: Tensor | None
    weight: Tensor | None

    @property
    def samples(self) -> bool:
        """Whether any gradient flows through the sampled columns."""
        return self.input is not None or self.offset is not None or self.mask is not None


def _backward_chunk(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    pointwise: Tensor,
    geo: _Geometry,
    chunk: _Chunk,
    dtype: torch.dtype,
    grads: _Gradients,
) -> None:
    """Accumulate one chunk's gradients into ``grads``."""
    images, rows = chunk.n1 - chunk.n0, chunk.oy1 - chunk.oy0
    table = _row_table(input, geo, chunk, dtype)
    plan = _plan(offset, mask, geo, chunk, dtype)
    flat_indices, flat_weights = plan.indices.view(-1), plan.weights.view(-1)
    bag_starts = torch.arange(0, flat_indices.numel(), 4, device=flat_indices.device)
    # The aten-level op (what F.embedding_bag runs) also returns the bookkeeping its backward needs.
    columns, offset2bag, bag_size, max_indices = torch.ops.aten._embedding_bag(
        table, flat_indices, bag_starts, False, 0, False, flat_weights, False, -1
    )
    matrix = _group_major(columns, geo)
    # The chunk's grad_output as a [P, C_out] matrix (P = B*R*W_out pixels).
    grad_rows = grad_output[chunk.n0 : chunk.n1, :, chunk.oy0 : chunk.oy1].to(dtype).permute(0, 2, 3, 1)
    grad_matrix = grad_rows.reshape(-1, geo.out_channels)
    if grads.weight is not None:
        per_out, per_in = geo.out_channels // geo.groups, matrix.shape[1] // geo.groups
        for g in range(geo.groups):
            outs, ins = slice(g * per_out, (g + 1) * per_out), slice(g * per_in, (g + 1) * per_in)
            block = grad_matrix[:, outs].t() @ matrix[:, ins]
            grads.weight[outs] += block.view(per_out, geo.kh, geo.kw, -1).permute(0, 3, 1, 2)
    if not grads.samples:
        return
    grad_image = torch.ops.aten.convolution_backward(
        _as_image(grad_matrix, images, rows, geo.out_w),
        _as_image(matrix, images, rows, geo.out_w),
        pointwise,
        None,
        [1, 1],
        [0, 0],
        [1, 1],
        False,
        [0, 0],
        geo.groups,
        [True, False, False],
    )[0]
    grad_columns = _tap_major(grad_image.permute(0, 2, 3, 1).reshape(matrix.shape), geo)
    if grads.input is not None:
        # (offset2bag may come back empty from the fast forward; this entry point rebuilds it.)
        grad_table = torch.ops.aten._embedding_bag_backward(
            grad_columns, flat_indices, bag_starts, offset2bag, bag_size, max_indices, table.shape[0],
            False, 0, False, flat_weights, -1,
        )  # fmt: skip
        grad_table = grad_table.view(images, geo.image_rows, geo.channels_per_offset_group)[:, :-1]
        grad_table = grad_table.reshape(
            images, geo.offset_groups, geo.height, geo.width, geo.channels_per_offset_group
        )
        grads.input[chunk.n0 : chunk.n1].view(
            images, geo.offset_groups, geo.channels_per_offset_group, geo.height, geo.width
        ).add_(grad_table.permute(0, 1, 4, 2, 3))
    if grads.offset is None and grads.mask is None:
        return
    grad_bag_weights = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_columns, table, flat_indices, bag_starts, offset2bag, 0, -1
    )
    grad_y, grad_x, grad_m = _sample_gradients(plan, grad_bag_weights.view(-1, 4))
    shape = (images, rows, geo.out_w, geo.kh, geo.kw, geo.offset_groups)
    if grads.offset is not None:
        pairs = torch.stack((grad_y.view(shape), grad_x.view(shape)), dim=-1)
        _chunk_view(grads.offset, geo, chunk, 2).copy_(pairs)
    if grads.mask is not None:
        assert grad_m is not None  # a mask gradient is accumulated only when there is a mask
        _chunk_view(grads.mask, geo, chunk, 1).copy_(grad_m.view(*shape, 1))
