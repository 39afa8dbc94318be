"""Deformable RoI pooling modules: DCNv1 ``DeformRoIPool``, DCNv2 ``ModulatedDeformRoIPool`` and the
FPN drop-in ``MultiScaleDeformRoIPool`` for torchvision's ``MultiScaleRoIAlign``.

Every module pools twice: plain RoI pooling (RoIAlign, i.e. ``deform_roi_pool`` with no offset) feeds
an fc branch that predicts normalised offsets (and, for DCNv2, a mask); the second pooling uses them.
The last fc layer is zero-initialised, so at start-up the offsets are 0 and the DCNv2 mask is
sigmoid(0) = 0.5: ``DeformRoIPool`` starts as RoIAlign, ``ModulatedDeformRoIPool`` as 0.5 * RoIAlign.

Learning-rate multipliers: ``offset_lr_mult`` (class attribute; DCNv1 0.01, DCNv2 1.0, as in the
papers) applies to the parameters returned by ``offset_parameters()``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar, cast

import torch
from torch import Tensor, nn
from torchvision.ops.poolers import LevelMapper, _convert_to_roi_format, _setup_scales

from ..ops._backend import check_backend_name
from ..ops.deform_roi_pool import _output_size, deform_roi_pool, validate_pooling_parameters
from .deform_conv import _check_bool, _check_input_dtype, _positive_int

__all__ = ["DeformRoIPool", "ModulatedDeformRoIPool", "MultiScaleDeformRoIPool"]


def _mlp(
    in_features: int, hidden: Sequence[int], out_features: int, hidden_std: float | None
) -> nn.Sequential:
    """Linear -> ReLU -> ... -> Linear; the last layer zero-initialised, hidden ones N(0, std) if given."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        linear = nn.Linear(width, h)
        if hidden_std is not None:
            nn.init.normal_(linear.weight, std=hidden_std)
            nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU(inplace=True)]
        width = h
    last = nn.Linear(width, out_features)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def _hidden_widths(hidden_channels) -> tuple[int, ...]:
    """``hidden_channels`` (a sequence of layer widths) as a tuple of positive ints."""
    if not isinstance(hidden_channels, Sequence) or isinstance(hidden_channels, str):
        raise TypeError(
            f"hidden_channels must be a sequence of layer widths, e.g. (1024,), got {hidden_channels!r}"
        )
    return tuple(_positive_int(h, "hidden_channels entries") for h in hidden_channels)


def _channels_last(feature: Tensor) -> Tensor:
    """``feature`` in channels-last layout, the layout the fast path reads.

    Converting once per forward lets both poolings (and their backward passes) read the map without a
    copy each, at the price of keeping the converted map until the backward pass. fp16 and bf16 maps are
    left alone: the fast path copies them to fp32 anyway.
    """
    if feature.dtype in (torch.float32, torch.float64) and feature.dim() == 4:
        return feature.contiguous(memory_format=torch.channels_last)
    return feature


class _DeformRoIPoolBase(nn.Module):
    """Shared plumbing: the two poolings around an offset branch (``predict``)."""

    offset_lr_mult: ClassVar[float] = 1.0

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int,
        gamma: float,
        in_channels: int,
        aligned: bool,
        backend: str | None,
    ) -> None:
        super().__init__()
        self.output_size = validate_pooling_parameters(
            output_size, spatial_scale, sampling_ratio, gamma, aligned
        )
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.aligned = aligned
        self.backend = check_backend_name(backend)

    @property
    def _bins(self) -> int:
        return self.output_size[0] * self.output_size[1]

    def predict(self, pooled: Tensor) -> tuple[Tensor, Tensor | None]:
        """Offsets ``[K, 2, ph, pw]`` and mask ``[K, 1, ph, pw]`` (or None) from plain pooled features."""
        raise NotImplementedError

    def pool(
        self,
        input: Tensor,
        rois: Tensor,
        offset: Tensor | None = None,
        mask: Tensor | None = None,
        spatial_scale: float | None = None,
    ) -> Tensor:
        """``deform_roi_pool`` with this module's settings (``spatial_scale`` overridable)."""
        return deform_roi_pool(
            input,
            rois,
            offset,
            mask,
            self.output_size,
            self.spatial_scale if spatial_scale is None else spatial_scale,
            self.sampling_ratio,
            self.gamma,
            self.aligned,
            backend=self.backend,
        )

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        """Pool ``rois`` [K, 5] (batch_index, x1, y1, x2, y2) from ``input`` [N, C, H, W]: [K, C, ph, pw]."""
        self._check_input(input)
        input = _channels_last(input)
        plain = self.pool(input, rois)
        offset, mask = self.predict(plain)
        return self.pool(input, rois, offset, mask)

    def _check_input(self, input: Tensor) -> None:
        """Channels and dtype the offset branch can take (the operator checks the rest)."""
        if not isinstance(input, Tensor) or input.dim() != 4:
            return
        if input.shape[1] != self.in_channels:
            raise ValueError(
                f"input must have in_channels={self.in_channels} channels, got {input.shape[1]} "
                f"(shape {list(input.shape)})"
            )
        if input.is_floating_point():  # other dtypes get the operator's own message
            _check_input_dtype(input, next(self.parameters()).dtype, "the offset branch's", "module")

    def offset_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of the offset (and mask) branch, trained at ``offset_lr_mult`` x the base rate."""
        return self.parameters()

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}, aligned={self.aligned}"
        )


class DeformRoIPool(_DeformRoIPoolBase):
    """Deformable RoI pooling (DCNv1): RoIAlign -> fc(s) -> normalised offsets -> deformable pooling.

    The branch is ``offset_fc``: Linear(C*ph*pw, h1) -> ReLU -> ... -> Linear(h_last, 2*ph*pw), the last
    layer zero-initialised (so the module starts as RoIAlign). The default, no hidden layer, is the
    paper's single fc: Linear(C*ph*pw, 2*ph*pw). With ``hidden_channels=(1024, 1024)`` its state-dict
    names and shapes are those of mmcv's ``DeformRoIPoolPack`` (whose op samples with ``aligned=True``
    and ``sampling_ratio=0``: pass those too for mmdetection's weights).

    Args:
        output_size: ``(ph, pw)`` or one int.
        spatial_scale: feature-map size / image size.
        sampling_ratio: samples per bin side; ``<= 0`` adaptive (``ceil(roi_size / output_size)``).
        gamma: offset scale (0.1 in the paper).
        in_channels: ``C``, channels of the pooled feature map.
        hidden_channels: widths of the hidden fc layers of the offset branch (default none).
        aligned: roi_align's ``aligned`` convention.
        backend: passed to :func:`deformable.ops.deform_roi_pool.deform_roi_pool`.

    Shapes:
        input ``[N, C, H, W]``, rois ``[K, 5]`` -> output ``[K, C, ph, pw]``.
    """

    offset_lr_mult: ClassVar[float] = 0.01

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
        *,
        in_channels: int,
        hidden_channels: Sequence[int] = (),
        aligned: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma, in_channels, aligned, backend)
        self.hidden_channels = _hidden_widths(hidden_channels)
        self.offset_fc = _mlp(self.in_channels * self._bins, self.hidden_channels, 2 * self._bins, None)

    def predict(self, pooled: Tensor) -> tuple[Tensor, None]:
        """Normalised offsets ``[K, 2, ph, pw]`` (channel 0 = x, 1 = y) from pooled ``[K, C, ph, pw]``."""
        offset = self.offset_fc(pooled.flatten(1))
        return offset.view(-1, 2, *self.output_size), None


class ModulatedDeformRoIPool(_DeformRoIPoolBase):
    """Modulated deformable RoI pooling (DCNv2): RoIAlign -> fc branch -> offsets and sigmoid mask.

    ``branch="paper"`` (default): one branch ``offset_mask_fc``, Linear(C*ph*pw, 1024) -> ReLU ->
    Linear(1024, 1024) -> ReLU -> Linear(1024, 3*ph*pw); hidden layers N(0, 0.01), the last zero. The
    first 2*ph*pw outputs are the offsets (x plane, then y plane), the last ph*pw the mask logits.

    ``branch="mmcv"``: mmcv's ``ModulatedDeformRoIPoolPack`` layout, so mmdetection checkpoints load by
    name: ``offset_fc`` = Linear(C*ph*pw, h1) -> ReLU -> Linear(h1, h2) -> ReLU -> Linear(h2, 2*ph*pw)
    and ``mask_fc`` = Linear(C*ph*pw, h1) -> ReLU -> Linear(h1, ph*pw) -> Sigmoid. It also samples as
    mmcv's op does, half a pixel shifted (``aligned`` defaults to True for it).

    At start-up the offsets are 0 and the mask 0.5: the output is 0.5 * RoIAlign.

    Args:
        as :class:`DeformRoIPool`, plus ``branch``; ``hidden_channels`` defaults to (1024, 1024),
        ``aligned`` to False for the paper's branch and True for mmcv's.

    Shapes:
        input ``[N, C, H, W]``, rois ``[K, 5]`` -> output ``[K, C, ph, pw]``.
    """

    offset_lr_mult: ClassVar[float] = 1.0

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
        *,
        in_channels: int,
        hidden_channels: Sequence[int] = (1024, 1024),
        branch: str = "paper",
        aligned: bool | None = None,
        backend: str | None = None,
    ) -> None:
        if branch not in ("paper", "mmcv"):
            raise ValueError(f"branch must be 'paper' or 'mmcv', got {branch!r}")
        aligned = branch == "mmcv" if aligned is None else aligned
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma, in_channels, aligned, backend)
        self.hidden_channels = _hidden_widths(hidden_channels)
        if not self.hidden_channels:
            raise ValueError(f"hidden_channels must name at least one layer, got {hidden_channels!r}")
        self.branch = branch
        features, bins = self.in_channels * self._bins, self._bins
        if branch == "paper":
            self.offset_mask_fc = _mlp(features, self.hidden_channels, 3 * bins, hidden_std=0.01)
        else:
            self.offset_fc = _mlp(features, self.hidden_channels, 2 * bins, hidden_std=0.01)
            self.mask_fc = nn.Sequential(*_mlp(features, self.hidden_channels[:1], bins, 0.01), nn.Sigmoid())

    def predict(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """Offsets ``[K, 2, ph, pw]`` and mask in (0, 1) ``[K, 1, ph, pw]`` from pooled ``[K, C, ph, pw]``."""
        flat = pooled.flatten(1)
        if self.branch == "paper":
            offset, logits = torch.split(self.offset_mask_fc(flat), [2 * self._bins, self._bins], dim=1)
            mask = torch.sigmoid(logits)  # one split: its backward is one concatenation
        else:
            offset = self.offset_fc(flat)
            mask = self.mask_fc(flat)
        return offset.reshape(-1, 2, *self.output_size), mask.reshape(-1, 1, *self.output_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, branch={self.branch!r}"


def _is_positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0


def _check_pyramid_inputs(x, boxes, image_shapes, featmap_names: list[str]) -> None:
    """MultiScaleDeformRoIPool's forward arguments (TypeError/ValueError naming the argument)."""
    if not isinstance(x, Mapping):
        raise TypeError(f"x must be a dict of feature maps by name, got {type(x).__name__}")
    missing = [name for name in featmap_names if name not in x]
    if missing:
        raise ValueError(f"x has no feature map named {missing} (featmap_names; x has {list(x)})")
    if isinstance(boxes, Tensor) or not isinstance(boxes, Sequence):
        raise TypeError(
            f"boxes must be a list of [L_i, 4] tensors, one per image, got {type(boxes).__name__}"
        )
    for b in boxes:
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[-1] != 4:
            raise ValueError(f"boxes must hold [L_i, 4] tensors, got {getattr(b, 'shape', type(b).__name__)}")
        if not b.is_floating_point():
            raise TypeError(f"boxes must be floating-point tensors, got {b.dtype}")
    if not isinstance(image_shapes, Sequence) or len(image_shapes) != len(boxes):
        raise ValueError(
            f"image_shapes must give one (height, width) per image ({len(boxes)}), got {image_shapes!r}"
        )
    for shape in image_shapes:
        if (
            not isinstance(shape, Sequence)
            or len(shape) != 2
            or not all(isinstance(v, torch.SymInt) or _is_positive_int(v) or _traced_size(v) for v in shape)
        ):
            raise ValueError(f"image_shapes must hold (height, width) pairs of positive ints, got {shape!r}")


def _traced_size(value) -> bool:
    """A size as torch.jit tracing (the TorchScript ONNX exporter) passes it: a 0-d integer tensor,
    which torchvision's transform makes of the image sizes so that they stay dynamic."""
    return (
        torch.jit.is_tracing()
        and isinstance(value, Tensor)
        and value.dim() == 0
        and not value.is_floating_point()
        and not value.is_complex()
    )


class MultiScaleDeformRoIPool(nn.Module):
    """Drop-in for ``torchvision.ops.MultiScaleRoIAlign`` with (modulated) deformable RoI pooling.

    Same constructor arguments, same ``forward(x, boxes, image_shapes)``, same FPN level assignment and
    scale inference (torchvision's own ``LevelMapper`` and ``_setup_scales``), so it can serve as
    ``box_roi_pool`` / ``mask_roi_pool`` of torchvision's ``RoIHeads``. Every RoI is pooled twice on
    its level: RoIAlign, the offset branch, then deformable pooling. One branch is shared by all
    levels (``share_offset_branch=True``, default; mmdetection builds one per level) or one per level.

    Args:
        featmap_names: the feature maps to pool from (keys of ``x``), finest first.
        output_size: ``(ph, pw)`` or one int.
        sampling_ratio: as in ``MultiScaleRoIAlign`` (``<= 0`` adaptive).
        in_channels: channels of the feature maps (needed by the fc branch).
        modulated: True builds :class:`ModulatedDeformRoIPool` (DCNv2), False :class:`DeformRoIPool`.
        gamma, hidden_channels, branch, aligned, backend: passed to the pooling modules
            (``hidden_channels=None`` and ``aligned=None`` keep their defaults; ``branch`` only for
            ``modulated=True``).
        share_offset_branch: one branch for all levels (True) or one per level.
        canonical_scale, canonical_level: FPN level mapping, as in ``MultiScaleRoIAlign``.

    Shapes:
        x: dict of ``[N, C, H_l, W_l]``; boxes: list of N ``[L_i, 4]`` (x1, y1, x2, y2) in image
        coordinates; image_shapes: list of (height, width) -> ``[sum L_i, C, ph, pw]``.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | tuple[int, int] | list[int],
        sampling_ratio: int,
        *,
        in_channels: int,
        modulated: bool = True,
        gamma: float = 0.1,
        hidden_channels: Sequence[int] | None = None,
        branch: str = "paper",
        aligned: bool | None = None,
        share_offset_branch: bool = True,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(featmap_names, str) or not isinstance(featmap_names, Sequence):
            raise TypeError(f"featmap_names must be a list of feature-map names, got {featmap_names!r}")
        self.featmap_names = list(featmap_names)
        if not self.featmap_names or not all(isinstance(n, str) for n in self.featmap_names):
            raise ValueError(f"featmap_names must name at least one feature map (str), got {featmap_names!r}")
        self.output_size = _output_size(tuple(output_size) if isinstance(output_size, list) else output_size)
        if isinstance(canonical_scale, bool) or not isinstance(canonical_scale, numbers.Real):
            raise TypeError(f"canonical_scale must be a positive number, got {canonical_scale!r}")
        if not (math.isfinite(canonical_scale) and canonical_scale > 0):
            raise ValueError(f"canonical_scale must be a positive finite number, got {canonical_scale!r}")
        self.canonical_scale: float = canonical_scale
        self.canonical_level: int = _positive_int(canonical_level, "canonical_level")
        self.share_offset_branch: bool = _check_bool(share_offset_branch, "share_offset_branch")
        self.scales: list[float] | None = None
        self.map_levels: LevelMapper | None = None
        kwargs: dict = dict(
            sampling_ratio=sampling_ratio, gamma=gamma, in_channels=in_channels, backend=backend
        )
        if hidden_channels is not None:
            kwargs["hidden_channels"] = hidden_channels
        if aligned is not None:
            kwargs["aligned"] = aligned
        if _check_bool(modulated, "modulated"):
            kwargs["branch"] = branch
        elif branch != "paper":
            raise ValueError(f"branch={branch!r} needs modulated=True")
        cls = ModulatedDeformRoIPool if modulated else DeformRoIPool
        count = 1 if self.share_offset_branch else len(self.featmap_names)
        self.pools: nn.ModuleList = nn.ModuleList(cls(self.output_size, **kwargs) for _ in range(count))
        self.sampling_ratio: int = self._branch(0).sampling_ratio  # checked by the pooling module

    def _branch(self, index: int) -> _DeformRoIPoolBase:
        """``pools[index]``, typed: the pooling module (with its offset branch) of level ``index``."""
        return cast(_DeformRoIPoolBase, self.pools[index])

    @property
    def offset_lr_mult(self) -> float:
        """Learning-rate multiplier of :meth:`offset_parameters` (that of the wrapped pooling class)."""
        return self._branch(0).offset_lr_mult

    def offset_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of the offset (and mask) branches."""
        return self.pools.parameters()

    def _pool_levels(
        self,
        features: list[Tensor],
        rois: Tensor,
        levels: list[Tensor] | None,
        offset: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        pool = self._branch(0)
        assert self.scales is not None
        if levels is None:
            return pool.pool(features[0], rois, offset, mask, self.scales[0])
        first = features[0]
        result = first.new_zeros((rois.shape[0], first.shape[1], *self.output_size))
        for feature, scale, index in zip(features, self.scales, levels, strict=True):
            if not (torch.compiler.is_compiling() or torch.jit.is_tracing()) and index.numel() == 0:
                continue
            pooled = pool.pool(
                feature,
                rois[index],
                None if offset is None else offset[index],
                None if mask is None else mask[index],
                scale,
            )
            result[index] = pooled.to(result.dtype)
        return result

    def _assign(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[Tensor], Tensor, list[Tensor] | None]:
        """The pooled maps, the RoIs [K, 5] and, with several maps, the RoI indices of each level."""
        _check_pyramid_inputs(x, boxes, image_shapes, self.featmap_names)
        features = [v for k, v in x.items() if k in self.featmap_names]  # in x's order, as torchvision
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        levels = None
        if len(features) > 1:
            assignment = self.map_levels(boxes)
            levels = [torch.where(assignment == level)[0] for level in range(len(features))]
            # A box with a NaN coordinate gets no level (and would pool as zeros): the single-level
            # path's RoI check rejects it, so does this one (the sizes are known: no extra sync; not
            # while compiling, where they are data-dependent).
            assigned = sum(index.shape[0] for index in levels)
            if not torch.compiler.is_compiling() and assigned != rois.shape[0]:
                raise ValueError("boxes must be finite: a box with a NaN coordinate maps to no level")
        return features, rois, levels

    def pool(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
        offset: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Deformable pooling of every box on its level with the given offsets and mask, no branch.

        ``offset`` ``[K, 2, ph, pw]`` and ``mask`` ``[K, 1, ph, pw]`` follow the order of the boxes
        (image by image); both None gives exactly ``MultiScaleRoIAlign``.
        """
        features, rois, levels = self._assign(x, boxes, image_shapes)
        for name, value, channels in (("offset", offset, 2), ("mask", mask, 1)):
            expected = (rois.shape[0], channels, *self.output_size)
            if value is not None and (not isinstance(value, Tensor) or tuple(value.shape) != expected):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} must have shape {list(expected)} (one row per box), got {got}")
        return self._pool_levels([_channels_last(f) for f in features], rois, levels, offset, mask)

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """Pool ``boxes`` (one [L_i, 4] tensor per image, image coordinates) from the FPN maps ``x``."""
        features, rois, levels = self._assign(x, boxes, image_shapes)
        for feature in features:
            self._branch(0)._check_input(feature)
        features = [_channels_last(f) for f in features]
        plain = self._pool_levels(features, rois, levels, None, None)
        if self.share_offset_branch:
            offset, mask = self._branch(0).predict(plain)
        else:
            offset, mask = self._predict_per_level(plain, levels)
        return self._pool_levels(features, rois, levels, offset, mask)

    def _predict_per_level(self, plain: Tensor, levels: list[Tensor] | None) -> tuple[Tensor, Tensor | None]:
        if levels is None:
            return self._branch(0).predict(plain)
        offset = plain.new_zeros((plain.shape[0], 2, *self.output_size))
        mask = plain.new_ones((plain.shape[0], 1, *self.output_size))
        has_mask = False
        for branch, index in zip(self.pools, levels, strict=True):
            level_offset, level_mask = cast(_DeformRoIPoolBase, branch).predict(plain[index])
            offset[index] = level_offset.to(offset.dtype)
            if level_mask is not None:
                mask[index] = level_mask.to(mask.dtype)
                has_mask = True
        return offset, mask if has_mask else None

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"sampling_ratio={self.sampling_ratio}, share_offset_branch={self.share_offset_branch},\n"
            f"  pools={self.pools})"
        )
