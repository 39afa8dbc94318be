"""The tiled-transpose layout copies (``_triton/_relayout.py``) against PyTorch's copies, bit for bit
(but for fp32 -> bf16 in the interpreter, which truncates where the GPU rounds): through the
interpreter on CPU tensors (``kernel=True`` forces the kernel there), on CUDA at real sizes when a GPU
is present, and inside the op, whose results must not change by a bit. The interpreter ignores the
kernel's alignment hints, so their facts are checked on :func:`_relayout._alignment` itself."""

from __future__ import annotations

import pytest
import torch

# Skips this module where Triton cannot run; before any deformable.ops._triton import.
from tests.ops.triton_device import DEVICE  # isort: skip

from deformable.ops import deform_conv2d
from deformable.ops._triton import _relayout
from deformable.ops._triton import deform_conv as tdc

pytestmark = pytest.mark.triton

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Odd sizes (no vector alignment), sizes whose alignment only the hints can tell (24 channels, 24
# pixels), and sizes that cross the 64 x 64 tiles in both directions with partial tiles.
SHAPES = [(2, 3, 5, 7), (1, 24, 4, 6), (2, 70, 3, 33)]


def _random(shape, dtype, device=DEVICE) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)


def spy_transposes(monkeypatch) -> list[dict]:
    """The constexprs of every transpose launch from now on."""
    launched, launch = [], _relayout.launch_planned

    def spy(kernel, bound, grid, tensors, scalars, kwargs):
        # Where every transpose passes, on a GPU too (a plan's later launches skip _launch.launch).
        launched.append(kwargs)
        launch(kernel, bound, grid, tensors, scalars, kwargs)

    monkeypatch.setattr(_relayout, "launch_planned", spy)
    return launched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_to_rows_is_the_channels_last_copy(monkeypatch, shape, dtype):
    launched = spy_transposes(monkeypatch)
    x = _random(shape, dtype)
    rows = _relayout.to_rows(x, kernel=True)
    assert len(launched) == 1 and not launched[0]["INDEX64"]
    assert rows.shape == (shape[0], shape[2], shape[3], shape[1]) and rows.is_contiguous()
    assert torch.equal(rows, x.permute(0, 2, 3, 1).contiguous())


def test_alignment_hints_are_facts():
    """What the kernel's hints claim, for every size and element size: a power of two that divides the
    size and the tile (so every tile starts on a multiple of it), and no more than a 16-byte vector."""
    for element_size in (1, 2, 4, 8):
        for n in range(1, 1100):
            align = _relayout._alignment(n, element_size)
            assert align & (align - 1) == 0 and n % align == 0 and _relayout.BLOCK % align == 0
            assert align * element_size <= 16
            # and the largest such: a vector-sized multiple gets a whole vector
            assert align == min(16 // element_size, n & -n)


def test_tiles_are_powers_of_two_that_the_hints_divide():
    for rows in (1, 3, 9, 16, 17, 70, 256, 4200, 65536):
        for cols in (1, 3, 9, 16, 17, 70, 256, 4200, 65536):
            block_r, block_s = _relayout._tile(rows, cols)
            for block in (block_r, block_s):
                assert block & (block - 1) == 0 and 16 <= block <= _relayout.TILE_ELEMENTS // 16
            assert block_r * block_s <= _relayout.TILE_ELEMENTS
            for element_size in (2, 4, 8):
                assert block_r % _relayout._alignment(rows, element_size) == 0
                assert block_s % _relayout._alignment(cols, element_size) == 0
    assert _relayout._tile(65536, 9) == (256, 16)  # a weight's taps: a long, narrow tile


@pytest.mark.parametrize(
    ("groups", "rows", "cols", "source", "dtype"),
    [
        (2, 6 * 5, 9, torch.float16, torch.float16),  # the forward's weight: [C_out * C_in, taps]
        (1, 300, 9, torch.float32, torch.float32),  # ... with a 256 x 16 tile straddling its end
        (2, 6, 5 * 9, torch.float32, torch.float32),  # the data kernel's: [C_out, C_in * taps]
        (2, 5 * 9, 6, torch.float32, torch.float16),  # the weight gradient: [C_in * taps, C_out]
    ],
    ids=str,
)
def test_transpose_of_weight_layouts(monkeypatch, groups, rows, cols, source, dtype):
    launched = spy_transposes(monkeypatch)
    src = _random((groups, rows, cols), source)
    dst = torch.empty((groups, cols, rows), dtype=dtype, device=DEVICE)
    assert _relayout.transpose(src, dst, groups, rows, cols, kernel=True) is dst
    assert len(launched) == 1
    assert torch.equal(dst, src.transpose(1, 2).to(dtype))
    assert torch.equal(_relayout.transpose(src, dst.clone(), groups, rows, cols, kernel=False), dst)


def test_a_transpose_clears_a_buffer_laid_out_as_its_destination(monkeypatch):
    launched = spy_transposes(monkeypatch)
    src = _random((2, 6, 45), torch.float16)
    dst = torch.empty((2, 45, 6), dtype=torch.float16, device=DEVICE)
    zero = torch.full((1, 2, 5, 9, 6), float("nan"), dtype=torch.float32, device=DEVICE)
    plan = _relayout.transpose_plan(2, 6, 45, torch.float16, torch.float16, torch.float32)
    assert _relayout.run_transpose(plan, src, dst, zero) is dst
    assert len(launched) == 1 and launched[0]["ZERO"]
    assert torch.equal(dst, src.transpose(1, 2)) and torch.equal(zero, torch.zeros_like(zero))


@pytest.mark.parametrize("zero", [None, torch.float32], ids=str)
def test_two_transposes_in_one_launch(monkeypatch, zero):
    """The pair kernel: each copy with its own sizes, tiles (an input's 64 x 64, a weight's 256 x 16),
    dtypes and partial tiles, as two launches of the single kernel would make them."""
    launched = spy_transposes(monkeypatch)
    x = _random((2, 70, 33), torch.float32)
    x_rows = torch.empty((2, 33, 70), dtype=torch.float16, device=DEVICE)
    w = _random((3, 300, 9), torch.float16)
    w_t = torch.empty((3, 9, 300), dtype=torch.float16, device=DEVICE)
    cleared = torch.ones((3, 9, 300), dtype=torch.float32, device=DEVICE) if zero is not None else None
    plan = _relayout.transpose_pair_plan(
        _relayout.transpose_plan(2, 70, 33, torch.float32, torch.float16),
        _relayout.transpose_plan(3, 300, 9, torch.float16, torch.float16, zero),
    )
    _relayout.run_transpose_pair(plan, (x, x_rows, None), (w, w_t, cleared))
    assert len(launched) == 1
    assert (launched[0]["BLOCK_R_A"], launched[0]["BLOCK_S_A"]) == _relayout._tile(70, 33)
    assert (launched[0]["BLOCK_R_B"], launched[0]["BLOCK_S_B"]) == (256, 16)
    assert torch.equal(x_rows, x.transpose(1, 2).half()) and torch.equal(w_t, w.transpose(1, 2))
    assert cleared is None or torch.equal(cleared, torch.zeros_like(cleared))


@pytest.mark.parametrize(
    ("source", "dtype"),
    [(torch.float32, torch.float16), (torch.float32, torch.bfloat16), (torch.float32, torch.float32),
     (torch.float64, torch.float64)],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_from_rows_converts_an_accumulator_like_torch(monkeypatch, shape, source, dtype):
    launched = spy_transposes(monkeypatch)
    n, c, h, w = shape
    rows = _random((n, h, w, c), source)
    out = _relayout.from_rows(rows, dtype, torch.contiguous_format, kernel=True)
    assert len(launched) == 1
    assert out.dtype == dtype and out.is_contiguous()
    expected = rows.permute(0, 3, 1, 2).to(dtype).contiguous()
    if dtype == torch.bfloat16 and not out.is_cuda:
        # The interpreter converts fp32 to bf16 by truncation, the GPU (and PyTorch) to nearest even:
        # one unit in the last place apart at most (bitwise on CUDA: test_cuda_real_sizes).
        torch.testing.assert_close(out, expected, rtol=2**-7, atol=0)
    else:
        assert torch.equal(out, expected)


def test_to_rows_converts_the_dtype_on_the_way():
    x = _random((2, 70, 3, 33), torch.float32)
    rows = _relayout.to_rows(x, torch.float16, kernel=True)
    assert rows.dtype == torch.float16
    assert torch.equal(rows, x.permute(0, 2, 3, 1).to(torch.float16).contiguous())


def test_64_bit_indices_give_the_same_copy(monkeypatch):
    monkeypatch.setattr(_relayout, "_INT32_SAFE", 16)
    monkeypatch.setattr(_relayout, "_PLANS", {})  # plans cached with 32-bit indices would be reused
    launched = spy_transposes(monkeypatch)
    x = _random((2, 70, 3, 33), torch.float16)
    rows = _relayout.to_rows(x, kernel=True)
    back = _relayout.from_rows(rows, torch.float16, torch.contiguous_format, kernel=True)
    assert [kw["INDEX64"] for kw in launched] == [True, True]
    assert torch.equal(rows, x.permute(0, 2, 3, 1).contiguous()) and torch.equal(back, x)


def test_layouts_that_need_no_transpose(monkeypatch):
    launched = spy_transposes(monkeypatch)
    x = _random((2, 8, 5, 7), torch.float32)
    cl = x.contiguous(memory_format=torch.channels_last)
    rows = _relayout.to_rows(cl, kernel=True)
    assert rows.data_ptr() == cl.data_ptr()  # a view, not a copy
    back = _relayout.from_rows(rows, torch.float32, torch.channels_last, kernel=True)
    assert back.data_ptr() == cl.data_ptr() and back.is_contiguous(memory_format=torch.channels_last)
    half = _relayout.from_rows(rows, torch.float16, torch.channels_last, kernel=True)
    assert half.is_contiguous(memory_format=torch.channels_last) and torch.equal(half, x.half())
    sliced = x[:, ::2]  # neither layout: PyTorch's copy
    assert torch.equal(_relayout.to_rows(sliced, kernel=True), sliced.permute(0, 2, 3, 1).contiguous())
    assert _relayout.to_rows(x[:, :0], kernel=True).shape == (2, 5, 7, 0)
    assert _relayout.to_rows(x[:0], kernel=True).shape == (0, 5, 7, 8)
    assert _relayout.from_rows(rows[:0], torch.float32, torch.contiguous_format, kernel=True).shape == (
        0,
        8,
        5,
        7,
    )
    # One channel or one pixel: the two layouts are one, and the rows are a view.
    for single in (x[:, :1].contiguous(), x[:, :, :1, :1].contiguous()):
        assert _relayout.to_rows(single, kernel=True).data_ptr() == single.data_ptr()
        back = _relayout.from_rows(
            _relayout.to_rows(single), torch.float32, torch.contiguous_format, kernel=True
        )
        assert torch.equal(back, single)
    assert launched == []


# Each dtype with each grad_output format, and each with one and two images (the interpreter is slow).
@pytest.mark.parametrize(
    ("dtype", "batch", "grad_format"),
    [(torch.float16, 1, "nchw"), (torch.float16, 2, "channels_last"), (torch.float32, 2, "nchw"),
     (torch.float32, 1, "channels_last")],
    ids=str,
)  # fmt: skip
def test_the_op_gives_the_same_bits_through_the_kernel(monkeypatch, dtype, batch, grad_format):
    """Forward and all gradients of an NCHW call with the transposes forced on, against PyTorch's
    copies: the input's copy in the forward and in the backward, the accumulator's conversion, the
    weight's two layouts and its gradient's, and grad_output's copy: into rows where NCHW (35
    pixels, no whole vectors), or, channels_last, into NCHW for the TF32 weight kernel (fp32; TF32 is
    PyTorch's default for convolutions)."""
    # 10 input channels: one channel block of each kernel (the interpreter's time is per block).
    x = _random((batch, 10, 5, 7), dtype).requires_grad_()
    offset = (2 * _random((batch, 18, 5, 7), torch.float32)).to(dtype).requires_grad_()
    mask = torch.rand((batch, 9, 5, 7), device=DEVICE).to(dtype).requires_grad_()
    weight = _random((9, 10, 3, 3), dtype).mul_(0.2).requires_grad_()
    grad = _random((batch, 9, 5, 7), dtype)
    if grad_format == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)

    def run():
        out = deform_conv2d(x, offset, weight, padding=1, mask=mask, backend="triton")
        return (out, *torch.autograd.grad(out, (x, offset, mask, weight), grad))

    expected = run()
    launched = spy_transposes(monkeypatch)
    monkeypatch.setattr(_relayout, "_use_kernel", lambda t: True)
    monkeypatch.setattr(tdc, "_PLANS", {})  # call plans made with PyTorch's copies would keep them
    got = run()
    grad_copies = 1 if grad_format == "nchw" or dtype == torch.float32 else 0
    weight_copies = 3  # the forward's layout, the data kernel's, and the weight gradient back
    assert len(launched) == 3 + grad_copies + weight_copies
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == e.dtype and g.stride() == e.stride() and torch.equal(g, e)
    # A repeated call follows its call plans: the input's rows and a weight layout in one launch, in
    # the forward and in the backward (which also clears the weight kernel's sums there): two fewer.
    launched.clear()
    again = run()
    assert len(launched) == 1 + grad_copies + weight_copies
    assert sum("BLOCK_R_A" in kwargs for kwargs in launched) == 2
    assert [kwargs["ZERO_B"] for kwargs in launched if "ZERO_B" in kwargs] == [False, True]
    for e, g in zip(expected, again, strict=True):
        assert g.dtype == e.dtype and g.stride() == e.stride() and torch.equal(g, e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_real_sizes(dtype):
    x = _random((2, 256, 50, 84), dtype)
    assert torch.equal(_relayout.to_rows(x), x.permute(0, 2, 3, 1).contiguous())
    acc = _random((2, 50, 84, 256), torch.float32)
    expected = acc.permute(0, 3, 1, 2).to(dtype).contiguous()
    assert torch.equal(_relayout.from_rows(acc, dtype, torch.contiguous_format), expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_tensor_on_another_device_than_the_current_one():
    with torch.cuda.device(0):
        x = _random((2, 24, 5, 7), torch.float16, device="cuda:1")
        rows = _relayout.to_rows(x)
        assert rows.device == x.device and torch.equal(rows, x.permute(0, 2, 3, 1).contiguous())
        back = _relayout.from_rows(rows.float(), torch.float16, torch.contiguous_format)
        assert back.device == x.device and torch.equal(back, x)
