"""Deformable convolution layers.

``DeformConv2d`` takes offsets (and a mask) from the caller, like torchvision's. ``DCNv1`` and
``DCNv2`` are drop-ins for ``nn.Conv2d`` that own the convolution predicting their offsets (and
modulation masks), zero-initialised so that a fresh DCNv1 computes exactly the convolution and a
fresh DCNv2 half of it (mask = sigmoid(0) = 0.5). State-dict names follow mmcv
(``weight``, ``bias``, ``conv_offset.weight``, ``conv_offset.bias``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..ops import deform_conv2d
from ..ops._backend import check_backend_name
from ..ops.deform_conv import _pair, autocast_enabled, check_output_size

_size_2 = int | tuple[int, int]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _check_input_dtype(input: Tensor, dtype: torch.dtype, owner: str, module: str) -> None:
    """Raise a TypeError naming both dtypes when ``input`` cannot meet parameters of ``dtype``.

    Under autocast the ops cast inputs and parameters to one dtype themselves; otherwise conv2d's or
    linear's own dtype error names neither the module nor the fix. ``owner`` ("the layer's") says
    whose parameters, ``module`` ("layer") what to convert.
    """
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {input.dtype}")
    if input.dtype != dtype and not autocast_enabled(input.device.type):
        raise TypeError(
            f"input dtype {input.dtype} differs from {owner} parameter dtype {dtype}: "
            f"convert the input or the {module} (e.g. {module}.to({input.dtype}))"
        )


def _string_padding_error(padding: str) -> ValueError:
    # nn.Conv2d's 'same' can need uneven padding, which the operator cannot express.
    return ValueError(
        f"padding must be an int or a pair of ints ('same'/'valid' unsupported), got {padding!r}"
    )


def _finite_number(value, name: str, *, allow_zero: bool) -> float:
    """``value`` as a float, checked to be finite and positive (or >= 0 with ``allow_zero``)."""
    expected = "a finite number >= 0" if allow_zero else "a finite positive number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


class DeformConv2d(nn.Module):
    """Deformable convolution whose offsets (and optional mask) are given to ``forward``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as
            ``nn.Conv2d`` (zero padding only).
        backend: passed to :func:`deformable.ops.deform_conv2d` (None = automatic).

    Shapes:
        input [N, C_in, H, W]; offset [N, 2*G*kh*kw, H_out, W_out]; mask [N, G*kh*kw, H_out, W_out]
        or None; output [N, C_out, H_out, W_out].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2,
        stride: _size_2 = 1,
        padding: _size_2 = 0,
        dilation: _size_2 = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_channels = _positive_int(in_channels, "in_channels")
        out_channels = _positive_int(out_channels, "out_channels")
        groups = _positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                f"groups ({groups})"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        _check_bool(bias, "bias")
        if isinstance(padding, str):
            raise _string_padding_error(padding)
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        self.backend = check_backend_name(backend)
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size, device=device, dtype=dtype)
        )
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation of ``nn.Conv2d``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check_input(input)
        return deform_conv2d(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask,
            backend=self.backend,
        )  # fmt: skip

    def _check_input(self, input: Tensor) -> None:
        """Raise where ``input`` is not [N, in_channels, H, W] (as ``nn.Conv2d`` would: an input with a
        multiple of ``in_channels`` must not run as a grouped convolution)."""
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() != 4 or input.shape[1] != self.in_channels:
            raise ValueError(
                f"input must be [N, {self.in_channels}, H, W] (in_channels={self.in_channels}), "
                f"got {list(input.shape)}"
            )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}"
        )
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class _OffsetPredictingConv(DeformConv2d):
    """A deformable convolution that predicts its own offsets with ``conv_offset`` (zero-initialised)."""

    #: Channels of ``conv_offset`` per (offset group, kernel tap): 2 for (dy, dx), 3 with a mask.
    _outputs_per_tap: ClassVar[int]
    #: Learning-rate multiplier of ``conv_offset`` used by ``deformable.models.param_groups``.
    offset_lr_mult: float

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2,
        stride: _size_2 = 1,
        padding: _size_2 = 0,
        dilation: _size_2 = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        offset_groups: int = 1,
        offset_lr_mult: float | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if padding_mode != "zeros":
            raise ValueError(
                f"padding_mode must be 'zeros' (the operator pads with zeros), got {padding_mode!r}"
            )
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            backend=backend, device=device, dtype=dtype,
        )  # fmt: skip
        offset_groups = _positive_int(offset_groups, "offset_groups")
        if in_channels % offset_groups:
            raise ValueError(
                f"in_channels ({in_channels}) must be divisible by offset_groups ({offset_groups})"
            )
        self.offset_groups = offset_groups
        if offset_lr_mult is not None:
            self.offset_lr_mult = _finite_number(offset_lr_mult, "offset_lr_mult", allow_zero=True)
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(
            in_channels,
            self._outputs_per_tap * offset_groups * taps,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=True,
            device=device,
            dtype=dtype,
        )
        assert self.conv_offset.bias is not None  # built with bias=True
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def _predict(self, input: Tensor) -> Tensor:
        """``conv_offset(input)``, after checking that ``input`` can meet the layer's parameters (and
        that the output is not empty: the operator's message, not conv_offset's conv2d error)."""
        self._check_input(input)
        size = (input.shape[2], input.shape[3])
        check_output_size(size, self.kernel_size, self.stride, self.padding, self.dilation)
        _check_input_dtype(input, self.weight.dtype, "the layer's", "layer")
        return self.conv_offset(input)

    def offset_parameters(self) -> Iterator[nn.Parameter]:
        """The offset (and mask) branch's parameters, trained at ``offset_lr_mult`` x the base rate."""
        return self.conv_offset.parameters()

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, **kwargs) -> _OffsetPredictingConv:
        """A layer with ``conv``'s hyper-parameters, a copy of its weight and bias and its state: a
        frozen ``conv`` (weight not requiring gradients, as in a backbone's frozen stages) gives a
        frozen layer, offset branch included, and the layer takes ``conv``'s train/eval mode.

        Keyword arguments (``offset_groups``, ``backend``, ...) go to the constructor.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if isinstance(conv.padding, str):
            raise _string_padding_error(conv.padding)
        # nn.Conv2d stores its hyper-parameters as pairs, typed as tuple[int, ...].
        kernel_size = _pair(conv.kernel_size, "kernel_size", 1)
        stride = _pair(conv.stride, "stride", 1)
        padding = _pair(conv.padding, "padding", 0)
        dilation = _pair(conv.dilation, "dilation", 1)
        layer = cls(
            conv.in_channels, conv.out_channels, kernel_size, stride, padding, dilation,
            conv.groups, conv.bias is not None, conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype, **kwargs,
        )  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                assert layer.bias is not None  # built with bias=True
                layer.bias.copy_(conv.bias)
        if not conv.weight.requires_grad:
            layer.requires_grad_(False)
        elif conv.bias is not None and layer.bias is not None:
            layer.bias.requires_grad_(conv.bias.requires_grad)
        return layer.train(conv.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", offset_groups={self.offset_groups}"


class DCNv1(_OffsetPredictingConv):
    """Deformable convolution v1: a drop-in for ``nn.Conv2d`` that learns its sampling offsets.

    ``conv_offset`` (same kernel, stride, padding, dilation) predicts 2*G*kh*kw offset channels in
    the operator's layout. Zero-initialised, so a fresh layer equals the plain convolution.
    """

    _outputs_per_tap = 2
    offset_lr_mult = 1.0

    # The layer predicts its own offsets: forward takes only the input, unlike DeformConv2d's.
    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(input, self._predict(input))


class DCNv2(_OffsetPredictingConv):
    """Modulated deformable convolution (DCNv2): a drop-in for ``nn.Conv2d``.

    ``conv_offset`` predicts 3*G*kh*kw channels: the first 2*G*kh*kw are the offsets, the last
    G*kh*kw mask logits, turned into the modulation ``mask_scale * sigmoid(logits)``. Zero-initialised:
    a fresh layer computes ``mask_scale / 2`` times the convolution (plus the bias). ``mask_scale=2``
    reproduces the paper's released code, which starts equal to the convolution. Like ``stride``, it is
    a constructor setting, not part of the state dict: build the layer (or the backbone, through its
    ``layer_options``) with the value the weights were trained with.
    """

    _outputs_per_tap = 3
    offset_lr_mult = 0.1

    def __init__(self, *args, mask_scale: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mask_scale = _finite_number(mask_scale, "mask_scale", allow_zero=False)

    def offsets_and_mask(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """The predicted offsets [N, 2*G*K, H_out, W_out] and mask [N, G*K, H_out, W_out]."""
        prediction = self._predict(input)
        taps = self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        # One split, not two slices: its backward is one concatenation, where two slices' backward
        # would zero-fill and add two prediction-sized gradients. The operator reads the offset slice
        # in place.
        offset, logits = torch.split(prediction, [2 * taps, taps], dim=1)
        mask = torch.sigmoid(logits)
        if self.mask_scale != 1.0:
            mask = mask * self.mask_scale
        return offset, mask

    # The layer predicts its own offsets and mask: forward takes only the input, unlike DeformConv2d's.
    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        offset, mask = self.offsets_and_mask(input)
        return super().forward(input, offset, mask)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.mask_scale == 1.0 else s + f", mask_scale={self.mask_scale}"
