"""Where feature-map positions lie in the image: the fixed geometry of a convolutional stack.

Every map has, per axis, an affine relation to image pixel coordinates (pixel centres at integers),

    image = shift + scale * position,

where ``scale`` is the map's stride in image pixels and ``shift`` the image coordinate of position 0, and
a theoretical receptive-field half-extent ``radius`` (image pixels) of one position. A convolution or
pooling with kernel ``k``, stride ``s``, padding ``p`` and dilation ``d`` maps its output position ``o``
to the centre ``s*o - p + d*(k - 1)/2`` of its window in its input, so

    scale_out = scale_in * s,   shift_out = shift_in + scale_in * (d*(k - 1)/2 - p),
    radius_out = radius_in + scale_in * d*(k - 1)/2.

:func:`trace_geometry` walks the module tree to give every module its input and output geometry. It knows
torchvision's ResNet (and this library's DCN ResNets), its BasicBlock/Bottleneck (the main path; the
``downsample`` shortcut branches off the block input), ``IntermediateLayerGetter``, ``BackboneWithFPN``
(each FPN level takes the geometry of its body layer; the extra max-pool level halves it), this library's
C4 backbone, ``GeneralizedRCNN`` detectors (the transform's resize is folded into the image geometry) and
any container whose children run one after another in registration order (``nn.Sequential`` and
similar). Elementwise modules (norms, activations) keep the geometry; global pooling, ``Flatten`` and
``Linear`` end it. Limits: modules whose children run in another order, in parallel or more than once
(other than the cases above) get wrong geometries; such modules can be given an explicit geometry with
``overrides``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import DeformConv2d as TorchvisionDeformConv2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..data._checks import is_int
from ..models.backbones import check_module
from ..nn import DeformConv2d
from ._core import (
    analysis_mode,
    check_point,
    check_position,
    find_module,
    is_detector,
    layer_output,
    prepare_image,
    spatial_size,
    transformed_scale,
)

__all__ = [
    "AxisMap",
    "MapGeometry",
    "image_geometry",
    "image_to_position",
    "layer_geometry",
    "position_to_image",
    "theoretical_receptive_field",
    "trace_geometry",
]

#: Modules that sample their input at (offset) kernel positions.
DEFORMABLE_TYPES = (DeformConv2d, TorchvisionDeformConv2d)
_ENDS_GEOMETRY = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Linear, nn.Flatten)


@dataclass(frozen=True)
class AxisMap:
    """One axis of a map's geometry: ``image = shift + scale * position``; ``radius`` is the half-extent
    (image pixels) of the theoretical receptive field of one position."""

    scale: float = 1.0
    shift: float = 0.0
    radius: float = 0.0

    def to_image(self, position):
        return self.shift + self.scale * position

    def from_image(self, coordinate):
        return (coordinate - self.shift) / self.scale

    def through(self, kernel: int, stride: int, padding: float, dilation: int) -> AxisMap:
        half = dilation * (kernel - 1) / 2
        return AxisMap(
            self.scale * stride, self.shift + self.scale * (half - padding), self.radius + self.scale * half
        )


@dataclass(frozen=True)
class MapGeometry:
    """The geometry of a 2-D map: one :class:`AxisMap` per axis."""

    y: AxisMap = AxisMap()
    x: AxisMap = AxisMap()

    def through(self, kernel, stride, padding, dilation) -> MapGeometry:
        """The geometry of the output of a window operation with these (pairs of) hyper-parameters."""
        k, s, p, d = _pair(kernel), _pair(stride), padding, _pair(dilation)
        if isinstance(p, str):
            p = (0, 0) if p == "valid" else tuple(d[i] * (k[i] - 1) / 2 for i in range(2))
        p = _pair(p)
        return MapGeometry(self.y.through(k[0], s[0], p[0], d[0]), self.x.through(k[1], s[1], p[1], d[1]))

    def to_image(self, points: Tensor) -> Tensor:
        """``points`` [..., 2] (y, x) in map coordinates -> image coordinates [..., 2]."""
        return torch.stack((self.y.to_image(points[..., 0]), self.x.to_image(points[..., 1])), -1)

    def from_image(self, points: Tensor) -> Tensor:
        """``points`` [..., 2] (y, x) in image coordinates -> map coordinates [..., 2]."""
        return torch.stack((self.y.from_image(points[..., 0]), self.x.from_image(points[..., 1])), -1)


def _window(module: nn.Module):
    """(kernel, stride, padding, dilation) of a convolution or pooling module, or None."""
    if isinstance(module, nn.Conv2d | DeformConv2d | TorchvisionDeformConv2d):
        return module.kernel_size, module.stride, module.padding, module.dilation
    if isinstance(module, nn.MaxPool2d):
        return module.kernel_size, module.stride, module.padding, module.dilation
    if isinstance(module, nn.AvgPool2d):
        return module.kernel_size, module.stride, module.padding, 1
    return None


Geometries = dict[str, tuple[MapGeometry | None, MapGeometry | None]]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _walk(
    module: nn.Module, name: str, g: MapGeometry | None, out: Geometries, overrides
) -> MapGeometry | None:
    if name in overrides:
        g_in, g_out = overrides[name]
        out[name] = (g_in, g_out)
        return g_out
    if g is None:
        out[name] = (None, None)
        for child_name, child in module.named_children():
            _walk(child, _join(name, child_name), None, out, overrides)
        return None
    window = _window(module)
    if window is not None:
        g_out = g.through(*window)
        out[name] = (g, g_out)
        for child_name, child in module.named_children():  # conv_offset: same input, same window
            _walk(child, _join(name, child_name), g, out, overrides)
        return g_out
    if isinstance(module, _ENDS_GEOMETRY):
        out[name] = (g, None)
        return None
    if isinstance(module, BasicBlock | Bottleneck):
        h: MapGeometry | None = g
        for child_name, child in module.named_children():
            if child_name == "downsample":
                _walk(child, _join(name, child_name), g, out, overrides)
            else:
                h = _walk(child, _join(name, child_name), h, out, overrides)
        out[name] = (g, h)
        return h
    if isinstance(module, BackboneWithFPN):
        return _walk_fpn_backbone(module, name, g, out, overrides)
    if is_detector(module):
        out[name] = (g, None)
        _walk(module.backbone, _join(name, "backbone"), g, out, overrides)
        return None
    children = list(module.named_children())
    if not children:  # elementwise
        out[name] = (g, g)
        return g
    h = g
    for child_name, child in children:
        h = _walk(child, _join(name, child_name), h, out, overrides)
    out[name] = (g, h)
    return h


def _walk_fpn_backbone(module: BackboneWithFPN, name: str, g: MapGeometry, out: Geometries, overrides):
    body_name = _join(name, "body")
    _walk(module.body, body_name, g, out, overrides)
    levels = [out.get(_join(body_name, layer), (None, None))[1] for layer in module.body.return_layers]
    fpn_name = _join(name, "fpn")
    out[fpn_name] = (None, None)
    fpn = module.fpn
    for kind in ("inner_blocks", "layer_blocks"):
        for i, block in enumerate(getattr(fpn, kind)):
            level = levels[i] if i < len(levels) else None
            # Lateral 1x1 and output 3x3 convolutions start from the level's body map (the top-down
            # pathway is not followed: FPN receptive-field radii are lower bounds).
            _walk(block, f"{fpn_name}.{kind}.{i}", level, out, overrides)
    if fpn.extra_blocks is not None:
        extra = (
            levels[-1].through(1, 2, 0, 1)
            if isinstance(fpn.extra_blocks, LastLevelMaxPool) and levels and levels[-1]
            else None
        )
        out[f"{fpn_name}.extra_blocks"] = (levels[-1] if levels else None, extra)
    out[name] = (g, None)
    return None


def image_geometry(model: nn.Module, image_size: tuple[int, int]) -> MapGeometry:
    """The geometry of the model's input tensor relative to the original image of ``image_size``.

    Identity for ordinary networks; for detectors, the transform's bilinear resize (align_corners=False):
    transformed coordinate ``t`` is original ``(t + 0.5) / r - 0.5`` with ``r`` the resize ratio.
    """
    if not is_detector(model):
        return MapGeometry()
    r_y, r_x, _ = transformed_scale(model, image_size)
    return MapGeometry(
        AxisMap(1 / r_y, 0.5 / r_y - 0.5, 0.0 if r_y == 1 else 1 / r_y),
        AxisMap(1 / r_x, 0.5 / r_x - 0.5, 0.0 if r_x == 1 else 1 / r_x),
    )


def trace_geometry(
    model: nn.Module,
    image_size: tuple[int, int] = (1, 1),
    overrides: Mapping[str, tuple[MapGeometry | None, MapGeometry | None]] | None = None,
) -> Geometries:
    """Input and output geometry of every module of ``model`` (None where unknown).

    Args:
        model: the network (see the module docstring for the structures it knows).
        image_size: (height, width) of the original image; only detectors need it (their resize).
        overrides: ``{module name: (input geometry, output geometry)}`` replacing the walk there.

    Returns:
        ``{module name: (input MapGeometry | None, output MapGeometry | None)}``; ``""`` is the model.
    """
    check_module(model)
    if (
        isinstance(image_size, str)
        or not isinstance(image_size, Sequence)
        or len(image_size) != 2
        or not all(is_int(v) and v > 0 for v in image_size)
    ):
        raise ValueError(f"image_size must be (height, width) positive ints, got {image_size!r}")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a mapping of module names to geometries, got {overrides!r}")
    out: Geometries = {}
    size = (image_size[0], image_size[1])  # a tuple, whatever the sequence
    _walk(model, "", image_geometry(model, size), out, dict(overrides or {}))
    return out


def _fallback(image_size: tuple[int, int], map_size: tuple[int, int]) -> MapGeometry:
    """Proportional geometry (pixel centres aligned as in an align_corners=False resize)."""
    sy, sx = image_size[0] / map_size[0], image_size[1] / map_size[1]
    return MapGeometry(AxisMap(sy, 0.5 * sy - 0.5, 0.5 * sy), AxisMap(sx, 0.5 * sx - 0.5, 0.5 * sx))


def _layer_map(model: nn.Module, image: Tensor, layer: str) -> tuple[MapGeometry, tuple[int, int]]:
    """``layer``'s output geometry (as :func:`layer_geometry`) and its output map size (height, width)."""
    x = prepare_image(image, model)
    with torch.no_grad(), analysis_mode(model):
        size = spatial_size(layer_output(model, x[None], layer))
    geometry = trace_geometry(model, spatial_size(x)).get(layer, (None, None))[1]
    return (geometry if geometry is not None else _fallback(spatial_size(x), size)), size


def layer_geometry(model: nn.Module, image: Tensor, layer: str) -> MapGeometry:
    """The geometry of ``layer``'s output map for ``image`` [C, H, W]; if the walk cannot place the layer,
    the proportional geometry of its output size is returned (image size / map size per axis)."""
    find_module(model, layer)
    x = prepare_image(image, model)
    geometry = trace_geometry(model, spatial_size(x)).get(layer, (None, None))[1]
    return geometry if geometry is not None else _layer_map(model, x, layer)[0]


def position_to_image(model: nn.Module, image: Tensor, layer: str, position) -> tuple[float, float]:
    """Image coordinates (y, x) of the centre of ``position`` (y, x) in ``layer``'s output map.

    ``position`` must be a pair of ints inside the map (ValueError naming the valid range otherwise).
    """
    g, size = _layer_map(model, image, layer)
    y, x = check_position(position, layer, size)
    return float(g.y.to_image(y)), float(g.x.to_image(x))


def image_to_position(model: nn.Module, image: Tensor, layer: str, point) -> tuple[int, int]:
    """The position of ``layer``'s output map whose centre is nearest the image point (y, x) (finite
    numbers; a point beyond the map's centres, inside the image or not, gives the nearest border
    position)."""
    point_y, point_x = check_point(point)
    g, (height, width) = _layer_map(model, image, layer)
    y = min(max(round(g.y.from_image(point_y)), 0), height - 1)
    x = min(max(round(g.x.from_image(point_x)), 0), width - 1)
    return int(y), int(x)


def theoretical_receptive_field(
    model: nn.Module, image: Tensor, layer: str, position
) -> tuple[float, float, float, float]:
    """The theoretical receptive field of ``position`` in ``layer``'s output: ``(y0, y1, x0, x1)``, the
    inclusive image-pixel bounds (not clipped to the image) implied by the stack's kernels, strides,
    paddings and dilations (offsets of deformable layers ignored).

    ``position`` must be a pair of ints inside the map (ValueError naming the valid range otherwise).
    """
    g, size = _layer_map(model, image, layer)
    y, x = check_position(position, layer, size)
    cy, cx = float(g.y.to_image(y)), float(g.x.to_image(x))
    return cy - g.y.radius, cy + g.y.radius, cx - g.x.radius, cx + g.x.radius
