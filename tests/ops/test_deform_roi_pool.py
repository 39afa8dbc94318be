"""deform_roi_pool: the oracle judges the reference, both judge the fast path; roi_align is the start."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torchvision.ops import roi_align

from deformable.benchmark import deterministic_algorithms
from deformable.ops.deform_roi_pool import deform_roi_pool
from tests.oracles import deform_roi_pool_oracle, finite_difference_grad

TRITON = pytest.param("triton", marks=pytest.mark.triton)
# "triton" runs through Triton's interpreter without CUDA (conftest sets TRITON_INTERPRET=1), which is
# slow: the tests with many calls or many RoIs (gradcheck, the roi_align sweep) take the two others,
# and the Triton kernels get the smaller tests at the end of this file.
BACKENDS = ("reference", "aten", TRITON)
BACKENDS_NOT_INTERPRETED = ("reference", "aten")


def make_rois(num, height, width, batch=2, scale=1.0, margin=3.0, max_size=None, seed=None):
    """Random RoIs in image coordinates (feature map size / scale), some poking out of the map."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    size = torch.tensor([width, height], dtype=torch.float64) / scale
    max_size = size * 0.8 if max_size is None else torch.tensor([max_size, max_size], dtype=torch.float64)
    top_left = torch.rand(num, 2, generator=gen, dtype=torch.float64) * (size + 2 * margin) - margin
    extent = torch.rand(num, 2, generator=gen, dtype=torch.float64) * max_size
    index = torch.randint(0, batch, (num, 1), generator=gen).double()
    return torch.cat([index, top_left, top_left + extent], dim=1)


def tolerance(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]


# ------------------------------------------------------------------------------------------------
# Forward against the oracle and torchvision
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_forward_matches_oracle(backend, aligned, sampling_ratio):
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    rois = make_rois(6, 9, 11, scale=0.5)
    offset = torch.randn(6, 2, 3, 4, dtype=torch.float64)
    mask = torch.rand(6, 1, 3, 4, dtype=torch.float64)
    args = ((3, 4), 0.5, sampling_ratio, 0.3, aligned)
    expected = deform_roi_pool_oracle(x, rois, offset, mask, *args)
    got = deform_roi_pool(x, rois, offset, mask, *args, backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # fp32 runs its arithmetic in fp32: within fp32 rounding of the oracle.
    got32 = deform_roi_pool(x.float(), rois.float(), offset.float(), mask.float(), *args, backend=backend)
    torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS_NOT_INTERPRETED)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, -1, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_offset_no_mask_is_roi_align(backend, aligned, sampling_ratio, dtype):
    x = torch.randn(2, 4, 17, 23, dtype=dtype)
    rois = make_rois(25, 17, 23, scale=0.25, margin=10.0).to(dtype)
    rois[0, 1:] = torch.tensor([8.0, 8.0, 8.0, 8.0], dtype=dtype)  # degenerate (point) RoI
    rois[1, 1:] = torch.tensor([60.0, 40.0, 20.0, 10.0], dtype=dtype)  # x2 < x1, y2 < y1
    for output_size in [(7, 7), (3, 5)]:
        expected = roi_align(x, rois, output_size, 0.25, sampling_ratio, aligned)
        got = deform_roi_pool(
            x, rois, None, None, output_size, 0.25, sampling_ratio, aligned=aligned, backend=backend
        )
        tol = tolerance(dtype)
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_offset_unit_mask_is_roi_align(backend):
    x = torch.randn(2, 3, 12, 12)
    rois = make_rois(8, 12, 12)
    expected = roi_align(x, rois.float(), 5, 1.0, 0, False)
    offset = torch.zeros(8, 2, 5, 5)
    mask = torch.ones(8, 1, 5, 5)
    got = deform_roi_pool(x, rois, offset, mask, 5, backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_bin_by_hand(backend):
    # A linear ramp x[.., h, w] = w: a 1x1-bin RoI with one sample at its centre reads the x coordinate.
    height, width = 10, 20
    x = torch.arange(width, dtype=torch.float64).expand(1, 1, height, width).contiguous()
    rois = torch.tensor([[0.0, 4.0, 2.0, 12.0, 6.0]], dtype=torch.float64)  # 8 wide, 4 high, scale 1
    offset = torch.tensor([0.5, -0.25], dtype=torch.float64).view(1, 2, 1, 1)
    gamma = 0.2
    got = deform_roi_pool(x, rois, offset, None, 1, 1.0, 1, gamma, backend=backend)
    # Centre x = 4 + 8 / 2 = 8, moved by gamma * 0.5 * 8 = 0.8 -> 8.8.
    assert got.item() == pytest.approx(8.8, abs=1e-12)
    # Along y (ramp in h), centre y = 2 + 4 / 2 = 4, moved by 0.2 * -0.25 * 4 = -0.2 -> 3.8.
    xt = torch.arange(height, dtype=torch.float64).view(1, 1, height, 1).expand(1, 1, height, width)
    got_y = deform_roi_pool(xt.contiguous(), rois, offset, None, 1, 1.0, 1, gamma, backend=backend)
    assert got_y.item() == pytest.approx(3.8, abs=1e-12)
    # A 2x2 output with a 2x2 grid per bin: bin (1, 0) spans x in [4, 8], samples at 5 and 7, moved by
    # gamma * offset_x * 8; only that bin moves.
    offset = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    offset[0, 0, 1, 0] = -1.0
    got = deform_roi_pool(x, rois, offset, None, 2, 1.0, 2, gamma, backend=backend)
    expected = torch.tensor([[6.0, 10.0], [6.0 - 1.6, 10.0]], dtype=torch.float64)
    torch.testing.assert_close(got[0, 0], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_scales_bins(backend):
    x = torch.randn(2, 3, 10, 10)
    rois = make_rois(5, 10, 10)
    offset = torch.randn(5, 2, 4, 4)
    mask = torch.rand(5, 1, 4, 4)
    plain = deform_roi_pool(x, rois, offset, None, 4, backend=backend)
    masked = deform_roi_pool(x, rois, offset, mask, 4, backend=backend)
    torch.testing.assert_close(masked, plain * mask, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_oracle_finite_differences(backend):
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64)
    rois = make_rois(3, 6, 7, batch=1, margin=1.0)
    offset = torch.randn(3, 2, 2, 2, dtype=torch.float64) * 0.5
    mask = torch.rand(3, 1, 2, 2, dtype=torch.float64)
    grad_out = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    tensors = [x.clone().requires_grad_(), offset.clone().requires_grad_(), mask.clone().requires_grad_()]
    out = deform_roi_pool(tensors[0], rois, tensors[1], tensors[2], 2, 1.0, 2, 0.25, backend=backend)
    grads = torch.autograd.grad(out, tensors, grad_out)

    def oracle(inp, off, msk):
        return deform_roi_pool_oracle(inp, rois, off, msk, 2, 1.0, 2, 0.25)

    for index, grad in enumerate(grads):
        expected = finite_difference_grad(oracle, [x, offset, mask], index, grad_out)
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_one_sample_in_all_has_gradients(backend, with_mask):
    """One RoI, one bin, one sample: the aten backward's per-sample bin index stayed a stride-0 view,
    which PyTorch's embedding-bag kernel refused (RuntimeError: Expected contiguous tensor)."""
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    offset = torch.tensor([[[[0.1]], [[-0.2]]]], dtype=torch.float64, requires_grad=True)
    mask = torch.full((1, 1, 1, 1), 0.7, dtype=torch.float64, requires_grad=True) if with_mask else None
    leaves = [t for t in (x, offset, mask) if t is not None]
    out = deform_roi_pool(x, rois, offset, mask, 1, 1.0, 1, 0.5, backend=backend)
    grads = torch.autograd.grad(out.sum(), leaves)

    def oracle(inp, off, msk=None):
        return deform_roi_pool_oracle(inp, rois, off, msk, 1, 1.0, 1, 0.5)

    for index, grad in enumerate(grads):
        expected = finite_difference_grad(oracle, [t.detach() for t in leaves], index, torch.ones_like(out))
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS_NOT_INTERPRETED)
@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck(backend, aligned):
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    rois = make_rois(4, 7, 8, scale=0.5)
    offset = (torch.randn(4, 2, 3, 2, dtype=torch.float64) * 0.5).requires_grad_()
    mask = torch.rand(4, 1, 3, 2, dtype=torch.float64, requires_grad=True)

    def fn(inp, off, msk):
        return deform_roi_pool(inp, rois, off, msk, (3, 2), 0.5, 0, 0.1, aligned, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, offset, mask), eps=1e-6, atol=1e-6, fast_mode=True)
    # Each input alone (the others constant), including DCNv1 (no mask) and plain RoIAlign; fast mode
    # (random projections): the full Jacobians are compared with the oracle's finite differences above.
    assert torch.autograd.gradcheck(
        lambda inp: fn(inp, None, None), (x,), eps=1e-6, atol=1e-6, fast_mode=True
    )
    # The offset Jacobian (the delicate one) in full.
    assert torch.autograd.gradcheck(
        lambda off: fn(x.detach(), off, mask.detach()), (offset,), eps=1e-6, atol=1e-6
    )
    assert torch.autograd.gradcheck(
        lambda m: fn(x.detach(), None, m), (mask,), eps=1e-6, atol=1e-6, fast_mode=True
    )


def test_fast_gradients_equal_reference_gradients():
    x = torch.randn(2, 5, 15, 13, dtype=torch.float64, requires_grad=True)
    rois = make_rois(20, 15, 13, scale=0.5, margin=6.0)
    offset = (torch.randn(20, 2, 7, 7, dtype=torch.float64) * 2).requires_grad_()
    mask = torch.rand(20, 1, 7, 7, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(20, 5, 7, 7, dtype=torch.float64)
    grads = {}
    for backend in BACKENDS_NOT_INTERPRETED:
        out = deform_roi_pool(x, rois, offset, mask, 7, 0.5, 0, 0.2, backend=backend)
        grads[backend] = (out, *torch.autograd.grad(out, (x, offset, mask), grad_out))
    for ref, fast in zip(grads["reference"], grads["aten"], strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)


def test_only_requested_gradients():
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    rois = make_rois(3, 8, 8, batch=1)
    offset = torch.randn(3, 2, 2, 2)
    mask = torch.rand(3, 1, 2, 2, requires_grad=True)
    out = deform_roi_pool(x, rois, offset, mask, 2)
    out.sum().backward()
    assert x.grad is not None and mask.grad is not None and offset.grad is None
    assert x.grad.shape == x.shape and mask.grad.shape == mask.shape


# ------------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rois(backend):
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    rois = torch.zeros(0, 5)
    offset = torch.zeros(0, 2, 7, 7, requires_grad=True)
    out = deform_roi_pool(x, rois, offset, None, 7, backend=backend)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rois_partly_and_fully_outside(backend):
    x = torch.randn(1, 2, 10, 12, dtype=torch.float64)
    rois = torch.tensor(
        [
            [0, -5.0, -5.0, 4.0, 3.0],  # partly outside (top-left)
            [0, 8.0, 6.0, 20.0, 15.0],  # partly outside (bottom-right)
            [0, 30.0, 30.0, 40.0, 44.0],  # fully outside: zeros
            [0, -40.0, -30.0, -20.0, -10.0],  # fully outside: zeros
            [0, -1.0, -1.0, 13.0, 11.0],  # the whole map and a bit
        ],
        dtype=torch.float64,
    )
    for aligned, sampling_ratio in ((False, 0), (True, 2)):  # each mode once (the interpreter is slow)
        args = (3, 1.0, sampling_ratio, 0.1, aligned)
        got = deform_roi_pool(x, rois, None, None, *args, backend=backend)
        torch.testing.assert_close(got, roi_align(x, rois, 3, 1.0, sampling_ratio, aligned))
        torch.testing.assert_close(got, deform_roi_pool_oracle(x, rois, None, None, *args))
        assert torch.equal(got[2:4], torch.zeros_like(got[2:4]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    base = torch.randn(2, 12, 9, 3).permute(0, 3, 1, 2)  # [2, 3, 12, 9], not contiguous
    x = base[:, :, :, ::1]
    channels_last = torch.randn(2, 3, 12, 9).contiguous(memory_format=torch.channels_last)
    rois = make_rois(6, 12, 9)
    offset = torch.randn(12, 2, 4, 4)[::2]  # non-contiguous offsets too
    for inp in (x, channels_last, torch.randn(2, 3, 24, 18)[:, :, ::2, ::2]):
        assert not inp.is_contiguous()
        expected = deform_roi_pool(inp.contiguous(), rois, offset.contiguous(), None, 4, backend=backend)
        got = deform_roi_pool(inp, rois, offset, None, 4, backend=backend)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert got.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    x = torch.randn(2, 4, 10, 12)
    rois = make_rois(7, 10, 12)
    offset = torch.randn(7, 2, 3, 3)
    mask = torch.rand(7, 1, 3, 3)
    xl, ol, ml = x.to(dtype), offset.to(dtype), mask.to(dtype)
    xl.requires_grad_()
    out = deform_roi_pool(xl, rois, ol, ml, 3, backend=backend)
    assert out.dtype == dtype
    # Same computation from the rounded inputs in float32, rounded once at the end (Triton's
    # interpreter may round the final conversion the other way: one unit in the last place).
    expected = deform_roi_pool(xl.detach().float(), rois, ol.float(), ml.float(), 3, backend=backend)
    ulp = torch.finfo(dtype).eps if backend == "triton" and not torch.cuda.is_available() else 0.0
    torch.testing.assert_close(out, expected.to(dtype), rtol=ulp, atol=0)
    out.float().sum().backward()
    assert xl.grad.dtype == dtype and torch.isfinite(xl.grad.float()).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_offset_only_reaches_its_bin_and_huge_offsets_are_zero(backend):
    x = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 6.0], [0, 2.0, 0.0, 7.0, 5.0]])
    offset = torch.zeros(2, 2, 3, 3)
    offset[0, 0, 1, 1] = math.nan
    offset[1, 0, 0, 0] = math.inf
    offset[1, 1, 2, 2] = -1e30
    offset[1, 0, 1, 2] = 1e9
    out = deform_roi_pool(x, rois, offset, None, 3, backend=backend)
    nan = torch.isnan(out)
    assert nan[0, :, 1, 1].all() and nan.sum() == 2
    assert torch.equal(out[1, :, 0, 0], torch.zeros(2))
    assert torch.equal(out[1, :, 2, 2], torch.zeros(2))
    assert torch.equal(out[1, :, 1, 2], torch.zeros(2))
    # Backward: the NaN bin's offset gradient is NaN, nothing else; no NaN reaches the input gradient.
    inputs = (x.clone().requires_grad_(), offset.clone().requires_grad_())
    out = deform_roi_pool(inputs[0], rois, inputs[1], None, 3, backend=backend)
    grad_x, grad_offset = torch.autograd.grad(out.nan_to_num(0.0).sum(), inputs)
    assert torch.isfinite(grad_x).all()
    assert torch.isfinite(grad_offset[1]).all() and torch.isfinite(grad_offset[0, :, [0, 2]]).all()
    plain = deform_roi_pool(x, rois, None, None, 3, backend=backend)
    keep = torch.ones(2, 3, 3, dtype=torch.bool)
    keep[0, 1, 1] = keep[1, 0, 0] = keep[1, 2, 2] = keep[1, 1, 2] = False
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[keep], plain.permute(0, 2, 3, 1)[keep])


def test_cpu_path_is_bitwise_repeatable():
    x = torch.randn(2, 16, 30, 30, requires_grad=True)
    rois = make_rois(64, 30, 30, margin=5.0)
    offset = torch.randn(64, 2, 7, 7, requires_grad=True)
    mask = torch.rand(64, 1, 7, 7, requires_grad=True)
    grad_out = torch.randn(64, 16, 7, 7)
    results = []
    for _ in range(2):
        out = deform_roi_pool(x, rois, offset, mask, 7, backend="aten")
        results.append((out, *torch.autograd.grad(out, (x, offset, mask), grad_out)))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_chunking_gives_the_same_result():
    from deformable.ops import _roi_aten, memory_budget

    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    rois = make_rois(10, 12, 12)
    offset = torch.randn(10, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(10, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(10, 3, 3, 3, dtype=torch.float64)

    def run():
        out = deform_roi_pool(x, rois, offset, mask, 3, backend="aten")
        return (out, *torch.autograd.grad(out, (x, offset, mask), grad_out))

    whole = run()
    with memory_budget(50 * _roi_aten._BYTES_PER_SAMPLE):  # 50 samples: about one RoI per chunk
        chunked = run()
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def _good():
    x = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 0.0, 2.0, 7.0, 6.0]])
    return x, rois


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (dict(rois=torch.tensor([[2, 1.0, 1.0, 5.0, 5.0]])), ValueError, ["rois[:, 0]", "[0, 1]", "2"]),
        (dict(rois=torch.tensor([[-1, 1.0, 1.0, 5.0, 5.0]])), ValueError, ["rois[:, 0]", "-1"]),
        (dict(rois=torch.tensor([[0.5, 1.0, 1.0, 5.0, 5.0]])), ValueError, ["rois[:, 0]", "integer", "0.5"]),
        (dict(rois=torch.tensor([[0, math.nan, 1.0, 5.0, 5.0]])), ValueError, ["rois", "finite"]),
        (dict(rois=torch.zeros(2, 4)), ValueError, ["rois", "[K, 5]", "[2, 4]"]),
        (dict(rois=torch.zeros(5)), ValueError, ["rois", "[K, 5]", "[5]"]),
        (dict(rois=torch.zeros(2, 5, dtype=torch.long)), TypeError, ["rois", "floating", "int64"]),
        (dict(input=torch.zeros(2, 3, 8, 8, dtype=torch.float8_e4m3fn)), TypeError, ["input", "float8"]),
        (dict(input=torch.zeros(0, 3, 8, 8)), ValueError, ["input", "batch size 0", "rois[:, 0]"]),
        (dict(rois=[[0, 1, 1, 5, 5]]), TypeError, ["rois", "Tensor", "list"]),
        (dict(offset=torch.zeros(2, 2, 5, 5)), ValueError, ["offset", "[2, 2, 7, 7]", "[2, 2, 5, 5]"]),
        (dict(offset=torch.zeros(2, 1, 7, 7)), ValueError, ["offset", "[2, 1, 7, 7]"]),
        (dict(offset=torch.zeros(3, 2, 7, 7)), ValueError, ["offset", "[3, 2, 7, 7]"]),
        (dict(mask=torch.zeros(2, 2, 7, 7)), ValueError, ["mask", "[2, 1, 7, 7]", "[2, 2, 7, 7]"]),
        (
            dict(offset=torch.zeros(2, 2, 7, 7, dtype=torch.float64)),
            TypeError,
            ["offset", "float32", "float64"],
        ),
        (dict(mask=torch.zeros(2, 1, 7, 7, dtype=torch.float16)), TypeError, ["mask", "float32", "float16"]),
        (dict(offset=torch.zeros(2, 2, 7, 7, device="meta")), ValueError, ["offset", "device", "meta"]),
        (dict(rois=torch.zeros(2, 5, device="meta")), ValueError, ["rois", "device", "meta"]),
        (dict(spatial_scale=-0.5), ValueError, ["spatial_scale", "positive", "-0.5"]),
        (dict(spatial_scale=0.0), ValueError, ["spatial_scale", "0.0"]),
        (dict(spatial_scale="1"), TypeError, ["spatial_scale", "'1'"]),
        (dict(sampling_ratio=1.5), TypeError, ["sampling_ratio", "int", "1.5"]),
        (dict(sampling_ratio=True), TypeError, ["sampling_ratio", "True"]),
        (dict(output_size=0), ValueError, ["output_size", "positive", "0"]),
        (dict(output_size=(7, 7, 7)), TypeError, ["output_size", "(7, 7, 7)"]),
        (dict(output_size=7.0), TypeError, ["output_size", "7.0"]),
        (dict(gamma=math.inf), ValueError, ["gamma", "inf"]),
        (dict(aligned=1), TypeError, ["aligned", "bool", "1"]),
        (dict(input=torch.randn(3, 8, 8)), ValueError, ["input", "[N, C, H, W]", "[3, 8, 8]"]),
        (dict(input=torch.zeros(2, 3, 8, 8, dtype=torch.long)), TypeError, ["input", "floating", "int64"]),
        (dict(backend="cuda"), ValueError, ["backend", "cuda"]),
    ],
)
def test_bad_arguments(kwargs, error, words):
    x, rois = _good()
    arguments = dict(input=x, rois=rois)
    arguments.update(kwargs)
    with pytest.raises(error) as info:
        deform_roi_pool(**arguments)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


# ------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aten", TRITON])
def test_opcheck(backend):
    # Two RoIs of 2x2 bins: the checks are of the op's registration (schema, fake kernel, AOT dispatch),
    # and under the Triton interpreter every program costs time (five RoIs of 3x3 bins took 78 s).
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    rois = make_rois(2, 9, 10, scale=0.5, seed=0)
    offset = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    op = torch.ops.deformable.deform_roi_pool.default
    # Under the Triton interpreter the AOT-dispatch checks (a dozen calls) run for the first variant of
    # each op there, the schema and fake-tensor checks (every output's shape and strides against the
    # fake kernel's) for all.
    light = ("test_schema", "test_faketensor") if backend == "triton" else None
    for index, args in enumerate(
        [
            (x, rois, offset, mask, 2, 2, 0.5, 0, 0.1, False, backend),
            (x, rois, None, None, 2, 2, 0.5, 2, 0.1, True, backend),
            (x.detach(), rois, offset, None, 2, 2, 0.5, 0, 0.1, False, backend),
        ]
    ):
        torch.library.opcheck(op, args, **({"test_utils": light} if index and light else {}))
    backward = torch.ops.deformable.deform_roi_pool_backward.default
    grad = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    for index, needs in enumerate([(True, True, True), (False, True, False), (True, False, True)]):
        args = (
            grad,
            x.detach(),
            rois,
            offset.detach(),
            mask.detach(),
            2,
            2,
            0.5,
            0,
            0.1,
            False,
            backend,
            *needs,
        )
        torch.library.opcheck(backward, args, **({"test_utils": light} if index and light else {}))


def test_compile_fullgraph_forward_and_backward():
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    rois = make_rois(6, 10, 10).float()
    offset = torch.randn(6, 2, 4, 4, requires_grad=True)
    mask = torch.rand(6, 1, 4, 4, requires_grad=True)

    def fn(inp, r, off, msk):
        return deform_roi_pool(inp, r, off, msk, 4, 1.0, 0, 0.1) * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(x, rois, offset, mask)
    expected = fn(x, rois, offset, mask)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.sum(), (x, offset, mask))
    expected_grads = torch.autograd.grad(expected.sum(), (x, offset, mask))
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_the_reference_refuses_by_name_what_it_cannot_be_traced_through():
    """The reference's grids depend on the RoI values (.item()): compiled it failed deep in inductor
    (NameError: TruncToInt), vmapped over rois with a raw .item() error."""
    x = torch.randn(2, 3, 8, 8)
    rois = make_rois(4, 8, 8, seed=0).float()

    def pool(features, boxes):
        return deform_roi_pool(features, boxes, None, None, 3, 1.0, 0, backend="reference")

    with pytest.raises(Exception, match=r"backend 'reference' .* cannot be compiled"):
        torch.compile(pool, fullgraph=True, backend="aot_eager")(x, rois)
    with pytest.raises(ValueError, match="vmapped over rois"):
        torch.func.vmap(pool)(x[None].expand(2, -1, -1, -1, -1), rois[None].expand(2, -1, -1))
    shared = torch.func.vmap(lambda features: pool(features, rois))(x[None].expand(2, -1, -1, -1, -1))
    torch.testing.assert_close(shared, pool(x, rois)[None].expand(2, -1, -1, -1, -1))


# ------------------------------------------------------------------------------------------------
# Backend choice and the two routes (eager autograd.Function, custom op)
# ------------------------------------------------------------------------------------------------


def _pool_inputs():
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    rois = make_rois(4, 9, 10, scale=0.5)
    offset = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    mask = torch.rand(4, 1, 3, 3, dtype=torch.float64)
    return x, rois, offset, mask


@pytest.mark.triton
def test_triton_under_deterministic_algorithms(monkeypatch):
    x, rois, offset, mask = _pool_inputs()
    monkeypatch.delenv("DEFORMABLE_BACKEND", raising=False)
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
    with deterministic_algorithms(True):
        with pytest.raises(ValueError, match="deterministic backward"):  # as any backend that cannot run
            deform_roi_pool(leaves[0], rois, leaves[1], leaves[2], 3, 0.5, backend="triton")
        # The automatic choice (aten on CPU anyway) runs.
        deform_roi_pool(leaves[0], rois, leaves[1], leaves[2], 3, 0.5)
        # Without gradients only the (atomic-free) forward runs: Triton is fine (it was refused).
        with torch.no_grad():
            out = deform_roi_pool(leaves[0], rois, leaves[1], leaves[2], 3, 0.5, backend="triton")
        torch.testing.assert_close(out, deform_roi_pool(x, rois, offset, mask, 3, 0.5, backend="aten"))
        deform_roi_pool(x, rois, offset, mask, 3, 0.5, backend="triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    x, rois, offset, mask = _pool_inputs()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton"):
        deform_roi_pool(x, rois, offset, mask, 3, 0.5, backend="triton")


@pytest.mark.parametrize("backend", ["aten", pytest.param("triton", marks=pytest.mark.triton)])
def test_eager_route_equals_custom_op(backend):
    """The eager autograd.Function and the custom op run the same backend code: equal bit for bit."""
    x, rois, offset, mask = _pool_inputs()
    grad_out = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    results = []
    for route in ("eager", "op"):
        leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
        if route == "eager":
            out = deform_roi_pool(
                leaves[0], rois, leaves[1], leaves[2], 3, 0.5, 0, 0.1, True, backend=backend
            )
        else:
            out = torch.ops.deformable.deform_roi_pool(
                leaves[0], rois, leaves[1], leaves[2], 3, 3, 0.5, 0, 0.1, True, backend
            )
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for eager, op in zip(*results, strict=True):
        assert torch.equal(eager, op)


def test_inference_calls_skip_autograd(monkeypatch):
    """Under torch.no_grad the eager route calls the backend directly, with the Function's output."""
    # importlib: the package exports a function of the module's name
    module = importlib.import_module("deformable.ops.deform_roi_pool")

    x, rois, offset, mask = _pool_inputs()
    applied, apply = [], module._DeformRoIPoolFunction.apply
    monkeypatch.setattr(module._DeformRoIPoolFunction, "apply", lambda *a: (applied.append(1), apply(*a))[1])
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
    with torch.no_grad():
        inference = deform_roi_pool(*leaves[:1], rois, *leaves[1:], 3, 0.5, 0, 0.1, True, backend="aten")
    assert applied == [] and inference.grad_fn is None
    recorded = deform_roi_pool(*leaves[:1], rois, *leaves[1:], 3, 0.5, 0, 0.1, True, backend="aten")
    assert applied == [1] and recorded.grad_fn is not None
    assert torch.equal(inference, recorded)
    # rois requiring a gradient alone (boxes regressed by a trained head): recorded, as by the custom op
    out = deform_roi_pool(
        x, rois.clone().requires_grad_(), offset, mask, 3, 0.5, 0, 0.1, True, backend="aten"
    )
    assert applied == [1, 1] and out.requires_grad


# ------------------------------------------------------------------------------------------------
# The Triton kernels on shapes small enough for the interpreter
# ------------------------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("aligned", [False, True])
def test_triton_is_roi_align_without_offsets(aligned):
    x = torch.randn(2, 4, 17, 23)
    rois = make_rois(4, 17, 23, scale=0.25, margin=10.0).float()
    rois[0, 1:] = torch.tensor([8.0, 8.0, 8.0, 8.0])  # degenerate (point) RoI
    rois[1, 1:] = torch.tensor([60.0, 40.0, 20.0, 10.0])  # x2 < x1, y2 < y1
    for sampling_ratio, output_size in ((0, (7, 7)), (2, (3, 5))):  # adaptive and fixed grids once each
        expected = roi_align(x, rois, output_size, 0.25, sampling_ratio, aligned)
        got = deform_roi_pool(
            x, rois, None, None, output_size, 0.25, sampling_ratio, aligned=aligned, backend="triton"
        )
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# Every pair of settings once (8 of the 16 combinations: the interpreter is slow): each parts value
# with both alignments and both grids, and every alignment with every grid.
_ROI_GRADIENT_CASES = [
    (parts, aligned, sampling_ratio)
    for index, parts in enumerate(["offset+mask", "offset", "mask", "none"])
    for aligned, sampling_ratio in (((False, 0), (True, 2)) if index % 2 == 0 else ((False, 2), (True, 0)))
]


@pytest.mark.triton
@pytest.mark.parametrize(("parts", "aligned", "sampling_ratio"), _ROI_GRADIENT_CASES)
def test_triton_gradients_equal_reference(aligned, sampling_ratio, parts):
    """Outputs and the three gradients in float64 against the reference (itself judged by the oracle
    and finite differences above), offsets large enough to move samples off the map."""
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    rois = make_rois(4, 7, 9, scale=0.5, margin=3.0)
    offset = torch.randn(4, 2, 2, 3, dtype=torch.float64) * 2 if "offset" in parts else None
    mask = torch.rand(4, 1, 2, 3, dtype=torch.float64) if "mask" in parts else None
    grad_out = torch.randn(4, 3, 2, 3, dtype=torch.float64)
    results = []
    for backend in ("reference", "triton"):
        leaves = [None if t is None else t.clone().requires_grad_() for t in (x, offset, mask)]
        out = deform_roi_pool(
            leaves[0], rois, leaves[1], leaves[2], (2, 3), 0.5, sampling_ratio, 0.2, aligned, backend=backend
        )
        wanted = [t for t in leaves if t is not None]
        results.append((out, *torch.autograd.grad(out, wanted, grad_out)))
    for ref, got in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.triton
def test_triton_float32_and_only_requested_gradients():
    x = torch.randn(1, 20, 6, 7)  # 20 channels: two channel blocks of 16, the second partial
    rois = make_rois(3, 6, 7, batch=1)
    offset = torch.randn(3, 2, 2, 2)
    mask = torch.rand(3, 1, 2, 2)
    grad_out = torch.randn(3, 20, 2, 2)
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
    ref = deform_roi_pool(
        *(t.double() for t in leaves[:1]),
        rois.double(),
        leaves[1].double(),
        leaves[2].double(),
        2,
        backend="reference",
    )
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    out = deform_roi_pool(leaves[0], rois.float(), leaves[1], leaves[2], 2, backend="triton")
    grads = torch.autograd.grad(out, leaves, grad_out)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Only the mask gradient: the kernel skips the input scatter and the offset reduction.
    (only_mask,) = torch.autograd.grad(
        deform_roi_pool(x, rois.float(), offset, leaves[2], 2, backend="triton"), leaves[2], grad_out
    )
    torch.testing.assert_close(only_mask, grads[2], rtol=0, atol=0)


def test_both_ops_and_their_modules_infer_shapes_on_the_meta_device():
    """Meta tensors (model initialisation, shape inference) take the custom ops' fake kernels; they
    used to fail in the autocast check or when the RoI values were read."""
    from deformable.nn import DCNv2, ModulatedDeformRoIPool
    from deformable.ops import deform_conv2d

    x = torch.empty(2, 4, 8, 8, device="meta", requires_grad=True)
    rois = torch.empty(3, 5, device="meta")
    offset, mask = torch.empty(3, 2, 2, 2, device="meta"), torch.empty(3, 1, 2, 2, device="meta")
    out = deform_roi_pool(x, rois, offset, mask, output_size=2)
    assert out.is_meta and out.shape == (3, 4, 2, 2)
    out.sum().backward()
    assert x.grad.is_meta and x.grad.shape == x.shape
    weight = torch.empty(6, 4, 3, 3, device="meta")
    conv = deform_conv2d(x, torch.empty(2, 18, 8, 8, device="meta"), weight, padding=1)
    assert conv.is_meta and conv.shape == (2, 6, 8, 8)
    with torch.device("meta"):
        layer = DCNv2(4, 6, 3, padding=1)
        pool = ModulatedDeformRoIPool(2, in_channels=4, hidden_channels=(8,))
    assert layer(x).shape == (2, 6, 8, 8) and pool(x, rois).shape == (3, 4, 2, 2)
