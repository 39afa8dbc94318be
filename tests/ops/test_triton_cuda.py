"""deform_conv2d's Triton kernels on a CUDA GPU at real sizes (skipped without one): the output and all
five gradients against float64 in fp32 (TF32 off), fp16 and bf16; parity with torchvision's fp32 op;
autocast. ``benchmarks/gpu_check.py`` runs the same checks at every anchor shape with finer error
accounting; these keep them in the test suite of any machine with a GPU (``pytest -m cuda``).

The float64 reference is our ``aten`` backend on the same GPU (float64 throughout; the CPU tests check
it against the loop oracle). Errors are judged against the size of what is summed: the output's per
element (the float64 op on absolute values bounds each output's sum of |terms|), each gradient's by
its largest value.
"""

from __future__ import annotations

import pytest
import torch

from deformable.ops import deform_conv2d

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")
torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.cuda

DEVICE = torch.device("cuda")
# (name, batch, channels in/out, size, stride, dilation, weight groups, offset groups)
SHAPES = {
    "det-c4": (1, 256, 256, (50, 84), 1, 1, 1, 1),
    "cls-c5": (8, 512, 512, (7, 7), 1, 1, 1, 1),
    "groups-s2-d2": (2, 96, 64, (33, 47), 2, 2, 2, 3),
}
# Output: |error| <= factor * eps * (sum of |terms|); gradients: <= factor * eps * max |gradient|
# (gradients sum over taps, pixels and channels: a few hundred roundings of fp32 partial sums).
OUT_FACTOR = {torch.float32: 64.0, torch.float16: 4.0, torch.bfloat16: 4.0}
GRAD_FACTOR = {torch.float32: 2048.0, torch.float16: 16.0, torch.bfloat16: 16.0}


def make_inputs(name: str, dtype: torch.dtype):
    """(input, offset, mask, weight, bias) on the GPU, in ``dtype``; offsets ~ N(0, 2^2) pixels."""
    batch, c_in, c_out, (h, w), stride, dilation, groups, offset_groups = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1  # 3x3 kernel, padding = dilation
    tensors = (
        torch.randn(batch, c_in, h, w, generator=g),
        torch.randn(batch, 2 * offset_groups * 9, ho, wo, generator=g) * 2,
        torch.rand(batch, offset_groups * 9, ho, wo, generator=g),
        torch.randn(c_out, c_in // groups, 3, 3, generator=g) / (c_in // groups * 9) ** 0.5,
        torch.randn(c_out, generator=g),
    )
    return [t.to(DEVICE, dtype) for t in tensors], dict(stride=stride, padding=dilation, dilation=dilation)


def run(tensors, geometry, backend: str, grad_output=None):
    """Output and, with ``grad_output``, the five gradients."""
    leaves = [t.detach().requires_grad_(grad_output is not None) for t in tensors]
    x, offset, mask, weight, bias = leaves
    out = deform_conv2d(x, offset, weight, bias, mask=mask, backend=backend, **geometry)
    if grad_output is None:
        return out.detach(), None
    return out.detach(), torch.autograd.grad(out, leaves, grad_output)


@pytest.fixture(autouse=True)
def _full_fp32():
    with torch.backends.cudnn.flags(allow_tf32=False):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_real_sizes_against_float64(name, dtype):
    check_against_float64(name, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fused_backward_at_real_sizes_against_float64(monkeypatch, dtype):
    """deform_conv.FUSED_BACKWARD: the data and weight gradients in one kernel, at the tolerances of
    the separate kernels (det-c4; groups-s2-d2's weight and offset groups, 48 and 32 channels, are not
    nested, so the two kernels run there: the interpreter tests cover nested groups)."""
    from deformable.ops._triton import _deform_conv_kernels as kernels
    from tests.ops.triton_device import fused_kernels_launched

    launched = fused_kernels_launched(monkeypatch)
    check_against_float64("det-c4", dtype)
    assert kernels.deform_conv_bwd_fused_kernel in launched
    assert kernels.deform_conv_bwd_weight_kernel not in launched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["det-c4", "groups-s2-d2"])
def test_forward_blend_in_16_bit_at_real_sizes(monkeypatch, name, dtype):
    """deform_conv.BLEND_IN_16_BIT: the forward's neighbours blended in fp16/bf16 arithmetic, within
    the tolerances of the fp32 blend (bf16 runs it only here: the interpreter's bf16 arithmetic is not
    the hardware's)."""
    from deformable.ops._triton import deform_conv as tdc

    monkeypatch.setattr(tdc, "BLEND_IN_16_BIT", True)
    check_against_float64(name, dtype)


def check_against_float64(name: str, dtype: torch.dtype) -> None:
    """The output and the five gradients of shape ``name`` in ``dtype`` against float64."""
    tensors, geometry = make_inputs(name, dtype)
    exact = [t.double() for t in tensors]
    out_shape = run(tensors, geometry, "triton")[0].shape
    grad_output = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out, grads = run(tensors, geometry, "triton", grad_output)
    ref_out, ref_grads = run(exact, geometry, "aten", grad_output.double())
    x, offset, mask, weight, bias = exact
    scale = deform_conv2d(x.abs(), offset, weight.abs(), bias.abs(), mask=mask, backend="aten", **geometry)
    eps = torch.finfo(dtype).eps
    assert out.dtype == dtype
    assert ((out.double() - ref_out).abs() <= OUT_FACTOR[dtype] * eps * scale + 1e-30).all()
    for label, got, want in zip(("input", "offset", "mask", "weight", "bias"), grads, ref_grads, strict=True):
        assert got.dtype == dtype, label
        error = (got.double() - want).abs().max().item()
        assert error <= GRAD_FACTOR[dtype] * eps * want.abs().max().item(), (label, error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_channels_last_grad_output_gives_the_same_gradients(name, dtype):
    """grad_output as NCHW (aligned, with the alignment hint, or copied: det-c4, groups-s2-d2 and cls-c5
    take each path) and as a channels_last tensor used as given: the same gradients, up to the order of
    the float atomics."""
    tensors, geometry = make_inputs(name, dtype)
    grad_output = torch.randn_like(run(tensors, geometry, "triton")[0])
    _, nchw = run(tensors, geometry, "triton", grad_output)
    _, given = run(tensors, geometry, "triton", grad_output.to(memory_format=torch.channels_last))
    eps = torch.finfo(dtype).eps
    for label, a, b in zip(("input", "offset", "mask", "weight", "bias"), given, nchw, strict=True):
        error = (a.double() - b.double()).abs().max().item()
        assert error <= GRAD_FACTOR[dtype] * eps * b.abs().max().item(), (label, error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_channels_last_model(name, dtype):
    """Every tensor channels_last, as in a channels_last model: read as they are, the output and the
    gradients come back channels_last with the NCHW path's values (up to the order of float atomics)."""
    tensors, geometry = make_inputs(name, dtype)
    strided = [t.to(memory_format=torch.channels_last) if t.dim() == 4 else t for t in tensors]
    out_nchw = run(tensors, geometry, "triton")[0]
    grad_output = torch.randn_like(out_nchw)
    out_nchw, nchw = run(tensors, geometry, "triton", grad_output)
    out, given = run(strided, geometry, "triton", grad_output.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, out_nchw)  # the same programs, only the store's strides differ
    eps = torch.finfo(dtype).eps
    names = ("input", "offset", "mask", "weight", "bias")
    for label, a, b, t in zip(names, given, nchw, strided, strict=True):
        assert a.stride() == t.stride(), label
        error = (a.double() - b.double()).abs().max().item()
        assert error <= GRAD_FACTOR[dtype] * eps * b.abs().max().item(), (label, error)


@pytest.mark.parametrize("name", list(SHAPES))
def test_fp32_parity_with_torchvision(name):
    tensors, geometry = make_inputs(name, torch.float32)
    grad_output = torch.randn_like(run(tensors, geometry, "triton")[0])
    out, grads = run(tensors, geometry, "triton", grad_output)
    leaves = [t.detach().requires_grad_() for t in tensors]
    tv_out = torchvision.ops.deform_conv2d(
        leaves[0], leaves[1], leaves[3], leaves[4], mask=leaves[2], **geometry
    )
    tv_grads = torch.autograd.grad(tv_out, leaves, grad_output)
    torch.testing.assert_close(out, tv_out.detach(), rtol=0, atol=1e-5 * tv_out.abs().max().item())
    for got, want in zip(grads, tv_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())


def test_autocast_runs_in_the_autocast_dtype():
    tensors, geometry = make_inputs("det-c4", torch.float32)
    x, offset, mask, weight, bias = tensors
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = deform_conv2d(x, offset, weight, bias, mask=mask, **geometry)
    low = [t.bfloat16() for t in tensors]
    expected = deform_conv2d(low[0], low[1], low[3], low[4], mask=low[2], **geometry)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_cuda_graph_capture_of_a_layer():
    """A DCNv2 layer's forward and backward capture into CUDA graphs (torch.cuda.make_graphed_callables:
    no host synchronisation, allocations from the graph's pool) and replay with eager's results; graphs
    remove the per-call host cost that bounds small shapes eagerly."""
    from deformable.nn import DCNv2

    torch.manual_seed(0)
    layer = DCNv2(64, 64, 3, padding=1).to(DEVICE)
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.01)
    x = torch.randn(2, 64, 20, 28, device=DEVICE, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(layer, (x,))
    for seed in range(2):  # replays with new inputs
        torch.manual_seed(seed + 1)
        inp = torch.randn_like(x).requires_grad_()
        out = graphed(inp)
        grad = torch.randn_like(out)
        (g_graph,) = torch.autograd.grad(out, inp, grad)
        eager_inp = inp.detach().clone().requires_grad_()
        eager_out = layer(eager_inp)
        (g_eager,) = torch.autograd.grad(eager_out, eager_inp, grad)
        torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_graph, g_eager, rtol=1e-4, atol=1e-4)
