"""One deformable-convolution test problem, shared by the tests of every implementation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvCase:
    """Shapes and hyper-parameters of one deform_conv2d problem (C_in -> C_out, kernel kh x kw)."""

    batch: int = 2
    in_channels: int = 4
    out_channels: int = 4
    size: tuple[int, int] = (6, 7)
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    offset_groups: int = 1
    mask: bool = True
    bias: bool = True

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(
                self.size, self.padding, self.dilation, self.kernel, self.stride, strict=True
            )
        )

    @property
    def geometry(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(stride, padding, dilation)."""
        return self.stride, self.padding, self.dilation
