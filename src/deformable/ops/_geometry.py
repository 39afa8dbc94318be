"""The shape arithmetic of one deform_conv2d call, shared by the backends."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of a validated deform_conv2d call: input [N, C_in, H, W], weight [C_out, C_in/groups,
    kh, kw], offset [N, 2*G*kh*kw, H_out, W_out]."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    groups: int
    kh: int
    kw: int
    offset_groups: int
    out_h: int
    out_w: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, input: Tensor, offset: Tensor, weight: Tensor, stride, padding, dilation):
        batch, in_channels, height, width = input.shape
        out_channels, group_in, kh, kw = weight.shape
        return cls(
            batch, in_channels, height, width, out_channels, in_channels // group_in, kh, kw,
            offset.shape[1] // (2 * kh * kw), offset.shape[2], offset.shape[3],
            tuple(stride), tuple(padding), tuple(dilation),
        )  # fmt: skip

    @property
    def taps(self) -> int:
        """kh * kw."""
        return self.kh * self.kw

    @property
    def group_in(self) -> int:
        """Input channels per weight group."""
        return self.in_channels // self.groups

    @property
    def group_out(self) -> int:
        """Output channels per weight group."""
        return self.out_channels // self.groups

    @property
    def channels_per_offset_group(self) -> int:
        """Input channels per offset group."""
        return self.in_channels // self.offset_groups
