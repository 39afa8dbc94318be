"""Call plans (``_triton/deform_conv.py``): a repeated forward or backward takes its signature's plan,
which must give bit for bit what the general path gives, in the same layouts. Under Triton's
interpreter on the CPU both paths run the same kernels in the same order, so equality is exact; the
layout copies run both ways (PyTorch's copies, and the transpose kernel as on a GPU)."""

from __future__ import annotations

import pytest
import torch

# Skips this module where Triton cannot run; before any deformable.ops._triton import.
from tests.ops.triton_device import DEVICE  # isort: skip

from deformable.benchmark import deterministic_algorithms
from deformable.ops._triton import _relayout
from deformable.ops._triton import deform_conv as tdc
from tests.ops.conv_cases import ConvCase as Case

pytestmark = pytest.mark.triton

ALL = (True, True, True, True, True)
WEIGHT_ONLY = (False, False, False, True, False)
INPUT_ONLY = (True, False, False, False, False)
MAPS_AND_BIAS = (False, True, True, False, True)
CASE = Case(batch=2, in_channels=6, out_channels=5, size=(4, 5), offset_groups=2)


def _inputs(dtype: torch.dtype, layout: str, seed: int = 0):
    """(input, offset, mask, weight, bias) of CASE; ``layout``: "nchw", "channels_last" (every map) or
    "sliced" (offset and mask cut from one prediction, as a DCNv2 layer does)."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = CASE.kernel
    oh, ow = CASE.out_size
    taps = CASE.offset_groups * kh * kw

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)

    x = rand(CASE.batch, CASE.in_channels, *CASE.size)
    offset = rand(CASE.batch, 2 * taps, oh, ow) * 2
    mask = rand(CASE.batch, taps, oh, ow).sigmoid()
    if layout == "channels_last":
        x, offset, mask = (t.contiguous(memory_format=torch.channels_last) for t in (x, offset, mask))
    elif layout == "sliced":
        prediction = torch.cat([offset, mask], dim=1)
        offset, mask = prediction[:, : 2 * taps], prediction[:, 2 * taps :]
    weight = rand(CASE.out_channels, CASE.in_channels, kh, kw) * 0.3
    bias = rand(CASE.out_channels)
    return x, offset, mask, weight, bias


def _call(tensors, grad_output, output_mask, with_mask=True, with_bias=True):
    x, offset, mask, weight, bias = tensors
    mask = mask if with_mask else None
    geometry = (CASE.stride, CASE.padding, CASE.dilation)
    out = tdc.forward(x, offset, mask, weight, bias if with_bias else None, *geometry)
    grads = tdc.backward(grad_output, x, offset, mask, weight, *geometry, output_mask)
    return (out, *grads)


def _spy(monkeypatch) -> dict[str, int]:
    """How often each planned path runs from now on."""
    calls = {"forward": 0, "backward": 0}
    for name, attr in (("forward", "_planned_forward"), ("backward", "_planned_backward")):
        original = getattr(tdc, attr)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(tdc, attr, counted)
    return calls


def _assert_same(planned, general) -> None:
    for p, g in zip(planned, general, strict=True):
        assert (p is None) == (g is None)
        if p is not None:
            assert p.dtype == g.dtype and p.shape == g.shape and p.stride() == g.stride()
            assert torch.equal(p, g)


# (dtype, layout, output_mask, with_mask, with_bias, expanded_grad, kernel_copies): the layout copies by
# PyTorch (the interpreter's path) or by the transpose kernel (a GPU's), each case one way or both.
PLANNED_CASES = {
    "fp32-all-transpose-kernel": (torch.float32, "nchw", ALL, True, True, False, True),
    "channels-last": (torch.float32, "channels_last", ALL, True, True, False, False),
    "weight-only-sliced": (torch.float32, "sliced", WEIGHT_ONLY, True, False, False, True),
    "dcnv1-input-only": (torch.float32, "nchw", INPUT_ONLY, False, False, False, False),
    "expanded-grad-sliced": (torch.float32, "sliced", MAPS_AND_BIAS, True, True, True, False),
    "fp64": (torch.float64, "nchw", ALL, True, True, False, True),
}  # fmt: skip


@pytest.mark.parametrize(
    ("dtype", "layout", "output_mask", "with_mask", "with_bias", "expanded_grad", "kernel_copies"),
    list(PLANNED_CASES.values()),
    ids=list(PLANNED_CASES),
)
def test_repeated_calls_take_the_plan_and_match_the_general_path(
    monkeypatch, dtype, layout, output_mask, with_mask, with_bias, expanded_grad, kernel_copies
):
    if kernel_copies:
        monkeypatch.setattr(_relayout, "_use_kernel", lambda t: True)
    monkeypatch.setattr(tdc, "_PLANS", {})
    tensors = _inputs(dtype, layout)
    shape = (CASE.batch, CASE.out_channels, *CASE.out_size)
    grad_output = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    if expanded_grad:  # as from out.sum().backward(): stride 0 everywhere, copied for the kernels
        grad_output = torch.ones((), dtype=dtype, device=DEVICE).expand(shape)
    calls = _spy(monkeypatch)
    _call(tensors, grad_output, output_mask, with_mask, with_bias)  # the general path makes the plans
    assert calls == {"forward": 0, "backward": 0}
    # Other tensors of the same signature take them, and get what the general path gives them.
    others = _inputs(dtype, layout, seed=1)
    planned = _call(others, grad_output, output_mask, with_mask, with_bias)
    assert calls == {"forward": 1, "backward": 1}
    monkeypatch.setattr(tdc, "_PLANS", {})
    general = _call(others, grad_output, output_mask, with_mask, with_bias)
    assert calls == {"forward": 1, "backward": 1}
    _assert_same(planned, general)


def test_deterministic_backward_has_no_plan(monkeypatch):
    monkeypatch.setattr(tdc, "_PLANS", {})
    tensors = _inputs(torch.float32, "nchw")
    grad_output = torch.randn((CASE.batch, CASE.out_channels, *CASE.out_size), device=DEVICE)
    calls = _spy(monkeypatch)
    with deterministic_algorithms(True):
        first = _call(tensors, grad_output, ALL)
        second = _call(tensors, grad_output, ALL)
    assert calls == {"forward": 1, "backward": 0}
    assert not any(isinstance(plan, tdc._BackwardCall) for plan in tdc._PLANS.values())
    _assert_same(second, first)


def test_a_plan_is_not_shared_across_signatures(monkeypatch):
    """A change of strides alone (a transposed view of the same values) is another signature."""
    monkeypatch.setattr(tdc, "_PLANS", {})
    x, offset, mask, weight, bias = _inputs(torch.float32, "nchw")
    geometry = (CASE.stride, CASE.padding, CASE.dilation)
    calls = _spy(monkeypatch)
    first = tdc.forward(x, offset, mask, weight, bias, *geometry)
    cl = x.contiguous(memory_format=torch.channels_last)
    second = tdc.forward(cl, offset, mask, weight, bias, *geometry)
    assert calls["forward"] == 0
    assert second.is_contiguous(memory_format=torch.channels_last) and torch.equal(second, first)
