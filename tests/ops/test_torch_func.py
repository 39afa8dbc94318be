"""deform_conv2d under torch.func: every transform against plain autograd on the same op (float64,
CPU, ``aten`` backend), DCNv2 and DCNv1, and vmap's batching rule (one call, no per-sample fallback)."""

from __future__ import annotations

import warnings

import pytest
import torch

from deformable.ops import deform_conv2d

D = torch.float64


def make(mask: bool = True, bias: bool = True, batch: int = 2, seed: int = 0):
    """(input, offset, mask, weight, bias) of a small 3x3 call with padding 1; offsets of a few pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, 4, 5, generator=g, dtype=D)
    offset = torch.randn(batch, 18, 4, 5, generator=g, dtype=D) * 1.5
    m = torch.rand(batch, 9, 4, 5, generator=g, dtype=D) if mask else None
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=D)
    b = torch.randn(3, generator=g, dtype=D) if bias else None
    return x, offset, m, w, b


def op(x, offset, m, w, b):
    return deform_conv2d(x, offset, w, b, padding=1, mask=m)


def loss(x, offset, m, w, b):
    return (op(x, offset, m, w, b) ** 2).sum()


def autograd_grads(tensors):
    leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss(*leaves), present))
    return [None if t is None else next(grads) for t in leaves]


@pytest.mark.parametrize(("mask", "bias"), [(True, True), (False, False)], ids=["dcnv2", "dcnv1-no-bias"])
def test_grad_equals_autograd(mask, bias):
    tensors = make(mask, bias)
    argnums = tuple(i for i, t in enumerate(tensors) if t is not None)
    got = torch.func.grad(loss, argnums=argnums)(*tensors)
    want = [g for g in autograd_grads(tensors) if g is not None]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_vmap_folds_into_one_call_and_equals_a_loop():
    x, offset, m, w, b = make(batch=1)
    xs = torch.randn(4, *x.shape, dtype=D)
    offsets = torch.randn(4, *offset.shape, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch warns when it falls back to a per-sample loop
        got = torch.vmap(lambda xi, oi: op(xi, oi, m, w, b))(xs, offsets)
    want = torch.stack([op(xi, oi, m, w, b) for xi, oi in zip(xs, offsets, strict=True)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # A vmapped weight (per-sample parameters) is a loop inside the rule, and as exact.
    ws = torch.randn(3, *w.shape, dtype=D)
    got = torch.vmap(lambda wi: op(x, offset, m, wi, b))(ws)
    torch.testing.assert_close(
        got, torch.stack([op(x, offset, m, wi, b) for wi in ws]), rtol=1e-12, atol=1e-12
    )


def test_per_sample_gradients():
    """vmap(grad): the weight gradient of every sample of a batch, as autograd gives one at a time."""
    x, offset, m, w, b = make(batch=3)

    def sample_loss(weight, xi, oi, mi):
        return loss(xi[None], oi[None], mi[None], weight, b)

    got = torch.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0, 0))(w, x, offset, m)
    for i in range(3):
        leaf = w.detach().requires_grad_()
        (want,) = torch.autograd.grad(sample_loss(leaf, x[i], offset[i], m[i]), leaf)
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_jacobians_equal_autograd(transform):
    x, offset, m, w, b = make(batch=1)
    fn = getattr(torch.func, transform)(lambda o: op(x, o, m, w, b))
    want = torch.autograd.functional.jacobian(lambda o: op(x, o, m, w, b), offset)
    torch.testing.assert_close(fn(offset), want, rtol=1e-10, atol=1e-10)


def test_hessian_and_jvp_equal_autograd():
    x, offset, m, w, b = make(batch=1)

    def of_offset(o):
        return loss(x, o, m, w, b)

    want = torch.autograd.functional.hessian(of_offset, offset)
    torch.testing.assert_close(torch.func.hessian(of_offset)(offset), want, rtol=1e-10, atol=1e-10)
    direction = torch.randn_like(x)
    _, tangent = torch.func.jvp(lambda xx: op(xx, offset, m, w, b), (x,), (direction,))
    _, want = torch.autograd.functional.jvp(lambda xx: op(xx, offset, m, w, b), x, direction)
    torch.testing.assert_close(tangent, want, rtol=1e-12, atol=1e-12)


def test_deform_roi_pool_under_torch_func():
    """grad and jacrev of (modulated) deformable RoI pooling equal autograd; vmap over the features
    equals a loop."""
    from deformable.ops import deform_roi_pool

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 9, generator=g, dtype=D)
    rois = torch.tensor([[0, 1.0, 1.5, 6.0, 7.0], [1, 0.5, 0.0, 8.0, 5.5]], dtype=D)
    offset = torch.randn(2, 2, 2, 3, generator=g, dtype=D) * 0.3
    m = torch.rand(2, 1, 2, 3, generator=g, dtype=D)

    def pool(x, offset, m):
        return deform_roi_pool(x, rois, offset, m, output_size=(2, 3), spatial_scale=1.0, sampling_ratio=2)

    def total(x, offset, m):
        return (pool(x, offset, m) ** 2).sum()

    got = torch.func.grad(total, argnums=(0, 1, 2))(x, offset, m)
    leaves = [t.detach().requires_grad_() for t in (x, offset, m)]
    want = torch.autograd.grad(total(*leaves), leaves)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    jac = torch.func.jacrev(lambda o: pool(x, o, m))(offset)
    want = torch.autograd.functional.jacobian(lambda o: pool(x, o, m), offset)
    torch.testing.assert_close(jac, want, rtol=1e-10, atol=1e-10)


def test_deform_roi_pool_vmap_rule():
    """vmap over the features, the offsets, or the features with per-sample RoIs: one call (no
    per-sample fallback), equal to a loop."""
    from deformable.ops import deform_roi_pool

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 9, generator=g, dtype=D)
    rois = torch.tensor([[0, 1.0, 1.5, 6.0, 7.0], [1, 0.5, 0.0, 8.0, 5.5], [1, 2.0, 2.0, 4.0, 7.0]], dtype=D)
    offset = torch.randn(3, 2, 2, 3, generator=g, dtype=D) * 0.3
    m = torch.rand(3, 1, 2, 3, generator=g, dtype=D)

    def pool(x, rois, offset, m):
        return deform_roi_pool(x, rois, offset, m, output_size=(2, 3), spatial_scale=1.0, sampling_ratio=2)

    xs = torch.randn(4, *x.shape, generator=g, dtype=D)
    offsets = torch.randn(4, *offset.shape, generator=g, dtype=D) * 0.3
    many_rois = rois.expand(4, -1, -1).clone()
    many_rois[:, :, 1:] += torch.rand(4, 3, 4, generator=g, dtype=D)  # a different box per sample
    cases = [
        (lambda xi: pool(xi, rois, offset, m), (xs,), lambda i: pool(xs[i], rois, offset, m)),
        (lambda oi: pool(x, rois, oi, m), (offsets,), lambda i: pool(x, rois, offsets[i], m)),
        (
            lambda xi, ri: pool(xi, ri, offset, None),
            (xs, many_rois),
            lambda i: pool(xs[i], many_rois[i], offset, None),
        ),
    ]
    for fn, args, one in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PyTorch warns when it falls back to a per-sample loop
            batched = torch.vmap(fn)(*args)
        torch.testing.assert_close(batched, torch.stack([one(i) for i in range(4)]), rtol=1e-12, atol=1e-12)
    # Per-sample RoIs are still checked: one sample's bad batch index is an error naming rois.
    many_rois[2, 1, 0] = 5
    with pytest.raises(ValueError, match="rois"):
        torch.vmap(lambda xi, ri: pool(xi, ri, offset, None))(xs, many_rois)


def test_deform_roi_pool_vmap_edge_cases():
    """The vmapped dimension anywhere in offset; bf16 RoIs renumbered past 256 images (bf16's last
    exact integer); derivatives with per-sample RoIs refused by name; functionalize keeps the op."""
    from deformable.ops import deform_roi_pool

    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 2, 6, 6, generator=g, dtype=D)
    rois = torch.tensor([[0, 1.0, 1.0, 4.0, 5.0], [7, 0.0, 2.0, 5.0, 5.0]], dtype=D)
    offset = torch.randn(2, 2, 2, 2, generator=g, dtype=D) * 0.3

    def pool(x, rois, offset):
        return deform_roi_pool(x, rois, offset, output_size=2, sampling_ratio=2)

    offsets = torch.randn(2, 2, 2, 5, 2, generator=g, dtype=D)  # vmapped dimension 3 of 5
    got = torch.vmap(lambda o: pool(x, rois, o), in_dims=3)(offsets)
    want = torch.stack([pool(x, rois, offsets[:, :, :, i]) for i in range(5)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    xs = torch.randn(40, *x.shape, generator=g, dtype=D)  # 40 x 8 = 320 images
    half_rois = rois.to(torch.bfloat16)
    got = torch.vmap(lambda xi: pool(xi, half_rois, offset))(xs)
    torch.testing.assert_close(
        got, torch.stack([pool(xi, half_rois, offset) for xi in xs]), rtol=1e-12, atol=1e-12
    )

    many_rois = rois.expand(3, -1, -1)
    with pytest.raises(NotImplementedError, match="per-sample"):
        torch.vmap(torch.func.grad(lambda o, r: pool(x, r, o).sum()))(
            offset.expand(3, -1, -1, -1, -1), many_rois
        )

    functional = torch.func.functionalize(lambda o: pool(x, rois, o))
    torch.testing.assert_close(functional(offset), pool(x, rois, offset), rtol=0, atol=0)
