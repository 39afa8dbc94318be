"""deform_conv2d: every CPU implementation judged by the float64 loop oracle."""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from deformable.ops import deform_conv2d, memory_budget
from deformable.ops._backend import resolve_backend
from tests.ops.conv_cases import ConvCase as Config
from tests.oracles import deform_conv2d_oracle

BACKENDS = ["reference", "aten"]


CONFIGS = {
    "plain": Config(),
    "no-mask": Config(mask=False),
    "no-bias": Config(bias=False),
    "groups2-offset-groups3": Config(in_channels=6, out_channels=4, groups=2, offset_groups=3),
    "kernel32-stride21-pad10-dil21": Config(kernel=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
    "everything": Config(
        in_channels=6, out_channels=8, size=(7, 5), kernel=(3, 2), stride=(2, 1), padding=(1, 0),
        dilation=(2, 1), groups=2, offset_groups=3,
    ),
    "batch0": Config(batch=0),
    "prime-batch-37": Config(batch=37, in_channels=2, out_channels=3, size=(3, 4)),
    "1x1": Config(kernel=(1, 1), padding=(0, 0)),
}  # fmt: skip


def make_inputs(cfg: Config, dtype=torch.float64, offset_scale: float = 2.0, seed: int = 0):
    """(input, offset, weight, bias, mask) with offsets of a few pixels, some samples off the map."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = cfg.kernel
    oh, ow = cfg.out_size
    x = torch.randn(cfg.batch, cfg.in_channels, *cfg.size, generator=g, dtype=dtype)
    offset = offset_scale * torch.randn(
        cfg.batch, 2 * cfg.offset_groups * kh * kw, oh, ow, generator=g, dtype=dtype
    )
    weight = torch.randn(cfg.out_channels, cfg.in_channels // cfg.groups, kh, kw, generator=g, dtype=dtype)
    bias = torch.randn(cfg.out_channels, generator=g, dtype=dtype) if cfg.bias else None
    mask = (
        torch.rand(cfg.batch, cfg.offset_groups * kh * kw, oh, ow, generator=g, dtype=dtype)
        if cfg.mask
        else None
    )
    return x, offset, weight, bias, mask


def run(cfg: Config, tensors, backend):
    x, offset, weight, bias, mask = tensors
    return deform_conv2d(
        x, offset, weight, bias, cfg.stride, cfg.padding, cfg.dilation, mask, backend=backend
    )


def oracle(cfg: Config, tensors):
    x, offset, weight, bias, mask = tensors
    return deform_conv2d_oracle(x, offset, weight, bias, cfg.stride, cfg.padding, cfg.dilation, mask)


# ------------------------------------------------------------------------------------------------
# Forward and gradients against the oracle


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_oracle(name, backend):
    cfg = CONFIGS[name]
    tensors = make_inputs(cfg)
    out = run(cfg, tensors, backend)
    expected = oracle(cfg, tensors)
    assert out.shape == expected.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def _gradcheck_inputs(cfg: Config):
    """Float64 leaves whose samples keep away from integer coordinates (bilinear kinks)."""
    x, offset, weight, bias, mask = make_inputs(cfg, offset_scale=1.0)
    offset = offset.round() + 0.25 + 0.5 * torch.rand_like(offset)
    return [t.requires_grad_() if t is not None else None for t in (x, offset, weight, bias, mask)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["everything", "plain", "no-mask"])
def test_gradcheck(name, backend):
    cfg = Config(**{**CONFIGS[name].__dict__, "batch": 1, "size": (4, 4)})
    leaves = _gradcheck_inputs(cfg)

    def fn(*args):
        return run(cfg, args, backend)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=False)


def test_gradients_match_oracle_finite_differences():
    """All five gradients of every backend against central differences of the oracle itself (the
    differences, thousands of oracle calls, computed once)."""
    from tests.oracles import finite_difference_grad

    cfg = Config(batch=1, in_channels=4, out_channels=2, size=(3, 3), groups=2, offset_groups=2)
    leaves = _gradcheck_inputs(cfg)
    grad_out = torch.randn((cfg.batch, cfg.out_channels, *cfg.out_size), dtype=torch.float64)

    def fn(x, offset, weight, bias, mask):
        return deform_conv2d_oracle(x, offset, weight, bias, cfg.stride, cfg.padding, cfg.dilation, mask)

    expected = [finite_difference_grad(fn, leaves, index, grad_out) for index in range(len(leaves))]
    for backend in BACKENDS:
        grads = torch.autograd.grad(run(cfg, leaves, backend), leaves, grad_out)
        for name, grad, want in zip(
            ("input", "offset", "weight", "bias", "mask"), grads, expected, strict=True
        ):
            torch.testing.assert_close(
                grad, want, rtol=1e-5, atol=1e-6, msg=lambda m, b=backend, n=name: f"{b} {n}: {m}"
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    cfg = CONFIGS["groups2-offset-groups3"]
    x, offset, weight, bias, mask = make_inputs(cfg)
    views = (
        x.transpose(2, 3).contiguous().transpose(2, 3),
        offset.contiguous(memory_format=torch.channels_last),
        weight.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        bias,
        torch.cat([mask, mask], dim=3)[..., ::2],
    )
    assert not views[0].is_contiguous() and not views[4].is_contiguous()
    torch.testing.assert_close(run(cfg, views, backend), oracle(cfg, views), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", [*BACKENDS, "triton"])
def test_output_and_gradients_follow_their_tensors_memory_format(backend):
    """As F.conv2d: a channels_last input gives a channels_last output, and each gradient comes back in
    its tensor's format (a channels_last model stays channels_last), whatever the backend returns (the
    reference's gradients are autograd's, in whatever layout its ops produce). The Triton backend
    returns these formats itself (``RESULTS_IN_FORMATS``: the routes do not check them), which this
    case checks through the public op (the kernels' own: tests/ops/test_triton_deform_conv.py)."""
    from deformable.ops._backend import triton_unavailable_reason

    if backend == "triton" and triton_unavailable_reason(torch.device("cpu")):
        pytest.skip(triton_unavailable_reason(torch.device("cpu")))
    cfg = CONFIGS["groups2-offset-groups3"]
    dense = [t.requires_grad_() if t is not None else None for t in make_inputs(cfg)]
    x, offset, weight, bias, mask = dense
    strided = [
        x.detach().to(memory_format=torch.channels_last).requires_grad_(),
        offset.detach().to(memory_format=torch.channels_last).requires_grad_(),
        weight.detach().to(memory_format=torch.channels_last).requires_grad_(),
        bias.detach().requires_grad_(),
        mask.detach().requires_grad_(),  # NCHW: each gradient follows its own tensor
    ]
    out = run(cfg, strided, backend)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    # The values of the aten backend's NCHW call (the interpreted Triton kernels are slow to run twice).
    expected = run(cfg, dense, "reference" if backend == "reference" else "aten")
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, strided, grad_out)
    for got, want, t in zip(grads, torch.autograd.grad(expected, dense, grad_out), strided, strict=True):
        assert got.stride() == t.stride() or backend == "reference"
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Equivalences


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["everything", "no-mask", "kernel32-stride21-pad10-dil21"])
def test_matches_torchvision_float32(name, backend):
    cfg = CONFIGS[name]
    tensors = [t.float().requires_grad_() if t is not None else None for t in make_inputs(cfg)]
    tv_tensors = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = run(cfg, tensors, backend)
    x, offset, weight, bias, mask = tv_tensors
    expected = torchvision.ops.deform_conv2d(
        x, offset, weight, bias, cfg.stride, cfg.padding, cfg.dilation, mask
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [t for t in tensors if t is not None], grad)
    theirs = torch.autograd.grad(expected, [t for t in tv_tensors if t is not None], grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", [*BACKENDS, "triton"])
def test_integer_offsets_match_torchvision_on_the_border(backend):
    """Integer offsets put samples exactly on pixels, on the map's edges and at -1 (zero offsets do at
    every padding tap: DCNv2's initial state). There the offset gradient is a one-sided derivative:
    every backend took torchvision's except at exactly -1, where they gave 0 and torchvision the
    derivative from inside the map."""
    from deformable.ops._backend import triton_unavailable_reason

    if backend == "triton" and triton_unavailable_reason(torch.device("cpu")):
        pytest.skip(triton_unavailable_reason(torch.device("cpu")))
    cfg = Config(in_channels=4, out_channels=3, size=(5, 6), offset_groups=2)
    x, offset, weight, bias, mask = make_inputs(cfg)
    g = torch.Generator().manual_seed(1)
    offset = torch.randint(-2, 3, offset.shape, generator=g).double()
    offset[:, :, ::2] = 0.0  # zero offsets on alternate rows: the padding taps sit at -1
    tensors = [t.clone().requires_grad_() for t in (x, offset, weight, bias, mask)]
    tv = [t.detach().clone().requires_grad_() for t in tensors]
    out = run(cfg, tensors, backend)
    expected = torchvision.ops.deform_conv2d(
        tv[0], tv[1], tv[2], tv[3], cfg.stride, cfg.padding, cfg.dilation, tv[4]
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=g, dtype=out.dtype)
    ours = torch.autograd.grad(out, tensors, grad)
    theirs = torch.autograd.grad(expected, tv, grad)
    for name, a, b in zip(("input", "offset", "weight", "bias", "mask"), ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    assert bool((theirs[1] != 0).any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_offsets_unit_mask_equal_conv2d(backend):
    cfg = Config(in_channels=6, out_channels=4, groups=2, stride=(2, 1), dilation=(1, 2), padding=(1, 2))
    x, offset, weight, bias, mask = make_inputs(cfg)
    offset, mask = torch.zeros_like(offset), torch.ones_like(mask)
    out = run(cfg, (x, offset, weight, bias, mask), backend)
    expected = F.conv2d(x, weight, bias, cfg.stride, cfg.padding, cfg.dilation, cfg.groups)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_dtype_bound(backend, dtype):
    """fp16/bf16 keep their dtype; accumulating in fp32 leaves only the output's rounding error."""
    cfg = CONFIGS["everything"]
    tensors = [t.to(dtype) if t is not None else None for t in make_inputs(cfg)]
    out = run(cfg, tensors, backend)
    assert out.dtype == dtype
    expected = oracle(cfg, tensors)  # the same low-precision inputs, computed exactly
    eps = torch.finfo(dtype).eps
    assert (out.double() - expected).abs().max() <= eps * expected.abs().max()
    leaves = [t.requires_grad_() if t is not None else None for t in tensors]
    grads = torch.autograd.grad(
        run(cfg, leaves, backend), [t for t in leaves if t is not None], torch.ones_like(out)
    )
    reference = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    exact = torch.autograd.grad(
        run(cfg, reference, "reference"),
        [t for t in reference if t is not None],
        torch.ones_like(out).double(),
    )
    for a, b in zip(grads, exact, strict=True):
        assert a.dtype == dtype
        assert (a.double() - b).abs().max() <= eps * b.abs().max() + eps


# ------------------------------------------------------------------------------------------------
# Non-finite values


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_offset_and_mask_reach_only_what_they_feed(backend):
    cfg = Config(batch=2, in_channels=2, out_channels=3, size=(5, 5))
    x, offset, weight, bias, mask = make_inputs(cfg)
    offset[0, 4, 1, 2] = math.nan  # y offset of tap (0, 2)... at output (1, 2) of image 0
    mask[1, 7, 3, 0] = math.nan
    leaves = [t.requires_grad_() for t in (x, offset, weight, bias, mask)]
    out = run(cfg, leaves, backend)
    nan = out.isnan()
    expected = torch.zeros_like(nan)
    expected[0, :, 1, 2] = True
    expected[1, :, 3, 0] = True
    assert torch.equal(nan, expected)
    grad = torch.zeros_like(out)
    grad[~expected] = 1.0  # a gradient that does not touch the NaN outputs
    g_x, g_offset, _, g_bias, g_mask = torch.autograd.grad(out, leaves, grad)
    # IEEE arithmetic as in any autograd graph: 0 * NaN is NaN, so only what touches the NaN sample
    # itself may be NaN: at most its four neighbours in image 1, and its own offset and mask entries.
    assert torch.isfinite(g_x[0]).all()
    assert (~torch.isfinite(g_x[1])).sum() <= 4 * cfg.in_channels
    finite_offset = torch.ones_like(g_offset, dtype=torch.bool)
    finite_offset[0, 4:6, 1, 2] = False
    finite_offset[1, 14:16, 3, 0] = False
    assert torch.isfinite(g_offset[finite_offset]).all()
    finite_mask = torch.ones_like(g_mask, dtype=torch.bool)
    finite_mask[1, 7, 3, 0] = finite_mask[0, 2, 1, 2] = False
    assert torch.isfinite(g_mask[finite_mask]).all()
    assert torch.isfinite(g_bias).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, 1e30, -1e30, 3e9])
def test_huge_offsets_sample_nothing(backend, value):
    cfg = Config(batch=1, in_channels=2, out_channels=2, size=(4, 5))
    x, offset, weight, bias, mask = make_inputs(cfg)
    offset[:, 0::2] = value  # every y offset: every sample leaves the map
    leaves = [t.requires_grad_() for t in (x, offset, weight, bias, mask)]
    out = run(cfg, leaves, backend)
    torch.testing.assert_close(out, bias.detach().view(1, -1, 1, 1).expand_as(out))
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    for g, name in zip(grads, ("input", "offset", "weight", "bias", "mask"), strict=True):
        assert torch.isfinite(g).all(), name
    assert not grads[0].any() and not grads[1].any() and not grads[4].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("size", "padding"), [((0, 5), 1), ((5, 0), 2)])
def test_empty_input_map_with_padding_samples_nothing(backend, size, padding):
    """A map without pixels (padding still gives output pixels): the output is the bias, the
    offset and weight gradients are 0."""
    x = torch.randn(1, 2, *size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    out_size = (size[0] + 2 * padding, size[1] + 2 * padding)
    offset = torch.randn(1, 2, *out_size, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64)
    out = deform_conv2d(x, offset, weight, bias, 1, padding, 1, backend=backend)
    torch.testing.assert_close(out, bias.view(1, -1, 1, 1).expand(1, 3, *out_size))
    grads = torch.autograd.grad(out.sum(), (x, offset, weight), allow_unused=True, materialize_grads=True)
    assert grads[0].shape == x.shape and not grads[1].any() and not grads[2].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_in_input_stays_where_it_is_read(backend):
    """A neighbour outside the map is never multiplied (0 * inf would be NaN)."""
    cfg = Config(batch=1, in_channels=1, out_channels=1, size=(4, 4), mask=False, bias=False)
    x, offset, weight, _, _ = make_inputs(cfg)
    x[0, 0, 0, 0] = math.inf
    offset.fill_(10.0)  # samples far away from the corner pixel
    out = run(cfg, (x, offset, weight, None, None), backend)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# The aten path: chunking, determinism, memory


def test_chunking_is_exact_and_deterministic():
    cfg = CONFIGS["everything"]
    cfg = Config(**{**cfg.__dict__, "batch": 5})
    tensors = make_inputs(cfg)
    leaves = [t.requires_grad_() if t is not None else None for t in tensors]
    present = [t for t in leaves if t is not None]
    out = run(cfg, leaves, "aten")
    grads = torch.autograd.grad(out, present, torch.ones_like(out))
    for budget in (1, 2_000, 40_000):  # one output row per chunk, a few rows, whole images
        with memory_budget(budget):
            chunked = run(cfg, leaves, "aten")
            chunked_grads = torch.autograd.grad(chunked, present, torch.ones_like(out))
        torch.testing.assert_close(chunked, out, rtol=1e-12, atol=1e-12)
        for a, b in zip(chunked_grads, grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_deterministic(backend):
    cfg = Config(batch=3, in_channels=16, out_channels=16, size=(12, 12), offset_groups=2)
    tensors = [t.float() if t is not None else None for t in make_inputs(cfg)]

    def once():
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = run(cfg, leaves, backend)
        return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]

    first, second = once(), once()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_memory_stays_within_budget():
    """Peak resident memory of forward+backward minus what the tensors themselves need."""
    script = textwrap.dedent(
        """
        import resource, torch
        from deformable.ops import deform_conv2d, set_memory_budget
        torch.set_num_threads(2)
        budget = 32 * 2**20
        set_memory_budget(budget)
        n, c, h, w = 16, 64, 40, 40
        x = torch.randn(n, c, h, w, requires_grad=True)
        weight = torch.randn(c, c, 3, 3, requires_grad=True)
        offset = torch.randn(n, 18, h, w, requires_grad=True)
        mask = torch.rand(n, 9, h, w, requires_grad=True)
        # Warm up on a tiny problem so that library initialisation is not counted.
        small = (x[:1, :, :4, :4], offset[:1, :, :4, :4], weight, None, 1, 1, 1, mask[:1, :, :4, :4])
        deform_conv2d(*small).sum().backward()
        tensors = sum(t.numel() * 4 for t in (x, weight, offset, mask))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = deform_conv2d(x, offset, weight, None, 1, 1, 1, mask)
        out.backward(torch.ones_like(out))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results = out.numel() * 4 * 2 + tensors  # output, its gradient, the inputs' gradients
        print((peak - before - results) / budget)
        """
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    fraction_of_budget = float(done.stdout.strip().splitlines()[-1])
    assert fraction_of_budget <= 1.0, fraction_of_budget


# ------------------------------------------------------------------------------------------------
# torch.library, torch.compile, autocast


def test_opcheck():
    cfg = CONFIGS["everything"]
    x, offset, weight, bias, mask = [t.float() for t in make_inputs(cfg)]
    channels_last = [t.to(memory_format=torch.channels_last) for t in (x, offset, mask, weight)]
    for leaves in ((x, offset, mask, weight, bias), (x, offset, None, weight, None), (*channels_last, bias)):
        args = [t.detach().requires_grad_() if t is not None else None for t in leaves]
        torch.library.opcheck(
            torch.ops.deformable.deform_conv2d.default,
            (*args, list(cfg.stride), list(cfg.padding), list(cfg.dilation), "aten"),
        )


@pytest.mark.slow
def test_torch_compile_fullgraph():
    from deformable.nn import DCNv2

    torch._dynamo.reset()
    model = torch.nn.Sequential(
        DCNv2(4, 8, 3, padding=1), torch.nn.ReLU(), DCNv2(8, 4, 3, padding=1, stride=2)
    )
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.conv_offset.weight.normal_(0, 0.1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(grad, expected)


def test_eager_route_equals_custom_op():
    """Plain eager calls skip the custom-op dispatcher (autograd.Function); both routes run the same
    backend code, so outputs and all five gradients agree bit for bit."""
    x, offset, weight, bias, mask = make_inputs(CONFIGS["plain"])
    grad_out = None
    results = []
    for route in ("eager", "op"):
        leaves = [t.clone().requires_grad_() for t in (x, offset, mask, weight, bias)]
        if route == "eager":
            out = deform_conv2d(
                leaves[0], leaves[1], leaves[3], leaves[4], 1, 1, 1, leaves[2], backend="aten"
            )
        else:
            out = torch.ops.deformable.deform_conv2d(*leaves, [1, 1], [1, 1], [1, 1], "aten")
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for eager, op in zip(*results, strict=True):
        assert torch.equal(eager, op)


def test_inference_calls_skip_autograd(monkeypatch):
    """Without a gradient to record (torch.no_grad, or no input requiring one) the eager route calls
    the backend directly, with the output the autograd.Function gives; with one, the Function runs."""
    module = importlib.import_module("deformable.ops.deform_conv")
    x, offset, weight, bias, mask = make_inputs(CONFIGS["plain"])
    applied, apply = [], module._DeformConv2dFunction.apply
    monkeypatch.setattr(module._DeformConv2dFunction, "apply", lambda *a: (applied.append(1), apply(*a))[1])
    with torch.no_grad():
        inference = deform_conv2d(x, offset, weight.requires_grad_(), bias, 1, 1, 1, mask, backend="aten")
    weight.requires_grad_(False)
    plain = deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask, backend="aten")
    assert applied == [] and inference.grad_fn is None and plain.grad_fn is None
    recorded = deform_conv2d(x, offset, weight.requires_grad_(), bias, 1, 1, 1, mask, backend="aten")
    assert applied == [1] and recorded.grad_fn is not None
    assert torch.equal(inference, recorded) and torch.equal(plain, recorded)
    # Forward-mode AD: through the Function, which has no jvp, rather than silently without tangents.
    with torch.autograd.forward_ad.dual_level(), pytest.raises(NotImplementedError, match="jvp"):
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        deform_conv2d(dual, offset, weight.detach(), bias, 1, 1, 1, mask, backend="aten")
    assert applied == [1, 1]


def test_autocast_runs_in_autocast_dtype():
    cfg = CONFIGS["plain"]
    x, offset, weight, bias, mask = [t.float() for t in make_inputs(cfg)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)
    assert out.dtype == torch.bfloat16
    expected = deform_conv2d(*(t.bfloat16() for t in (x, offset, weight, bias)), 1, 1, 1, mask.bfloat16())
    assert torch.equal(out, expected)


def test_autocast_accepts_mixed_dtypes_as_a_network_produces_them():
    """Inside a network under autocast the activations arrive in bf16 and the weights stay fp32."""
    cfg = CONFIGS["plain"]
    x, offset, weight, bias, mask = [t.float() for t in make_inputs(cfg)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d(x.bfloat16(), offset, weight, bias, 1, 1, 1, mask.bfloat16())
    expected = deform_conv2d(*(t.bfloat16() for t in (x, offset, weight, bias)), 1, 1, 1, mask.bfloat16())
    assert torch.equal(out, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="weight"):
        deform_conv2d(x.double(), offset.double(), weight, bias.double(), 1, 1, 1, mask.double())


# ------------------------------------------------------------------------------------------------
# Backend selection


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("DEFORMABLE_BACKEND", raising=False)
    assert resolve_backend(None, cpu) == "aten"
    assert resolve_backend("reference", cpu) == "reference"
    monkeypatch.setenv("DEFORMABLE_BACKEND", "reference")
    assert resolve_backend(None, cpu) == "reference"
    monkeypatch.setenv("DEFORMABLE_BACKEND", "fast")
    with pytest.raises(ValueError, match="DEFORMABLE_BACKEND"):
        resolve_backend(None, cpu)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", cpu)
    with pytest.raises(TypeError, match="backend must be one of"):
        resolve_backend(1, cpu)  # type: ignore[arg-type]
    monkeypatch.delenv("DEFORMABLE_BACKEND")
    assert resolve_backend(None, "cpu") == "aten"  # a device string works too
    with pytest.raises(TypeError, match=r"device must be a torch\.device or a str"):
        resolve_backend(None, None)
    with pytest.raises(ValueError, match="device"):
        resolve_backend(None, "nonsense")


def test_explicit_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = CONFIGS["plain"]
    with pytest.raises(ValueError, match="triton"):
        run(cfg, make_inputs(cfg), "triton")


# ------------------------------------------------------------------------------------------------
# Bad input


def _bad_call(**changes):
    cfg = CONFIGS["everything"]
    x, offset, weight, bias, mask = make_inputs(cfg)
    kwargs = dict(
        input=x, offset=offset, weight=weight, bias=bias, stride=cfg.stride, padding=cfg.padding,
        dilation=cfg.dilation, mask=mask,
    )  # fmt: skip
    kwargs.update(changes)
    return deform_conv2d(**kwargs)


X, OFFSET, WEIGHT, BIAS, MASK = make_inputs(CONFIGS["everything"])
BAD_INPUTS = {
    "input rank": (dict(input=X[0]), ValueError, "input"),
    "input type": (dict(input=X.numpy()), TypeError, "input"),
    "integer input": (dict(input=X.long()), TypeError, "input"),
    "channels not divisible by groups": (dict(input=X[:, :5]), ValueError, "divisible"),
    "offset channels": (dict(offset=OFFSET[:, :-1]), ValueError, "offset channels"),
    "offset groups do not divide channels": (
        dict(offset=torch.cat([OFFSET, OFFSET[:, :12]], 1)), ValueError, "offset"
    ),
    "offset spatial size": (dict(offset=OFFSET[..., :-1]), ValueError, "offset spatial"),
    "offset batch": (dict(offset=OFFSET[:1]), ValueError, "offset batch"),
    "mask channels": (dict(mask=MASK[:, :-1]), ValueError, "mask"),
    "mask spatial size": (dict(mask=MASK[..., :-1]), ValueError, "mask"),
    "dtype mismatch": (dict(offset=OFFSET.float()), TypeError, "offset"),
    "bias size": (dict(bias=BIAS[:-1]), ValueError, "bias"),
    "bias rank": (dict(bias=BIAS.view(2, -1)), ValueError, "bias"),
    "zero stride": (dict(stride=0), ValueError, "stride"),
    "negative stride": (dict(stride=(1, -1)), ValueError, "stride"),
    "zero dilation": (dict(dilation=(0, 1)), ValueError, "dilation"),
    "negative padding": (dict(padding=-1), ValueError, "padding"),
    "stride triple": (dict(stride=(1, 1, 1)), TypeError, "stride"),
    "float stride": (dict(stride=1.5), TypeError, "stride"),
    "empty output": (dict(input=X[..., :1, :1]), ValueError, "output"),
    "out channels not divisible": (dict(weight=WEIGHT[:-1]), ValueError, "weight"),
    "no input channel": (dict(input=X[:, :0]), ValueError, "at least one channel"),  # a ZeroDivisionError
    "bool stride": (dict(stride=True), TypeError, "stride"),
    "numpy float padding": (dict(padding=np.float64(1.0)), TypeError, "padding"),
}  # fmt: skip


def test_integer_arguments_of_any_integer_type():
    """numpy integers (as F.conv2d and torchvision take them) were refused."""
    cfg = CONFIGS["everything"]
    tensors = make_inputs(cfg)
    x, offset, weight, bias, mask = tensors
    as_numpy = [tuple(np.int64(v) for v in pair) for pair in (cfg.stride, cfg.padding, cfg.dilation)]
    out = deform_conv2d(x, offset, weight, bias, *as_numpy, mask)
    torch.testing.assert_close(out, run(cfg, tensors, None), rtol=0, atol=0)
    plain = CONFIGS["plain"]  # one scalar for both sides
    x, offset, weight, bias, mask = make_inputs(plain)
    scalars = deform_conv2d(x, offset, weight, bias, np.int32(1), np.int64(1), np.int16(1), mask)
    torch.testing.assert_close(scalars, deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask), rtol=0, atol=0)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(case):
    changes, error, words = BAD_INPUTS[case]
    with pytest.raises(error, match=words):
        _bad_call(**changes)


def test_device_mismatch_raises():
    cfg = CONFIGS["plain"]
    x, offset, weight, bias, mask = make_inputs(cfg)
    with pytest.raises(ValueError, match="device"):
        deform_conv2d(x, offset.to("meta"), weight, bias, 1, 1, 1, mask)
