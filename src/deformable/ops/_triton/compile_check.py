"""Cross-compile the Triton kernels for an NVIDIA target without a GPU and report their resources.

    python -m deformable.ops._triton.compile_check             # sm_90 (H100), the anchor shapes
    python -m deformable.ops._triton.compile_check --arch 80   # another compute capability
    python -m deformable.ops._triton.compile_check --fast      # quicker: resources from the cubin
    python -m deformable.ops._triton.compile_check --fast --defaults-only --quick  # the test suite's

For every deform_conv2d kernel, dtype and launch configuration the heuristic picks for the seven
anchor shapes of ``shared/anchors``, and for the deformable RoI pooling kernels (7x7 bins, 256
channels, every dtype), Triton compiles to PTX and Triton's bundled ``ptxas`` assembles it, which needs no
driver. Printed per configuration: registers per thread, bytes spilled, shared memory, whether the
matrix products use wgmma (Hopper) or mma.sync, "(serialized)" where ptxas had to serialise the
wgmma instructions (its warning C7515), the SASS instructions of the main loop's body and how many of
them are global loads narrower than 16 bytes (``nvdisasm``; a static proxy for the cost of an
instruction-bound kernel, see ``loop_mix``), and the compile time. Exits 1 if anything fails to
compile or spills more than ``--max-spill-bytes`` (default 0): a check a session without a GPU can run
before handing kernels over (the test suite runs it with a small allowance, as ptxas may keep a few
bytes of a loop's state on the stack). ``--fast`` reads the resources from the cubin Triton assembled
(spills as its stack frame, an upper bound; no serialisation flag) and disassembles only the 16-bit
data and weight kernels, whose loop loads the test suite checks: about a third less time. ``--quick``
compiles every mode at the first anchor shape only, and at the others the modes a GPU trains in by
default (fp16 and TF32), without the deterministic data kernel: about half the compilations.
Uses Triton internals (``ASTSource``, ``GPUTarget``), so it may need updating with Triton; it does
not work under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _deform_conv_kernels as _k
from . import _deform_roi_pool_kernels as _roi_k
from . import _relayout
from .deform_conv import (
    Config,
    _blocks_align_with_offset_groups,
    _candidates,
    _data_blocks_whole,
    _data_gathered_layout,
    _format_strides,
    _forward_flat,
    _forward_k_major,
    _Geometry,
    _grad_out_operand,
    _heuristic,
)
from .deform_roi_pool import _launch_args as _roi_launch_args

ANCHORS = {
    "det-c3": (2, 128, 100, 168, 1), "det-c4": (2, 256, 50, 84, 1), "det-c5": (2, 512, 25, 42, 1),
    "det-c4-s2": (2, 256, 100, 168, 2), "cls-c3": (64, 128, 28, 28, 1), "cls-c4": (64, 256, 14, 14, 1),
    "cls-c5": (64, 512, 7, 7, 1),
}  # fmt: skip
_QUICK_MODES = ((torch.float16, True), (torch.float32, True))  # --quick, after the first shape: (dtype, tf32)
_16_BIT = (torch.float16, torch.bfloat16)  # --fast disassembles their data and weight kernels
_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# Integer arguments whose divisibility by 16 the JIT would see for the anchor shapes (channel counts).
_CHANNEL_ARGS = ("C", "CG_IN", "CG_OUT", "CPG", "SEG")
# Where the forward's flat-loop candidates are compiled (fp16 and fp32): 128 and 256 channels (the
# candidates are the same at every shape of a width; at every shape this check would take twice as long).
_FLAT_SHAPES = ("det-c3", "det-c4")
# Kernels a user opts into (module switches of deform_conv, off by default): spills reported, not
# failed.
_OPT_IN = ("fused", "forward-16")


def _compile(
    fn, pointers: dict[str, str], constexprs: dict, ints16: set[str], warps: int, stages: int, arch: int,
    fast: bool = False, sass: bool = True,
):  # fmt: skip
    """Compile one kernel and report its resources. ``fast``: from the cubin Triton made (its
    registers, and its stack frame as the spill figure), without assembling the PTX again with
    ``ptxas -v``, which alone reports spill bytes and serialised wgmma; ``sass`` False skips the
    disassembly (no loop figures)."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in ints16:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    start = time.perf_counter()
    kernel = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages}
    )
    seconds = time.perf_counter() - start
    ptx = kernel.asm["ptx"]
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    suffix = "a" if arch >= 90 else ""
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "fma")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        if fast:
            with open(cubin, "wb") as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run(
                [os.path.join(tools, "cuobjdump"), "-res-usage", cubin],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            registers = re.search(r"REG:(\d+)", usage)
            spills = re.search(r"STACK:(\d+)", usage)
        else:
            path = os.path.join(tmp, "kernel.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            result = subprocess.run(
                [os.path.join(tools, "ptxas"), "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o", cubin],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            registers = re.search(r"Used (\d+) registers", result.stderr)
            spills = re.search(r"(\d+) bytes spill stores", result.stderr)
            if "C7515" in result.stderr:  # ptxas: wgmma serialized (no overlap of consecutive products)
                mma += " (serialized)"
        loop, narrow = -1, -1
        if sass:
            disassembly = subprocess.run(
                [os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True
            ).stdout  # fmt: skip
            loop, narrow = loop_mix(disassembly)
    return {
        "registers": int(registers.group(1)) if registers else -1,
        "spill_bytes": int(spills.group(1)) if spills else 0,
        "shared_bytes": kernel.metadata.shared,
        "mma": mma,
        "loop_instructions": loop,
        "loop_narrow_loads": narrow,
        "seconds": round(seconds, 1),
    }


_LOAD = re.compile(r"^(?:@!?U?P\w+\s+)?(LDG|LDGSTS)(\.[A-Z0-9_.]+)?\s")


def loop_mix(sass: str) -> tuple[int, int]:
    """(instructions, global loads narrower than 16 bytes) in the longest loop body of ``sass``
    (nvdisasm output): the static cost of one iteration of a kernel's main loop, a proxy for an
    instruction-bound kernel's time (each is issued by every warp)."""
    labels: dict[str, int] = {}
    instructions: list[str] = []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        instruction = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", line)
        if instruction:
            instructions.append(instruction.group(1).strip())
    longest = (0, -1)
    for end, text in enumerate(instructions):
        target = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", text)
        if target and labels.get(target.group(1), end + 1) <= end:
            start = labels[target.group(1)]
            longest = max(longest, (start, end), key=lambda span: span[1] - span[0])
    body = instructions[longest[0] : longest[1] + 1]
    narrow = 0
    for text in body:
        load = _LOAD.match(text)
        if load and not (load.group(2) or "").endswith(".128"):
            narrow += 1
    return len(body), narrow


def _specialised(prefix: str, strides: Sequence[int]) -> tuple[dict, set[str]]:
    """Stride arguments ``{prefix}_SN/_SC/_SP`` as the JIT specialises them: constexprs (the strides
    of 1) and the names of those divisible by 16."""
    named = dict(zip((f"{prefix}_SN", f"{prefix}_SC", f"{prefix}_SP"), strides, strict=True))
    ones = {name: 1 for name, value in named.items() if value == 1}
    return ones, {name for name, value in named.items() if value % 16 == 0}


def _grad_out_args(dtype: torch.dtype, geo: _Geometry, pixel_major: bool = False) -> tuple[dict, set[str]]:
    """The grad_out stride arguments as the JIT specialises them for an NCHW grad_output (read
    ``pixel_major`` by the TF32 weight kernel): constexprs (strides of 1, GO_ALIGN) and the names of
    those divisible by 16."""
    shape = (geo.batch, geo.out_channels, geo.out_h, geo.out_w)
    meta = torch.empty(shape, dtype=dtype, device="meta")
    _, (*strides, align) = _grad_out_operand(meta, dtype, pixel_major=pixel_major)
    constexprs, divisible = _specialised("GO", strides)
    return {**constexprs, "GO_ALIGN": align}, divisible


def _map_args(geo: _Geometry, kernel: str) -> tuple[dict, set[str]]:
    """The offset and mask stride arguments (and the forward's output's, the data kernel's gradients')
    as the JIT specialises them for NCHW tensors: constexprs (strides of 1) and the names of those
    divisible by 16."""
    size = (geo.out_h, geo.out_w)
    taps = geo.offset_groups * geo.taps
    maps = {"OFF": 2 * taps, "MSK": taps}
    if kernel == "forward":
        maps["OUT"] = geo.out_channels
    if kernel == "data":
        maps.update(GOFF=2 * taps, GMSK=taps)
    constexprs: dict = {}
    divisible: set[str] = set()
    for prefix, channels in maps.items():
        strides = _format_strides((geo.batch, channels, *size), torch.contiguous_format)
        ones, sixteens = _specialised(prefix, strides)
        constexprs.update(ones)
        divisible |= sixteens
    return constexprs, divisible


def _kernel_args(kernel: str, dtype: torch.dtype, config, tf32: bool, geo: _Geometry):
    """(jit function, pointer types, constexprs, integer arguments divisible by 16 beyond the
    channel counts) for one kernel, as deform_conv.py launches it."""
    t = "*" + _TL[dtype]
    acc = "*fp64" if dtype == torch.float64 else "*fp32"
    ct = tl.float64 if dtype == torch.float64 else tl.float32
    mma = _k.MMA_SUM if dtype == torch.float64 else _k.MMA_DOT
    precision = ("tf32" if tf32 else "ieee") if dtype == torch.float32 else "tf32"
    common = {"MMA": mma, "PRECISION": precision, "CT": ct, "INDEX64": False}
    if kernel.startswith("forward"):  # forward-16: the blend in 16-bit (BLEND_IN_16_BIT)
        pointers = dict.fromkeys(("x_ptr", "off_ptr", "msk_ptr", "w_ptr", "b_ptr", "out_ptr"), t)
        if config.splits > 1:  # partial sums go to an fp32 (fp64) buffer
            pointers["out_ptr"] = acc
        constexprs = {"HAS_MASK": True, "HAS_BIAS": True, "SPLIT_TAPS": config.splits > 1, **common}
        constexprs["W_K_MAJOR"] = _forward_k_major(dtype, "tf32" if tf32 else "ieee")
        constexprs["FLAT"] = _forward_flat(geo, config)
        constexprs["WHOLE_BLOCKS"] = _blocks_align_with_offset_groups(geo, config.block_k)
        constexprs["LOW_BLEND"] = kernel == "forward-16"
        constexprs["CHANNELS_INNER"] = constexprs["FLAT"] and config.channels_inner
        constexprs.update(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
        map_constexprs, divisible = _map_args(geo, "forward")
        return _k.deform_conv_fwd_kernel, pointers, {**constexprs, **map_constexprs}, divisible
    if kernel in ("data", "data-deterministic"):  # deterministic: no atomics
        pointers = dict.fromkeys(
            ("x_ptr", "off_ptr", "msk_ptr", "w_ptr", "go_ptr", "goff_ptr", "gmsk_ptr"), t
        )
        pointers.update(gx_ptr=acc, colgrad_ptr=acc, frac_ptr=acc, key_ptr="*i32")
        constexprs = {"HAS_MASK": True, "NEED_INPUT": True, "NEED_OFFSET": True, "NEED_MASK": True}
        constexprs.update(DETERMINISTIC=kernel == "data-deterministic", **common)
        constexprs["ONE_O_BLOCK"] = config.block_k >= geo.group_out
        constexprs["DEFER_SUMS"] = config.deferred_sums
        constexprs["WHOLE_BLOCKS"] = _data_blocks_whole(geo, config, dtype)
        constexprs["GATHERED_LAYOUT"] = _data_gathered_layout(dtype, config, tf32)
        constexprs.update(BLOCK_M=config.block_m, BLOCK_C=config.block_n, BLOCK_O=config.block_k)
        go_constexprs, divisible = _grad_out_args(dtype, geo)
        map_constexprs, map_divisible = _map_args(geo, "data")
        constexprs.update(go_constexprs, **map_constexprs)
        return _k.deform_conv_bwd_data_kernel, pointers, constexprs, divisible | map_divisible
    if kernel == "fused":  # offset and mask gradients summed atomically (channel blocks < a group)
        pointers = dict.fromkeys(("x_ptr", "off_ptr", "msk_ptr", "w_ptr", "go_ptr"), t)
        pointers.update(gx_ptr=acc, goff_ptr=acc, gmsk_ptr=acc, part_ptr=acc)
        constexprs = {"HAS_MASK": True, "NEED_INPUT": True, "NEED_OFFSET": True, "NEED_MASK": True}
        constexprs.update(SUMS_ATOMIC=True, **common)
        constexprs.update(BLOCK_M=config.block_m, BLOCK_C=config.block_n, BLOCK_O=config.block_k)
        go_constexprs, divisible = _grad_out_args(dtype, geo)
        map_constexprs, map_divisible = _map_args(geo, "data")
        constexprs.update(go_constexprs, **map_constexprs)
        return _k.deform_conv_bwd_fused_kernel, pointers, constexprs, divisible | map_divisible
    if kernel == "weight":
        pointers = dict.fromkeys(("x_ptr", "off_ptr", "msk_ptr", "go_ptr"), t)
        pointers["part_ptr"] = acc
        one_group = _blocks_align_with_offset_groups(geo, config.block_k)
        constexprs = {"HAS_MASK": True, "ONE_GROUP": one_group, "ATOMIC": True, **common}
        constexprs["GO_FIRST"] = config.go_first
        constexprs.update(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
        go_constexprs, divisible = _grad_out_args(dtype, geo, pixel_major=dtype == torch.float32 and tf32)
        map_constexprs, map_divisible = _map_args(geo, "weight")
        constexprs.update(go_constexprs, **map_constexprs)
        return _k.deform_conv_bwd_weight_kernel, pointers, constexprs, divisible | map_divisible
    if kernel == "cells":
        pointers = {"colgrad_ptr": acc, "frac_ptr": acc, "order_ptr": "*i64", "start_ptr": "*i64"}
        pointers["sums_ptr"] = acc
        constexprs = {"CT": ct, "INDEX64": False, "BLOCK_CELLS": config.block_m, "BLOCK_C": config.block_n}
        return _k.deform_conv_cell_sums_kernel, pointers, constexprs, set()
    pointers = {"sums_ptr": acc, "gx_ptr": t}
    constexprs = {"CT": ct, "INDEX64": False, "BLOCK_P": config.block_m, "BLOCK_C": config.block_n}
    return _k.deform_conv_gather_input_grad_kernel, pointers, constexprs, set()


def _roi_kernel_args(kernel: str, dtype: torch.dtype):
    """(jit function, pointer types, constexprs, warps) of a deformable RoI pooling kernel (7x7, 256 ch)."""
    t = "*" + _TL[dtype]
    acc = "*fp64" if dtype == torch.float64 else "*fp32"
    names = ["x_ptr", "rois_ptr", "off_ptr", "mask_ptr"]
    launch = _roi_launch_args(
        torch.empty(1, 256, 1, 1, dtype=dtype, device="meta"), torch.empty(512, 5), 7, 7
    )
    warps = launch.pop("num_warps")
    constexprs = {"ALIGNED": False, "HAS_OFFSET": True, "HAS_MASK": True, **launch}
    if kernel == "roi-forward":
        pointers = dict.fromkeys([*names, "out_ptr"], t)
        fn = _roi_k.deform_roi_pool_fwd_kernel
    else:
        pointers = dict.fromkeys([*names, "go_ptr", "goff_ptr", "gmask_ptr"], t)
        pointers["gx_ptr"] = acc
        constexprs.update(NEED_INPUT=True, NEED_OFFSET=True, NEED_MASK=True)
        fn = _roi_k.deform_roi_pool_bwd_kernel
    pointers["params_ptr"] = acc
    return fn, pointers, constexprs, warps


# The layout copies at det-c4's sizes (256 channels, 50 x 84 = 4200 pixels, a multiple of 8 but not
# of 16, so those vectors come from the alignment hints): (what, source, destination, R, S).
_TRANSPOSES = (
    # the input into rows, in every dtype
    *(("input", dtype, dtype, 256, 4200) for dtype in _TL),
    # the fp32 accumulator back to an NCHW 16-bit gradient
    ("accumulator", torch.float32, torch.float16, 4200, 256),
    ("accumulator", torch.float32, torch.bfloat16, 4200, 256),
    # the forward's weight on the matrix unit, [C_out * C_in, taps] per group: a 256 x 16 tile
    *(("weight", dtype, dtype, 256 * 256, 9) for dtype in (torch.float16, torch.float32)),
)
# Copies made in one launch (transpose_pair_kernel), each (source, destination, R, S, zeroed buffer):
# the forward's input and weight, and the backward's input and the data kernel's weight, [C_out,
# C_in * taps] per group, clearing the weight kernel's fp32 sums.
_TRANSPOSE_PAIRS = tuple(
    (what, (dtype, dtype, 256, 4200, None), b(dtype))
    for dtype in (torch.float16, torch.float32)
    for what, b in (
        ("fwd pair", lambda t: (t, t, 256 * 256, 9, None)),
        ("bwd pair", lambda t: (t, t, 256, 256 * 9, torch.float32)),
    )
)


def _transpose_args(
    src: torch.dtype, dst: torch.dtype, rows: int, cols: int, zero: torch.dtype | None = None
):
    """(jit function, pointer types, constexprs, integer arguments divisible by 16) of a layout copy of
    [R, S] = [rows, cols] per batch, with the tile and hints the backend's plan would take; ``zero``:
    the dtype of a buffer the copy also clears."""
    plan = _relayout._plan(1, rows, cols, src, dst, zero)[2]
    pointers = {"src_ptr": "*" + _TL[src], "dst_ptr": "*" + _TL[dst], "zero_ptr": "*" + _TL[zero or dst]}
    constexprs = {name: plan[name] for name in _relayout._PER_COPY}
    divisible = {name for name, n in (("R", rows), ("S", cols)) if n % 16 == 0}
    return _relayout.transpose_kernel, pointers, constexprs, divisible


def _transpose_pair_args(a: tuple, b: tuple):
    """As :func:`_transpose_args` for :func:`transpose_pair_kernel` with copies ``a`` and ``b``, each
    (source dtype, destination dtype, R, S, zeroed buffer's dtype or None)."""
    pointers, constexprs, divisible = {}, {}, set()
    for (src, dst, rows, cols, zero), tag, suffix in ((a, "a", "_A"), (b, "b", "_B")):
        _, ptrs, consts, div = _transpose_args(src, dst, rows, cols, zero)
        pointers.update({name.replace("_ptr", "_" + tag): kind for name, kind in ptrs.items()})
        constexprs.update({name + suffix: value for name, value in consts.items()})
        divisible |= {name + suffix for name in div}
    return _relayout.transpose_pair_kernel, pointers, constexprs, divisible


def _jobs(
    name: str, geo: _Geometry, dtype: torch.dtype, tf32: bool, sms: int, defaults_only: bool = False,
    deterministic: bool = True,
) -> list[tuple[str, Config]]:  # fmt: skip
    """(kernel, config) pairs to compile for one shape and mode: each kernel's default (where
    ``deterministic``, the data kernel's also in deterministic mode), and unless ``defaults_only``
    the variants the autotuner may pick: split taps (forward, 512 channels), go_first (weight),
    every deferred-sums candidate (data, 256 channels or fewer), the opt-in fused backward's default
    and candidates (256 channels or fewer), at ``_FLAT_SHAPES`` the forward's flat-loop candidates
    (in either order), where the forward's default is a flat loop that loop with its channels inner
    (FLAT_CHANNELS_INNER, an autotuning candidate too), and in 16-bit the opt-in 16-bit blend of the
    forward's default and of that channels-inner loop ("forward-16")."""
    defaults = {
        kernel: _heuristic(kernel, geo, dtype, interpreted=False, sms=sms, tf32=tf32)
        for kernel in ("forward", "data", "weight", "cells", "gather")
    }
    jobs = list(defaults.items())
    if deterministic:
        jobs.insert(2, ("data-deterministic", defaults["data"]))
    if dtype == torch.float64 or defaults_only:
        return jobs
    if geo.group_out == 512:
        jobs.append(("forward", dataclasses.replace(defaults["forward"], splits=3)))
    # The variants where _candidates offers them (not for full fp32's multiply-add products).
    if any(c.go_first for c in _candidates("weight", geo, dtype, tf32)):
        jobs.append(("weight", dataclasses.replace(defaults["weight"], go_first=True)))
    jobs += [("data", c) for c in _candidates("data", geo, dtype, tf32) if c.deferred_sums]
    if geo.group_out <= 256:  # deform_conv.FUSED_BACKWARD: the fused pass's default and candidates
        fused = _heuristic("fused", geo, dtype, interpreted=False, sms=sms, tf32=tf32)
        jobs += [("fused", c) for c in dict.fromkeys([fused, *_candidates("fused", geo, dtype, tf32)])]
    if name in _FLAT_SHAPES and dtype != torch.bfloat16:  # bf16: fp16's code (sm_90: within 6 registers)
        jobs += [("forward", c) for c in _candidates("forward", geo, dtype, tf32) if c.flat]
    forwards = [defaults["forward"]]
    if _forward_flat(geo, defaults["forward"]):  # deform_conv.FLAT_CHANNELS_INNER
        forwards.append(dataclasses.replace(defaults["forward"], channels_inner=True))
        jobs.append(("forward", forwards[-1]))  # compiled once where a candidate above is the same
    if dtype in _16_BIT:  # deform_conv.BLEND_IN_16_BIT: with the 16-bit blend
        jobs += [("forward-16", c) for c in forwards]
    return jobs


def _checked(
    args, fn, pointers: dict, constexprs: dict, ints16: set[str], warps: int, stages: int,
    sass: bool | None = None, spills_fail: bool = True,
) -> tuple[dict | str, bool]:  # fmt: skip
    """:func:`_compile` with ``main``'s options: (its report, or the failure's text; whether the job
    fails the check: it did not compile, or, where ``spills_fail``, spilled more than allowed)."""
    try:
        result = _compile(
            fn, pointers, constexprs, ints16, warps, stages, args.arch, fast=args.fast,
            sass=not args.fast if sass is None else sass,
        )  # fmt: skip
    except Exception as e:  # report every failure, then fail
        return f"FAILED: {type(e).__name__}: {str(e)[:300]}", True
    return result, spills_fail and result["spill_bytes"] > args.max_spill_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors the heuristic assumes")
    parser.add_argument("--max-spill-bytes", type=int, default=0, help="spill allowance per kernel")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="the test suite's check: resources from Triton's own cubin (spills as its stack frame, no "
        "serialised-wgmma flag), SASS loop figures only for the 16-bit data and weight kernels",
    )
    parser.add_argument(
        "--defaults-only",
        action="store_true",
        help="only the configurations the heuristic picks (normal and deterministic mode), not the "
        "autotuner's variant candidates (deferred sums, flat loops elsewhere, split taps): the test suite",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every mode at the first anchor shape; at the others fp16 and TF32 only, and no deterministic "
        "data kernel (the test suite)",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET", file=sys.stderr)
        return 2

    modes = [(torch.float16, True), (torch.bfloat16, True), (torch.float32, True), (torch.float32, False)]
    modes.append((torch.float64, False))
    seen: dict[tuple, dict | str] = {}
    bad = 0
    for index, (name, (n, c, h, w, s)) in enumerate(ANCHORS.items()):
        everything = index == 0 or not args.quick
        ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
        geo = _Geometry(n, c, h, w, c, 1, 3, 3, 1, ho, wo, (s, s), (1, 1), (1, 1))
        ints16 = set(_CHANNEL_ARGS)
        if (ho * wo) % 16 == 0:
            ints16.add("HoWo")
        if (h * w) % 16 == 0:
            ints16.add("HW")
        for dtype, tf32 in modes if everything else _QUICK_MODES:
            for kernel, config in _jobs(name, geo, dtype, tf32, args.sms, args.defaults_only, everything):
                fn, pointers, constexprs, divisible = _kernel_args(kernel, dtype, config, tf32, geo)
                # What the compiled code depends on: shapes and modes that give a kernel the same
                # arguments, specialisations and launch shape (e.g. the deterministic reduction's
                # kernels in fp32 with and without TF32) compile once.
                specialised = frozenset(name for name in ints16 | divisible if name in fn.arg_names)
                key = (
                    kernel, tuple(sorted(pointers.items())), tuple(sorted(constexprs.items(), key=str)),
                    config.num_warps, config.num_stages, specialised,
                )  # fmt: skip
                if key in seen:
                    continue
                sass = not args.fast or (kernel in ("data", "weight") and dtype in _16_BIT)
                # Opt-in variants (off by default): their spills are reported, not failed.
                result, failed = _checked(
                    args, fn, pointers, constexprs, ints16 | divisible, config.num_warps, config.num_stages,
                    sass=sass, spills_fail=kernel not in _OPT_IN,
                )  # fmt: skip
                seen[key] = result
                bad += failed
                mode = _TL[dtype] + ("" if dtype != torch.float32 else ("-tf32" if tf32 else "-ieee"))
                blocks: tuple[int, ...] = (
                    config.block_m,
                    config.block_n,
                    config.block_k,
                    config.num_warps,
                    config.num_stages,
                )
                blocks += (config.splits,) if config.splits > 1 else ()
                variant = "".join(f" {flag}" for flag in config.variants())
                print(f"{name:10s} {kernel:8s} {mode:10s} {blocks}{variant} {result}", flush=True)
    for dtype, _ in modes[:3] + modes[4:]:
        for kernel in ("roi-forward", "roi-backward"):
            fn, pointers, constexprs, warps = _roi_kernel_args(kernel, dtype)
            result, failed = _checked(args, fn, pointers, constexprs, {"C"}, warps, 1)
            bad += failed
            seen[(kernel, dtype)] = result
            print(f"{'fpn-7x7':10s} {kernel:12s} {_TL[dtype]:10s} {result}", flush=True)
    for what, src, dst, rows, cols in _TRANSPOSES:
        fn, pointers, constexprs, divisible = _transpose_args(src, dst, rows, cols)
        result, failed = _checked(args, fn, pointers, constexprs, divisible, 4, 1)
        bad += failed
        seen[("transpose", what, src, dst)] = result
        print(f"{what:11s} {'transpose':12s} {_TL[src] + '->' + _TL[dst]:10s} {result}", flush=True)
    for what, a, b in _TRANSPOSE_PAIRS:
        fn, pointers, constexprs, divisible = _transpose_pair_args(a, b)
        result, failed = _checked(args, fn, pointers, constexprs, divisible, 4, 1)
        bad += failed
        seen[("transpose pair", what, a[0])] = result
        print(f"{what:11s} {'transposes':12s} {_TL[a[0]]:10s} {result}", flush=True)
    print(f"{len(seen)} compilations, {bad} failed or spilled more than {args.max_spill_bytes} bytes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
