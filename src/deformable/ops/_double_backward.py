"""Differentiable backward passes: how the fast backends support double backward.

The aten and Triton backends compute first-order gradients with their own kernels, which autograd
cannot differentiate. When a backward runs with ``create_graph=True`` (gradient penalties,
Hessian-vector products, meta-learning) and something in it requires a gradient, the operators
instead rebuild the forward with the readable reference implementation and let autograd
differentiate that, so every higher-order derivative is exact. The cost is the reference's: its
speed and its memory (it keeps the sampled columns), paid only by backward passes that build a graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def builds_graph(*tensors: Tensor | None) -> bool:
    """True inside a backward run with ``create_graph=True`` where any of ``tensors`` requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gradients_with_graph(
    forward: Callable[..., Tensor],
    grad_output: Tensor,
    tensors: Sequence[Tensor | None],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """Vector-Jacobian products of ``forward(*tensors)`` that autograd can differentiate again.

    Args:
        forward: recomputes the operator's output from ``tensors`` with differentiable ops only.
        grad_output: the incoming gradient, shaped like the output.
        tensors: the operator's tensor arguments (None for an absent optional one).
        needs: for each entry of ``tensors``, whether its gradient is wanted.

    Returns:
        One gradient per entry of ``tensors`` (None where not wanted), each the partial derivative
        with respect to that argument alone, attached to a graph over ``grad_output`` and ``tensors``.
    """
    with torch.enable_grad():
        # Differentiating with respect to the arguments themselves would also follow the paths
        # between them (an offset computed from the input adds its own path to the input's gradient);
        # a fresh alias of each argument is a node only this op's recomputation reads from.
        aliases = [t.view_as(t) if t is not None else None for t in tensors]
        targets = [a for a, need in zip(aliases, needs, strict=True) if need and a is not None]
        if not targets:
            return [None] * len(tensors)
        output = forward(*aliases)
        grads = iter(torch.autograd.grad(output, targets, grad_output, create_graph=True, allow_unused=True))
    result: list[Tensor | None] = []
    for a, need in zip(aliases, needs, strict=True):
        if not need or a is None:
            result.append(None)
            continue
        grad = next(grads)
        result.append(torch.zeros_like(a) if grad is None else grad)
    return result
