"""Effective receptive fields: the gradient of a node with respect to every image pixel."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._core import (
    Node,
    analysis_mode,
    evaluate_node,
    gradients_enabled,
    make_node,
    prepare_image,
    resolve_node,
)

__all__ = ["effective_receptive_field", "erf_spread", "node_gradient"]

_REDUCTIONS = ("abs_sum", "l2", "sum", "none")


def node_gradient(model: nn.Module, image: Tensor, node: Node) -> Tensor:
    """d(node scalar) / d(image): ``[C, H, W]``, signed, for a resolved :class:`~._core.Node` (also
    inside ``torch.no_grad()`` / ``torch.inference_mode()``)."""
    with gradients_enabled():
        x = prepare_image(image, model).clone().requires_grad_(True)
        scalar = evaluate_node(model, x[None], node).scalar[0]
        (grad,) = torch.autograd.grad(scalar, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def effective_receptive_field(
    model: nn.Module,
    image: Tensor,
    layer: str,
    position,
    channel: int | None = None,
    *,
    reduction: str = "abs_sum",
) -> Tensor:
    """The effective receptive field of a node: its gradient with respect to every image pixel.

    The model runs in evaluation mode (restored afterwards); a layer node's forward pass stops at its
    layer. The gradient is that of the node's scalar: the channel, or with ``channel=None`` the sum over
    the channels; for a RoI node (``layer="roi"``) the class score (see :mod:`deformable.analysis`).
    Gradients are taken even inside ``torch.no_grad()`` or ``torch.inference_mode()``.

    Args:
        model: the network (an ordinary ``[B, C, H, W]`` network or a torchvision detector).
        image: ``[C, H, W]``, as the model takes it (detectors: values in [0, 1], unnormalised).
        layer, position, channel: the node (module name and ``(y, x)`` in its output map, or ``"roi"``
            and a box ``(x1, y1, x2, y2)`` with an optional class).
        reduction: how the colour channels are combined: ``"abs_sum"`` (default, sum of absolute
            values), ``"l2"`` (Euclidean norm), ``"sum"`` (signed sum) or ``"none"`` (``[C, H, W]``).

    Returns:
        ``[H, W]`` (``[C, H, W]`` for ``reduction="none"``), on the model's device and dtype.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    node = make_node(layer, position, channel)
    with analysis_mode(model), gradients_enabled():
        node = resolve_node(model, prepare_image(image, model), node)
        grad = node_gradient(model, image, node)
    if reduction == "abs_sum":
        return grad.abs().sum(0)
    if reduction == "l2":
        return grad.square().sum(0).sqrt()
    if reduction == "sum":
        return grad.sum(0)
    return grad


def erf_spread(erf: Tensor) -> float:
    """Radius of gyration (image pixels) of an effective receptive field ``[H, W]``.

    ``sqrt(sum_p w_p |p - c|^2 / sum_p w_p)`` with ``w = |erf|`` and ``c`` its weighted centroid: the
    RMS distance of the field's mass from its centre (0 for a single pixel; NaN for an all-zero field).
    """
    if not isinstance(erf, Tensor):
        raise TypeError(f"erf must be a torch.Tensor [H, W], got {type(erf).__name__}")
    if erf.dim() != 2:
        raise ValueError(f"erf must have shape [H, W], got {list(erf.shape)}")
    w = erf.detach().abs().double()
    total = w.sum()
    if total <= 0:
        return float("nan")
    ys = torch.arange(w.shape[0], dtype=w.dtype, device=w.device)[:, None]
    xs = torch.arange(w.shape[1], dtype=w.dtype, device=w.device)[None, :]
    cy, cx = (w * ys).sum() / total, (w * xs).sum() / total
    return float(((w * ((ys - cy) ** 2 + (xs - cx) ** 2)).sum() / total).sqrt())
