"""Fused Triton deformable convolution (DCNv1/DCNv2): the ``"triton"`` backend of ``deform_conv2d``.

Semantics are those of ``torchvision.ops.deform_conv2d`` (``shared/design.md`` §3), with one
deliberate difference of measure zero: a sample exactly on the line y = -1 or x = -1 is outside, so
its offset gradient is 0, where torchvision's is the one-sided derivative from inside. Pixel tiles
never cross images (so NCHW loads and stores are contiguous and vectorised). Four kernels
(``_deform_conv_kernels.py``):

forward
    Implicit GEMM over (output pixels) x (output channels of one weight group), reduced over
    (taps x input channels). Sampling positions and bilinear weights are computed once per
    (pixel block, tap, offset group); the four neighbours are gathered as contiguous channel
    vectors from a channels-last copy of the input, blended and fed to ``tl.dot``. The sampled
    columns never exist in memory. Output-channel tiles cover a whole weight group where it fits
    (up to 256 channels; 128 for full fp32), so most shapes gather each sample once.
    A configuration may also split the taps across programs (``Config.splits``: partial sums added
    with fp32 atomics, never in deterministic mode), for shapes whose tiles leave multiprocessors
    idle: the TF32 default where 64 x 256 tiles would leave over 40% of them idle (so the fp32
    forward is not bitwise repeatable there outside deterministic mode), a candidate otherwise.
backward, data part
    One program per (pixel block, offset group, tap): the column gradient
    ``grad_out @ weight_k`` by ``tl.dot``, reduced in the same pass into the offset and mask
    gradients (plain stores: the program owns those elements) and scattered into the input
    gradient with fp32 atomics (fp64 for float64).
backward, weight part
    Split-K over pixels: each program recomputes its sampled columns and accumulates
    ``columns^T @ grad_out`` in fp32 (16-bit: ``(grad_out^T @ columns)^T``, ``Config.go_first``);
    the splits add up with fp32 atomics into one buffer (in deterministic mode: per-split partial
    sums, added by ``torch.sum`` in a fixed order). The bias gradient is ``grad_out.sum``.

Memory formats: NCHW and channels_last tensors are both taken as they are (offsets, masks and the
output's gradient are read through their strides); the output and every gradient come back in the
memory format of their tensor (``memory_format_of``), so a channels_last model stays channels_last
without copies. Nothing is saved between forward and backward but the op's inputs; each call makes
one channels-last copy of the input (free when the input is channels_last already; a tiled transpose,
``_relayout.py``, for an NCHW one, as is the input gradient's conversion back to NCHW). The backward runs
the weight kernel first and converts the fp32 input-gradient accumulator into grad_input only after
releasing that copy, so no more than two input-sized buffers are alive at once
(``benchmarks/triton_memory.py`` predicts the GPU's peak memory on a CPU).

Deterministic mode (``torch.are_deterministic_algorithms_enabled()``): no float atomics anywhere.
The data kernel stores the per-sample column gradients instead of scattering them, the samples are
sorted stably by the input cell their neighbours fall in (int32 keys where the cell count allows),
one kernel sums each cell's run once into four corner-weighted sums, and a gather kernel adds, for
every input pixel, the sums of its four neighbouring cells in a fixed order. It costs one
[N*Ho*Wo*kh*kw, C_in] fp32 buffer, a sort and the cell sums ([4, N*(H+1)*(W+1), C_in] fp32), taken
a group of images at a time when the whole batch would exceed the memory budget
(``deformable.ops.set_memory_budget``, 256 MiB by default); the weight kernel writes per-split
partial sums, as many as fit that budget, instead of adding them atomically. The offset, mask and
bias gradients are deterministic in both modes.

Precision: fp16/bf16 run the matrix products in their dtype with fp32 accumulation; positions,
bilinear weights and blends are fp32 (fp64 for float64 inputs, whose products avoid ``tl.dot`` and
are exact fp64). float32 products follow the switch that governs F.conv2d on cuDNN: TF32 when
``torch.backends.cudnn.conv.fp32_precision`` is "tf32" (legacy: ``torch.backends.cudnn.allow_tf32``),
PyTorch's default, so a deformable layer is as precise as the convolutions around it; full fp32
after ``torch.backends.cudnn.allow_tf32 = False``. (torchvision's op follows the matmul switch instead,
whose default is full fp32: compare the two in fp32 with TF32 off.)

Launch configurations: a heuristic keyed by shape and dtype picks block sizes, warps and stages,
so the first call compiles once and never benchmarks. ``DEFORMABLE_TRITON_AUTOTUNE=1`` (read at
import) instead benchmarks a short candidate list per kernel the first time each (shape, dtype,
flags) key is seen (a few seconds per new shape) and keeps the fastest, for the process and in a
file per GPU model, Triton version and kernel source, so later processes skip the benchmark
(``_autotune_cache``: ``DEFORMABLE_TRITON_AUTOTUNE_CACHE`` names the file; empty keeps results in
memory only); not in deterministic mode, whose results must not depend on a timing. Tests may pin
configurations through :data:`CONFIG_OVERRIDES`.
``python -m deformable.ops._triton.compile_check`` compiles every default configuration for sm_90
without a GPU and reports registers, spills and shared memory.

Host time: at detector sizes the kernels take tens of microseconds, so the host's cost matters. Each
call's launch arguments (configuration, grid, integer arguments, constexprs) are worked out once per
(shapes, flags, settings) and cached as a plan; every launch goes through ``_launch.launch``, which
from a shape's second call on skips Triton's dispatcher and calls the compiled kernel directly.
``benchmarks/profile_host.py --stub-launches`` measures this host code on a CPU.

The same code runs on CPU tensors under ``TRITON_INTERPRET=1`` (how CI checks it), with small tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, cast

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._aten import get_memory_budget
from .._geometry import ConvGeometry
from .._layout import memory_format_of
from . import _autotune_cache
from . import _deform_conv_kernels as _k
from ._launch import device_guard, launch, launch_planned, on_current_device
from ._relayout import (
    ROWS_KERNEL,
    from_rows,
    rows_as_planned,
    rows_buffer,
    rows_plan,
    run_transpose,
    run_transpose_pair,
    to_rows,
    transpose,
    transpose_pair_plan,
    transpose_plan,
    transpose_uses_kernel,
)

AUTOTUNE_ENV = "DEFORMABLE_TRITON_AUTOTUNE"

# forward and backward return the output and every gradient in its tensor's memory format (tested):
# deform_conv2d's routes then skip their own format checks.
RESULTS_IN_FORMATS = True

__all__ = ["AUTOTUNE_ENV", "CONFIG_OVERRIDES", "VARIANT_FLAGS", "Config", "backward", "forward"]


# Each kernel's boolean variant of its launch configuration (a Config field; the autotune cache's
# seventh field).
VARIANT_FLAGS: dict[str, str] = {"forward": "flat", "data": "deferred_sums", "weight": "go_first"}


@dataclass(frozen=True)
class Config:
    """Launch configuration of one kernel.

    ``block_m`` / ``block_n`` / ``block_k`` mean, per kernel:
    forward: pixels / output channels / input channels (the reduction);
    data: pixels / input channels / output channels (the reduction);
    fused (data and weight in one pass): pixels / input channels / output channels (the whole weight
    group's: block_k >= C_out/groups);
    weight: pixels (the reduction) / output channels / input channels;
    cells: neighbourhood cells / input channels / unused (deterministic mode);
    gather: input pixels / input channels / unused (deterministic mode).

    ``splits`` (forward only) splits the taps too, for shapes with fewer tiles than multiprocessors:
    the splits add their partial sums atomically into an fp32 buffer (ignored in deterministic mode).

    ``go_first`` (weight only) orders the product as grad_out^T @ columns: the columns, blended in
    registers, become the matrix unit's second operand, staged to shared memory as they are, instead
    of a transposed first operand. On sm_90 that keeps consecutive wgmma overlapped where ptxas
    serialises them otherwise (pipelined grad_out loads; compile_check's "serialized"). The 16-bit
    default; not for full fp32 (its multiply-add products spill registers in that order).

    ``deferred_sums`` (data only) accumulates the offset and mask gradients' products with the column
    gradient in tiles across the channel blocks and sums them once after the loop, for more registers
    (three of the ten layout conversions per channel block leave the loop; where the column gradient
    leaves the matrix unit's layout once per block, :data:`DATA_GATHERED_LAYOUT`, the sums' shuffles). An
    autotuning candidate at 256 channels or fewer (H200, 2026-11-28: fp16 det-c3 0.340 ms against the
    default's 0.359, within the sweep's noise; slower at det-c4 and in TF32).

    ``flat`` (forward only) runs one loop over (channel block, tap), taps fastest, instead of a
    channel-block loop inside a tap loop, pipelined by hand in registers (``num_stages`` is then 1):
    gathers stay in flight across taps (Triton's pipeline of the nested loops drains at every tap: 4
    steps per tap at 128 channels in 32-channel blocks), with plain loads that L1 caches (Triton's
    cp.async reads through L2 only), and one channel block's neighbourhoods, which overlap from tap
    to tap, are read in succession. Each step sets its samples up again. Used where no channel
    block crosses an offset group (:func:`_flat_forward_ok`); elsewhere the nested loops run. The
    16-bit default at 64-128 input channels (H200: 15-18% faster there; slower at 256 and 512 and in
    TF32).

    ``channels_inner`` (with ``flat`` only) orders that loop channel blocks fastest: a step sets its
    samples up only where it starts a tap or an offset group (sm_90, det-c3 fp16: 26% fewer
    instructions per step with the 16-bit blend, the same count without it). An autotuning
    candidate beside each flat one; :data:`FLAT_CHANNELS_INNER` turns it on for every flat loop.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    splits: int = 1
    go_first: bool = False
    deferred_sums: bool = False
    flat: bool = False
    channels_inner: bool = False

    def __post_init__(self) -> None:
        if self.channels_inner and not self.flat:
            raise ValueError("Config: channels_inner orders the flat loop; it needs flat=True")

    def cache_fields(self) -> tuple[int, ...]:
        """The autotune cache's entry: six launch fields and the kernel's variant (weight: go_first;
        data: deferred_sums; forward: flat; 0 or 1; 2: the forward's flat loop with channels_inner)."""
        launch = (self.block_m, self.block_n, self.block_k, self.num_warps, self.num_stages, self.splits)
        return (*launch, 2 if self.channels_inner else int(bool(self.variants())))

    def variants(self) -> tuple[str, ...]:
        """The names of the variant flags (:data:`VARIANT_FLAGS`, then channels_inner) this
        configuration sets."""
        flags = tuple(flag for flag in VARIANT_FLAGS.values() if getattr(self, flag))
        return (*flags, "channels_inner") if self.channels_inner else flags

    @classmethod
    def from_cache_fields(cls, kernel: str, fields: Sequence[int]) -> Config:
        """The inverse of :meth:`cache_fields` for ``kernel`` (entries without the variant mean 0);
        ValueError for a variant ``kernel`` does not have."""
        m, n, k, warps, stages, splits = fields[:6]
        variant = fields[6] if len(fields) > 6 else 0
        flag = VARIANT_FLAGS.get(kernel)
        if variant == 0:
            return cls(m, n, k, warps, stages, splits)
        if flag is None or variant not in (1, 2) or (variant == 2 and kernel != "forward"):
            raise ValueError(f"no variant {variant} for the {kernel} kernel")
        return cls(m, n, k, warps, stages, splits, **{flag: True}, channels_inner=variant == 2)


# Kernel name ("forward", "data", "weight", "fused", "cells", "gather") -> Config used instead of the
# heuristic.
CONFIG_OVERRIDES: dict[str, Config] = {}

_INT32_SAFE = 2**30  # elements; above this, index arithmetic is 64-bit (margin for corner offsets)


class _Geometry(ConvGeometry):
    """:class:`ConvGeometry` plus the tiling and index-width questions of the kernels."""

    def __hash__(self) -> int:
        # Every launch plan's key holds the geometry: hashed once (the dataclass's hash rebuilds the
        # tuple of its fields on every call), then remembered on the (frozen) instance.
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    @property
    def pixels(self) -> int:
        return self.batch * self.out_h * self.out_w

    def pixel_tiles(self, block: int) -> int:
        """Number of pixel tiles of ``block`` output pixels (tiles never cross images)."""
        return self.batch * _cdiv(self.out_h * self.out_w, block)

    def spatial_args(self) -> tuple[int, ...]:
        """stride_h, stride_w, pad_h, pad_w, dil_h, dil_w."""
        return (*self.stride, *self.padding, *self.dilation)

    def index64(self, *extra_numels: int) -> bool:
        """Whether any tensor a kernel indexes is too large for 32-bit index arithmetic."""
        numels = (
            self.batch * self.in_channels * (self.height + 1) * (self.width + 1),
            self.pixels * self.out_channels,
            self.pixels * 3 * self.offset_groups * self.taps,
            self.pixels * self.taps * self.in_channels,
            *extra_numels,
        )
        return max(numels) >= _INT32_SAFE


# --------------------------------------------------------------------------------------------------
# Dtypes, devices, configurations


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _fp32_precision() -> str:
    """The ``tl.dot`` input precision for float32 operands: whatever F.conv2d uses on cuDNN.

    PyTorch's default lets cuDNN convolutions use TF32 (``torch.backends.cudnn.conv.fp32_precision``
    is "tf32", legacy ``torch.backends.cudnn.allow_tf32`` is True); "none" inherits the cuDNN-wide,
    then the global setting.
    """
    try:
        # Attributes PyTorch adds at run time (absent from its type stubs).
        setting = torch.backends.cudnn.conv.fp32_precision  # type: ignore[attr-defined]
        if setting == "none":
            setting = torch.backends.cudnn.fp32_precision
        if setting == "none":
            setting = torch.backends.fp32_precision  # type: ignore[attr-defined]
        return "tf32" if setting == "tf32" else "ieee"
    except (AttributeError, RuntimeError):  # PyTorch without the fp32_precision API
        try:
            return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
        except RuntimeError:
            return "ieee"


def _products_on_matrix_unit(dtype: torch.dtype) -> bool:
    """The ``tf32`` argument of :func:`_heuristic` and :func:`_candidates` for ``dtype``: False only
    for fp32 with TF32 off (full fp32 products on the FMA units)."""
    return dtype != torch.float32 or _fp32_precision() == "tf32"


def _dot_args(t: Tensor) -> dict:
    """MMA / PRECISION / CT constexprs for kernels on tensors like ``t``."""
    if t.dtype == torch.float64:
        mma = _k.MMA_SUM
    elif t.dtype == torch.bfloat16 and t.device.type != "cuda":
        mma = _k.MMA_DOT_FP32
    else:
        mma = _k.MMA_DOT
    precision = _fp32_precision() if t.dtype == torch.float32 else "tf32"
    return {"MMA": mma, "PRECISION": precision, "CT": _tl_compute_dtype(t.dtype)}


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _multiprocessors(t: Tensor) -> int:
    if t.device.type != "cuda":
        return 4
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _pow2(n: int, lo: int, hi: int) -> int:
    """The power of two at or above ``n``, clamped to [lo, hi] (by bit_length: Triton's
    ``next_power_of_2`` costs about 2.5 us a call, and RoI pooling asks on every call)."""
    return max(lo, min(hi, 1 << (max(1, n) - 1).bit_length()))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile_efficiency(geo: _Geometry, block: int) -> float:
    """Fraction of a pixel tile's rows that are real pixels (tiles never cross images)."""
    hw = geo.out_h * geo.out_w
    return hw / (_cdiv(hw, block) * block)


@functools.lru_cache(maxsize=1024)  # called on every launch: a cache hit costs far less than the rules
def _heuristic(
    kernel: str, geo: _Geometry, dtype: torch.dtype, *, interpreted: bool, sms: int, tf32: bool = True
) -> Config:
    """Default launch configuration: small tiles when ``interpreted``, else for an H100-class GPU
    with ``sms`` multiprocessors (every default compiles for sm_90 without register spills)."""
    if interpreted:
        # Interpreter: tl.dot needs every dimension >= 16; tiles stay small so that tests straddle them.
        if kernel == "forward":
            return Config(32, _pow2(geo.group_out, 16, 32), 16)
        if kernel == "data":
            return Config(32, 16, _pow2(geo.group_out, 16, 256))
        if kernel == "weight":  # 16-bit in the product order of the GPU default, so that CI tests it
            return Config(
                32, _pow2(geo.group_out, 16, 32), 16, go_first=dtype in (torch.float16, torch.bfloat16)
            )
        if kernel == "fused":  # the whole weight group's output channels in one tile
            return Config(32, 16, _pow2(geo.group_out, 16, 256))
        if kernel == "cells":
            return Config(16, _pow2(geo.channels_per_offset_group, 1, 16), 1)
        return Config(32, _pow2(geo.channels_per_offset_group, 16, 32), 1)

    if kernel == "cells":  # four [64, 32] fp32 accumulators: 64 registers per thread with 4 warps
        return Config(64, _pow2(geo.channels_per_offset_group, 1, 16 if dtype == torch.float64 else 32), 1)
    if kernel == "gather":
        return Config(64, _pow2(geo.channels_per_offset_group, 1, 32 if dtype == torch.float64 else 64), 1)
    if dtype == torch.float64:  # broadcast-and-sum products: small 3-D tiles
        return {
            "forward": Config(32, 32, 8, 4, 1),
            "data": Config(32, 16, 8, 4, 1),
            "weight": Config(8, 32, 32, 4, 1),
            "fused": Config(8, 8, _pow2(geo.group_out, 16, 256), 4, 1),
        }[kernel]
    wide = dtype in (torch.float16, torch.bfloat16)
    fma = dtype == torch.float32 and not tf32  # full-fp32 products run on the FMA units
    if kernel == "fused":
        # H200 sweep in CUDA graphs (2026-11-28, run 8): 4 warps, though they spill 52-72 bytes on
        # sm_90 where 8 do not: fp16 det-c3 0.422 ms against 0.576 for 8 warps, det-c4 0.270 against
        # 0.375, cls-c3 0.731 against 0.973. TF32 at 128 channels 64-channel blocks with 8 warps
        # (det-c3 0.632 against 0.689 and 0.931); at 256 the 32-channel 8-warp tile, the one that fits
        # shared memory without spills (untimed). Full fp32 untimed.
        block_o = _pow2(geo.group_out, 16, 256)
        if fma:
            return Config(32, 16, block_o, 8, 1)
        if wide:
            return Config(64, 32, block_o, 4, 2)
        return Config(64, 64, block_o, 8, 2) if block_o <= 128 else Config(64, 32, block_o, 8, 2)
    if kernel == "forward":
        if fma:
            return Config(64, _pow2(geo.group_out, 16, 128), 16, 8, 2)
        # One output-channel tile per weight group where it fits: every extra tile gathers again. TF32
        # too, since its weight is K-major (64 x 256: 210 registers, no spills on sm_90), even where
        # the programs leave multiprocessors idle (H200, det-c5 fp32 with 68 programs on 132: 0.165 ms
        # against 0.217 with 136 programs of 128 channels).
        block_n = _pow2(geo.group_out, 16, 256)
        # 16-bit, 64 to 128 input channels: the flat loop in 64 x 128 tiles with 4 warps, where they
        # fill the multiprocessors. H200 in CUDA graphs, 2026-11-28 (runs 6-7): det-c3 fp16 0.114 ms ->
        # 0.094, bf16 0.116 -> 0.094; cls-c3 fp16 0.186 -> 0.158, bf16 0.188 -> 0.159. Not at 256 (det-c4
        # fp16 0.072 -> 0.092: an eager sweep, timing host time at that size, had ranked it faster) nor
        # 512 (cls-c5 0.161 against 0.116), nor in TF32 (det-c3 0.167 against 0.146).
        flat_n = min(block_n, 128)
        if (
            wide
            and 64 <= geo.group_in <= 128
            and _flat_forward_ok(geo, 32)
            and geo.pixel_tiles(64) * geo.groups * _cdiv(geo.group_out, flat_n) >= sms
        ):
            return Config(64, flat_n, 32, 4, 1, flat=True)
        block_m = (
            64 if block_n > 128 or _tile_efficiency(geo, 64) > _tile_efficiency(geo, 128) + 0.03 else 128
        )
        # Fewer programs than multiprocessors: shrink the pixel tile, never the channel tile (each
        # extra channel tile gathers the same samples again: on the H200 sweep of 2026-11-26, cls-c5
        # fp16 ran 0.134 ms with 128 programs of 256 channels against 0.151 ms with 256 programs of 128).
        if block_m > 64 and geo.pixel_tiles(block_m) * geo.groups * _cdiv(geo.group_out, block_n) < sms:
            block_m = 64
        # Under 60% of the multiprocessors busy: more programs. 16-bit: 32-pixel tiles with 4 warps
        # (H200 fp16, det-c5 with 68 programs of 64 pixels: 0.100 ms against 0.122; the taps split
        # in 3, 0.102 in that run and 0.206 in a later one). TF32: the taps split in 3 (det-c5:
        # 0.129 ms against 0.165; 32-pixel tiles 0.151-0.163). Not cls-c5, 128 programs (fp16
        # 32-pixel tiles 0.141 against 0.122; TF32 splits 0.177-0.180 against 0.170).
        warps = 8 if block_m * block_n >= 128 * 128 else 4
        if block_m == 64 and geo.pixel_tiles(64) * geo.groups * _cdiv(geo.group_out, block_n) < 0.6 * sms:
            return Config(32, block_n, 32, 4, 3) if wide else Config(64, block_n, 32, warps, 3, splits=3)
        # Three stages, TF32 too: better than two in every pair the H200 sweep timed with 8 warps (64 x
        # 256 at det-c4 0.105 ms against 0.126, cls-c5 0.170 against 0.203; 128 x 128 at det-c4 0.124
        # against 0.150). TF32 64 x 128 tiles (4 warps) take two: cls-c3 0.289 against 0.337.
        stages = 2 if not wide and warps == 4 else 3
        return Config(block_m, block_n, 32, warps, stages)
    if kernel == "data":
        if fma:
            return Config(32, 32, 32, 4, 2)
        # 128 output channels or fewer: 4-warp programs, two to a multiprocessor (H200: fp16 det-c3
        # 0.402 ms against 0.424, cls-c3 0.589 against 0.631; TF32 det-c3 0.509 against 0.576, cls-c3
        # 0.754 against 0.869). 16-bit 64 x 64 tiles ran as fast but spill on sm_90 (bf16: 300 bytes).
        # Not at 256 or 512 channels, where 8 warps won (fp16 det-c4 0.220 against 0.242 for 4-warp
        # 64 x 64 tiles, det-c5 0.190 against 0.218).
        if geo.group_out <= 128:
            return Config(64, 32, 64, 4, 2) if wide else Config(32, 64, 64, 4, 2)
        # 16-bit: three stages and 256 output channels per step (H200 sweep of 2026-11-26, fp16: det-c4
        # 0.234 ms against 0.311 with two stages; cls-c5 (512 channels) 0.331 against 0.402 with 64;
        # the runs of 2026-11-27 found the gaps narrower, 0.220 against 0.228 and 0.278 against 0.284).
        # TF32 at 256 output channels: 64-channel blocks too (H200, 2026-11-28: det-c4 0.262 ms against
        # 0.293 for 32, cls-c4 0.46 against 0.53); at 128 the 4-warp tiles above.
        if geo.group_out <= 256:  # one grad_out tile per weight group, kept across channel blocks
            return Config(64, 64, _pow2(geo.group_out, 16, 256), 8, 3 if wide else 2)
        # fp32 over more than 256 output channels re-reads the grad_out tile once per channel block:
        # 64-channel blocks halve that (the largest term of the traffic model at det-c5/cls-c5) at
        # the same instructions per channel and the same occupancy (250 registers, no spills on
        # sm_90; 32-channel blocks: 177, one CTA per multiprocessor either way). H200, cls-c5:
        # 0.386 ms against 0.429.
        return Config(64, 64, 256, 8, 2) if wide else Config(64, 64, 64, 8, 2)
    # weight: the channel tile is the matrix unit's M dimension (>= 64 for wgmma); a whole weight
    # group of output channels per tile where it fits, so that each column is gathered once.
    block_k = _pow2(geo.group_in, 16, 64)
    block_n = _pow2(geo.group_out, 16, 256)
    warps = 8 if block_k * block_n >= 64 * 128 else 4
    if wide:
        # 16-bit: the product as grad_out^T @ columns (go_first), whose wgmma ptxas does not serialise.
        # H200: det-c3 0.116 ms against 0.144 for (64, 128, 64, 8, 2), det-c4 0.142 against 0.172;
        # at 512 channels 32-pixel steps, pipelined: cls-c5 0.188 against 0.217, det-c5 0.127 against 0.142.
        if geo.group_out > 256:
            return Config(32, block_n, block_k, warps, 2, go_first=True)
        return Config(64, block_n, block_k, warps, 1, go_first=True)
    if not fma and geo.group_out >= 256:
        # TF32 at 256-512 channels (H200): 64-pixel steps and one stage, unpipelined grad_out loads that
        # spare the wgmma ptxas serialises when they are pipelined. cls-c5 0.325 ms against 0.424 for
        # (32, 256, 64, 8, 2), det-c5 0.210 against 0.264, cls-c4 0.294 against 0.349, det-c4 0.193
        # against 0.201 (two stages there: 0.182). go_first is slower in TF32 (det-c4 0.199 and up).
        return Config(64, block_n, block_k, warps, 1)
    return Config(32, block_n, block_k, warps, 2)


def _blocks_align_with_offset_groups(geo: _Geometry, block: int) -> bool:
    """Whether ``block`` divides both the weight group's and the offset group's channel counts, so that
    blocks of channels counted from a weight group's first channel never cross an offset group (the
    weight kernel's ``ONE_GROUP``)."""
    return geo.channels_per_offset_group % block == 0 and geo.group_in % block == 0


def _flat_forward_ok(geo: _Geometry, block_k: int) -> bool:
    """Whether the forward's flat loop (``Config.flat``) may run: no block of ``block_k`` channels,
    counted from its weight group's first channel, crosses an offset group's boundary. True where a
    weight group lies inside one offset group (every plain DCN layer: one offset group), or where the
    blocks align with the offset groups."""
    return geo.channels_per_offset_group % geo.group_in == 0 or _blocks_align_with_offset_groups(geo, block_k)


def _forward_flat(geo: _Geometry, config: Config) -> bool:
    """Whether the forward runs ``config``'s flat loop (``FLAT``; launched with one stage)."""
    return config.flat and _flat_forward_ok(geo, config.block_k)


def _default_config(kernel: str, geo: _Geometry, t: Tensor) -> Config:
    """The override for ``kernel`` if any, else the heuristic for tensors like ``t``."""
    if kernel in CONFIG_OVERRIDES:
        return CONFIG_OVERRIDES[kernel]
    return _heuristic(
        kernel, geo, t.dtype, interpreted=t.device.type != "cuda", sms=_multiprocessors(t),
        tf32=_products_on_matrix_unit(t.dtype),
    )  # fmt: skip


def _candidates(kernel: str, geo: _Geometry, dtype: torch.dtype, tf32: bool = True) -> list[Config]:
    """The short list DEFORMABLE_TRITON_AUTOTUNE=1 benchmarks (block sizes capped to the shape);
    ``tf32``: whether fp32 products run on the matrix unit (else full fp32, on the FMA units)."""
    if dtype == torch.float64:
        return []
    if kernel == "forward":
        cap_n = _pow2(geo.group_out, 16, 256)
        raw = [
            (128, 128, 32, 8, 3), (64, 256, 32, 8, 3), (128, 256, 32, 8, 3), (64, 128, 64, 4, 3),
            (128, 128, 64, 8, 3), (64, 64, 32, 4, 4), (32, 128, 32, 4, 3), (128, 64, 32, 4, 3),
            (64, 128, 32, 4, 2), (128, 128, 16, 8, 4), (32, 256, 32, 4, 3), (32, 256, 32, 8, 3),
            # Taps split in 2 or 3: more programs where the (pixel, channel) tiles leave SMs idle.
            (64, 256, 32, 8, 3, 2), (64, 256, 32, 8, 3, 3), (128, 128, 32, 8, 3, 3),
            # Two stages, TF32's defaults before the H200 sweep found three faster.
            (64, 256, 32, 8, 2), (128, 128, 32, 8, 2), (64, 128, 32, 4, 2),
        ]  # fmt: skip
        configs = [Config(c[0], min(c[1], cap_n), c[2], c[3], c[4], c[5] if len(c) > 5 else 1) for c in raw]
        if dtype != torch.float32 or tf32:
            # The flat loop (sm_90, Triton 3.6: 64 x 256 tiles 165-171 registers in 16-bit, 251 in
            # TF32, no spills; 128 x 128 tiles spill in TF32).
            raw = [(64, 256, 32, 8)]
            raw += [(128, 128, 32, 8), (64, 128, 32, 4)] if dtype != torch.float32 else []
            # Each in either order of its steps: taps fastest, or channel blocks (channels_inner).
            configs += [
                Config(m, min(n, cap_n), kk, w, 1, flat=True, channels_inner=inner)
                for m, n, kk, w in raw
                for inner in (False, True)
                if _flat_forward_ok(geo, kk)
            ]
    elif kernel == "data":
        cap_o = _pow2(geo.group_out, 16, 256)
        raw = [
            (64, 64, 256, 8, 2), (64, 32, 256, 8, 2), (128, 32, 256, 8, 2), (64, 32, 64, 4, 2),
            (64, 64, 64, 4, 2), (128, 32, 64, 8, 2), (32, 64, 64, 4, 2), (64, 64, 256, 8, 3),
            (64, 32, 64, 8, 2), (64, 64, 64, 8, 2),  # fp32 beyond 256 output channels: before, now
            # A whole grad_out tile with 4 warps: how the fused kernel ran fastest (H200, run 8).
            (64, 32, 256, 4, 2),
        ]  # fmt: skip
        configs = [Config(m, c, min(o, cap_o), w, s) for m, c, o, w, s in raw]
        if geo.group_out <= 256 and (dtype != torch.float32 or tf32):
            # The products summed once after the loop (more registers: at 512 channels they spill).
            # Per dtype, 32-channel blocks: other tiles spill on sm_90 (compile_check compiles these).
            if dtype == torch.float32:
                # (32, 32, 64, 4, 2) was dropped: never the fastest on the H200 (run 6: 8-30% behind
                # the best) and, since the data kernel's shared-difference derivatives, ptxas caps it
                # at 168 registers with 32 bytes of spills.
                raw = [(64, 32, 256, 8, 2)]
            else:
                raw = [(64, 32, 64, 4, 2), (64, 32, 256, 8, 3)]
            configs += [Config(m, c, min(o, cap_o), w, s, deferred_sums=True) for m, c, o, w, s in raw]
    elif kernel == "weight":
        cap_n = _pow2(geo.group_out, 16, 256)
        cap_k = _pow2(geo.group_in, 16, 128)
        raw = [
            (64, 128, 64, 8, 2), (32, 128, 64, 4, 2), (64, 64, 64, 4, 2), (64, 128, 32, 4, 2),
            (128, 128, 64, 8, 2), (32, 64, 32, 4, 2), (64, 256, 64, 8, 2), (64, 128, 128, 8, 2),
            # One stage: no pipelined grad_out loads, but where Ho*Wo is a multiple of 16 the pipelined
            # ones make ptxas serialise the wgmma instructions (compile_check: "serialized").
            (64, 256, 64, 8, 1), (64, 128, 64, 8, 1),
        ]  # fmt: skip
        configs = [Config(m, min(n, cap_n), min(kk, cap_k), w, s) for m, n, kk, w, s in raw]
        # The product as grad_out^T @ columns: no serialised wgmma with pipelined loads (sm_90 SASS).
        # Not for full fp32, whose multiply-add products spill registers in that order.
        raw = [(64, 256, 64, 8, 2), (64, 128, 64, 8, 2), (32, 256, 64, 8, 2), (64, 256, 64, 8, 1)]
        if dtype != torch.float32 or tf32:
            configs += [
                Config(m, min(n, cap_n), min(kk, cap_k), w, s, go_first=True) for m, n, kk, w, s in raw
            ]
    elif kernel == "fused":
        if dtype == torch.float32 and not tf32:
            return []  # multiply-add products: every tile but the default's spills kilobytes (sm_90)
        cap_o = _pow2(geo.group_out, 16, 256)
        raw = [
            (64, 32, 4, 2),
            (64, 32, 8, 2),
            (64, 32, 8, 3),
            (32, 32, 4, 2),
            (128, 32, 8, 2),
            (64, 64, 8, 2),
        ]
        configs = [Config(m, c, cap_o, w, s) for m, c, w, s in raw]
    else:
        return []
    return list(dict.fromkeys(configs))


_TUNED: dict[tuple, Config] = {}


# Read once, at import: an environment lookup on every call would cost more than the plan lookup.
_AUTOTUNE = os.environ.get(AUTOTUNE_ENV, "0") == "1"


def _autotune_enabled(t: Tensor) -> bool:
    return _AUTOTUNE and t.device.type == "cuda"


def _choose(kernel: str, geo: _Geometry, t: Tensor, flags: tuple, run: Callable[[Config], object]) -> Config:
    """The configuration for ``kernel``: override, else (autotuned or) heuristic.

    ``run(config)`` launches the kernel; when autotuning it is called repeatedly, so it must leave
    its outputs valid after any number of calls (e.g. zero an accumulator itself).
    """
    default = _default_config(kernel, geo, t)
    # Deterministic mode keeps the heuristic: a configuration changes the order of additions, and
    # a timed choice could differ between processes, hence the bits.
    if kernel in CONFIG_OVERRIDES or not _autotune_enabled(t) or torch.are_deterministic_algorithms_enabled():
        return default
    key = (kernel, geo, t.dtype, t.device.index, flags, _fp32_precision())
    if key in _TUNED:
        return _TUNED[key]
    scope, text_key = (
        _autotune_scope(t),
        json.dumps([kernel, str(t.dtype), dataclasses.astuple(geo), *key[4:]]),
    )
    stored = _autotune_cache.lookup(scope, text_key)  # what an earlier process found on this GPU
    if stored is not None:
        try:
            config = Config.from_cache_fields(kernel, stored)
            run(config)  # a trial launch: an entry that cannot run is tuned again
            _TUNED[key] = config
        except Exception as error:
            message = f"deformable: ignoring the autotune cache entry {stored} of {kernel} ({error})"
            warnings.warn(message, stacklevel=3)
    if key not in _TUNED:
        best, best_ms = default, float("inf")
        tf32 = _products_on_matrix_unit(t.dtype)
        for config in dict.fromkeys([default, *_candidates(kernel, geo, t.dtype, tf32)]):
            # A candidate that cannot run at all is skipped; one short of shared memory runs with
            # fewer stages (_launch retries it) and is timed as it runs.
            try:
                ms = triton.testing.do_bench(lambda config=config: run(config), warmup=5, rep=20)
            except Exception:
                continue
            if ms < best_ms:
                best, best_ms = config, ms
        _TUNED[key] = best
        if best_ms < float("inf"):
            _autotune_cache.store(scope, text_key, best.cache_fields())
    return _TUNED[key]


def _autotune_scope(t: Tensor) -> str:
    """What a tuned configuration is valid for: the GPU model, the Triton version, the kernels' source."""
    device = torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else t.device.type
    return f"{device} | triton {triton.__version__} | kernels {_kernels_hash()}"


@functools.cache
def _kernels_hash() -> str:
    return hashlib.sha256(Path(_k.__file__).read_bytes()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# Launch plans: a call's launch arguments depend on its shapes, flags and settings alone, so they are
# worked out (configuration chosen, grid and integer arguments computed) once per such key; a repeated
# call only prepares its tensors and launches (host time is what these ops cost at detector sizes).


class _Launch(NamedTuple):
    """One prepared launch: the grid, the integer arguments after the tensors, the keyword arguments
    (warps, stages, constexprs), and ``launch_planned``'s compiled kernels for it (a new dict each)."""

    grid: tuple[int]
    scalars: tuple
    kwargs: dict
    bound: dict


def _run(kernel, spec: _Launch, tensors: tuple[Tensor, ...]) -> None:
    launch_planned(kernel, spec.bound, spec.grid, tensors, spec.scalars, spec.kwargs)


_PLANS: dict[tuple, object] = {}
_MAX_PLANS = 2048  # detectors with varying image sizes keep adding shapes


def _planned(
    key: tuple, kernel: str, geo: _Geometry, t: Tensor, flags: tuple, spec_of: Callable, run: Callable
):
    """The launch plan cached under ``key``; on a miss, ``spec_of`` the configuration :func:`_choose`
    picks for ``kernel`` (autotuning launches candidates through ``run(spec_of(config))``)."""
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = spec_of(_choose(kernel, geo, t, flags, lambda config: run(spec_of(config))))
    return plan


def _settings(t: Tensor, budgeted: bool = False) -> tuple:
    """Everything besides shapes and flags that a plan for tensors like ``t`` depends on: the fp32
    product precision, autotuning, :data:`FUSED_BACKWARD`, :data:`BLEND_IN_16_BIT`,
    :data:`FLAT_CHANNELS_INNER`, :data:`DATA_GATHERED_LAYOUT`, configuration overrides and, for
    ``budgeted`` plans (the deterministic backward's buffers), the memory budget."""
    precision = _fp32_precision() if t.dtype == torch.float32 else None
    budget = get_memory_budget() if budgeted else None
    switches = (FUSED_BACKWARD, BLEND_IN_16_BIT, FLAT_CHANNELS_INNER, DATA_GATHERED_LAYOUT)
    state = (precision, _autotune_enabled(t), budget, *switches)
    return (*state, *CONFIG_OVERRIDES.items()) if CONFIG_OVERRIDES else state


_GEOMETRIES: dict[tuple, _Geometry] = {}


def _geometry(input: Tensor, offset: Tensor, weight: Tensor, stride, padding, dilation) -> _Geometry:
    """:meth:`_Geometry.of`, cached by the shapes."""
    key = (input.shape, offset.shape, weight.shape, stride, padding, dilation)
    geo = _GEOMETRIES.get(key)
    if geo is None:
        if len(_GEOMETRIES) >= _MAX_PLANS:
            _GEOMETRIES.clear()
        geo = _GEOMETRIES[key] = _Geometry.of(input, offset, weight, stride, padding, dilation)
    return geo


# --------------------------------------------------------------------------------------------------
# Layouts


def _pixel_operand(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """A per-pixel map [N, C, Ho, Wo] (offset, mask, output) as the kernels index it, and its (image,
    channel, flat pixel p = y*Wo + x) strides: the tensor itself when NCHW-contiguous or channels_last
    (with the format's canonical strides, which address every element whatever strides its size-1
    dimensions carry), or when its rows and columns merge into one pixel stride (a channel slice of
    either, as a layer's offsets cut from its offset-and-mask prediction); otherwise an NCHW copy."""
    n, c, h, w = t.shape
    if t.is_contiguous():  # first: also what memory_format_of calls a tensor that is both
        return t, (c * h * w, h * w, 1)
    if t.is_contiguous(memory_format=torch.channels_last):
        return t, (h * w * c, 1, c)
    sn, sc, sh, sw = t.stride()
    pixel = sh if w == 1 else (sw if h == 1 or sh == w * sw else None)
    # Beyond 32-bit reach, the copy's canonical size is what the kernels' index-width choice counts.
    if pixel is not None and (n - 1) * sn + (c - 1) * sc + (h * w - 1) * pixel < _INT32_SAFE:
        return t, (sn, sc, pixel)
    return t.contiguous(), _format_strides(t.shape, torch.contiguous_format)


def _format_strides(shape: Sequence[int], fmt: torch.memory_format) -> tuple[int, int, int]:
    """(image, channel, flat pixel) strides of a dense [N, C, H, W] tensor in memory format ``fmt``."""
    _, c, h, w = shape
    return (h * w * c, 1, c) if fmt == torch.channels_last else (c * h * w, h * w, 1)


def _empty_map(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised [N, C, H, W] tensor in ``like``'s memory format (and dtype unless given)."""
    return torch.empty(
        shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format_of(like)
    )


def _grad_out_operand(
    grad_output: Tensor, dtype: torch.dtype, pixel_major: bool = False
) -> tuple[Tensor, tuple[int, int, int, int]]:
    """grad_output [N, C_out, Ho, Wo] in ``dtype``, laid out so the backward kernels load it as
    16-byte vectors, with its (image, channel, pixel) strides and the alignment hint ``GO_ALIGN``.

    Channels-last stays as it is (contiguous channels). NCHW stays when Ho*Wo is a multiple of 16
    (the compiler's specialisation sees that) or of one vector's elements (then GO_ALIGN tells it);
    otherwise a channels-last copy is made. Left as it was, every channel's row would start anywhere,
    and the kernels would load and stage the tile one element at a time: at det-c4 (Ho*Wo = 4200,
    fp16) that is 44% of the weight kernel's and 26% of the data kernel's inner-loop instructions
    (sm_90 SASS), for a copy that costs one pass over grad_output.

    ``pixel_major``: NCHW whatever the alignment (a channels-last grad_output is copied), for the TF32
    weight kernel. Its reduction runs over the pixels, and TF32's matrix unit takes only operands
    whose reduction axis is contiguous: a channels-last tile must be transposed on its way to shared
    memory, which cost more than the element-wise loads it avoids (H200: the weight kernel at det-c5
    0.252 ms NCHW against 0.40 channels-last, cls-c5 0.417 against 0.722).
    """
    if pixel_major:  # converted straight to NCHW: one copy at most, not a conversion and then a copy
        rows = grad_output.permute(0, 2, 3, 1)
        if rows.is_contiguous() and not grad_output.is_contiguous():
            go = from_rows(rows, dtype, torch.contiguous_format)
        else:
            go = grad_output.to(dtype, memory_format=torch.contiguous_format)
    else:
        go = grad_output.to(dtype)
    c, ho, wo = go.shape[1:]
    pixels = ho * wo
    channels_last = (pixels * c, 1, c)
    vector = max(1, 16 // go.element_size())
    hint = vector if pixels % 16 and pixels % vector == 0 else 1
    if pixel_major:  # .to leaves a tensor of the right dtype as it is, contiguous or not
        return go.contiguous(), (c * pixels, pixels, 1, hint)
    if not go.is_contiguous() and go.is_contiguous(memory_format=torch.channels_last):
        return go, (*channels_last, 1)
    if pixels % 16 == 0 or pixels % vector == 0 or c == 1:
        return go.contiguous(), (c * pixels, pixels, 1, hint)
    return to_rows(go).permute(0, 3, 1, 2), (*channels_last, 1)


class _WeightLayout(NamedTuple):
    """How a weight [C_out, C_in/groups, kh, kw] (of given shape, strides, dtype and device) becomes a
    kernel's contiguous GEMM operand of ``shape``: the weight viewed as [groups, C_out/groups,
    C_in/groups, kh*kw], permuted by ``order``; by ``copy`` (a :func:`transpose_plan`: one transpose
    per group) where the weight is contiguous and the transpose kernel runs, else by PyTorch's copy."""

    shape: tuple[int, int, int, int]
    order: tuple[int, int, int, int]
    copy: tuple | None


# The weight operands (order of [groups, C_out/g, C_in/g, taps]; the transpose's rows and columns per
# group, None where no single transpose makes it):
_WEIGHT_OPERANDS = {
    # the data kernel's [groups, C_in/g, taps, C_out/g]: its reduction, over output channels, contiguous
    "data": ((0, 2, 3, 1), lambda co, ci, k: (co, ci * k)),
    # the forward's on the matrix unit [groups, taps, C_out/g, C_in/g]: its reduction, over input
    # channels, contiguous (the operand TF32's matrix unit needs, which fp16/bf16 take as well)
    "forward": ((0, 3, 1, 2), lambda co, ci, k: (co * ci, k)),
    # the forward's on the FMA units (full fp32, fp64) [groups, taps, C_in/g, C_out/g]: the layout
    # their multiply-add products keep in fewer registers
    "forward fma": ((0, 3, 2, 1), None),
}


def _weight_layout(
    weight: Tensor, geo: _Geometry, operand: str, zero: torch.dtype | None = None
) -> _WeightLayout:
    """The :class:`_WeightLayout` of ``operand`` (a key of ``_WEIGHT_OPERANDS``) for ``weight``;
    ``zero``: the dtype of a buffer laid out as the operand that its copy also clears
    (:func:`transpose_plan`)."""
    order, transposed = _WEIGHT_OPERANDS[operand]
    dims = (geo.groups, geo.group_out, geo.group_in, geo.taps)
    shape = (dims[order[0]], dims[order[1]], dims[order[2]], dims[order[3]])
    copy = None
    if transposed is not None and weight.is_contiguous():
        rows, cols = transposed(*dims[1:])
        if transpose_uses_kernel(weight, rows, cols):
            copy = transpose_plan(geo.groups, rows, cols, weight.dtype, weight.dtype, zero)
    return _WeightLayout(shape, order, copy)


def _weight_as(layout: _WeightLayout, weight: Tensor) -> Tensor:
    """``weight`` in ``layout`` (a launch on the current device where the layout has a ``copy``)."""
    out = weight.new_empty(layout.shape)
    if layout.copy is not None:
        return run_transpose(layout.copy, weight, out)
    dims = [0, 0, 0, 0]
    for axis, size in zip(layout.order, layout.shape, strict=True):
        dims[axis] = size
    return out.copy_(weight.reshape(dims).permute(layout.order))


def _weight_gemm(weight: Tensor, geo: _Geometry) -> Tensor:
    """The data kernel's weight [groups, C_in/groups, kh*kw, C_out/groups] (on the current device)."""
    return _weight_as(_weight_layout(weight, geo, "data"), weight)


def _forward_k_major(dtype: torch.dtype, fp32_precision: str | None) -> bool:
    """Whether the forward's products run on the matrix unit (16-bit, or fp32 as TF32), which wants
    K-major weight tiles (``W_K_MAJOR``); the launcher and ``compile_check`` both ask here."""
    return dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32 and fp32_precision == "tf32")


def _grid(programs: int) -> tuple[int]:
    return (programs,)


# --------------------------------------------------------------------------------------------------
# Call plans: what a call does depends on its tensors' shapes, strides, dtype and device, the flags and
# the settings alone, so a repeated call (a layer's every step) looks its plan up by those and only
# allocates and launches. The first call of a signature, and every call a plan does not cover (empty
# tensors, layout copies of the offset or mask, split taps, deterministic mode's backward), takes the
# general path, which works the plan out.

# Call plans live in _PLANS beside the launch plans they hold (keys "forward call", "backward call"):
# whatever forgets the launch plans forgets them too.


def _signature(input: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor, stride, padding, dilation):
    """The part of a call plan's key that the forward and backward share (the layouts of its operands)."""
    return (
        input.shape, input.stride(), offset.shape, offset.stride(), None if mask is None else mask.stride(),
        weight.shape, weight.stride(), stride, padding, dilation, input.dtype, input.device,
    )  # fmt: skip


def _remember(key: tuple, plan) -> None:
    """Keep ``plan`` (None: the call took a path plans do not cover, nothing to keep)."""
    if plan is None:
        return
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan


# --------------------------------------------------------------------------------------------------
# Forward


# The forward blends a 16-bit input's four neighbours in fp16/bf16 arithmetic (as torchvision's
# kernels do) instead of converting them to fp32 and the blend back: sm_90, det-c3 fp16, the main loop
# 467 -> 400 instructions (bf16 501 -> 401), the gathers and the matrix products unchanged; each
# column value rounded in a few operations instead of once (the products still accumulate in fp32).
# Off until a GPU has timed it (gpu_check's blend A/B). Part of every plan's settings.
BLEND_IN_16_BIT = False


# The forward's flat loop (Config.flat) with the channel blocks fastest instead of the taps: a step
# sets its samples up only where it starts a tap or an offset group, instead of at every step (sm_90,
# det-c3 fp16: the set-up is most of a step's instructions besides the blend and the product). Off
# until a GPU has timed it (gpu_check's forward A/B); autotuning tries it per shape as
# ``Config.channels_inner``. Part of every plan's settings.
FLAT_CHANNELS_INNER = False


def _blends_in_16_bit(t: Tensor) -> bool:
    """Whether the forward blends tensors like ``t`` in 16-bit (``LOW_BLEND``): fp16, and bf16 on a
    GPU (Triton's interpreter computes bf16 arithmetic on the raw bits: CPU tensors blend in fp32)."""
    return BLEND_IN_16_BIT and (t.dtype == torch.float16 or (t.dtype == torch.bfloat16 and t.is_cuda))


class _ForwardCall(NamedTuple):
    """A forward's call plan: the output's shape and format, how the input becomes rows
    (:func:`rows_plan`) and the weight its GEMM operand, or both at once (``copies``, a
    :func:`transpose_pair_plan`, where both are transposes), and the kernel's launch."""

    out_shape: tuple[int, int, int, int]
    out_format: torch.memory_format
    x_rows: tuple
    w_layout: _WeightLayout
    copies: tuple | None
    spec: _Launch


def _copies_together(x_rows: tuple, w_copy: tuple | None) -> tuple | None:
    """One launch for the input's rows and a weight layout (:func:`transpose_pair_plan`) where both
    are transposes (``x_rows`` a :func:`rows_plan`, ``w_copy`` a :func:`transpose_plan` or None)."""
    mode, x_copy = x_rows
    if mode != ROWS_KERNEL or x_copy is None or w_copy is None:
        return None
    return transpose_pair_plan(x_copy, w_copy)


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
    """Deformable convolution forward (arguments validated by ``deform_conv2d``).

    Args:
        input: [N, C_in, H, W]; offset: [N, 2*G*kh*kw, Ho, Wo]; mask: [N, G*kh*kw, Ho, Wo] or None;
        weight: [C_out, C_in/groups, kh, kw]; bias: [C_out] or None; all one dtype and device,
        any strides.

    Returns:
        [N, C_out, Ho, Wo] in the input's dtype and memory format (:func:`memory_format_of`).
    """
    settings = _settings(input)
    deterministic = torch.are_deterministic_algorithms_enabled()
    key = (
        "forward call", *_signature(input, offset, mask, weight, stride, padding, dilation),
        None if bias is None else bias.stride(), deterministic, *settings,
    )  # fmt: skip
    plan = _PLANS.get(key)
    if isinstance(plan, _ForwardCall) and on_current_device(input):
        return _planned_forward(plan, input, offset, mask, weight, bias)
    out, plan = _forward(
        input, offset, mask, weight, bias, stride, padding, dilation, settings, deterministic
    )
    _remember(key, plan)
    return out


def _planned_forward(
    plan: _ForwardCall,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
) -> Tensor:
    out = torch.empty(plan.out_shape, dtype=input.dtype, device=input.device, memory_format=plan.out_format)
    if plan.copies is not None:
        x, w = rows_buffer(input, input.dtype), weight.new_empty(plan.w_layout.shape)
        run_transpose_pair(plan.copies, (input, x, None), (weight, w, None))
    else:
        x = rows_as_planned(input, plan.x_rows, input.dtype)
        w = _weight_as(plan.w_layout, weight)
    tensors = (x, offset, offset if mask is None else mask, w, w if bias is None else bias, out)
    _run(_k.deform_conv_fwd_kernel, plan.spec, tensors)
    return out


def _forward(
    input, offset, mask, weight, bias, stride, padding, dilation, settings: tuple, deterministic: bool
) -> tuple[Tensor, _ForwardCall | None]:
    """The general forward: the output, and the call plan for later calls like this one (None where
    it takes a path plans do not cover)."""
    geo = _geometry(input, offset, weight, stride, padding, dilation)
    out_format = memory_format_of(input)
    shape = (geo.batch, geo.out_channels, geo.out_h, geo.out_w)
    out = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=out_format)
    if out.numel() == 0:
        return out, None
    if input.numel() == 0:  # an empty map: every sample is 0 (no launch with empty tensors)
        return (out.fill_(0) if bias is None else out.copy_(bias.view(1, -1, 1, 1).expand_as(out))), None
    x = to_rows(input)
    offset_c, offset_strides = _pixel_operand(offset)
    mask_c, mask_strides = _pixel_operand(mask) if mask is not None else (offset_c, offset_strides)
    out_strides = _format_strides(out.shape, out_format)
    k_major = _forward_k_major(input.dtype, settings[0])  # settings[0]: the fp32 product precision
    w_layout = _weight_layout(weight, geo, "forward" if k_major else "forward fma")
    with device_guard(input):
        w = _weight_as(w_layout, weight)
    bias_c = w if bias is None else (bias if bias.is_contiguous() else bias.contiguous())
    tensors = (x, offset_c, mask_c, w, bias_c, out)
    flags = (mask is not None, bias is not None)
    kernel = _k.deform_conv_fwd_kernel

    def spec_of(cfg: Config) -> _Launch:
        tiles = geo.pixel_tiles(cfg.block_m) * geo.groups * _cdiv(geo.group_out, cfg.block_n)
        # Split taps add partial sums with float atomics: not in deterministic mode.
        taps_per_split = _cdiv(geo.taps, 1 if deterministic else max(1, cfg.splits))
        splits = _cdiv(geo.taps, taps_per_split)
        flat = _forward_flat(geo, cfg)
        scalars = (
            geo.batch, geo.height, geo.width, geo.in_channels, geo.out_h * geo.out_w, geo.out_w,
            geo.group_in, geo.group_out, geo.channels_per_offset_group, geo.taps, geo.kw,
            *geo.spatial_args(), tiles, taps_per_split, *offset_strides, *mask_strides, *out_strides,
        )  # fmt: skip
        return _Launch(_grid(splits * tiles), scalars, dict(
            HAS_MASK=flags[0], HAS_BIAS=flags[1], SPLIT_TAPS=splits > 1, INDEX64=geo.index64(),
            W_K_MAJOR=k_major, FLAT=flat, CHANNELS_INNER=flat and (cfg.channels_inner or FLAT_CHANNELS_INNER),
            WHOLE_BLOCKS=_blocks_align_with_offset_groups(geo, cfg.block_k),
            LOW_BLEND=_blends_in_16_bit(input),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=1 if flat else cfg.num_stages,
            **_dot_args(input),
        ), {})  # fmt: skip

    def run(spec: _Launch) -> None:
        if not spec.kwargs["SPLIT_TAPS"]:
            _run(kernel, spec, tensors)
            return
        wide = out.dtype in (torch.float32, torch.float64)
        # A 16-bit output's fp32 buffer takes its strides, which the launch's scalars carry.
        target = out.zero_() if wide else torch.zeros_like(out, dtype=torch.float32)
        _run(kernel, spec, (*tensors[:-1], target))
        if not wide:
            out.copy_(target)

    strides = (offset_strides, mask_strides, out_strides)  # in the launch's scalars
    key = ("forward", geo, flags, strides, deterministic, input.dtype, input.device, *settings)
    with device_guard(input):
        spec = _planned(key, "forward", geo, input, (*flags, deterministic), spec_of, run)
        run(spec)
    # The plan: where the offset and mask need no copy, the bias none and the taps are not split.
    copies = (
        offset_c is not offset
        or (mask is not None and mask_c is not mask)
        or bias_c is not (w if bias is None else bias)
    )
    if copies or spec.kwargs["SPLIT_TAPS"]:
        return out, None
    x_rows = rows_plan(input, input.dtype)
    return out, _ForwardCall(
        shape, out_format, x_rows, w_layout, _copies_together(x_rows, w_layout.copy), spec
    )


# --------------------------------------------------------------------------------------------------
# Backward


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
    """Gradients of the forward with respect to (input, offset, mask, weight, bias).

    Args:
        grad_output: [N, C_out, Ho, Wo]; the others as for :func:`forward`.
        output_mask: which of the five gradients to compute.

    Returns:
        (grad_input [N, C_in, H, W], grad_offset, grad_mask, grad_weight, grad_bias [C_out]), each
        in its tensor's dtype and memory format (:func:`memory_format_of`), None where not requested
        (grad_mask also when ``mask`` is None). Deterministic when
        ``torch.are_deterministic_algorithms_enabled()``.
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    settings = _settings(input, budgeted=deterministic)
    key = (
        "backward call", *_signature(input, offset, mask, weight, stride, padding, dilation),
        grad_output.shape, grad_output.stride(), grad_output.dtype, output_mask, deterministic, *settings,
    )  # fmt: skip
    plan = _PLANS.get(key)
    if isinstance(plan, _BackwardCall) and on_current_device(input):
        return _planned_backward(plan, grad_output, input, offset, mask, weight)
    grads, plan = _backward(
        grad_output,
        input,
        offset,
        mask,
        weight,
        stride,
        padding,
        dilation,
        output_mask,
        settings,
        deterministic,
    )
    _remember(key, plan)
    return grads


class _BackwardCall(NamedTuple):
    """A backward's call plan (never deterministic mode's): which gradients, how grad_output becomes
    each kernel's operand (as it is, or by :func:`_grad_out_operand`), how the input becomes rows
    (:func:`rows_plan`; None: not read), the two kernels' launches (None: not run) with the weight
    kernel's fp32 buffer shape, and the layouts of the weight, the gradients and the accumulator.
    ``copies``: where the rows and the data kernel's weight are both transposes, one launch for the
    two (:func:`transpose_pair_plan`), which with ``part_zeroed`` also clears the weight kernel's
    buffer (laid out as that weight)."""

    geo: _Geometry
    dtype: torch.dtype
    need_offset: bool
    need_mask: bool
    need_bias: bool
    go: int  # the data kernel's operand: _GO_NONE (not needed), _GO_AS_IS (grad_output), _GO_COPY
    go_w: int  # the weight kernel's: _GO_NONE, _GO_SAME (the data kernel's), _GO_AS_IS, _GO_COPY
    x_rows: tuple | None
    weight_spec: _Launch | None
    part_shape: tuple[int, ...]
    data_spec: _Launch | None
    w_layout: _WeightLayout | None  # the data kernel's weight (None: the kernel does not run)
    input_format: torch.memory_format | None  # None: no input gradient
    offset_format: torch.memory_format
    mask_format: torch.memory_format
    copies: tuple | None
    part_zeroed: bool


_GO_NONE, _GO_SAME, _GO_AS_IS, _GO_COPY = 0, 1, 2, 3


def _planned_backward(
    plan: _BackwardCall,
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """:func:`backward` by a call plan: the general path's allocations and launches, in its order."""
    geo, dtype = plan.geo, plan.dtype
    g = grad_output.to(dtype)
    go = g if plan.go == _GO_AS_IS else (_grad_out_operand(g, dtype)[0] if plan.go == _GO_COPY else None)
    go_w = go if plan.go_w == _GO_SAME else g if plan.go_w == _GO_AS_IS else None
    if plan.go_w == _GO_COPY:
        go_w = _grad_out_operand(g, dtype, True)[0]
    del g  # a converted copy is freed before the input's rows are made, as on the general path
    grad_bias = go.sum(dim=(0, 2, 3)) if plan.need_bias and go is not None else None
    acc = _compute_dtype(dtype)
    w = part = None
    if plan.copies is not None:  # the rows and the data kernel's weight (made early: weight-sized)
        assert plan.w_layout is not None
        x, w = rows_buffer(input, dtype), weight.new_empty(plan.w_layout.shape)
        if plan.part_zeroed:
            part = torch.empty(plan.part_shape, dtype=acc, device=input.device)
        run_transpose_pair(plan.copies, (input, x, None), (weight, w, part))
    else:
        x = input if plan.x_rows is None else rows_as_planned(input, plan.x_rows, dtype)
    mask_c = offset if mask is None else mask
    grad_input = grad_offset = grad_mask = grad_weight = None
    if plan.weight_spec is not None:
        assert go_w is not None
        if part is None:
            part = torch.zeros(plan.part_shape, dtype=acc, device=input.device)
        _run(_k.deform_conv_bwd_weight_kernel, plan.weight_spec, (x, offset, mask_c, go_w, part))
        grad_weight = _grad_weight_in_format(part[0], weight, geo)
        del part
    del go_w  # a pixel-major copy is freed before the data kernel's buffers are made
    if plan.data_spec is not None:
        assert plan.w_layout is not None
        if w is None:
            w = _weight_as(plan.w_layout, weight)
        device = input.device
        if plan.need_offset:
            grad_offset = torch.empty(
                offset.shape, dtype=dtype, device=device, memory_format=plan.offset_format
            )
        if plan.need_mask and mask is not None:
            grad_mask = torch.empty(mask.shape, dtype=dtype, device=device, memory_format=plan.mask_format)
        gx = None
        if plan.input_format is not None:
            gx = torch.zeros((geo.batch, geo.height, geo.width, geo.in_channels), dtype=acc, device=device)
        assert go is not None  # the data kernel's operand: made whenever the kernel runs
        tensors = (
            x, offset, mask_c, w, go,
            offset if gx is None else gx,
            offset if grad_offset is None else grad_offset,
            offset if grad_mask is None else grad_mask,
            offset, offset, offset,
        )  # fmt: skip
        _run(_k.deform_conv_bwd_data_kernel, plan.data_spec, tensors)
        del tensors, w, x
        if gx is not None and plan.input_format is not None:
            grad_input = from_rows(gx, dtype, plan.input_format)
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias


def _backward(
    grad_output, input, offset, mask, weight, stride, padding, dilation, output_mask, settings: tuple,
    deterministic: bool,
) -> tuple[tuple, _BackwardCall | None]:  # fmt: skip
    """The general backward: the five gradients, and the call plan for later calls like this one (None
    where it takes a path plans do not cover)."""
    need_input, need_offset, need_mask, need_weight, need_bias = (bool(v) for v in output_mask)
    need_mask = need_mask and mask is not None
    geo = _geometry(input, offset, weight, stride, padding, dilation)
    dtype = input.dtype
    need_data = need_input or need_offset or need_mask
    # Each kernel reads grad_output in the layout it loads best; the data kernel's TF32 products
    # reduce over the channels, the weight kernel's over the pixels (_grad_out_operand).
    tf32 = settings[0] == "tf32"  # fp32 products on the matrix unit (the precision is None otherwise)
    fused = need_weight and need_data and not deterministic and _fused_backward_ok(geo, input)
    g = grad_output.to(dtype)
    go, go_layout = None, None
    if need_data or need_bias or (need_weight and not tf32):
        go, go_layout = _grad_out_operand(g, dtype)
    go_w, go_w_layout = go, go_layout
    if need_weight and tf32 and not fused:
        go_w, go_w_layout = _grad_out_operand(g, dtype, pixel_major=True)
    go_source = _GO_NONE if go is None else (_GO_AS_IS if go is g else _GO_COPY)
    go_w_source = (
        _GO_NONE if go_w is None else _GO_SAME if go_w is go else _GO_AS_IS if go_w is g else _GO_COPY
    )
    del g

    # Always summed from the data kernel's operand: the same bits whichever gradients are asked for.
    # PyTorch's reductions accumulate 16-bit tensors in fp32 and round once: one kernel, not two.
    grad_bias = go.sum(dim=(0, 2, 3)) if need_bias and go is not None else None
    if geo.pixels == 0 or input.numel() == 0 or weight.numel() == 0:  # no launch: all other gradients are 0

        def zeros(t: Tensor) -> Tensor:
            return torch.zeros_like(t, memory_format=memory_format_of(t))

        return (
            zeros(input) if need_input else None,
            zeros(offset) if need_offset else None,
            zeros(mask) if need_mask and mask is not None else None,
            zeros(weight) if need_weight else None,
            grad_bias,
        ), None

    # Only the weight, offset and mask gradients read the input's samples: an input gradient alone
    # (an effective receptive field, an adversarial input) needs no copy, and the kernel no input.
    x = to_rows(input) if need_weight or need_offset or need_mask else input
    offset_c, offset_strides = _pixel_operand(offset)
    mask_c, mask_strides = _pixel_operand(mask) if mask is not None else (offset_c, offset_strides)
    # Read strides of offset and mask, then those of their gradients: new tensors in their formats.
    maps = (
        *offset_strides,
        *mask_strides,
        *_format_strides(offset_c.shape, memory_format_of(offset_c)),
        *_format_strides(mask_c.shape, memory_format_of(mask_c)),
    )
    grad_input = grad_offset = grad_mask = grad_weight = None
    key: tuple = (
        geo,
        mask is not None,
        need_input,
        need_offset,
        need_mask,
        deterministic,
        dtype,
        input.device,
    )
    key += (go_layout, go_w_layout, maps, *settings)
    if fused:
        with device_guard(input):
            w = _weight_gemm(weight, geo)
            finish_input, grad_offset, grad_mask, grad_weight = _fused_grads(
                geo, x, offset_c, mask_c, mask is not None, w, go, go_layout, maps, need_input,
                need_offset, need_mask, weight, memory_format_of(input), key,
            )  # fmt: skip
            del w, x
            grad_input = finish_input() if finish_input is not None else None
        return (grad_input, grad_offset, grad_mask, grad_weight, grad_bias), None
    with device_guard(input):
        # Peak memory: the weight kernel runs first and the input gradient is written last, after the
        # channels-last copy of the input is released, so that copy, the fp32 accumulator and
        # grad_input (each input-sized) are never alive together.
        if need_weight:
            grad_weight = _weight_grad(
                geo,
                x,
                offset_c,
                mask_c,
                mask is not None,
                go_w,
                go_w_layout,
                maps,
                weight,
                deterministic,
                key,
            )
        del go_w  # a pixel-major copy is freed before the data kernel's buffers are made
        finish_input = None
        if need_data:
            w = _weight_gemm(weight, geo)
            finish_input, grad_offset, grad_mask = _data_grads(
                geo, x, offset_c, mask_c, mask is not None, w, go, go_layout, maps, need_input,
                need_offset, need_mask, memory_format_of(input), key,
            )  # fmt: skip
            del w
        del x
        if finish_input is not None:
            grad_input = finish_input()
    grads = (grad_input, grad_offset, grad_mask, grad_weight, grad_bias)
    # The plan: where the offset and mask need no copy, outside deterministic mode.
    if deterministic or offset_c is not offset or (mask is not None and mask_c is not mask):
        return grads, None
    weight_plan = cast(
        "tuple[_Launch, tuple[int, ...]] | None", _PLANS.get(("weight", *key)) if need_weight else None
    )
    data_spec = cast("_Launch | None", _PLANS.get(("data", geo.batch, *key)) if need_data else None)
    if (need_weight and weight_plan is None) or (need_data and data_spec is None):
        return grads, None  # the launch plans were forgotten meanwhile (a full cache): plan next time
    w_layout = _weight_layout(weight, geo, "data") if need_data else None
    x_rows = rows_plan(input, dtype) if need_weight or need_offset or need_mask else None
    copies, part_zeroed = None, False
    if x_rows is not None and w_layout is not None and w_layout.copy is not None:
        w_copy: tuple | None = w_layout.copy
        # The weight kernel's single fp32 buffer (one split outside deterministic mode) is laid out as
        # the data kernel's weight: the same launch clears it.
        part_zeroed = weight_plan is not None and math.prod(weight_plan[1]) == math.prod(w_layout.shape)
        if part_zeroed:
            w_copy = _weight_layout(weight, geo, "data", zero=_compute_dtype(dtype)).copy
        copies = _copies_together(x_rows, w_copy)
        part_zeroed = part_zeroed and copies is not None
    plan = _BackwardCall(
        geo, dtype, need_offset, need_mask, need_bias, go_source, go_w_source, x_rows,
        weight_plan[0] if weight_plan is not None else None,
        weight_plan[1] if weight_plan is not None else (),
        data_spec, w_layout, memory_format_of(input) if need_input else None,
        memory_format_of(offset), memory_format_of(mask_c), copies, part_zeroed,
    )  # fmt: skip
    return grads, plan


# The data and weight kernels fused into one pass over the samples (``deform_conv_bwd_fused_kernel``):
# each sample gathered once for all four of its gradients, grad_out read once for both products. Off:
# on the H200 (2026-11-28, CUDA graphs, the input/offset/mask/weight backward) its best configuration
# only matched the two kernels (fp16 det-c3 0.422 ms against 0.437, det-c4 0.270 against 0.286, cls-c3
# 0.731 against 0.680; TF32 det-c3 0.632 against 0.659): the data kernel's per-tap programs are the
# cost, not the weight kernel's second gather. Part of every plan's settings; gpu_check's fused A/B
# times it.
FUSED_BACKWARD = False


def _fused_backward_ok(geo: _Geometry, t: Tensor) -> bool:
    """Whether the fused pass may run for ``geo`` and tensors like ``t``: :data:`FUSED_BACKWARD` on;
    weight groups and offset groups nested (one's channels a multiple of the other's, so that segments
    of the smaller count lie inside one of each); a weight group's output channels within one 256-wide
    tile; on a GPU, not float64 (its broadcast products would not fit)."""
    if not FUSED_BACKWARD or geo.group_out > 256:
        return False
    if t.device.type == "cuda" and t.dtype == torch.float64:
        return False
    cg_in, cpg = geo.group_in, geo.channels_per_offset_group
    return cg_in % cpg == 0 or cpg % cg_in == 0


def _fused_grads(
    geo, x, offset, mask, has_mask, w, go, go_layout, maps, need_input, need_offset, need_mask, weight,
    input_format, key,
):  # fmt: skip
    """Run the fused kernel: (finish_input, grad_offset, grad_mask, grad_weight), None where not needed.

    Arguments as for :func:`_data_grads`, plus ``weight`` (the format of grad_weight). Where several
    programs share an offset group's samples (``SUMS_ATOMIC``), the offset and mask gradients are
    summed with atomics into zeroed tensors of the compute dtype, converted once after. Never in
    deterministic mode (float atomics in every reduction).
    """
    dtype, acc = x.dtype, _compute_dtype(x.dtype)
    device = x.device
    seg = min(geo.group_in, geo.channels_per_offset_group)
    part = torch.empty((geo.groups, geo.group_in, geo.taps, geo.group_out), dtype=acc, device=device)
    gx = None
    if need_input:
        gx = torch.empty((geo.batch, geo.height, geo.width, geo.in_channels), dtype=acc, device=device)
    sums: dict[str, Tensor | None] = {}

    def spec_of(cfg: Config) -> tuple[_Launch, bool]:
        """The launch, and whether it adds the offset and mask gradients atomically."""
        if cfg.block_k < geo.group_out:
            raise ValueError(
                f"fused backward: block_k={cfg.block_k} must cover the {geo.group_out} output channels "
                "of a weight group"
            )
        blocks = _cdiv(seg, cfg.block_n)
        others = geo.in_channels // seg * geo.taps * blocks
        tiles = geo.pixel_tiles(cfg.block_m)
        # About four programs per multiprocessor, each at least two pixel tiles.
        splits = max(1, min(_cdiv(4 * _multiprocessors(x), others), _cdiv(tiles, 2)))
        tiles_per_split = _cdiv(tiles, splits)
        splits = _cdiv(tiles, tiles_per_split)
        atomic_sums = blocks > 1 or seg < geo.channels_per_offset_group
        scalars = (
            geo.batch, geo.height, geo.width, geo.in_channels, geo.out_h * geo.out_w, geo.out_w,
            geo.group_in, geo.group_out, geo.channels_per_offset_group, geo.taps, geo.kw, seg,
            *geo.spatial_args(), tiles_per_split, *go_layout[:3], *maps,
        )  # fmt: skip
        return _Launch(_grid(splits * others), scalars, dict(
            HAS_MASK=has_mask, NEED_INPUT=need_input, NEED_OFFSET=need_offset, NEED_MASK=need_mask,
            SUMS_ATOMIC=atomic_sums, INDEX64=geo.index64(geo.pixels * geo.offset_groups * geo.taps * 2),
            GO_ALIGN=go_layout[3], BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_n, BLOCK_O=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_dot_args(x),
        ), {}), atomic_sums  # fmt: skip

    def run(spec: tuple[_Launch, bool]) -> None:
        launch_spec, atomic_sums = spec
        part.zero_()  # autotuning runs the kernel repeatedly: each run starts from zero
        if gx is not None:
            gx.zero_()
        # Atomic sums go to zeroed tensors of the compute dtype; stored ones to the gradients.
        sums["offset"] = (
            _empty_map(offset.shape, offset, acc if atomic_sums else dtype) if need_offset else None
        )
        sums["mask"] = _empty_map(mask.shape, mask, acc if atomic_sums else dtype) if need_mask else None
        if atomic_sums:
            for t in sums.values():
                if t is not None:
                    t.zero_()
        dummy = offset
        tensors = (
            x, offset, mask, w, go,
            gx if gx is not None else dummy,
            sums["offset"] if sums["offset"] is not None else dummy,
            sums["mask"] if sums["mask"] is not None else dummy,
            part,
        )  # fmt: skip
        _run(_k.deform_conv_bwd_fused_kernel, launch_spec, tensors)

    flags = (has_mask, need_input, need_offset, need_mask)
    run(_planned(("fused", *key), "fused", geo, x, flags, spec_of, run))
    grad_offset, grad_mask = (
        None if t is None else t if t.dtype == dtype else t.to(dtype) for t in (sums["offset"], sums["mask"])
    )
    grad_weight = _grad_weight_in_format(part, weight, geo)

    def finish_input() -> Tensor:
        assert gx is not None
        return from_rows(gx, dtype, input_format)

    return (finish_input if need_input else None), grad_offset, grad_mask, grad_weight


def _data_grads(
    geo, x, offset, mask, has_mask, w, go, go_layout, maps, need_input, need_offset, need_mask,
    input_format, key,
):  # fmt: skip
    """Run the data kernel: (finish_input, grad_offset, grad_mask), None where not needed.

    ``offset`` and ``mask`` are :func:`_pixel_operand` tensors; ``maps`` holds their (image, channel,
    pixel) strides, then those of their gradients (allocated in their memory formats).
    ``finish_input()`` turns the kernel's buffers into grad_input [N, C_in, H, W] in ``input_format``
    (the fp32 channels-last accumulator converted, or itself, permuted, for a channels_last
    float32/float64 input; or the deterministic gather); it reads neither ``x`` nor ``w``, so the
    caller can release them first. In deterministic mode the per-sample buffers are sized for
    groups of images that fit the memory budget (:func:`deformable.ops.set_memory_budget`), one
    data-kernel launch, sort, cell sums and gather per group; a sample only reaches its own image's
    pixels and each group is sorted stably, so the result is bitwise the same whatever the grouping.
    ``key`` is the backward's plan key.
    """
    dtype, acc = x.dtype, _compute_dtype(x.dtype)
    device = x.device
    deterministic = need_input and torch.are_deterministic_algorithms_enabled()
    grad_offset = _empty_map(offset.shape, offset, dtype) if need_offset else None
    grad_mask = _empty_map(mask.shape, mask, dtype) if need_mask else None
    gx = None
    if need_input and not deterministic:
        gx = torch.empty((geo.batch, geo.height, geo.width, geo.in_channels), dtype=acc, device=device)
    input_shape = (geo.batch, geo.in_channels, geo.height, geo.width)
    flags = (has_mask, need_input, need_offset, need_mask, deterministic)
    step = _images_per_deterministic_group(geo, acc) if deterministic else geo.batch
    groups = [(n, min(n + step, geo.batch)) for n in range(0, geo.batch, step)]
    # Several groups gather as they go, into a grad_input that exists from the start; a single one
    # leaves its gather to finish_input, after the caller has released the input's copy.
    grad_input = torch.empty(input_shape, dtype=dtype, device=device) if len(groups) > 1 else None
    pending = None
    dummy = offset  # the kernel's pointer for an output it does not write
    kernel = _k.deform_conv_bwd_data_kernel
    for n0, n1 in groups:
        whole = (n0, n1) == (0, geo.batch)
        sub = geo if whole else dataclasses.replace(geo, batch=n1 - n0)
        rows = _whole if whole else functools.partial(_images, n0=n0, n1=n1)
        buffers = _sample_buffers(sub, acc, device) if deterministic else None
        colgrad, frac, keys, cells = buffers if buffers is not None else (None, None, None, 0)
        tensors = (
            rows(x), rows(offset), rows(mask), w, rows(go),
            gx if gx is not None else dummy,
            rows(grad_offset) if grad_offset is not None else dummy,
            rows(grad_mask) if grad_mask is not None else dummy,
            colgrad if colgrad is not None else dummy,
            frac if frac is not None else dummy,
            keys if keys is not None else dummy,
        )  # fmt: skip

        def spec_of(cfg: Config, sub=sub, cells=cells) -> _Launch:
            programs = sub.pixel_tiles(cfg.block_m) * sub.offset_groups * sub.taps
            scalars = (
                sub.batch, sub.height, sub.width, sub.in_channels, sub.out_h * sub.out_w, sub.out_w,
                sub.group_in, sub.group_out, sub.channels_per_offset_group, sub.offset_groups, sub.taps,
                sub.kw, *sub.spatial_args(), cells, *go_layout[:3], *maps,
            )  # fmt: skip
            return _Launch(_grid(programs), scalars, dict(
                HAS_MASK=has_mask, NEED_INPUT=need_input, NEED_OFFSET=need_offset, NEED_MASK=need_mask,
                DETERMINISTIC=deterministic, ONE_O_BLOCK=cfg.block_k >= sub.group_out,
                DEFER_SUMS=cfg.deferred_sums, WHOLE_BLOCKS=_data_blocks_whole(sub, cfg, dtype),
                GATHERED_LAYOUT=_data_gathered_layout(dtype, cfg, _products_on_matrix_unit(dtype)),
                INDEX64=sub.index64(sub.pixels * sub.offset_groups * sub.taps * 2), GO_ALIGN=go_layout[3],
                BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_n, BLOCK_O=cfg.block_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_dot_args(x),
            ), {})  # fmt: skip

        def run(spec: _Launch, tensors=tensors) -> None:
            if gx is not None:  # autotuning runs the kernel repeatedly: each run starts from zero
                gx.zero_()
            _run(kernel, spec, tensors)

        run(_planned(("data", sub.batch, *key), "data", sub, x, flags, spec_of, run))
        del tensors, run, colgrad, frac, keys  # the gather below frees what it has read
        if buffers is not None and grad_input is not None:
            _gather_input_grad(sub, buffers, rows(grad_input), dtype)
        elif buffers is not None:
            pending = (sub, buffers)

    def in_input_format(nchw: Tensor) -> Tensor:
        # The deterministic gather writes NCHW: a channels_last input's gradient is transposed after.
        return to_rows(nchw).permute(0, 3, 1, 2) if input_format == torch.channels_last else nchw

    def finish_input() -> Tensor:
        if grad_input is not None:
            return in_input_format(grad_input)
        if pending is not None:
            sub, buffers = pending
            return in_input_format(_gather_input_grad(sub, buffers, None, dtype))
        assert gx is not None  # need_input without deterministic mode: the kernel's accumulator
        return from_rows(gx, dtype, input_format)

    return (finish_input if need_input else None), grad_offset, grad_mask


# The data kernel's column gradient taken out of the matrix unit's layout once per channel block
# (``_off_the_matrix_layout``), its scatter in rows of two neighbours: 2-3 layout conversions through
# shared memory per block instead of 10, 6-15% fewer main-loop instructions (sm_90,
# triton_sass_sm90.md; not yet timed). None: the default of :func:`_data_gathered_layout`; True: every
# dtype but float64; False: none. gpu_check's data-kernel A/B times both. Part of every plan's settings.
DATA_GATHERED_LAYOUT: bool | None = None


def _data_gathered_layout(dtype: torch.dtype, config: Config, tf32: bool) -> bool:
    """The data kernel's ``GATHERED_LAYOUT`` for inputs of ``dtype`` launched with ``config``
    (:data:`DATA_GATHERED_LAYOUT`; ``tf32``: fp32 products on the matrix unit). By default 16-bit
    inputs, and fp32 ones multiplied in TF32 in tiles of 64 pixels over 8 warps (the TF32 defaults at
    256-512 channels): other TF32 tiles (32 pixels on mma.sync, 128 pixels, 4 warps) already hold
    about 255 registers and spill with it (sm_90, Triton 3.6 and 3.8), and full fp32's multiply-add
    products have no matrix unit layout to leave (nor has float64: never)."""
    if dtype == torch.float64:
        return False
    if DATA_GATHERED_LAYOUT is not None:
        return DATA_GATHERED_LAYOUT
    return dtype != torch.float32 or (tf32 and config.block_m == 64 and config.num_warps == 8)


def _data_blocks_whole(geo: _Geometry, config: Config, dtype: torch.dtype) -> bool:
    """The data kernel's ``WHOLE_BLOCKS``: no partial channel block, in 16-bit. In fp32 the unmasked
    loop leaves ptxas more loads to hoist than registers (sm_90: the TF32 default at det-c3 spilled 12
    bytes), so fp32 and fp64 keep the masks."""
    return dtype in (torch.float16, torch.bfloat16) and _blocks_align_with_offset_groups(geo, config.block_n)


def _images(t: Tensor, *, n0: int, n1: int) -> Tensor:
    """Images n0..n1-1 of a batch-major tensor."""
    return t[n0:n1]


def _whole(t: Tensor) -> Tensor:
    return t


def _images_per_deterministic_group(geo: _Geometry, acc: torch.dtype) -> int:
    """How many images' per-sample buffers, their sort and cell sums fit the memory budget; at least
    one."""
    acc_bytes = torch.finfo(acc).bits // 8
    samples = geo.out_h * geo.out_w * geo.offset_groups * geo.taps
    cells = geo.offset_groups * (geo.height + 1) * (geo.width + 1)
    cpg = geo.channels_per_offset_group
    # colgrad and frac; the key, the sort's sorted keys (int64 each, at most) and order; the cell
    # sums (four per cell) and the run starts.
    per_image = samples * ((cpg + 2) * acc_bytes + 3 * 8) + cells * (4 * cpg * acc_bytes + 8)
    return max(1, get_memory_budget() // per_image)


def _sample_buffers(geo: _Geometry, acc: torch.dtype, device) -> list:
    """[colgrad [samples, C_in/G], frac [samples, 2], keys [samples], cells] of deterministic mode;
    the keys are int32 where the cells allow (a radix sort of half the bits)."""
    samples = geo.pixels * geo.offset_groups * geo.taps
    cells = geo.batch * geo.offset_groups * (geo.height + 1) * (geo.width + 1)
    key_dtype = torch.int32 if cells < 2**31 - 1 else torch.int64
    return [
        torch.empty((samples, geo.channels_per_offset_group), dtype=acc, device=device),
        torch.empty((samples, 2), dtype=acc, device=device),
        torch.empty(samples, dtype=key_dtype, device=device),
        cells,
    ]


def _gather_input_grad(geo, buffers: list, out: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Deterministic grad_input [N, C_in, H, W] of ``geo``'s images from the per-sample column
    gradients ``buffers`` (:func:`_sample_buffers`, emptied here so that they are freed once read):
    sort the samples by cell, sum each cell's run per corner (``deform_conv_cell_sums_kernel``), then
    add every input pixel's four cell sums (``deform_conv_gather_input_grad_kernel``). Written into
    ``out`` (contiguous) or, when None, a new tensor of ``dtype`` allocated once the per-sample
    buffers are gone; returns it."""
    colgrad, frac, keys, cells = buffers
    buffers.clear()
    sorted_keys, order = torch.sort(keys, stable=True)
    del keys
    bounds = torch.arange(cells + 1, device=colgrad.device, dtype=sorted_keys.dtype)
    start = torch.searchsorted(sorted_keys, bounds)
    del bounds, sorted_keys
    cpg = geo.channels_per_offset_group
    sums = torch.empty((4, cells, cpg), dtype=colgrad.dtype, device=colgrad.device)
    index64 = geo.index64(colgrad.numel(), sums.numel(), cells + 1)
    cfg = _default_config("cells", geo, colgrad)
    launch(
        _k.deform_conv_cell_sums_kernel, _grid(_cdiv(cells, cfg.block_m) * _cdiv(cpg, cfg.block_n)),
        colgrad, frac, order, start, sums, cells, cpg,
        CT=_tl_compute_dtype(colgrad.dtype), INDEX64=index64, BLOCK_CELLS=cfg.block_m, BLOCK_C=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    del colgrad, frac, order, start
    if out is None:
        shape = (geo.batch, geo.in_channels, geo.height, geo.width)
        out = torch.empty(shape, dtype=dtype, device=sums.device)
    cfg = _default_config("gather", geo, sums)
    hw = geo.height * geo.width
    programs = geo.batch * _cdiv(hw, cfg.block_m) * geo.offset_groups * _cdiv(cpg, cfg.block_n)
    launch(
        _k.deform_conv_gather_input_grad_kernel, _grid(programs),
        sums, out,
        geo.batch, geo.height, geo.width, hw, geo.in_channels, geo.offset_groups, cpg, cells,
        CT=_tl_compute_dtype(out.dtype), INDEX64=index64,
        BLOCK_P=cfg.block_m, BLOCK_C=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def _weight_grad(geo, x, offset, mask, has_mask, go, go_layout, maps, weight, deterministic, key) -> Tensor:
    """grad_weight [C_out, C_in/groups, kh, kw] by the split-K weight kernel, in ``x``'s dtype and
    ``weight``'s memory format (``offset``, ``mask`` and ``maps`` as for :func:`_data_grads`).

    The splits add up with atomics into one fp32 buffer, or, in deterministic mode, write partial
    sums (within the memory budget, :func:`deformable.ops.set_memory_budget`) that ``torch.sum``
    reduces in a fixed order. ``key`` is the backward's plan key.
    """
    acc = _compute_dtype(x.dtype)
    result: list[Tensor] = []
    kernel = _k.deform_conv_bwd_weight_kernel

    def spec_of(cfg: Config) -> tuple[_Launch, tuple[int, ...]]:
        """The launch and the shape of its fp32 partial-sum buffer."""
        others = geo.groups * geo.taps * _cdiv(geo.group_in, cfg.block_k) * _cdiv(geo.group_out, cfg.block_n)
        tiles = geo.pixel_tiles(cfg.block_m)
        # Enough programs for ~4 waves, each split at least 4 pixel tiles.
        splits = max(1, min(_cdiv(4 * _multiprocessors(x), others), _cdiv(tiles, 4), 64))
        if deterministic:
            per_split = geo.groups * geo.taps * geo.group_in * geo.group_out * torch.finfo(acc).bits // 8
            splits = max(1, min(splits, get_memory_budget() // max(per_split, 1)))
        tiles_per_split = _cdiv(tiles, splits)
        splits = _cdiv(tiles, tiles_per_split)
        shape = (splits if deterministic else 1, geo.groups, geo.group_in, geo.taps, geo.group_out)
        scalars = (
            geo.batch, geo.height, geo.width, geo.in_channels, geo.out_h * geo.out_w, geo.out_w,
            geo.group_in, geo.group_out, geo.channels_per_offset_group, geo.taps, geo.kw,
            *geo.spatial_args(), tiles_per_split, *go_layout[:3], *maps[:6],
        )  # fmt: skip
        return _Launch(_grid(splits * others), scalars, dict(
            HAS_MASK=has_mask, INDEX64=geo.index64(math.prod(shape)), GO_ALIGN=go_layout[3],
            ONE_GROUP=_blocks_align_with_offset_groups(geo, cfg.block_k), ATOMIC=not deterministic,
            GO_FIRST=cfg.go_first,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_dot_args(x),
        ), {}), shape  # fmt: skip

    def run(spec: tuple[_Launch, tuple[int, ...]]) -> None:
        part = (torch.empty if deterministic else torch.zeros)(spec[1], dtype=acc, device=x.device)
        _run(kernel, spec[0], (x, offset, mask, go, part))
        result[:] = [part.sum(dim=0) if part.shape[0] > 1 else part[0]]

    run(_planned(("weight", *key), "weight", geo, x, (has_mask, deterministic), spec_of, run))
    return _grad_weight_in_format(result.pop(), weight, geo)


def _grad_weight_in_format(summed: Tensor, weight: Tensor, geo: _Geometry) -> Tensor:
    """The weight kernel's fp32 sums [groups, C_in/g, taps, C_out/g] as grad_weight [C_out, C_in/g, kh,
    kw] in ``weight``'s dtype and memory format: one copy converts and reorders, for an NCHW weight a
    transpose per group of [C_in/g * taps, C_out/g]."""
    gw = _empty_map(weight.shape, weight)
    if gw.is_contiguous():
        return transpose(summed, gw, geo.groups, geo.group_in * geo.taps, geo.group_out)
    # A view in either format: (kh, kw) merge into the taps, C_out splits into the groups.
    gw.view(geo.groups, geo.group_out, geo.group_in, geo.taps).copy_(summed.permute(0, 3, 1, 2))
    return gw
