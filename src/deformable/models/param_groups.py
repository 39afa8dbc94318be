"""Optimizer parameter groups with the paper's learning-rate multipliers."""

from __future__ import annotations

import math
import numbers

from torch import nn

from .backbones import check_module

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _is_norm(module: nn.Module) -> bool:
    # torchvision's FrozenBatchNorm2d holds buffers only, so it never reaches here with parameters.
    return isinstance(module, _NORMS)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 1e-4,
    *,
    norm_weight_decay: float = 0.0,
    bias_weight_decay: float = 0.0,
    offset_weight_decay: float | None = None,
) -> list[dict]:
    """Parameter groups for ``torch.optim`` with per-branch learning rates.

    Every module exposing ``offset_lr_mult`` and ``offset_parameters()`` (the DCN layers' ``conv_offset``:
    0.1x for DCNv2 and 1x for DCNv1; deformable RoI pooling branches: 1x for DCNv2's modulated pooling,
    0.01x for DCNv1's) has those parameters trained at ``lr * offset_lr_mult``. Norm parameters and
    biases, the offset branches' included, get no weight decay unless asked (``norm_weight_decay``,
    ``bias_weight_decay``); the offset branches' weights get ``offset_weight_decay`` (default:
    ``weight_decay``). Parameters with ``requires_grad=False`` are left out.

    Returns:
        A list of dicts with ``params``, ``lr``, ``weight_decay`` and a ``name`` for logging; empty
        groups are dropped. Each group also records ``lr_mult`` so schedulers can rescale.
    """
    check_module(model)
    rates = {
        "lr": lr, "weight_decay": weight_decay, "norm_weight_decay": norm_weight_decay,
        "bias_weight_decay": bias_weight_decay, "offset_weight_decay": offset_weight_decay,
    }  # fmt: skip
    for name, value in rates.items():
        if value is None and name == "offset_weight_decay":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    offset_decay = weight_decay if offset_weight_decay is None else offset_weight_decay
    assigned: dict[int, tuple[str, float, float]] = {}

    for module in model.modules():
        mult = getattr(module, "offset_lr_mult", None)
        offset_parameters = getattr(module, "offset_parameters", None)
        if mult is None or offset_parameters is None:
            continue
        for param in offset_parameters():
            # The outermost module wins (a multi-scale pool before the pools it wraps). The branches are
            # convolutions and linear layers: their 1-d parameters are the biases.
            group = (f"offsets x{mult:g}", float(mult), offset_decay)
            if param.dim() <= 1:
                group = (f"offset biases x{mult:g}", float(mult), bias_weight_decay)
            assigned.setdefault(id(param), group)

    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in assigned:
                continue
            if _is_norm(module):
                assigned[id(param)] = ("norm", 1.0, norm_weight_decay)
            elif name == "bias":
                assigned[id(param)] = ("bias", 1.0, bias_weight_decay)
            else:
                assigned[id(param)] = ("weights", 1.0, weight_decay)

    groups: dict[tuple[str, float, float], list] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault(assigned[id(param)], []).append(param)
    return [
        {"name": name, "params": params, "lr": lr * mult, "lr_mult": mult, "weight_decay": decay}
        for (name, mult, decay), params in groups.items()
    ]
