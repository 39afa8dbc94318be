"""Double backward: second derivatives of both operators, every backend and both dispatch routes.

gradgradcheck (finite differences of the first derivative, float64) judges the reference and the aten
backend through the eager route; the custom op's route must give the eager route's second-order
products (a Hessian-vector product over every input pair), and the Triton backend, whose interpreted
forward is too slow for gradgradcheck's thousands of calls, the aten backend's on either route.
"""

from __future__ import annotations

import pytest
import torch

import deformable.ops.deform_conv as deform_conv_module
from deformable.ops import deform_conv2d
from deformable.ops.deform_roi_pool import deform_roi_pool
from tests.ops.conv_cases import ConvCase
from tests.ops.test_deform_conv import _gradcheck_inputs

CONV_CASES = {
    "dcnv2": ConvCase(batch=1, in_channels=2, out_channels=3, size=(4, 5)),
    "dcnv1-no-bias": ConvCase(batch=1, in_channels=2, out_channels=2, size=(4, 4), mask=False, bias=False),
    "groups-stride-dilation": ConvCase(
        batch=1, in_channels=4, out_channels=2, size=(6, 5), kernel=(3, 2), stride=(2, 1), padding=(1, 0),
        dilation=(2, 1), groups=2, offset_groups=2,
    ),
}  # fmt: skip


def _conv(case: ConvCase, backend: str, route: str):
    """f(input, offset, weight, bias, mask) through the public op (eager route) or the custom op."""

    def fn(x, offset, weight, bias, mask):
        if route == "eager":
            return deform_conv2d(
                x, offset, weight, bias, case.stride, case.padding, case.dilation, mask, backend=backend
            )
        return torch.ops.deformable.deform_conv2d(
            x, offset, mask, weight, bias, list(case.stride), list(case.padding), list(case.dilation), backend
        )

    return fn


def _second_order_products(fn, leaves: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    """d/d(leaves) of <grad of <fn(leaves), v>, u>: a Hessian-vector product over every input pair."""
    gen = torch.Generator().manual_seed(seed)
    out = fn(*leaves)
    v = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves, v, create_graph=True)
    inner = sum((g * torch.randn(g.shape, generator=gen, dtype=g.dtype)).sum() for g in grads)
    return list(torch.autograd.grad(inner, leaves, allow_unused=True))


def _conv_leaves(case: ConvCase) -> list[torch.Tensor]:
    return [t for t in _gradcheck_inputs(case) if t is not None]


def _conv_args(case: ConvCase, leaves: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """(input, offset, weight, bias, mask) with None where the case has no bias or mask."""
    it = iter(leaves)
    x, offset, weight = next(it), next(it), next(it)
    bias = next(it) if case.bias else None
    mask = next(it) if case.mask else None
    return [x, offset, weight, bias, mask]


# gradgradcheck judges the reference (plain autograd, never a custom op) and the aten backend's eager
# route; the custom op's route must give the eager route's second-order products.
ROUTES = [("reference", "eager"), ("aten", "eager")]


@pytest.mark.parametrize(("backend", "route"), ROUTES)
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_deform_conv2d_gradgradcheck(name, backend, route):
    case = CONV_CASES[name]
    fn = _conv(case, backend, route)
    leaves = _conv_leaves(case)
    assert torch.autograd.gradgradcheck(
        lambda *ls: fn(*_conv_args(case, list(ls))), leaves, eps=1e-6, atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_deform_conv2d_custom_op_second_order_equals_eager(name):
    case = CONV_CASES[name]
    leaves = _conv_leaves(case)
    results = {}
    for route in ("eager", "custom-op"):
        fn = _conv(case, "aten", route)
        results[route] = _second_order_products(lambda *ls, fn=fn: fn(*_conv_args(case, list(ls))), leaves)
    for got, expected in zip(results["custom-op"], results["eager"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.triton
@pytest.mark.parametrize("route", ["eager", "custom-op"])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_deform_conv2d_triton_second_order_equals_aten(name, route):
    case = CONV_CASES[name]
    leaves = _conv_leaves(case)
    results = {}
    for backend in ("aten", "triton"):
        fn = _conv(case, backend, route)
        results[backend] = _second_order_products(lambda *ls, fn=fn: fn(*_conv_args(case, list(ls))), leaves)
    for got, expected in zip(results["triton"], results["aten"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["aten", pytest.param("triton", marks=pytest.mark.triton)])
def test_graph_gradients_equal_the_plain_ones_when_offsets_come_from_the_input(backend):
    """With create_graph=True each gradient is still the partial derivative of its own argument:
    an offset and mask predicted from the input must not add their paths to the input's gradient."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    predictor = 0.3 * torch.randn(27, 2, 3, 3, generator=gen, dtype=torch.float64)
    prediction = torch.nn.functional.conv2d(x, predictor, padding=1)
    offset, mask = prediction[:, :18], torch.sigmoid(prediction[:, 18:])
    out = deform_conv2d(x, offset, weight, None, 1, 1, 1, mask, backend=backend)
    features = out.detach().requires_grad_()
    rois = torch.tensor([[0, 0.5, 1.0, 4.0, 4.5], [1, 1.0, 0.0, 5.5, 3.5]], dtype=torch.float64)
    pooled = deform_roi_pool(features, rois, output_size=2, sampling_ratio=2, aligned=True)
    roi_offset = torch.tanh(pooled[:, :2])
    roi_mask = torch.sigmoid(pooled[:, 2:])
    roi_out = deform_roi_pool(features, rois, roi_offset, roi_mask, 2, sampling_ratio=2, backend=backend)
    for result, leaves in ((out, (x, weight)), (roi_out, (features,))):
        plain = torch.autograd.grad(result.square().sum(), leaves, retain_graph=True)
        with_graph = torch.autograd.grad(result.square().sum(), leaves, create_graph=True)
        for p, g in zip(plain, with_graph, strict=True):
            torch.testing.assert_close(g, p, rtol=1e-10, atol=1e-12)


def test_first_order_backward_keeps_the_fast_path(monkeypatch):
    """Only a backward that builds a graph pays for the reference."""
    calls = []
    reference = deform_conv_module.deform_conv2d_reference
    monkeypatch.setattr(
        deform_conv_module, "deform_conv2d_reference", lambda *a: calls.append(1) or reference(*a)
    )
    case = CONV_CASES["dcnv2"]
    x, offset, weight, bias, mask = _conv_args(case, _conv_leaves(case))
    out = _conv(case, "aten", "eager")(x, offset, weight, bias, mask)
    torch.autograd.grad(out.sum(), (x, offset, weight), retain_graph=True)
    assert calls == []
    torch.autograd.grad(out.sum(), (x, offset, weight), create_graph=True)
    assert calls == [1]


def test_gradient_penalty_through_a_dcnv2_layer_equals_the_reference():
    """The use that needs double backward: a penalty on the input gradient's norm (WGAN-GP style)
    reaches every parameter, the offset and mask predictor included, as through the reference."""
    from deformable.nn import DCNv2

    grads = {}
    for backend in ("aten", "reference"):
        torch.manual_seed(0)
        layer = DCNv2(2, 3, 3, padding=1, backend=backend).double()
        torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)  # offsets of about a pixel
        x = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
        (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        penalty = (grad_x.flatten(1).norm(dim=1) - 1).square().mean()
        penalty.backward()
        grads[backend] = {name: p.grad for name, p in layer.named_parameters()}
    assert grads["aten"]["conv_offset.weight"].abs().sum() > 0
    for name, expected in grads["reference"].items():
        torch.testing.assert_close(grads["aten"][name], expected, rtol=1e-9, atol=1e-10, msg=name)


# ------------------------------------------------------------------------------------------------
# Deformable RoI pooling


def _roi_inputs():
    gen = torch.Generator().manual_seed(3)
    feat = torch.randn(2, 2, 8, 9, generator=gen, dtype=torch.float64).requires_grad_()
    rois = torch.tensor([[0, 1.0, 1.5, 6.0, 7.0], [1, 2.5, 0.5, 8.0, 5.0]], dtype=torch.float64)
    offset = (0.5 * torch.randn(2, 2, 2, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(2, 1, 2, 3, generator=gen, dtype=torch.float64).requires_grad_()
    return feat, rois, offset, mask


def _roi(rois: torch.Tensor, backend: str, route: str):
    params = (2, 3, 1.0, 2, 0.1, True)

    def fn(feat, offset, mask):
        if route == "eager":
            return deform_roi_pool(feat, rois, offset, mask, params[:2], *params[2:], backend=backend)
        return torch.ops.deformable.deform_roi_pool(feat, rois, offset, mask, *params, backend)

    return fn


@pytest.mark.parametrize(("backend", "route"), ROUTES)
def test_deform_roi_pool_gradgradcheck(backend, route):
    feat, rois, offset, mask = _roi_inputs()
    assert torch.autograd.gradgradcheck(_roi(rois, backend, route), (feat, offset, mask), eps=1e-6, atol=1e-6)


def test_deform_roi_pool_custom_op_second_order_equals_eager():
    feat, rois, offset, mask = _roi_inputs()
    results = {
        route: _second_order_products(_roi(rois, "aten", route), [feat, offset, mask])
        for route in ("eager", "custom-op")
    }
    for got, expected in zip(results["custom-op"], results["eager"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.triton
@pytest.mark.parametrize("route", ["eager", "custom-op"])
def test_deform_roi_pool_triton_second_order_equals_aten(route):
    feat, rois, offset, mask = _roi_inputs()
    results = {
        backend: _second_order_products(_roi(rois, backend, route), [feat, offset, mask])
        for backend in ("aten", "triton")
    }
    for got, expected in zip(results["triton"], results["aten"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
