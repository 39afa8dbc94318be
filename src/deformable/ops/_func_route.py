"""The operators' route under torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, hessian, vmap and
their compositions).

PyTorch builds a custom op's autograd as an ``autograd.Function`` of the older form (``forward(ctx,
...)``), which functorch refuses to transform. The ops therefore enter such transforms through a
Function of the ``setup_context`` form built here: its forward is the custom op itself (fast, and
batched under vmap by the op's vmap rule or PyTorch's per-sample fallback); its derivatives, backward
(vjp) and forward (jvp) alike, are those of the op's reference implementation, taken with torch.func so
that they compose with whatever transforms surround them. They are exact, at the reference's speed and
memory: torch.func code pays that price, plain autograd does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import overload

import torch
from torch import Tensor

__all__ = ["differentiating", "make_transformable", "under_torch_func", "vmapped_first", "vmapped_folded"]


def _active_transforms() -> set:
    """The kinds (``TransformType``) of the torch.func transforms active around this call."""
    if torch._C._functorch.peek_interpreter_stack() is None:  # the common case, one C call
        return set()
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return {interpreter.key() for interpreter in retrieve_all_functorch_interpreters()}


def under_torch_func() -> bool:
    """True inside a torch.func transform that the custom ops cannot serve (grad, vjp, jvp, vmap and
    what is built of them), outside torch.compile's tracing. ``functionalize`` alone keeps the custom
    op, which it handles."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the interpreter stack; the custom op serves
        return False
    kinds = torch._C._functorch.TransformType
    return bool(_active_transforms() & {kinds.Grad, kinds.Jvp, kinds.Vmap})


def differentiating() -> bool:
    """True inside a torch.func transform that differentiates (grad, vjp, jacrev, jvp, jacfwd, ...)."""
    kinds = torch._C._functorch.TransformType
    return bool(_active_transforms() & {kinds.Grad, kinds.Jvp})


@overload
def vmapped_first(t: Tensor, dim: int | None, size: int) -> Tensor: ...
@overload
def vmapped_first(t: None, dim: int | None, size: int) -> None: ...
@overload
def vmapped_first(t: Tensor | None, dim: int | None, size: int) -> Tensor | None: ...
def vmapped_first(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """For a vmap rule: ``t`` with its vmapped dimension ``dim`` moved first, an unbatched ``t`` (dim
    None) expanded to ``size`` samples; None stays None."""
    if t is None:
        return None
    return t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


@overload
def vmapped_folded(t: Tensor, dim: int | None, size: int) -> Tensor: ...
@overload
def vmapped_folded(t: None, dim: int | None, size: int) -> None: ...
@overload
def vmapped_folded(t: Tensor | None, dim: int | None, size: int) -> Tensor | None: ...
def vmapped_folded(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """:func:`vmapped_first` with the samples folded into the next dimension: [B, N, ...] -> [B*N, ...]."""
    t = vmapped_first(t, dim, size)
    return None if t is None else t.flatten(0, 1)


def make_transformable(
    name: str, op: Callable[..., Tensor], reference: Callable[..., Tensor], differentiable: Sequence[int]
) -> type[torch.autograd.Function]:
    """An autograd.Function, of the form torch.func can transform, computing ``op(*args)`` and
    differentiated as ``reference(*args)`` is, with respect to the arguments at the positions
    ``differentiable`` (tensors, or None where absent)."""

    def arguments(ctx) -> list:
        args = list(ctx.constants)
        for position, tensor in zip(ctx.tensor_positions, ctx.saved_tensors, strict=True):
            args[position] = tensor
        return args

    def of_variables(args: list, variables: list[int]) -> Callable[..., Tensor]:
        def reference_of(*values: Tensor) -> Tensor:
            full = list(args)
            for position, value in zip(variables, values, strict=True):
                full[position] = value
            return reference(*full)

        return reference_of

    def forward(*args):
        return op(*args)

    def setup_context(ctx, inputs, output):
        ctx.tensor_positions = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.constants = [None if isinstance(a, Tensor) else a for a in inputs]
        tensors = [inputs[i] for i in ctx.tensor_positions]
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    def backward(ctx, grad_output):
        args = arguments(ctx)
        variables = [i for i in differentiable if args[i] is not None]
        vjp = torch.func.vjp(of_variables(args, variables), *(args[i] for i in variables))[1]
        grads = [None] * len(args)
        for position, grad in zip(variables, vjp(grad_output), strict=True):
            grads[position] = grad if ctx.needs_input_grad[position] else None
        return tuple(grads)

    def jvp(ctx, *tangents):
        args = arguments(ctx)
        variables = [i for i in differentiable if args[i] is not None]
        primals = tuple(args[i] for i in variables)
        directions = tuple(
            torch.zeros_like(args[i]) if tangents[i] is None else tangents[i] for i in variables
        )
        return torch.func.jvp(of_variables(args, variables), primals, directions)[1]

    namespace = {
        "__doc__": f"{name} under torch.func: the custom op, differentiated as the reference.",
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "jvp": staticmethod(jvp),
    }
    return type(name, (torch.autograd.Function,), namespace)
