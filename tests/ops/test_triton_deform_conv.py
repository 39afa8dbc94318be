"""The Triton deform_conv2d kernels, judged by the float64 oracle (outputs) and torchvision in float64
(gradients). Without CUDA they run through Triton's interpreter (conftest sets TRITON_INTERPRET=1),
which is slow: shapes stay tiny and tiles are pinned small so that they straddle every boundary.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

# Skips this module where Triton cannot run; before any deformable.ops._triton import.
from tests.ops.triton_device import DEVICE, fused_kernels_launched  # isort: skip

torchvision = pytest.importorskip("torchvision")

from deformable.benchmark import deterministic_algorithms  # noqa: E402
from deformable.ops import deform_conv2d  # noqa: E402
from deformable.ops._layout import memory_format_of  # noqa: E402
from deformable.ops._triton import _launch  # noqa: E402
from deformable.ops._triton import deform_conv as tdc  # noqa: E402
from tests.ops.conv_cases import ConvCase as Case  # noqa: E402
from tests.oracles import deform_conv2d_oracle  # noqa: E402

pytestmark = pytest.mark.triton

ALL = (True, True, True, True, True)
GRAD_NAMES = ("input", "offset", "mask", "weight", "bias")


CASES = {
    "plain": Case(out_channels=6, size=(5, 6)),
    # 16 channels fill whole 16-wide channel blocks: the weight kernel's single-offset-group fast path.
    "dcnv1-no-bias-16ch": Case(batch=1, in_channels=16, out_channels=5, size=(4, 5), mask=False, bias=False),
    # Offset group 1 (channels 2-3) spans both weight groups (channels 0-2 and 3-5).
    "groups2-offset-groups3": Case(batch=1, in_channels=6, out_channels=4, groups=2, offset_groups=3),
    "kernel32-stride21-pad10-dil21-odd": Case(
        in_channels=3,
        out_channels=5,
        size=(7, 5),
        kernel=(3, 2),
        stride=(2, 1),
        padding=(1, 0),
        dilation=(2, 1),
    ),
}
# With 16-wide tiles, 35 pixels, 18 input channels (2 offset groups of 9) and 17 output channels straddle
# tile boundaries in every dimension of every kernel, and channel blocks cross offset groups.
STRADDLE = Case(batch=1, in_channels=18, out_channels=17, size=(5, 7), offset_groups=2)
SMALL_TILES = {
    "forward": tdc.Config(16, 16, 16),
    "data": tdc.Config(16, 16, 16),
    "weight": tdc.Config(16, 16, 16),
    "cells": tdc.Config(64, 8, 1),  # STRADDLE's 96 cells: a whole block and a partial one
    "gather": tdc.Config(16, 8, 1),
}

EPS = {
    dtype: torch.finfo(dtype).eps for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def make_inputs(case: Case, dtype: torch.dtype, offset_scale: float = 2.0, seed: int = 0):
    """(input, offset, mask, weight, bias) in ``dtype`` on DEVICE; offsets of a few pixels."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = case.kernel
    oh, ow = case.out_size
    taps = case.offset_groups * kh * kw

    def rand(*shape, uniform=False):
        t = torch.rand(*shape, generator=g) if uniform else torch.randn(*shape, generator=g)
        return t.double().to(dtype).to(DEVICE)

    x = rand(case.batch, case.in_channels, *case.size)
    offset = rand(case.batch, 2 * taps, oh, ow) * offset_scale
    # fp16/bf16 round many offsets to integers; exactly on the line y = -1 or x = -1 a sample is outside
    # (offset gradient 0) while torchvision, the gradient reference, takes the one-sided derivative.
    offset = torch.where(offset == offset.floor(), offset + 0.25, offset)
    mask = rand(case.batch, taps, oh, ow, uniform=True) if case.mask else None
    weight = rand(case.out_channels, case.in_channels // case.groups, kh, kw)
    bias = rand(case.out_channels) if case.bias else None
    return x, offset, mask, weight, bias


def _f64(t):
    return None if t is None else t.detach().double().cpu()


def oracle(case: Case, tensors) -> torch.Tensor:
    x, offset, mask, weight, bias = (_f64(t) for t in tensors)
    return deform_conv2d_oracle(x, offset, weight, bias, case.stride, case.padding, case.dilation, mask)


def abs_oracle(case: Case, tensors) -> torch.Tensor:
    """Oracle on absolute values: bounds sum |w * sample| per output (bilinear weights are >= 0)."""
    x, offset, mask, weight, bias = (_f64(t) for t in tensors)
    absolute = [None if t is None else t.abs() for t in (x, mask, weight, bias)]
    x, mask, weight, bias = absolute
    return deform_conv2d_oracle(x, offset, weight, bias, case.stride, case.padding, case.dilation, mask)


def torchvision_grads(case: Case, tensors, grad_output, absolute: bool = False):
    """Gradients of <deform_conv2d(...), grad_output> by torchvision's op in float64 on CPU.

    With ``absolute``, every tensor but the offset is replaced by its absolute value: the result then
    bounds sum |term| of the input, mask, weight and bias gradients (not the offset's).
    """
    leaves = [_f64(t) for t in tensors]
    go = _f64(grad_output)
    if absolute:
        leaves = [t if i == 1 or t is None else t.abs() for i, t in enumerate(leaves)]
        go = go.abs()
    leaves = [None if t is None else t.requires_grad_() for t in leaves]
    x, offset, mask, weight, bias = leaves
    out = torchvision.ops.deform_conv2d(
        x, offset, weight, bias, case.stride, case.padding, case.dilation, mask
    )
    (out * go).sum().backward()
    return [None if t is None else t.grad for t in leaves]


def forward(case: Case, tensors) -> torch.Tensor:
    x, offset, mask, weight, bias = tensors
    return tdc.forward(x, offset, mask, weight, bias, *case.geometry)


def backward(case: Case, tensors, grad_output, output_mask=ALL):
    """The kernels' gradients; the bias gradient is asked for only when there is a bias, as the op does."""
    x, offset, mask, weight, bias = tensors
    output_mask = (*output_mask[:4], output_mask[4] and bias is not None)
    return tdc.backward(grad_output, x, offset, mask, weight, *case.geometry, output_mask)


def spy_launches(monkeypatch, whole: bool = False) -> list:
    """The keyword arguments (constexprs, warps, stages) of every kernel launch from now on; with
    ``whole``, (kernel, launch) pairs (``tdc._Launch``: grid, integer arguments, keyword arguments)."""
    launched, run = [], tdc._run

    def spy(kernel, spec, tensors):
        launched.append((kernel, spec) if whole else spec.kwargs)
        run(kernel, spec, tensors)

    monkeypatch.setattr(tdc, "_run", spy)
    return launched


def check_forward(case: Case, tensors, out: torch.Tensor, dtype: torch.dtype) -> None:
    """|out - exact| <= c * eps * sum |terms|: c = 2 where one rounding of the samples and one of the
    output dominate (fp16/bf16), 32 where the fp32/fp64 accumulation does."""
    assert out.dtype == dtype and out.is_contiguous()
    expected = oracle(case, tensors)
    factor = 2.0 if dtype in (torch.float16, torch.bfloat16) else 32.0
    tol = factor * EPS[dtype] * abs_oracle(case, tensors) + 1e-300
    err = (out.double().cpu() - expected).abs()
    assert out.shape == expected.shape
    assert bool((err <= tol).all()), (
        f"max error {err.max().item():.3g}, max excess {(err - tol).max().item():.3g}"
    )


def check_grads(case: Case, tensors, grad_output, grads, dtype: torch.dtype, output_mask=ALL) -> None:
    """Each gradient within c * eps * (its largest sum of |terms|) of torchvision's float64 gradient."""
    ref = torchvision_grads(case, tensors, grad_output)
    bound = torchvision_grads(case, tensors, grad_output, absolute=True)
    factor = 8.0 if dtype in (torch.float16, torch.bfloat16) else 64.0
    for name, wanted, got, r, b, t in zip(GRAD_NAMES, output_mask, grads, ref, bound, tensors, strict=True):
        if not wanted or t is None:
            assert got is None, name
            continue
        assert got is not None and got.shape == t.shape and got.dtype == t.dtype, name
        assert got.is_contiguous(), name
        scale = r.abs().max() if name == "offset" else b.abs().max()
        tol = factor * EPS[dtype] * scale.item() + 1e-300
        err = (got.double().cpu() - r).abs().max().item()
        assert err <= tol, f"grad_{name}: max error {err:.3g} > {tol:.3g}"


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equal under the interpreter (programs run in order); on CUDA float atomics let the
    summation order of the input and weight gradients vary, so equal within a few roundings there."""
    if a.device.type == "cuda":
        scale = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=0, atol=64 * EPS[b.dtype] * scale)
    else:
        assert torch.equal(a, b)


@pytest.fixture(autouse=True)
def _full_fp32():
    """fp32 products follow cuDNN's TF32 switch (on by default); the tolerances here assume full fp32."""
    with torch.backends.cudnn.flags(allow_tf32=False):
        yield


@pytest.fixture
def small_tiles(monkeypatch):
    for kernel, config in SMALL_TILES.items():
        monkeypatch.setitem(tdc.CONFIG_OVERRIDES, kernel, config)


@pytest.fixture
def deterministic():
    with deterministic_algorithms(True):
        yield


# --------------------------------------------------------------------------------------------------
# Forward and backward against the references


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_backward(name, dtype):
    case = CASES[name]
    tensors = make_inputs(case, dtype)
    out = forward(case, tensors)
    check_forward(case, tensors, out, dtype)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    check_grads(case, tensors, grad_output, backward(case, tensors, grad_output), dtype)


@pytest.mark.parametrize("name", ["dcnv1-no-bias-16ch", "kernel32-stride21-pad10-dil21-odd"])
def test_deterministic_mode_on_other_geometries(deterministic, name):
    """Deterministic mode (sort, cell sums, gather) without a mask, and with a non-square kernel,
    stride, padding and dilation, against the float64 oracle."""
    case = CASES[name]
    tensors = make_inputs(case, torch.float64)
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float64).to(DEVICE)
    check_grads(case, tensors, grad_output, backward(case, tensors, grad_output), torch.float64)


@pytest.mark.parametrize("mode", ["atomic", "deterministic"])
def test_tiles_straddle_every_boundary(small_tiles, request, mode):
    """Every kernel's tiles cross the shape's edges (in deterministic mode also those of the cell
    sums and the gather)."""
    if mode == "deterministic":
        request.getfixturevalue("deterministic")
    dtype = torch.float32
    tensors = make_inputs(STRADDLE, dtype)
    out = forward(STRADDLE, tensors)
    check_forward(STRADDLE, tensors, out, dtype)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    check_grads(STRADDLE, tensors, grad_output, backward(STRADDLE, tensors, grad_output), dtype)


@pytest.mark.parametrize(
    ("splits", "case_name", "dtype"),
    [
        (2, "straddle", torch.float64),
        (3, "straddle", torch.float32),
        (4, "kernel32", torch.float16),  # 6 taps in splits of 2: the fp32 buffer, then the copy
        (9, "groups", torch.bfloat16),  # one tap per split
    ],
)
def test_forward_with_split_taps(monkeypatch, splits, case_name, dtype):
    """Taps split across programs, the partial sums added atomically (the bias once), equal the oracle."""
    case = {"straddle": STRADDLE, "kernel32": CASES["kernel32-stride21-pad10-dil21-odd"]}.get(
        case_name, CASES["groups2-offset-groups3"]
    )
    monkeypatch.setitem(tdc.CONFIG_OVERRIDES, "forward", tdc.Config(16, 16, 16, splits=splits))
    tensors = make_inputs(case, dtype)
    check_forward(case, tensors, forward(case, tensors), dtype)


@pytest.mark.parametrize(
    ("case", "dtype", "splits", "flat"),
    [
        # One offset group, 40 channels: two whole 16-channel blocks and a partial one.
        (Case(batch=1, in_channels=40, out_channels=17, size=(5, 7)), torch.float32, 1, True),
        (Case(batch=1, in_channels=40, out_channels=17, size=(5, 7)), torch.float16, 1, True),
        # Two offset groups of 32 channels, one weight group: the offset group changes mid-loop.
        (Case(batch=1, in_channels=64, out_channels=6, size=(4, 5), offset_groups=2), torch.bfloat16,
         1, True),
        # Two weight groups of two offset groups each: the second weight group's offset group starts
        # at 2 and steps to 3 after its first channel block.
        (Case(batch=1, in_channels=64, out_channels=4, groups=2, offset_groups=4, size=(4, 5)),
         torch.float32, 1, True),
        # Two weight groups inside one offset group, no mask, the taps split in 2.
        (Case(batch=2, in_channels=32, out_channels=6, groups=2, mask=False), torch.float64, 2, True),
        (CASES["kernel32-stride21-pad10-dil21-odd"], torch.float32, 3, True),
        # Taps split 5 + 4 with three channel blocks: the second split starts mid-row of the kernel
        # (tap 5 = (1, 2)) and returns there at every channel block.
        (Case(batch=1, in_channels=40, out_channels=6, size=(4, 5)), torch.float32, 2, True),
        # A channel block would cross an offset group (9 channels each): the nested loops run instead.
        (STRADDLE, torch.float32, 1, False),
    ],
    ids=["40ch", "40ch-fp16", "offset-groups-bf16", "weight-and-offset-groups", "weight-groups-split-fp64",
         "kernel32-split", "40ch-split-mid-row", "straddle-falls-back"],
)  # fmt: skip
@pytest.mark.parametrize("channels_inner", [False, True], ids=["taps-inner", "channels-inner"])
def test_forward_flat_loop(monkeypatch, case, dtype, splits, flat, channels_inner):
    """Config.flat: one loop over (channel block, tap), pipelined by hand in registers (launched with
    one stage): the oracle's output, with partial channel and pixel tiles, offset groups changing
    mid-loop, weight groups, no mask and split taps; in either order (Config.channels_inner, the
    autotuner's candidate: channel blocks fastest, the samples set up only where a step starts a tap
    or an offset group; the tests below take the FLAT_CHANNELS_INNER switch)."""
    config = tdc.Config(16, 16, 16, num_stages=3, splits=splits, flat=True, channels_inner=channels_inner)
    monkeypatch.setitem(tdc.CONFIG_OVERRIDES, "forward", config)
    launched = spy_launches(monkeypatch)
    tensors = make_inputs(case, dtype)
    check_forward(case, tensors, forward(case, tensors), dtype)
    assert [(kwargs["FLAT"], kwargs["num_stages"]) for kwargs in launched] == [(flat, 1 if flat else 3)]
    assert [kwargs["CHANNELS_INNER"] for kwargs in launched] == [flat and channels_inner]


@pytest.mark.parametrize(
    ("case_name", "dtype", "whole"),
    [
        ("dcnv1-no-bias-16ch", torch.float16, (True, True)),  # 16 channels in blocks of 16
        ("dcnv1-no-bias-16ch", torch.float32, (True, False)),  # fp32's data kernel keeps its masks
        ("groups2-offset-groups3", torch.float16, (False, False)),  # 3 channels a group: partial
    ],
    ids=str,
)
def test_whole_channel_blocks(small_tiles, monkeypatch, case_name, dtype, whole):
    """WHOLE_BLOCKS: where the blocks divide every weight and offset group, the forward and (16-bit)
    data kernels run without channel masks, with the references' results."""
    launched = spy_launches(monkeypatch, whole=True)
    case = CASES[case_name]
    tensors = make_inputs(case, dtype)
    out = forward(case, tensors)
    check_forward(case, tensors, out, dtype)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    check_grads(case, tensors, grad_output, backward(case, tensors, grad_output), dtype)
    flags = {
        kernel.__name__: spec.kwargs["WHOLE_BLOCKS"]
        for kernel, spec in launched
        if "WHOLE_BLOCKS" in spec.kwargs
    }
    assert (flags["deform_conv_fwd_kernel"], flags["deform_conv_bwd_data_kernel"]) == whole


def test_data_kernel_layout_defaults():
    """DATA_GATHERED_LAYOUT None: 16-bit inputs, and TF32 in 64-pixel tiles over 8 warps (its other
    tiles spill); never full fp32 or float64 (no matrix unit layout to leave)."""
    assert tdc.DATA_GATHERED_LAYOUT is None
    wide = tdc.Config(64, 64, 256, 8, 2)
    others = [tdc.Config(32, 64, 64, 4, 2), tdc.Config(128, 32, 64, 8, 2), tdc.Config(64, 32, 64, 4, 2)]
    for config in (wide, *others):
        assert tdc._data_gathered_layout(torch.float16, config, True)
        assert tdc._data_gathered_layout(torch.bfloat16, config, True)
        assert not tdc._data_gathered_layout(torch.float32, config, False)
        assert not tdc._data_gathered_layout(torch.float64, config, False)
        assert tdc._data_gathered_layout(torch.float32, config, True) == (config is wide)


# The defaults (16-bit on; fp32 off in the tests' 16-pixel tiles) run in every other test; here the
# flipped choices.
@pytest.mark.parametrize(
    ("dtype", "switch", "gathered"),
    [(torch.float16, False, False), (torch.float32, True, True), (torch.float64, True, False)],
    ids=str,
)
def test_data_kernel_in_either_layout(small_tiles, monkeypatch, dtype, switch, gathered):
    """DATA_GATHERED_LAYOUT: the data kernel's column gradient taken out of the matrix unit's layout
    and its scatter in rows of two neighbours, or not: the references' gradients either way (partial
    channel blocks, offset groups, neighbours off the map)."""
    monkeypatch.setattr(tdc, "DATA_GATHERED_LAYOUT", switch)
    launched = spy_launches(monkeypatch, whole=True)
    case = CASES["groups2-offset-groups3"]
    tensors = make_inputs(case, dtype)
    seed = torch.Generator().manual_seed(1)
    grad_output = (
        torch.randn(case.batch, case.out_channels, *case.out_size, generator=seed).to(dtype).to(DEVICE)
    )
    check_grads(case, tensors, grad_output, backward(case, tensors, grad_output), dtype)
    flags = [spec.kwargs["GATHERED_LAYOUT"] for kernel, spec in launched if "GATHERED_LAYOUT" in spec.kwargs]
    assert flags == [gathered]


@pytest.mark.parametrize(
    ("case_name", "config"),
    [
        ("groups2-offset-groups3", tdc.Config(16, 16, 16)),  # partial channel blocks, nested loops
        ("dcnv1-no-bias-16ch", tdc.Config(16, 16, 16, num_stages=1, flat=True)),  # whole blocks, flat
        ("kernel32-stride21-pad10-dil21-odd", tdc.Config(16, 16, 16, num_stages=1, flat=True)),
    ],
    ids=["nested-partial", "flat-whole", "flat-odd"],
)
@pytest.mark.parametrize("channels_inner", [False, True], ids=["taps-inner", "channels-inner"])
def test_forward_blend_in_16_bit(monkeypatch, case_name, config, channels_inner):
    """BLEND_IN_16_BIT: fp16 neighbours blended in fp16 arithmetic, within the same bound of the
    float64 oracle as the fp32 blend (under the interpreter: 0.3-0.4 eps x scale, against 0.14-0.31
    blending in fp32). bf16 blends in fp32 under the interpreter, whose bf16 arithmetic is not."""
    monkeypatch.setattr(tdc, "BLEND_IN_16_BIT", True)
    monkeypatch.setattr(tdc, "FLAT_CHANNELS_INNER", channels_inner)
    monkeypatch.setitem(tdc.CONFIG_OVERRIDES, "forward", config)
    launched = spy_launches(monkeypatch)
    case = CASES[case_name]
    for dtype in (torch.float16, torch.bfloat16):
        tensors = make_inputs(case, dtype)
        check_forward(case, tensors, forward(case, tensors), dtype)
    assert [kwargs["LOW_BLEND"] for kwargs in launched] == [True, DEVICE.type == "cuda"]
    if case_name == "dcnv1-no-bias-16ch":
        assert [kwargs["WHOLE_BLOCKS"] for kwargs in launched] == [True, True]


@pytest.mark.parametrize("channels_inner", [False, True], ids=["taps-inner", "channels-inner"])
def test_forward_flat_loop_with_nan_and_far_offsets(monkeypatch, channels_inner):
    """The hand-pipelined flat loop keeps each step's samples apart: a NaN offset poisons its own
    pixel only, far offsets read nothing."""
    monkeypatch.setattr(tdc, "FLAT_CHANNELS_INNER", channels_inner)
    # Two offset groups of 16 channels: one 16-channel block each (the flat loop runs).
    case = Case(batch=1, in_channels=32, out_channels=3, offset_groups=2)
    x, offset, mask, weight, bias = make_inputs(case, torch.float64)
    offset = offset.clone()
    offset[0, 0, 1, 2] = float("nan")  # group 0, tap 0, dy at pixel (1, 2)
    offset[0, 19, 3, 3] = 3e9  # group 1, tap 0, dx
    monkeypatch.setitem(tdc.CONFIG_OVERRIDES, "forward", tdc.Config(16, 16, 16, num_stages=1, flat=True))
    launched = spy_launches(monkeypatch)
    tensors = (x, offset, mask, weight, bias)
    out = forward(case, tensors)
    assert [kwargs["FLAT"] for kwargs in launched] == [True]
    expected = torch.zeros(out.shape[2:], dtype=torch.bool)
    expected[1, 2] = True
    assert torch.equal(out.isnan().any(dim=1)[0].cpu(), expected)
    torch.testing.assert_close(out.cpu(), oracle(case, tensors), rtol=1e-10, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("channels_inner", [False, True], ids=["taps-inner", "channels-inner"])
def test_forward_flat_loop_with_64_bit_indices(monkeypatch, channels_inner):
    """The flat loop's 64-bit index arithmetic (INDEX64, for tensors of 2**30+ elements), split taps
    included, gives the bits of the 32-bit one."""
    monkeypatch.setattr(tdc, "FLAT_CHANNELS_INNER", channels_inner)
    case = Case(batch=2, in_channels=40, out_channels=6, size=(4, 5))
    config = tdc.Config(16, 16, 16, num_stages=1, splits=2, flat=True)
    monkeypatch.setitem(tdc.CONFIG_OVERRIDES, "forward", config)
    tensors = make_inputs(case, torch.float32)
    launched = spy_launches(monkeypatch)
    narrow = forward(case, tensors)
    monkeypatch.setattr(tdc, "_INT32_SAFE", 0)
    monkeypatch.setattr(tdc, "_PLANS", {})  # the plans hold the index width
    assert_same(forward(case, tensors), narrow)
    assert [(kwargs["INDEX64"], kwargs["FLAT"]) for kwargs in launched] == [(False, True), (True, True)]


def check_variant(
    monkeypatch, kernel: str, config, case: Case, dtype: torch.dtype, output_mask
) -> list[dict]:
    """Run the backward with ``config`` for ``kernel``, check the gradients of ``output_mask`` against
    torchvision in float64, and return the keyword arguments of every launch (to see the variant's
    constexpr reach its kernel)."""
    tensors = make_inputs(case, dtype)
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size).to(dtype).to(DEVICE)
    launched = spy_launches(monkeypatch)
    monkeypatch.setitem(tdc.CONFIG_OVERRIDES, kernel, config)
    grads = backward(case, tensors, grad_output, output_mask=output_mask)
    check_grads(case, tensors, grad_output, grads, dtype, output_mask=output_mask)
    return launched


@pytest.mark.parametrize(
    ("mode", "dtype", "go_first"),
    [
        ("atomic", torch.float32, True),
        ("deterministic", torch.float16, True),
        ("atomic", torch.float16, False),
        ("atomic", torch.bfloat16, False),
    ],
)
def test_weight_kernel_in_either_product_order(monkeypatch, request, mode, dtype, go_first):
    """Config.go_first accumulates grad_out^T @ columns instead of columns^T @ grad_out: the same
    weight gradient (float64 oracle), with channel blocks straddling the offset groups and the channel
    counts, through the atomic and the deterministic (per-split) writes. Each dtype's other order than
    its default (go_first for 16-bit, which every other 16-bit test runs)."""
    if mode == "deterministic":
        request.getfixturevalue("deterministic")
    config = tdc.Config(16, 16, 16, go_first=go_first)
    launched = check_variant(
        monkeypatch, "weight", config, STRADDLE, dtype, (False, False, False, True, False)
    )
    assert [kwargs["GO_FIRST"] for kwargs in launched] == [go_first]  # the order reached the kernel


@pytest.mark.parametrize(
    ("mode", "dtype", "case"),
    [
        ("atomic", torch.float32, STRADDLE),
        ("atomic", torch.bfloat16, Case(batch=1, in_channels=40, out_channels=6, groups=2, size=(4, 5))),
        ("deterministic", torch.float16, Case(batch=1, in_channels=40, out_channels=6, size=(4, 5))),
    ],
    ids=["straddle-fp32", "two-weight-groups-bf16", "three-channel-blocks-fp16-deterministic"],
)
def test_data_kernel_with_deferred_sums(monkeypatch, request, mode, dtype, case):
    """Config.deferred_sums sums the offset and mask gradients' products over channels once, after the
    channel loops, instead of per channel block: the same data gradients (torchvision in float64),
    with several channel blocks and weight groups per program, blocks straddling offset groups, and
    the atomic and deterministic input gradients."""
    if mode == "deterministic":
        request.getfixturevalue("deterministic")
    config = tdc.Config(16, 16, 16, deferred_sums=True)
    launched = check_variant(monkeypatch, "data", config, case, dtype, (True, True, True, False, False))
    assert [kwargs["DEFER_SUMS"] for kwargs in launched if "DEFER_SUMS" in kwargs] == [True]


FUSED_CASES = {
    "plain": CASES["plain"],
    "straddle": STRADDLE,
    "dcnv1-no-bias-16ch": CASES["dcnv1-no-bias-16ch"],
    "kernel32-stride21-pad10-dil21-odd": CASES["kernel32-stride21-pad10-dil21-odd"],
    # Weight groups of 4 channels inside one offset group of 8: the offset and mask sums of two
    # segments meet in atomics.
    "groups2-offset-group1": Case(batch=1, in_channels=8, out_channels=6, groups=2, offset_groups=1),
    # 40 output channels: one 64-wide tile (the interpreter's default once capped it at 32).
    "40-out-channels": Case(batch=1, in_channels=4, out_channels=40, size=(3, 4)),
}


@pytest.mark.parametrize(
    ("name", "dtype", "block_c"),
    [
        ("plain", torch.float64, None),
        ("straddle", torch.float32, None),  # 9-channel offset groups in one 16-channel block: stored
        ("straddle", torch.float64, 4),  # ... in 4-channel blocks: summed atomically
        ("dcnv1-no-bias-16ch", torch.float16, None),
        ("kernel32-stride21-pad10-dil21-odd", torch.bfloat16, None),
        ("groups2-offset-group1", torch.float64, None),
        ("40-out-channels", torch.float32, None),
    ],
)
def test_fused_backward_against_the_references(monkeypatch, name, dtype, block_c):
    """tdc.FUSED_BACKWARD: the data and weight gradients by one kernel (no weight or data kernel),
    against torchvision's float64 gradients."""
    case = FUSED_CASES[name]
    launched = fused_kernels_launched(monkeypatch)
    if block_c is not None:
        monkeypatch.setitem(tdc.CONFIG_OVERRIDES, "fused", tdc.Config(16, block_c, 32))
    tensors = make_inputs(case, dtype)
    grad_output = torch.randn(
        case.batch, case.out_channels, *case.out_size, generator=torch.Generator().manual_seed(1)
    )
    grad_output = grad_output.to(dtype).to(DEVICE)
    check_grads(case, tensors, grad_output, backward(case, tensors, grad_output), dtype)
    assert launched == [tdc._k.deform_conv_bwd_fused_kernel]


def test_fused_backward_subsets_and_fallbacks(monkeypatch):
    """The fused pass computes only what is asked for (a weight gradient with any data gradient), and
    the two kernels run where it does not apply: weight and offset groups not nested, a weight group
    beyond 256 output channels, the weight or the data gradients alone, deterministic mode."""
    launched = fused_kernels_launched(monkeypatch)
    case = CASES["plain"]
    tensors = make_inputs(case, torch.float64)
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float64).to(DEVICE)
    fused, weight_kernel = tdc._k.deform_conv_bwd_fused_kernel, tdc._k.deform_conv_bwd_weight_kernel
    for output_mask, kernels in [
        ((False, True, False, True, False), [fused]),
        ((True, False, True, True, True), [fused]),
        ((False, False, False, True, False), [weight_kernel]),
        ((True, True, True, False, False), [tdc._k.deform_conv_bwd_data_kernel]),
    ]:
        launched.clear()
        grads = backward(case, tensors, grad_output, output_mask)
        assert launched == kernels, output_mask
        check_grads(case, tensors, grad_output, grads, torch.float64, output_mask)
    with deterministic_algorithms(True):
        launched.clear()
        backward(case, tensors, grad_output)
        assert fused not in launched and weight_kernel in launched
    geo = tdc._Geometry(1, 6, 5, 5, 4, 2, 3, 3, 3, 5, 5, (1, 1), (1, 1), (1, 1))  # 3 vs 2 channels
    assert not tdc._fused_backward_ok(geo, tensors[0])
    geo = tdc._Geometry(1, 8, 5, 5, 512, 1, 3, 3, 1, 5, 5, (1, 1), (1, 1), (1, 1))
    assert not tdc._fused_backward_ok(geo, tensors[0])
    geo = tdc._Geometry(1, 8, 5, 5, 256, 2, 3, 3, 4, 5, 5, (1, 1), (1, 1), (1, 1))  # 4 in 2 channels
    assert tdc._fused_backward_ok(geo, tensors[0])


def test_an_autotuned_go_first_entry_is_read_back(monkeypatch):
    """An entry of the autotune cache with the variant flag (its seventh field) becomes a go_first
    Config for the weight kernel, a deferred_sums Config for the data kernel and a flat one for the
    forward."""
    from deformable.ops._triton import _autotune_cache

    case = Case(batch=1, in_channels=16, out_channels=16, size=(4, 5))
    tensors = make_inputs(case, torch.float32)
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size).to(DEVICE)
    monkeypatch.setattr(tdc, "_autotune_enabled", lambda t: True)
    monkeypatch.setattr(tdc, "_TUNED", {})
    monkeypatch.setattr(tdc, "_PLANS", {})
    monkeypatch.setattr(_autotune_cache, "lookup", lambda scope, key: (16, 16, 16, 4, 1, 1, 1))
    grads = backward(case, tensors, grad_output)
    check_grads(case, tensors, grad_output, grads, torch.float32)
    tuned = {key[0]: config for key, config in tdc._TUNED.items()}
    assert tuned["weight"] == tdc.Config(16, 16, 16, 4, 1, 1, go_first=True)
    assert tuned["data"] == tdc.Config(16, 16, 16, 4, 1, 1, deferred_sums=True)
    assert tuned["weight"].cache_fields() == tuned["data"].cache_fields() == (16, 16, 16, 4, 1, 1, 1)
    # The forward's variant is the flat loop; 2 is the flat loop with its channel blocks fastest.
    flat = tdc.Config.from_cache_fields("forward", (16, 16, 16, 4, 1, 1, 1))
    assert flat == tdc.Config(16, 16, 16, 4, 1, 1, flat=True) and flat.cache_fields()[-1] == 1
    inner = tdc.Config.from_cache_fields("forward", (16, 16, 16, 4, 1, 1, 2))
    assert inner == tdc.Config(16, 16, 16, 4, 1, 1, flat=True, channels_inner=True)
    assert inner.cache_fields()[-1] == 2 and inner.variants() == ("flat", "channels_inner")
    for kernel, variant in (("data", 2), ("fused", 1), ("forward", 3)):
        with pytest.raises(ValueError, match=f"no variant {variant} for the {kernel} kernel"):
            tdc.Config.from_cache_fields(kernel, (16, 16, 16, 4, 1, 1, variant))
    with pytest.raises(ValueError, match=r"channels_inner .* needs flat=True"):
        tdc.Config(16, 16, 16, channels_inner=True)


def test_every_flat_forward_candidate_comes_in_both_orders():
    """Autotuning times each flat-loop candidate with taps fastest and with channel blocks fastest."""
    geo = tdc._Geometry(2, 128, 100, 168, 128, 1, 3, 3, 1, 100, 168, (1, 1), (1, 1), (1, 1))
    for dtype, tf32 in ((torch.float16, True), (torch.float32, True), (torch.float32, False)):
        flat = [c for c in tdc._candidates("forward", geo, dtype, tf32) if c.flat]
        assert len(flat) == (6 if dtype == torch.float16 else 2 if tf32 else 0)
        inner = {c for c in flat if c.channels_inner}
        assert {dataclasses.replace(c, channels_inner=True) for c in flat} == inner


def test_deterministic_forward_ignores_split_taps(monkeypatch, deterministic):
    """No float atomics in deterministic mode: a split configuration runs unsplit, bitwise as without."""
    tensors = make_inputs(STRADDLE, torch.float32)
    monkeypatch.setitem(tdc.CONFIG_OVERRIDES, "forward", tdc.Config(16, 16, 16))
    plain = forward(STRADDLE, tensors)
    monkeypatch.setitem(tdc.CONFIG_OVERRIDES, "forward", tdc.Config(16, 16, 16, splits=3))
    assert torch.equal(forward(STRADDLE, tensors), plain)


@pytest.mark.parametrize("case_name", ["straddle", "groups"])
def test_tf32_forward_reads_the_k_major_weight(small_tiles, case_name):
    """With TF32 on, the fp32 forward runs on the matrix unit, whose weight tiles are K-major (a layout
    of their own): the outputs of full fp32 up to TF32's rounding, with weight groups, offset groups
    and tiles straddling every boundary."""
    case = STRADDLE if case_name == "straddle" else CASES["groups2-offset-groups3"]
    tensors = make_inputs(case, torch.float32)
    full = forward(case, tensors)
    check_forward(case, tensors, full, torch.float32)
    with torch.backends.cudnn.flags(allow_tf32=True):
        tf32 = forward(case, tensors)
    torch.testing.assert_close(tf32, full, rtol=0, atol=16 * 2**-10 * full.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision(dtype):
    case = CASES["groups2-offset-groups3"]
    tensors = make_inputs(case, dtype)
    out = forward(case, tensors)
    check_forward(case, tensors, out, dtype)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    check_grads(case, tensors, grad_output, backward(case, tensors, grad_output), dtype)


def test_output_mask_selects_gradients(monkeypatch):
    """Each subset of gradients is computed alone and equals the full computation bitwise; the input
    gradient alone copies no input (only the weight, offset and mask gradients read its samples)."""
    case = CASES["plain"]
    tensors = make_inputs(case, torch.float64)
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float64).to(DEVICE)
    full = backward(case, tensors, grad_output)
    copied, to_rows = [], tdc.to_rows
    monkeypatch.setattr(tdc, "to_rows", lambda t, *a, **kw: (copied.append(t), to_rows(t, *a, **kw))[1])
    for output_mask in [
        (True, False, False, False, False),
        (False, True, False, False, False),
        (False, False, True, False, False),
        (False, False, False, True, True),
        (False, False, False, False, False),
    ]:
        copied.clear()
        grads = backward(case, tensors, grad_output, output_mask)
        copies_input = any(t is tensors[0] for t in copied)
        assert copies_input == any(output_mask[1:4]), output_mask
        for wanted, got, reference in zip(output_mask, grads, full, strict=True):
            assert (got is None) != wanted
            if wanted:
                assert_same(got, reference)
    no_mask = (*tensors[:2], None, *tensors[3:])
    assert backward(case, no_mask, grad_output)[2] is None


# --------------------------------------------------------------------------------------------------
# Layout, sizes and values at the edges of the contract


@pytest.mark.parametrize(
    "case",
    [Case(batch=0), Case(size=(0, 3), kernel=(1, 1)), Case(out_channels=0, bias=False)],
    ids=["batch0", "empty-map", "no-output-channels"],
)
def test_empty_sizes(case):
    """Nothing to compute: outputs are the bias (or empty), gradients zeros, and nothing is launched."""
    tensors = make_inputs(case, torch.float32)
    out = forward(case, tensors)
    assert out.shape == (case.batch, case.out_channels, *case.out_size)
    bias = tensors[4]
    assert torch.equal(out, torch.zeros_like(out) if bias is None else bias.view(1, -1, 1, 1).expand_as(out))
    grads = backward(case, tensors, torch.ones_like(out))
    for got, t in zip(grads, tensors, strict=True):
        if t is not None:
            assert got.shape == t.shape
    assert not any(g.any() for g in grads[:4] if g is not None)
    if bias is not None:
        assert torch.equal(grads[4], torch.ones_like(out).sum(dim=(0, 2, 3)))


def test_non_contiguous_inputs_give_identical_results():
    case = CASES["plain"]
    dense = make_inputs(case, torch.float64)
    x, offset, mask, weight, bias = dense

    def transposed(t):  # same values, spatial dims stored transposed
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    strided = (
        x.to(memory_format=torch.channels_last),
        transposed(offset),
        torch.cat([mask, mask], dim=3)[..., : mask.shape[3]],
        weight.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),
        torch.stack([bias, bias], dim=1)[:, 0],
    )
    assert not any(t.is_contiguous() for t in strided)
    assert_same(forward(case, strided), forward(case, dense))
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float64).to(DEVICE)
    for a, b in zip(
        backward(case, strided, transposed(grad_output)), backward(case, dense, grad_output), strict=True
    ):
        assert_same(a, b)


def _channels_last(tensors):
    return tuple(
        t.to(memory_format=torch.channels_last) if t is not None and t.dim() == 4 else t for t in tensors
    )


@pytest.mark.parametrize(
    ("mode", "dtype"), [("atomic", torch.float32), ("deterministic", torch.float16)], ids=["fp32", "fp16-det"]
)
def test_channels_last_in_channels_last_out(request, mode, dtype):
    """A channels_last model's tensors are read as they are (input, offset, mask and weight through
    their strides) and the output and gradients come back channels_last: the values of the NCHW path
    (bitwise under the interpreter; the bias gradient, a PyTorch sum, up to its order)."""
    if mode == "deterministic":
        request.getfixturevalue("deterministic")
    case = CASES["groups2-offset-groups3"]
    dense = make_inputs(case, dtype)
    strided = _channels_last(dense)
    out = forward(case, strided)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert_same(out, forward(case, dense))
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    grads = backward(case, strided, grad_output.to(memory_format=torch.channels_last))
    expected = backward(case, dense, grad_output)
    for name, got, want in zip(GRAD_NAMES[:4], grads, expected, strict=False):
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous(), name
        assert_same(got, want)
    terms = grad_output.double().abs().sum(dim=(0, 2, 3)).max().item()
    torch.testing.assert_close(grads[4], expected[4], rtol=0, atol=4 * EPS[dtype] * terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_channels_last_output_of_split_taps(monkeypatch, dtype):
    """Split taps add into the output (fp32) or an fp32 buffer (fp16) with the output's strides."""
    case = CASES["kernel32-stride21-pad10-dil21-odd"]
    monkeypatch.setitem(tdc.CONFIG_OVERRIDES, "forward", tdc.Config(16, 16, 16, splits=3))
    dense = make_inputs(case, dtype)
    out = forward(case, _channels_last(dense))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_same(out, forward(case, dense))


def test_offsets_and_mask_sliced_from_a_prediction():
    """A DCNv2 layer cuts its offsets and mask from one [N, 3*G*K, Ho, Wo] prediction: channel slices
    are read in place (no copy), each through its own strides (here the offsets from a channels_last
    prediction, the mask from an NCHW one), with the results of contiguous copies; their gradients are
    new tensors in the slices' layouts (channels innermost: channels_last)."""
    case = CASES["groups2-offset-groups3"]
    dense = make_inputs(case, torch.float64)
    x, offset, mask, weight, bias = dense
    prediction = torch.cat([offset, mask], dim=1)
    split = offset.shape[1]
    sliced = (
        x,
        prediction.contiguous(memory_format=torch.channels_last)[:, :split],
        prediction[:, split:],
        weight,
        bias,
    )
    for t in sliced[1:3]:
        assert tdc._pixel_operand(t)[0].data_ptr() == t.data_ptr()  # read as it is
    assert_same(forward(case, sliced), forward(case, dense))
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float64).to(DEVICE)
    got, expected = backward(case, sliced, grad_output), backward(case, dense, grad_output)
    for a, b, t in zip(got[:4], expected[:4], sliced[:4], strict=True):
        assert a.is_contiguous(memory_format=memory_format_of(t))
        assert_same(a, b)
    assert memory_format_of(sliced[1]) == torch.channels_last


def test_pixel_operand_copies_what_it_cannot_index():
    """Rows and columns that do not merge into one pixel stride (a cropped width, a transpose) are
    copied to NCHW; those that do (every other column, a broadcast batch) are read in place."""
    base = torch.randn(2, 9, 5, 8)
    for t in (base[..., :4], base.transpose(2, 3).contiguous().transpose(2, 3)):
        copy, strides = tdc._pixel_operand(t)
        _, c, h, w = t.shape
        assert copy.is_contiguous() and torch.equal(copy, t) and strides == (c * h * w, h * w, 1)
    for t, strides in ((base[..., ::2], (360, 40, 2)), (base[:1].expand(2, -1, -1, -1), (0, 40, 1))):
        same, got = tdc._pixel_operand(t)
        assert same.data_ptr() == t.data_ptr() and got == strides


@pytest.mark.parametrize(
    ("dtype", "out_size", "expected"),
    [
        (torch.float16, (4, 4), "nchw"),  # Ho*Wo = 16: the compiler's specialisation sees the alignment
        (torch.float16, (2, 4), "nchw-hint8"),  # 8 fp16 = one 16-byte vector
        (torch.float32, (3, 4), "nchw-hint4"),
        (torch.float64, (1, 6), "nchw-hint2"),
        (torch.float16, (3, 4), "channels-last"),  # 12 pixels: rows would start mid-vector
        (torch.float32, (5, 7), "channels-last"),
    ],
)
def test_grad_output_layout_for_vector_loads(dtype, out_size, expected):
    """NCHW grad_output is kept where its pixel rows start on 16-byte vectors (telling the kernels so
    when only a hint can), copied to channels-last otherwise; channels-last is always kept as given."""
    grad_output = torch.randn(2, 5, *out_size).to(dtype)
    go, (sn, sc, sp, hint) = tdc._grad_out_operand(grad_output, dtype)
    layout = "channels-last" if sc == 1 else ("nchw" if hint == 1 else f"nchw-hint{hint}")
    assert layout == expected
    assert go.dtype == dtype and torch.equal(go, grad_output)
    assert (sn, sc, sp) == (go.stride(0), go.stride(1), go.stride(3))
    as_given = grad_output.to(memory_format=torch.channels_last)
    kept, (_, sc, sp, hint) = tdc._grad_out_operand(as_given, dtype)
    assert kept.data_ptr() == as_given.data_ptr() and (sc, sp, hint) == (1, 5, 1)
    # Pixel-major (the TF32 weight kernel's): NCHW whatever the alignment or the given layout (also
    # one that is neither NCHW nor channels_last: rows stored transposed).
    transposed = grad_output.transpose(2, 3).contiguous().transpose(2, 3)
    for given in (grad_output, as_given, transposed):
        go, (_, sc, sp, hint) = tdc._grad_out_operand(given, dtype, pixel_major=True)
        assert (
            go.is_contiguous() and torch.equal(go, grad_output) and (sc, sp) == (go.shape[2] * go.shape[3], 1)
        )
        assert hint == (
            1 if expected in ("nchw", "channels-last") else int(expected.removeprefix("nchw-hint"))
        )


@pytest.mark.parametrize("given", ["nchw", "channels-last"])
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_each_backward_kernel_gets_its_grad_output_layout(small_tiles, monkeypatch, tf32, given):
    """An fp32 grad_output whose NCHW rows start mid-vector (15 pixels), given NCHW (then copied
    channels-last) or channels_last: the data kernel reads it channels-last; the weight kernel reads it
    NCHW under TF32 (whose matrix unit reduces over contiguous pixels only), as the data kernel
    otherwise, also when it is the only kernel. The gradients are those of full fp32 up to TF32's
    rounding, and the bias gradient has the same bits whichever gradients are asked for."""
    case = Case(batch=2, in_channels=16, out_channels=17, size=(3, 5))
    tensors = make_inputs(case, torch.float32)
    dense = torch.randn(case.batch, case.out_channels, *case.out_size).to(DEVICE)
    grad_output = dense.to(memory_format=torch.channels_last) if given == "channels-last" else dense
    full = backward(case, tensors, dense)
    seen: dict[str, list] = {"weight": [], "data": []}
    weight_grad, data_grads = tdc._weight_grad, tdc._data_grads

    def spy_weight(geo, x, offset, mask, has_mask, go, *rest):
        seen["weight"].append(go.stride())
        return weight_grad(geo, x, offset, mask, has_mask, go, *rest)

    def spy_data(geo, x, offset, mask, has_mask, w, go, *rest):
        seen["data"].append(go.stride())
        return data_grads(geo, x, offset, mask, has_mask, w, go, *rest)

    monkeypatch.setattr(tdc, "_weight_grad", spy_weight)
    monkeypatch.setattr(tdc, "_data_grads", spy_data)
    monkeypatch.setattr(tdc, "_PLANS", {})  # the general path, which the spies see (call plans repeat it)
    with torch.backends.cudnn.flags(allow_tf32=tf32):
        grads = backward(case, tensors, grad_output)
        weight_only = backward(case, tensors, grad_output, output_mask=(False, False, False, True, True))
        bias_only = backward(case, tensors, grad_output, output_mask=(False, False, False, False, True))
    channels_last = dense.to(memory_format=torch.channels_last).stride()
    weight_layout = dense.stride() if tf32 else channels_last
    assert seen == {"data": [channels_last], "weight": [weight_layout, weight_layout]}
    assert torch.equal(weight_only[3], grads[3])
    assert torch.equal(weight_only[4], grads[4]) and torch.equal(bias_only[4], grads[4])
    for got, expected in zip(grads, full, strict=True):
        scale = 16 * 2**-10 if tf32 else 0.0
        torch.testing.assert_close(got, expected, rtol=0, atol=scale * expected.abs().max().item())


@pytest.mark.parametrize(
    ("dtype", "size"),
    [(torch.float32, (4, 4)), (torch.float32, (3, 4)), (torch.float16, (3, 4))],
    ids=["aligned-fp32", "hint-fp32", "copy-fp16"],
)
def test_every_grad_output_layout_gives_the_same_gradients(small_tiles, dtype, size):
    """The kernels read grad_output through its strides: NCHW (with or without the alignment hint),
    a channels-last copy and a channels-last tensor as given all give the same gradients, within the
    tolerance of the float64 reference (bitwise under the interpreter, but for the bias gradient: a
    PyTorch sum, whose order follows the layout)."""
    case = Case(batch=2, in_channels=16, out_channels=17, size=size)
    tensors = make_inputs(case, dtype)
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float64)
    grad_output = grad_output.to(dtype).to(DEVICE)
    dense = backward(case, tensors, grad_output)
    check_grads(case, tensors, grad_output, dense, dtype)
    given = backward(case, tensors, grad_output.to(memory_format=torch.channels_last))
    for a, b in zip(given[:4], dense[:4], strict=True):
        assert_same(a, b)
    terms = grad_output.double().abs().sum(dim=(0, 2, 3)).max().item()
    torch.testing.assert_close(given[4], dense[4], rtol=0, atol=4 * EPS[dtype] * terms)


@pytest.mark.parametrize("fused", [False, True], ids=["two-kernels", "fused"])
def test_extreme_offsets_and_nan(monkeypatch, fused):
    """Infinite and huge offsets are simply outside; NaN offsets and masks make NaN only what they feed
    (by the data and weight kernels, and by the fused pass, whose offset and mask sums are atomic here)."""
    monkeypatch.setattr(tdc, "FUSED_BACKWARD", fused)
    if fused:  # 2-channel offset groups in 1-channel blocks: every (pixel, tap) sum added atomically
        monkeypatch.setitem(tdc.CONFIG_OVERRIDES, "fused", tdc.Config(16, 1, 16))
    case = Case(batch=1, in_channels=4, out_channels=3, offset_groups=2)
    x, offset, mask, weight, bias = make_inputs(case, torch.float64)
    offset = offset.clone()
    offset[0, 0, 0, 0] = float("inf")  # group 0, tap 0, dy at pixel (0, 0)
    offset[0, 3, 1, 1] = -float("inf")
    offset[0, 4, 2, 2] = 1e30
    offset[0, 5, 2, 3] = -1e300
    offset[0, 19, 3, 3] = 3e9  # group 1, tap 0, dx
    far = (offset, offset.clamp(-50, 50))  # equivalent: the clamped ones are still far outside
    tensors = (x, far[0], mask, weight, bias)
    out = forward(case, tensors)
    check_forward(case, tensors, out, torch.float64)
    grad_output = torch.randn(out.shape, dtype=torch.float64).to(DEVICE)
    grads = backward(case, tensors, grad_output)
    ref = torchvision_grads(case, (x, far[1], mask, weight, bias), grad_output)
    for name, got, r in zip(GRAD_NAMES, grads, ref, strict=True):
        torch.testing.assert_close(got.cpu(), r, rtol=1e-10, atol=1e-10, msg=name)

    nan_offset = offset.clamp(-50, 50)
    nan_offset[0, 0, 1, 2] = float("nan")  # group 0 (channels 0-1) at pixel (1, 2)
    nan_mask = mask.clone()
    nan_mask[0, 9 + 4, 3, 0] = float("nan")  # group 1, centre tap, pixel (3, 0)
    tensors = (x, nan_offset, nan_mask, weight, bias)
    out = forward(case, tensors)
    nan_pixels = out.isnan().any(dim=1)[0]
    expected = torch.zeros_like(nan_pixels)
    expected[1, 2] = expected[3, 0] = True
    assert torch.equal(nan_pixels, expected)
    torch.testing.assert_close(out.cpu(), oracle(case, tensors), rtol=1e-10, atol=1e-10, equal_nan=True)
    grads = backward(case, tensors, grad_output)  # must not crash or read out of bounds
    nan_grad_offset = torch.zeros(grads[1].shape, dtype=torch.bool)
    nan_grad_offset[0, 0:2, 1, 2] = True  # the NaN position's dy, dx
    nan_grad_offset[0, 26:28, 3, 0] = True  # d/d(dy, dx) carries the NaN mask
    assert torch.equal(grads[1].isnan().cpu(), nan_grad_offset)
    # d(mask * sample)/d(mask) = sample: NaN for the NaN position only, finite for the NaN mask itself.
    assert grads[2].isnan().sum() == 1 and grads[2][0, 0, 1, 2].isnan()


def test_int64_indexing_path_matches(monkeypatch):
    """The 64-bit index arithmetic (used for tensors of 2**30+ elements) gives identical results."""
    case = Case(batch=1, in_channels=4, out_channels=4, size=(4, 5), groups=2, offset_groups=2)
    tensors = make_inputs(case, torch.float32)
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size).to(DEVICE)

    def run_all():
        with deterministic_algorithms(True):
            deterministic_grad_input = backward(
                case, tensors, grad_output, (True, False, False, False, False)
            )[0]
        return [forward(case, tensors), *backward(case, tensors, grad_output), deterministic_grad_input]

    launched = spy_launches(monkeypatch)
    narrow = run_all()
    assert launched and not any(kwargs["INDEX64"] for kwargs in launched if "INDEX64" in kwargs)
    monkeypatch.setattr(tdc, "_INT32_SAFE", 0)
    monkeypatch.setattr(tdc, "_PLANS", {})  # the plans hold the index width
    launched.clear()
    wide = run_all()
    assert all(kwargs["INDEX64"] for kwargs in launched if "INDEX64" in kwargs)
    # Every kernel of the forward, both backward modes and the deterministic input gradient ran wide.
    assert len([kwargs for kwargs in launched if kwargs.get("INDEX64")]) >= 4, launched
    for a, b in zip(wide, narrow, strict=True):
        assert_same(a, b)


# --------------------------------------------------------------------------------------------------
# Deterministic mode


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_deterministic_mode_is_correct_and_bitwise_repeatable(deterministic, dtype):
    """Samples pile onto few input pixels (long runs per cell for the cell-sum kernel)."""
    case = Case(batch=1, in_channels=6, out_channels=5, size=(4, 5), offset_groups=2)
    x, offset, mask, weight, bias = make_inputs(case, dtype, offset_scale=0.5)
    oh, ow = case.out_size
    oy = torch.arange(oh, dtype=dtype, device=DEVICE).view(1, 1, oh, 1)
    ox = torch.arange(ow, dtype=dtype, device=DEVICE).view(1, 1, 1, ow)
    offset = offset.clone()
    offset[:, 0::2] += 1.5 - oy  # every sample near (1.5 + i - 1, 2.5 + j - 1)
    offset[:, 1::2] += 2.5 - ox
    tensors = (x, offset, mask, weight, bias)
    grad_output = torch.randn(case.batch, case.out_channels, oh, ow, dtype=torch.float64).to(dtype).to(DEVICE)
    first = backward(case, tensors, grad_output)
    second = backward(case, tensors, grad_output)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    check_grads(case, tensors, grad_output, first, dtype)
    with deterministic_algorithms(False):
        atomic = backward(case, tensors, grad_output)
    for index in (0, 3):  # grad_input and grad_weight have separate deterministic paths
        scale = first[index].abs().max().item()
        torch.testing.assert_close(first[index], atomic[index], rtol=0, atol=64 * EPS[dtype] * scale)
    for index in (1, 2, 4):
        assert torch.equal(first[index], atomic[index])


@pytest.mark.parametrize("go_first", [False, True])
def test_deterministic_weight_gradient_with_several_splits_and_groups(monkeypatch, deterministic, go_first):
    """Several splits of the pixels (deterministic mode's partial sums, part [splits, groups, C_in/g,
    taps, C_out/g], summed on the host), as a GPU takes them, with two weight groups whose C_in/g (11)
    is not a multiple of the channel block; a channels_last weight's gradient has the same values."""
    case = Case(batch=3, in_channels=22, out_channels=10, size=(5, 7), groups=2, offset_groups=2)
    monkeypatch.setattr(tdc, "_multiprocessors", lambda t: 1024)  # a GPU's appetite for programs
    monkeypatch.setitem(tdc.CONFIG_OVERRIDES, "weight", tdc.Config(16, 16, 16, go_first=go_first))
    tensors = make_inputs(case, torch.float32)
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size).to(DEVICE)
    grids = spy_launches(monkeypatch, whole=True)
    only_weight = (False, False, False, True, False)
    grads = backward(case, tensors, grad_output, output_mask=only_weight)
    check_grads(case, tensors, grad_output, grads, torch.float32, output_mask=only_weight)
    ((kernel, spec),) = grids
    per_split = case.groups * 9  # programs per split: groups x taps x one 16-wide block of each side
    assert kernel is tdc._k.deform_conv_bwd_weight_kernel and not spec.kwargs["ATOMIC"]
    assert spec.grid[0] >= 3 * per_split, "the test must run several splits"
    weight_cl = tensors[3].contiguous(memory_format=torch.channels_last)
    grads_cl = backward(case, (*tensors[:3], weight_cl, tensors[4]), grad_output, output_mask=only_weight)
    assert torch.equal(grads_cl[3], grads[3]) and grads_cl[3].stride() == weight_cl.stride()


@pytest.mark.parametrize("budget_images", [1, 2])
def test_deterministic_groups_of_images_under_the_memory_budget_are_bitwise_identical(
    deterministic, budget_images
):
    """A memory budget too small for the whole batch's per-sample buffers splits it into groups of
    images (1 + 1 + 1, or 2 + 1): same bits as one group, and within the oracle's bounds."""
    from deformable.ops import memory_budget

    case = Case(batch=3, in_channels=6, out_channels=5, size=(5, 6), offset_groups=2)
    tensors = make_inputs(case, torch.float32)
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float32).to(DEVICE)
    whole = backward(case, tensors, grad_output)
    geo = tdc._Geometry.of(tensors[0], tensors[1], tensors[3], *case.geometry)
    per_image = tdc.get_memory_budget() // tdc._images_per_deterministic_group(geo, torch.float32)
    with memory_budget(budget_images * per_image):
        assert tdc._images_per_deterministic_group(geo, torch.float32) == budget_images
        grouped = backward(case, tensors, grad_output)
    for a, b in zip(whole, grouped, strict=True):
        assert torch.equal(a, b)
    check_grads(case, tensors, grad_output, grouped, torch.float32)


# --------------------------------------------------------------------------------------------------
# Integration and configuration


def test_custom_op_dispatches_to_triton():
    ops = pytest.importorskip("deformable.ops")
    case = CASES["kernel32-stride21-pad10-dil21-odd"]
    x, offset, mask, weight, bias = make_inputs(case, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask, weight, bias)]
    out = ops.deform_conv2d(
        leaves[0], leaves[1], leaves[3], leaves[4], case.stride, case.padding, case.dilation, leaves[2],
        backend="triton",
    )  # fmt: skip
    torch.testing.assert_close(out.detach().cpu(), oracle(case, (x, offset, mask, weight, bias)))
    grad_output = torch.randn(out.shape, dtype=torch.float64).to(DEVICE)
    out.backward(grad_output)
    ref = torchvision_grads(case, (x, offset, mask, weight, bias), grad_output)
    for name, leaf, r in zip(GRAD_NAMES, leaves, ref, strict=True):
        torch.testing.assert_close(leaf.grad.cpu(), r, msg=name)


def test_heuristic_and_candidate_configs_are_valid():
    """GPU configurations (checked here without a GPU): powers of two, >= 16 wherever tl.dot needs it."""
    shapes = [(2, 128, 100, 168, 1), (2, 256, 50, 84, 1), (2, 512, 25, 42, 1), (2, 256, 100, 168, 2),
              (64, 128, 28, 28, 1), (64, 512, 7, 7, 1), (1, 6, 5, 5, 1)]  # fmt: skip
    for n, c, h, w, s in shapes:
        geo = tdc._Geometry(n, c, h, w, c, 1, 3, 3, 1, h // s, w // s, (s, s), (1, 1), (1, 1))
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            for kernel in ("forward", "data", "weight", "fused", "cells", "gather"):
                configs = tdc._candidates(kernel, geo, dtype)
                configs.append(tdc._heuristic(kernel, geo, dtype, interpreted=False, sms=132))
                configs.append(tdc._heuristic(kernel, geo, dtype, interpreted=True, sms=4))
                for config in configs:
                    blocks = (config.block_m, config.block_n, config.block_k)
                    assert all(b >= 1 and b & (b - 1) == 0 for b in blocks), (kernel, config)
                    if dtype != torch.float64 and kernel not in ("cells", "gather"):
                        assert min(blocks) >= 16, (kernel, dtype, config)
                    assert not config.go_first or (kernel == "weight" and dtype != torch.float64), config
                    assert not config.deferred_sums or (kernel == "data" and dtype != torch.float64), config
                    assert not config.flat or (kernel == "forward" and dtype != torch.float64), config
                    # The fused pass holds a weight group's output channels in one tile (<= 256).
                    assert kernel != "fused" or config.block_k >= min(geo.group_out, 256), config
        assert tdc._candidates("fused", geo, torch.float32, tf32=False) == []  # spills (compile_check)
        # Full fp32 (FMA products) spills registers with the go_first order: never a candidate there.
        assert not any(c.go_first for c in tdc._candidates("weight", geo, torch.float32, tf32=False))
        fma_weight = tdc._heuristic("weight", geo, torch.float32, interpreted=False, sms=132, tf32=False)
        assert not fma_weight.go_first
        assert any(c.go_first for c in tdc._candidates("weight", geo, torch.float32, tf32=True))


def test_autotune_picks_the_fastest_candidate_and_caches_it(monkeypatch):
    """The DEFORMABLE_TRITON_AUTOTUNE path (CUDA only) with a fake clock: each candidate runs, the
    fastest is cached per key, and repeated runs leave correct results (the atomic accumulator is reset)."""
    import triton.testing

    case = Case(batch=1, in_channels=2, out_channels=3, size=(3, 4), kernel=(2, 2), padding=(0, 0))
    tensors = make_inputs(case, torch.float64)
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float64).to(DEVICE)
    expected_out, expected_grads = forward(case, tensors), backward(case, tensors, grad_output)

    candidates = [tdc.Config(16, 16, 16)]
    timed = []

    def fake_bench(fn, **kwargs):
        fn()  # a second run below: results must not depend on how often a candidate ran
        timed.append(len(timed))
        return 1.0 if len(timed) % 2 == 0 else 2.0  # the candidate, benchmarked second, wins

    monkeypatch.setattr(tdc, "_autotune_enabled", lambda t: True)
    monkeypatch.setattr(tdc, "_candidates", lambda kernel, geo, dtype, tf32=True: candidates)
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(tdc, "_TUNED", {})
    torch.testing.assert_close(forward(case, tensors), expected_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(backward(case, tensors, grad_output), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert {key[0] for key in tdc._TUNED} == {"forward", "data", "weight"}
    assert all(config == candidates[0] for config in tdc._TUNED.values())
    calls = len(timed)
    forward(case, tensors)
    backward(case, tensors, grad_output)
    assert len(timed) == calls  # cached: no second benchmark


def test_deterministic_mode_never_autotunes(monkeypatch, deterministic):
    """A timed choice of configuration could differ between processes, hence the bits: deterministic
    mode keeps the heuristic even with DEFORMABLE_TRITON_AUTOTUNE on."""
    import triton.testing

    case = Case(batch=1, in_channels=2, out_channels=3, size=(3, 4), kernel=(2, 2), padding=(0, 0))
    tensors = make_inputs(case, torch.float64)
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float64).to(DEVICE)

    def no_bench(fn, **kwargs):
        raise AssertionError("benchmarked a candidate in deterministic mode")

    monkeypatch.setattr(tdc, "_autotune_enabled", lambda t: True)
    monkeypatch.setattr(triton.testing, "do_bench", no_bench)
    monkeypatch.setattr(tdc, "_TUNED", {})
    forward(case, tensors)
    backward(case, tensors, grad_output)
    assert tdc._TUNED == {}


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float32, 3.0), (torch.float16, 4.0)])
def test_backward_never_holds_three_input_sized_buffers(monkeypatch, dtype, bound):
    """The backward's peak memory, counted from the allocator's events with the kernels not run: the
    channels-last copy of the input, the fp32 input-gradient accumulator and grad_input (1 + 1 + 1
    input sizes in fp32, 1 + 2 + 1 in fp16) are never alive together (the peak was 3.7 / 4.7 before)."""
    from deformable.benchmark import peak_allocated_bytes

    if DEVICE.type != "cpu":
        pytest.skip("counts the host-side allocations of CPU tensors")
    monkeypatch.setattr(_launch, "launch", lambda *args, **kwargs: None)  # every kernel's launch
    monkeypatch.setattr(tdc, "launch", lambda *args, **kwargs: None)  # deterministic mode's reduction
    leaves = [
        torch.zeros(size, dtype=dtype, requires_grad=True)
        for size in ((1, 16, 64, 64), (1, 18, 32, 32), (1, 9, 32, 32), (16, 16, 3, 3), (16,))
    ]
    x, offset, mask, weight, bias = leaves
    grad_output = torch.zeros(1, 16, 32, 32, dtype=dtype)

    def step():
        out = deform_conv2d(x, offset, weight, bias, 2, 1, 1, mask, backend="triton")
        torch.autograd.grad(out, leaves, grad_output)

    input_bytes = x.numel() * x.element_size()
    assert peak_allocated_bytes(step) <= bound * input_bytes


def test_launch_plans_are_reused_and_follow_the_settings(monkeypatch):
    """A repeated call reuses its launch plan (no configuration is chosen again); a configuration
    override, another fp32 precision or another flag makes a new plan, and results stay exact."""
    case = Case(batch=1, in_channels=2, out_channels=3, size=(3, 4), kernel=(2, 2), padding=(0, 0))
    tensors = make_inputs(case, torch.float32)
    grad_output = torch.randn(case.batch, case.out_channels, *case.out_size).to(DEVICE)
    chosen = []
    choose = tdc._choose

    def counting_choose(kernel, *args):
        chosen.append(kernel)
        return choose(kernel, *args)

    monkeypatch.setattr(tdc, "_choose", counting_choose)
    monkeypatch.setattr(tdc, "_PLANS", {})
    first = forward(case, tensors)
    assert forward(case, tensors).equal(first) and chosen == ["forward"]
    backward(case, tensors, grad_output)
    backward(case, tensors, grad_output)
    assert sorted(chosen) == ["data", "forward", "weight"]

    monkeypatch.setitem(tdc.CONFIG_OVERRIDES, "forward", tdc.Config(16, 16, 16))
    check_forward(case, tensors, forward(case, tensors), torch.float32)
    with torch.backends.cudnn.flags(allow_tf32=True):
        forward(case, tensors)
    backward(case, tensors, grad_output, output_mask=(False, True, True, True, True))
    assert sorted(chosen) == ["data", "data", "forward", "forward", "forward", "weight", "weight"]


def test_autotuned_configurations_persist_across_processes(monkeypatch, tmp_path):
    """The autotuner's winner is written to the cache file; a new process (cleared memory) reads it and
    benchmarks nothing; a corrupt file or entry is ignored with a warning and tuned again."""
    import json

    import triton.testing

    from deformable.ops._triton import _autotune_cache

    case = Case(batch=1, in_channels=2, out_channels=3, size=(3, 4), kernel=(2, 2), padding=(0, 0))
    tensors = make_inputs(case, torch.float64)
    expected = oracle(case, tensors)
    winner = tdc.Config(16, 16, 16, 4, 1)
    timed = []

    def fake_bench(fn, **kwargs):
        fn()
        timed.append(1)
        return 1.0 if len(timed) == 2 else 2.0  # the second candidate, ``winner``, is fastest

    path = tmp_path / "cache" / "autotune.json"
    monkeypatch.setenv(_autotune_cache.CACHE_ENV, str(path))
    monkeypatch.setattr(tdc, "_autotune_enabled", lambda t: True)
    monkeypatch.setattr(
        tdc, "_candidates", lambda kernel, geo, dtype, tf32=True: [winner] if kernel == "forward" else []
    )
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)

    def new_process():
        monkeypatch.setattr(tdc, "_TUNED", {})
        monkeypatch.setattr(tdc, "_PLANS", {})
        timed.clear()

    new_process()
    torch.testing.assert_close(forward(case, tensors).double(), expected, rtol=1e-12, atol=1e-12)
    assert len(timed) == 2
    scopes = json.loads(path.read_text())["scopes"]
    (entries,) = scopes.values()
    (key, fields) = next((k, v) for k, v in entries.items() if '"forward"' in k)
    assert fields == [16, 16, 16, 4, 1, 1, 0]

    new_process()
    torch.testing.assert_close(forward(case, tensors).double(), expected, rtol=1e-12, atol=1e-12)
    assert timed == [] and tdc.Config(16, 16, 16, 4, 1) in tdc._TUNED.values()

    # A broken entry, then a broken file: warned about, tuned again, rewritten.
    data = json.loads(path.read_text())
    next(iter(data["scopes"].values()))[key] = [16, 24, 16, 4, 1, 1]  # 24: not a power of two
    path.write_text(json.dumps(data))
    new_process()
    with pytest.warns(UserWarning, match="invalid autotune cache entry"):
        forward(case, tensors)
    assert len(timed) == 2
    path.write_text("{not json")
    new_process()
    with pytest.warns(UserWarning, match="unreadable autotune cache"):
        forward(case, tensors)
    assert len(timed) == 2 and json.loads(path.read_text())["format"] == 1

    # A well-formed entry whose launch fails (a kernel changed, a smaller GPU): tuned again.
    data = json.loads(path.read_text())
    next(iter(data["scopes"].values()))[key] = [64, 16, 16, 4, 1, 1]
    path.write_text(json.dumps(data))
    launch = _launch.launch

    def failing_launch(*args, **kwargs):
        if kwargs.get("BLOCK_M") == 64:
            raise RuntimeError("out of resources")
        return launch(*args, **kwargs)

    monkeypatch.setattr(_launch, "launch", failing_launch)
    new_process()
    with pytest.warns(UserWarning, match="ignoring the autotune cache entry"):
        torch.testing.assert_close(forward(case, tensors).double(), expected, rtol=1e-12, atol=1e-12)
    assert len(timed) == 2

    # An empty setting keeps results in memory only.
    monkeypatch.setenv(_autotune_cache.CACHE_ENV, "")
    assert _autotune_cache.cache_path() is None
