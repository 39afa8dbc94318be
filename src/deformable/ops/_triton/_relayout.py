"""Layout copies between NCHW and channels-last as tiled transposes (a Triton kernel).

The deformable-convolution and RoI-pooling kernels gather channel vectors, so they read the input as
contiguous [N, H, W, C] rows, and the backward's fp32 input-gradient accumulator has that layout too.
For an NCHW model the forward therefore copies the input into rows, and the backward copies it again
and converts the accumulator back into an NCHW gradient (16-bit: converted on the way); it also
copies grad_output into rows where Ho*Wo is not a multiple of a 16-byte vector. The weight, too, is
rearranged into each kernel's GEMM layout, and its gradient back (:func:`transpose`, one transpose
per weight group each).

PyTorch makes such copies with its generic strided copy: one element per thread, the output written
in order and the input read at a stride of H*W (or C) elements, so every warp's load touches 32
different 32-byte sectors of which it uses 2-4 bytes. On the H200, with each layer captured in CUDA
graphs, an NCHW layer's forward+backward (three such copies) took 18-187 us longer than a
channels_last one's (no copy) across the seven anchor shapes and three dtypes: mostly 4-7 us per
million input elements per copy, where the bytes need 1.4 (16-bit) to 2.8 (fp32)
(``benchmarks/results/triton_traffic_h200.md``).

:func:`transpose_kernel` copies a tile of [BLOCK_R rows x BLOCK_S columns] per program: it loads the
tile along the source's contiguous axis and stores it along the destination's, and Triton moves it
between the two register layouts through shared memory, so both sides are read and written in whole
sectors (16-byte vectors where the sizes allow). CUDA tensors take this kernel; CPU tensors (the
interpreter's test runs of the op) keep PyTorch's copy, and tests call the kernel directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import device_guard, launch_planned

__all__ = [
    "from_rows",
    "rows_as_planned",
    "rows_buffer",
    "rows_plan",
    "run_transpose",
    "run_transpose_pair",
    "to_rows",
    "transpose",
    "transpose_kernel",
    "transpose_pair_kernel",
    "transpose_pair_plan",
    "transpose_plan",
    "transpose_uses_kernel",
]

_INT32_SAFE = 2**31 - 1
BLOCK = 64  # 64 x 64 tiles (or 256 x 16): 8 KB (16-bit) to 32 KB (fp64) of shared memory
TILE_ELEMENTS = BLOCK * BLOCK


@triton.jit
def _transpose_tile(
    src_ptr, dst_ptr, zero_ptr, pid, R, S, TILES_S,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, R_ALIGN: tl.constexpr, S_ALIGN: tl.constexpr,
    INDEX64: tl.constexpr, ZERO: tl.constexpr,
):  # fmt: skip
    """Program ``pid`` of :func:`transpose_kernel`: its tile of [BLOCK_R x BLOCK_S], and with ``ZERO``
    the same elements of ``zero`` (shaped and laid out as dst) set to 0."""
    tiles = tl.cdiv(R, BLOCK_R) * TILES_S
    b = pid // tiles
    t = pid % tiles
    r = (t // TILES_S) * BLOCK_R + tl.arange(0, BLOCK_R)
    s = (t % TILES_S) * BLOCK_S + tl.arange(0, BLOCK_S)
    if INDEX64:
        b = b.to(tl.int64)
        r = r.to(tl.int64)
        s = s.to(tl.int64)
    r_in = r < R
    s_in = s < S
    src_rows = (b * R + r) * S
    dst_rows = (b * S + s) * R
    if S_ALIGN > 1:
        src_rows = tl.multiple_of(src_rows, S_ALIGN)
        s_in = tl.max_constancy(s_in, S_ALIGN)
    if R_ALIGN > 1:
        dst_rows = tl.multiple_of(dst_rows, R_ALIGN)
        r_in = tl.max_constancy(r_in, R_ALIGN)
    inside = r_in[:, None] & s_in[None, :]
    tile = tl.load(src_ptr + src_rows[:, None] + s[None, :], mask=inside)
    dst = dst_rows[None, :] + r[:, None]
    tl.store(dst_ptr + dst, tile.to(dst_ptr.dtype.element_ty), mask=inside)
    if ZERO:
        tl.store(zero_ptr + dst, tl.zeros([BLOCK_R, BLOCK_S], dtype=zero_ptr.dtype.element_ty), mask=inside)


@triton.jit
def transpose_kernel(
    src_ptr, dst_ptr, zero_ptr, R, S, TILES_S,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, R_ALIGN: tl.constexpr, S_ALIGN: tl.constexpr,
    INDEX64: tl.constexpr, ZERO: tl.constexpr,
):  # fmt: skip
    """dst[b, s, r] = src[b, r, s], converted to dst's dtype, for contiguous src [B, R, S] and dst
    [B, S, R]; with ``ZERO``, also zero[b, s, r] = 0 for a buffer ``zero`` laid out as dst (an
    accumulator that a later kernel adds into, cleared in the same pass instead of by a launch of its
    own). One program per (b, tile of BLOCK_R x BLOCK_S); grid B * cdiv(R, BLOCK_R) * TILES_S with
    TILES_S = cdiv(S, BLOCK_S).

    ``R_ALIGN`` / ``S_ALIGN`` (powers of two dividing R / S, and BLOCK_R / BLOCK_S, so that every tile
    starts on a multiple of them) tell the compiler what its specialisation sees only for multiples
    of 16: every row starts, and the tile's edge falls, on a multiple of that many elements, so the
    loads (stores) run as vectors of up to 16 bytes. A hint that is not a fact corrupts silently on a
    GPU (the interpreter ignores hints): :func:`_alignment` makes them, and a test checks its facts.
    """
    _transpose_tile(
        src_ptr, dst_ptr, zero_ptr, tl.program_id(0), R, S, TILES_S,
        BLOCK_R, BLOCK_S, R_ALIGN, S_ALIGN, INDEX64, ZERO,
    )  # fmt: skip


@triton.jit
def transpose_pair_kernel(
    src_a, dst_a, zero_a, src_b, dst_b, zero_b, R_A, S_A, TILES_S_A, PROGRAMS_A, R_B, S_B, TILES_S_B,
    BLOCK_R_A: tl.constexpr, BLOCK_S_A: tl.constexpr, R_ALIGN_A: tl.constexpr, S_ALIGN_A: tl.constexpr,
    INDEX64_A: tl.constexpr, ZERO_A: tl.constexpr,
    BLOCK_R_B: tl.constexpr, BLOCK_S_B: tl.constexpr, R_ALIGN_B: tl.constexpr, S_ALIGN_B: tl.constexpr,
    INDEX64_B: tl.constexpr, ZERO_B: tl.constexpr,
):  # fmt: skip
    """Two :func:`transpose_kernel` launches (a and b, each with its own sizes, tiles, dtypes and
    zeroed buffer) as one: programs [0, PROGRAMS_A) copy a, the rest b. A layer's input and weight
    are copied together so, one launch where there were two (the launch costs the host more than the
    weight's copy costs the GPU)."""
    pid = tl.program_id(0)
    if pid < PROGRAMS_A:
        _transpose_tile(
            src_a, dst_a, zero_a, pid, R_A, S_A, TILES_S_A,
            BLOCK_R_A, BLOCK_S_A, R_ALIGN_A, S_ALIGN_A, INDEX64_A, ZERO_A,
        )  # fmt: skip
    else:
        _transpose_tile(
            src_b, dst_b, zero_b, pid - PROGRAMS_A, R_B, S_B, TILES_S_B,
            BLOCK_R_B, BLOCK_S_B, R_ALIGN_B, S_ALIGN_B, INDEX64_B, ZERO_B,
        )  # fmt: skip


def _alignment(n: int, element_size: int) -> int:
    """The largest power of two dividing ``n``, up to one 16-byte vector of elements (so at most 16,
    which divides every tile side :func:`_tile` gives)."""
    align = 1
    while align * element_size < 16 and n % (align * 2) == 0:
        align *= 2
    return align


# (batch, rows, columns, source dtype, destination dtype) -> (grid, integer arguments, constexprs,
# launch_planned's dict): worked out once per shape, as these copies sit on every call's host path
# (``triton.cdiv`` alone costs about 2.5 us a call on a CPU).
_PLANS: dict[tuple, tuple] = {}
_MAX_PLANS = 1024


def _tile(rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_S): 64 x 64, or for a short side (a weight's 9 taps) a tile as narrow as 16 on
    that side and as much longer on the other, so that the programs do not mostly mask."""

    def side(n: int, most: int) -> int:  # the power of two at or above n, within [16, most]
        return min(most, max(16, 1 << (n - 1).bit_length()))

    block_s = side(cols, BLOCK)
    block_r = side(rows, TILE_ELEMENTS // block_s)
    return block_r, side(cols, TILE_ELEMENTS // block_r)


def _plan(
    batch: int, rows: int, cols: int, src_dtype: torch.dtype, dst_dtype: torch.dtype, zero: torch.dtype | None
) -> tuple:
    block_r, block_s = _tile(rows, cols)
    tiles_s = -(-cols // block_s)
    element = min(src_dtype.itemsize, dst_dtype.itemsize)
    constexprs = {
        "BLOCK_R": block_r, "BLOCK_S": block_s, "R_ALIGN": _alignment(rows, element),
        "S_ALIGN": _alignment(cols, element), "INDEX64": batch * rows * cols > _INT32_SAFE,
        "ZERO": zero is not None, "num_warps": 4, "num_stages": 1,
    }  # fmt: skip
    return (batch * -(-rows // block_r) * tiles_s,), (rows, cols, tiles_s), constexprs, {}


def transpose_plan(
    batch: int, rows: int, cols: int, src_dtype: torch.dtype, dst_dtype: torch.dtype,
    zero: torch.dtype | None = None,
) -> tuple:  # fmt: skip
    """The launch of a [batch, rows, cols] -> [batch, cols, rows] transpose from ``src_dtype`` to
    ``dst_dtype`` (grid, integer arguments, constexprs, ``launch_planned``'s dict), worked out once per
    such key: for :func:`run_transpose`, which callers that repeat a copy (a launch plan) call directly.
    ``zero``: the dtype of a buffer laid out as the destination that the launch also sets to 0."""
    key = (batch, rows, cols, src_dtype, dst_dtype, zero)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _plan(*key)
    return plan


def run_transpose(plan: tuple, src: Tensor, dst: Tensor, zero: Tensor | None = None) -> Tensor:
    """Launch ``plan`` (:func:`transpose_plan`) from ``src`` into ``dst`` (contiguous, not empty, of the
    plan's dtypes and sizes, on the current CUDA device or on the CPU under the interpreter), setting
    ``zero`` to 0 where the plan was made with a zeroed buffer's dtype; returns ``dst``."""
    grid, scalars, kwargs, bound = plan
    launch_planned(transpose_kernel, bound, grid, (src, dst, dst if zero is None else zero), scalars, kwargs)
    return dst


# A plan's constexprs that the pair kernel takes once per copy (suffixed _A, _B).
_PER_COPY = ("BLOCK_R", "BLOCK_S", "R_ALIGN", "S_ALIGN", "INDEX64", "ZERO")


def transpose_pair_plan(a: tuple, b: tuple) -> tuple:
    """The launch of :func:`transpose_pair_kernel` doing the transposes of plans ``a`` and ``b``
    (:func:`transpose_plan`), in the same format: for :func:`run_transpose_pair`. Not cached here: a
    call plan makes it once and keeps it."""
    (programs_a,), scalars_a, kwargs_a, _ = a
    (programs_b,), scalars_b, kwargs_b, _ = b
    kwargs = {"num_warps": 4, "num_stages": 1}
    for suffix, part in (("_A", kwargs_a), ("_B", kwargs_b)):
        kwargs.update({name + suffix: part[name] for name in _PER_COPY})
    return (programs_a + programs_b,), (*scalars_a, programs_a, *scalars_b), kwargs, {}


def run_transpose_pair(
    plan: tuple, a: tuple[Tensor, Tensor, Tensor | None], b: tuple[Tensor, Tensor, Tensor | None]
) -> None:
    """Launch ``plan`` (:func:`transpose_pair_plan`): ``a`` and ``b`` are each (source, destination,
    zeroed buffer or None) as for :func:`run_transpose`."""
    grid, scalars, kwargs, bound = plan
    tensors = (a[0], a[1], a[1] if a[2] is None else a[2], b[0], b[1], b[1] if b[2] is None else b[2])
    launch_planned(transpose_pair_kernel, bound, grid, tensors, scalars, kwargs)


def _transpose(src: Tensor, dst: Tensor, batch: int, rows: int, cols: int) -> None:
    """dst [B, S, R] = src [B, R, S] transposed per b (B, R, S = ``batch``, ``rows``, ``cols``; both
    contiguous, not empty, on one CUDA device or on the CPU under the interpreter)."""
    plan = transpose_plan(batch, rows, cols, src.dtype, dst.dtype)
    with device_guard(src):  # most callers make these copies outside their own device guards
        run_transpose(plan, src, dst)


def transpose(
    src: Tensor, dst: Tensor, batch: int, rows: int, cols: int, *, kernel: bool | None = None
) -> Tensor:
    """``dst`` viewed as [batch, cols, rows] = ``src`` viewed as [batch, rows, cols], transposed per
    batch and converted to ``dst``'s dtype; returns ``dst``. Both contiguous with batch*rows*cols
    elements (the weights' layout changes). :func:`transpose_kernel` on CUDA (``kernel`` forces the
    choice), PyTorch's copy otherwise, and for an empty one or one with a single row or column."""
    if transpose_uses_kernel(src, rows, cols, kernel):
        _transpose(src, dst, batch, rows, cols)
    else:
        dst.view(batch, cols, rows).copy_(src.view(batch, rows, cols).transpose(1, 2))
    return dst


def transpose_uses_kernel(src: Tensor, rows: int, cols: int, kernel: bool | None = None) -> bool:
    """Whether :func:`transpose` copies ``src`` by :func:`transpose_kernel` (else by PyTorch's copy)."""
    use = _use_kernel(src) if kernel is None else kernel
    return use and src.numel() > 0 and rows > 1 and cols > 1


def _use_kernel(t: Tensor) -> bool:
    """Whether a layout copy of ``t`` runs :func:`transpose_kernel` (CUDA) or PyTorch's copy (CPU)."""
    return t.is_cuda


def _transposes(t: Tensor, channels: int, pixels: int, kernel: bool | None) -> bool:
    """Whether ``t`` (NCHW or rows, with this many channels and pixels per image) is copied by the
    kernel: contiguous, on the kernel's device (or as ``kernel`` says), and a real transpose. With one
    channel, one pixel or no element, the two layouts are one (or there is nothing to copy)."""
    use = _use_kernel(t) if kernel is None else kernel
    return channels > 1 and pixels > 1 and t.shape[0] > 0 and use and t.is_contiguous()


def to_rows(t: Tensor, dtype: torch.dtype | None = None, *, kernel: bool | None = None) -> Tensor:
    """[N, C, H, W] (any strides) -> contiguous [N, H, W, C] rows in ``dtype`` (default: ``t``'s).

    A view of ``t`` when it is channels_last already and of that dtype. An NCHW-contiguous ``t`` is
    transposed by :func:`transpose_kernel` on CUDA (``kernel`` forces the choice: tests); anything
    else goes through PyTorch's copy.
    """
    dtype = dtype or t.dtype
    plan = rows_plan(t, dtype, kernel=kernel)
    with device_guard(t):  # a planned transpose launches on the current device
        return rows_as_planned(t, plan, dtype)


ROWS_VIEW, ROWS_KERNEL, ROWS_GENERIC = 0, 1, 2


def rows_plan(t: Tensor, dtype: torch.dtype, *, kernel: bool | None = None) -> tuple[int, tuple | None]:
    """How :func:`to_rows` turns tensors like ``t`` (its shape, strides, dtype, device) into rows of
    ``dtype``: (ROWS_VIEW, None): ``t`` permuted is already those rows; (ROWS_KERNEL, a
    :func:`transpose_plan`); (ROWS_GENERIC, None): PyTorch's copy. For :func:`rows_as_planned`;
    ``kernel`` as for :func:`to_rows`."""
    n, c, h, w = t.shape
    if t.dtype == dtype and t.permute(0, 2, 3, 1).is_contiguous():
        return ROWS_VIEW, None
    if _transposes(t, c, h * w, kernel):
        return ROWS_KERNEL, transpose_plan(n, c, h * w, t.dtype, dtype)
    return ROWS_GENERIC, None


def rows_buffer(t: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised [N, H, W, C] buffer of ``dtype`` for the rows of ``t`` [N, C, H, W]."""
    n, c, h, w = t.shape
    return torch.empty((n, h, w, c), dtype=dtype, device=t.device)


def rows_as_planned(t: Tensor, plan: tuple[int, tuple | None], dtype: torch.dtype) -> Tensor:
    """:func:`to_rows` ``(t, dtype)`` for a tensor like the one ``plan`` (:func:`rows_plan`) was made
    for (a launch on the current device)."""
    mode, copy = plan
    if mode == ROWS_VIEW:
        return t.permute(0, 2, 3, 1)
    if mode == ROWS_KERNEL:
        assert copy is not None
        return run_transpose(copy, t, rows_buffer(t, dtype))
    return t.permute(0, 2, 3, 1).to(dtype).contiguous()


def from_rows(
    rows: Tensor, dtype: torch.dtype, memory_format: torch.memory_format, *, kernel: bool | None = None
) -> Tensor:
    """Contiguous [N, H, W, C] ``rows`` -> [N, C, H, W] in ``dtype`` and ``memory_format``.

    channels_last: ``rows`` itself, permuted, when of that dtype (no copy), else its conversion. NCHW:
    transposed by :func:`transpose_kernel` on CUDA (``kernel`` forces the choice), by PyTorch's copy
    otherwise (also for rows that are not contiguous).
    """
    n, h, w, c = rows.shape
    if memory_format == torch.channels_last:
        return rows.permute(0, 3, 1, 2).to(dtype)
    out = torch.empty((n, c, h, w), dtype=dtype, device=rows.device)
    if _transposes(rows, c, h * w, kernel):
        _transpose(rows, out, n, h * w, c)
        return out
    return out.copy_(rows.permute(0, 3, 1, 2))
