"""Effective sampling locations (and bin locations) of a node, and DCNv1's effective dilation.

How the sampling locations are found. Every *sampling layer* (by default the deformable convolutions
``DeformConv2d``/``DCNv1``/``DCNv2``, torchvision's ``DeformConv2d``; for a network without any, its regular
convolutions with a kernel larger than 1x1, which contribute their fixed grid) is temporarily run through
:func:`deformable.ops.deform_conv2d` with three identity *probes* that change nothing in the forward pass:
an additive zero on the offsets, a multiplicative one on the (possibly absent) mask and an additive zero
on the output. One backward pass from the node gives, for every sample ``k`` of every output position
``o`` of the layer (per offset group),

- whether it is *under the node*: the node's gradient reaches the output position ``o``;
- its location ``p = o*stride - padding + k*dilation + offset`` in the layer's input map, which is
  propagated back to image pixel coordinates through the stack's geometry (strides, paddings and
  dilations of everything below; :mod:`.geometry`);
- its weight, by ``weighting``:

  * ``"location"`` (default): ``|d node / d p|_2``, the gradient of the node with respect to the sampling
    location (the DCNv2 paper's definition), from the offset probe, per image pixel: the gradient in the
    layer's input-map pixels divided, per axis, by the map's scale (image pixels per map pixel), so that
    weights of layers at different strides compare;
  * ``"value"``: ``|d node / d x(p)|``, the gradient of the node with respect to the sampled value, summed
    in absolute value over the input channels of the offset group (the ERF's reduction) and including the
    modulation ``m_k``: ``sum_c |m_k * sum_o' dN/dy[o', o] * w[o', c, k]|``;
  * ``"contribution"``: ``|d node / d g|`` for the unit gate ``g`` multiplying the sample, i.e. the
    sample's first-order contribution (gradient x input) ``|m_k * sum dN/dy * w * x(p)|``.

The node's scalar is the one differentiated: its channel, the sum over channels with ``channel=None``, or
a RoI node's class score. Every sample under the node is returned, even with weight 0.

The effective *bin* locations of a RoI node are the centres of the ``ph x pw`` bins of the detector's RoI
pooling (deformable, or torchvision's ``MultiScaleRoIAlign``), moved by their offsets, on the RoI's FPN
level (with one offset branch per level, ``share_offset_branch=False``, the branch of that level), in
pixel-centre image coordinates (box coordinates minus 0.5). They are weighted from the gradient with
respect to the bin's displacement (``"location"``, per image pixel; for RoIAlign the pooling is run
through deformable RoI pooling with zero offsets, which computes exactly RoIAlign, to get it, and a
deformable pooling with ``gamma=0`` is run at ``gamma=1`` with zero offsets, the same bins) or with
respect to the pooled bin (``"value"``: ``sum_c |dN/dbin_c| * mask``; ``"contribution"``:
``|sum_c dN/dbin_c * bin_c|``).

Gradients are taken whatever the caller's autograd mode (also inside ``torch.no_grad()`` and
``torch.inference_mode()``).

Limits: sampling layers must run as ``forward(input)`` (DCNv1/DCNv2, ``nn.Conv2d`` with zero padding) or
``forward(input, offset, mask=None)`` (``DeformConv2d``); their image coordinates come from
:func:`~.geometry.trace_geometry` (ResNets, DCN ResNets, FPN/C4 detectors, sequential stacks), or, for a
layer the walk cannot place, from the proportional geometry of its input size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales

from ..models.backbones import check_module
from ..nn import DCNv1, DCNv2, DeformConv2d, MultiScaleDeformRoIPool
from ..ops import deform_conv2d, deform_roi_pool
from ._core import (
    Node,
    RoIForward,
    _check_detector,
    analysis_mode,
    evaluate_node,
    gradients_enabled,
    is_detector,
    make_node,
    prepare_image,
    resolve_node,
    run_model,
    spatial_size,
)
from .geometry import DEFORMABLE_TYPES, AxisMap, MapGeometry, _fallback, trace_geometry

__all__ = [
    "WEIGHTINGS",
    "DilationMap",
    "LayerSamples",
    "effective_dilation",
    "effective_sampling_locations",
    "sampling_layers",
    "sampling_locations_by_layer",
]

WEIGHTINGS = ("value", "contribution", "location")


@dataclass
class LayerSamples:
    """The samples of one sampling layer (or the bins of a RoI pooling) under a node.

    Attributes:
        layer: module name.
        points: ``[P, 2]`` (y, x) image pixel coordinates.
        weights: ``[P]`` non-negative (see the module docstring for ``weighting``).
        feature_points: ``[P, 2]`` (y, x) in the layer's input map (RoI bins: the pooled feature level).
        positions: ``[P, 2]`` output position (y, x) of each sample (RoI bins: bin index (i, j)).
        taps: ``[P]`` kernel tap ``i*kw + j`` (RoI bins: 0).
        groups: ``[P]`` offset group.
        kernel_size, stride, dilation: the layer's (pairs); RoI pooling: (ph, pw), (1, 1), (1, 1).
        input_geometry: geometry of the layer's input map (RoI bins: of the pooled level).
    """

    layer: str
    points: Tensor
    weights: Tensor
    feature_points: Tensor
    positions: Tensor
    taps: Tensor
    groups: Tensor
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    input_geometry: MapGeometry


# --------------------------------------------------------------------------------------------------
# Which layers sample


def _is_regular_sampler(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d and max(module.kernel_size) > 1


def sampling_layers(model: nn.Module, layers: str | Sequence[str] | None = None) -> list[str]:
    """Names of the sampling layers, in module order.

    Args:
        layers: None (default): the deformable layers, or, when the model has none, every regular
            convolution with a kernel larger than 1x1; ``"deformable"``; ``"regular"``; ``"all"`` (both);
            or a sequence of module names (deformable or ``nn.Conv2d``).
    """
    check_module(model)
    modules = dict(model.named_modules())
    deformable = [n for n, m in modules.items() if isinstance(m, DEFORMABLE_TYPES)]
    inside = tuple(f"{n}." for n in deformable)
    regular = [n for n, m in modules.items() if _is_regular_sampler(m) and not n.startswith(inside)]
    if layers is None:
        return deformable or regular
    if isinstance(layers, str):
        if layers not in ("deformable", "regular", "all"):
            raise ValueError(
                f"layers must be None, 'deformable', 'regular', 'all' or a list of names, got {layers!r}"
            )
        if layers == "all":
            chosen = set(deformable) | set(regular)
            return [n for n in modules if n in chosen]
        return deformable if layers == "deformable" else regular
    if not isinstance(layers, Sequence) or not all(isinstance(name, str) for name in layers):
        raise ValueError(
            f"layers must be None, 'deformable', 'regular', 'all' or a list of names, got {layers!r}"
        )
    names = list(layers)
    for name in names:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"layers: {name!r} is not a module of the model")
        if not isinstance(module, DEFORMABLE_TYPES) and type(module) is not nn.Conv2d:
            raise ValueError(
                f"layers: {name!r} is a {type(module).__name__}, not a deformable layer or an nn.Conv2d"
            )
    return names


# --------------------------------------------------------------------------------------------------
# Probing the sampling layers


@dataclass
class _Call:
    """One call of a probed sampling layer."""

    name: str
    module: DeformConv2d | nn.Conv2d
    input_channels: int
    input_size: tuple[int, int]
    offset: Tensor  # [N, 2*G*K, Ho, Wo], detached
    mask: Tensor | None  # [N, G*K, Ho, Wo], detached
    shift: Tensor  # probe leaves
    gate: Tensor
    out_probe: Tensor
    padding: tuple[int, int]


def _numeric_padding(module: nn.Module) -> tuple[int, int]:
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        k, d = _pair(module.kernel_size), _pair(module.dilation)
        if any((d[i] * (k[i] - 1)) % 2 for i in range(2)):
            raise ValueError(f"cannot probe {type(module).__name__} with asymmetric 'same' padding")
        return (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    return _pair(padding)


def _probed_forward(module, name, calls, input, offset, mask):
    kh, kw = module.kernel_size
    taps = kh * kw
    groups = offset.shape[1] // (2 * taps)
    batch, _, out_h, out_w = offset.shape
    padding = _numeric_padding(module)
    shift = torch.zeros_like(offset).requires_grad_(True)
    gate = torch.ones((batch, groups * taps, out_h, out_w), dtype=input.dtype, device=input.device)
    gate.requires_grad_(True)
    modulation = gate if mask is None else mask * gate
    out = deform_conv2d(
        input, offset + shift, module.weight, module.bias, module.stride, padding, module.dilation,
        modulation, backend=getattr(module, "backend", None),
    )  # fmt: skip
    out_probe = torch.zeros_like(out).requires_grad_(True)
    calls.append(
        _Call(
            name,
            module,
            input.shape[1],
            tuple(input.shape[-2:]),
            offset.detach(),
            None if mask is None else mask.detach(),
            shift,
            gate,
            out_probe,
            padding,
        )
    )
    return out + out_probe


def _make_forward(module: nn.Module, name: str, calls: list[_Call]) -> Callable[..., Tensor]:
    # The probed forward takes the arguments of the layer's own: (input) or (input, offset, mask).
    forward: Callable[..., Tensor]
    if isinstance(module, DCNv2):

        def forward(input):
            offset, mask = module.offsets_and_mask(input)
            return _probed_forward(module, name, calls, input, offset, mask)

    elif isinstance(module, DCNv1):

        def forward(input):
            return _probed_forward(module, name, calls, input, module.conv_offset(input), None)

    elif isinstance(module, DEFORMABLE_TYPES):
        if type(module) not in (DeformConv2d, *DEFORMABLE_TYPES[1:]):
            raise ValueError(f"cannot probe {name!r}: unsupported deformable layer {type(module).__name__}")

        def forward(input, offset, mask=None):
            return _probed_forward(module, name, calls, input, offset, mask)

    elif type(module) is nn.Conv2d:
        if module.padding_mode != "zeros":
            raise ValueError(f"cannot probe {name!r}: padding_mode={module.padding_mode!r} (needs 'zeros')")
        kh, kw = module.kernel_size

        def forward(input):
            padding = _numeric_padding(module)
            size = []
            for i in range(2):
                span = module.dilation[i] * (module.kernel_size[i] - 1) + 1
                size.append((input.shape[2 + i] + 2 * padding[i] - span) // module.stride[i] + 1)
            offset = input.new_zeros((input.shape[0], 2 * kh * kw, *size))
            return _probed_forward(module, name, calls, input, offset, None)

    else:
        raise ValueError(f"cannot probe {name!r}: {type(module).__name__} is not a sampling layer")
    return forward


@contextlib.contextmanager
def _replaced(module: nn.Module, attribute: str, value) -> Iterator[None]:
    """Set an instance attribute (a method override) for the duration, restoring any previous one."""
    previous = module.__dict__.get(attribute, _MISSING)
    setattr(module, attribute, value)
    try:
        yield
    finally:
        if previous is _MISSING:
            delattr(module, attribute)
        else:
            setattr(module, attribute, previous)


_MISSING = object()


@contextlib.contextmanager
def _probes(model: nn.Module, names: Sequence[str]) -> Iterator[list[_Call]]:
    """Replace the forward of every named sampling layer by its probed equivalent for the duration."""
    modules = dict(model.named_modules())
    calls: list[_Call] = []
    with contextlib.ExitStack() as stack:
        for name in names:
            module = modules[name]
            stack.enter_context(_replaced(module, "forward", _make_forward(module, name, calls)))
        yield calls


# --------------------------------------------------------------------------------------------------
# Sampling locations of the layers under a node


def _input_geometry(geometries, call: _Call, image_size) -> MapGeometry:
    g = geometries.get(call.name, (None, None))[0]
    return g if g is not None else _fallback(image_size, call.input_size)


def _value_weights(call: _Call, grad_out: Tensor, support: Tensor) -> Tensor:
    """``sum_c |m * d node / d x(p)|`` per (offset group, tap, supported position): ``[G, K, S]``."""
    weight = call.module.weight.detach()  # [C_out, C_in / conv_groups, kh, kw]
    c_out, c_in_group, kh, kw = weight.shape
    taps = kh * kw
    conv_groups = call.input_channels // c_in_group
    grad = grad_out[:, support].reshape(conv_groups, c_out // conv_groups, -1)  # [groups, C_out/groups, S]
    w = weight.reshape(conv_groups, c_out // conv_groups, c_in_group, taps).to(grad.dtype)
    per_channel = torch.einsum("gos,goik->giks", grad, w).reshape(call.input_channels, taps, -1)
    offset_groups = call.offset.shape[1] // (2 * taps)
    value = per_channel.abs().reshape(offset_groups, -1, taps, per_channel.shape[-1]).sum(1)
    if call.mask is not None:
        value = value * call.mask[0].reshape(offset_groups, taps, -1)[:, :, support.flatten()]
    return value


def _location_weights(call: _Call, grad_shift: Tensor | None, flat: Tensor, geometry: MapGeometry) -> Tensor:
    """``|d node / d p|_2`` per (offset group, tap, supported position) ``[G, K, S]``, per image pixel: the
    offset gradient (input-map pixels, (y, x) per tap) divided per axis by the input map's scale."""
    g = torch.zeros_like(call.shift) if grad_shift is None else grad_shift
    kh, kw = call.module.kernel_size
    taps = kh * kw
    per_axis = g[0].reshape(-1, taps, 2, g.shape[-2] * g.shape[-1])[:, :, :, flat]  # [G, K, 2, S]
    scale = torch.tensor([geometry.y.scale, geometry.x.scale], dtype=per_axis.dtype, device=per_axis.device)
    return (per_axis / scale[:, None]).norm(dim=2)


def _layer_samples(call: _Call, grads, weighting: str, geometry: MapGeometry) -> LayerSamples | None:
    grad_shift, grad_gate, grad_out = grads
    offset = call.offset[0]
    device, dtype = offset.device, offset.dtype
    kh, kw = call.module.kernel_size
    taps = kh * kw
    groups = offset.shape[0] // (2 * taps)
    grad_out = torch.zeros_like(call.out_probe[0]) if grad_out is None else grad_out[0]
    support = grad_out.ne(0).any(0)  # [Ho, Wo]
    if not bool(support.any()):
        return None
    flat = support.flatten()
    if weighting == "value":
        weights = _value_weights(call, grad_out.detach(), support)
    elif weighting == "contribution":
        g = torch.zeros_like(call.gate) if grad_gate is None else grad_gate
        weights = g[0].reshape(groups, taps, -1)[:, :, flat].abs()
    else:
        weights = _location_weights(call, grad_shift, flat, geometry)
    oy, ox = torch.nonzero(support, as_tuple=True)  # [S]
    stride, dilation, padding = _pair(call.module.stride), _pair(call.module.dilation), call.padding
    i = torch.arange(kh, device=device).repeat_interleave(kw)  # [K]
    j = torch.arange(kw, device=device).repeat(kh)
    delta = offset.reshape(groups, taps, 2, -1)[:, :, :, flat]  # [G, K, 2, S]
    qy = (oy * stride[0] - padding[0])[None, None, :] + (i * dilation[0])[None, :, None] + delta[:, :, 0]
    qx = (ox * stride[1] - padding[1])[None, None, :] + (j * dilation[1])[None, :, None] + delta[:, :, 1]
    if weighting == "location":
        # A sample off the map reads 0. At exactly -1 (a padding tap under zero offsets) the operator's
        # offset gradient is torchvision's one-sided one, not 0 as at H or W: weigh neither edge.
        height, width = call.input_size
        weights = weights * ((qy > -1) & (qy < height) & (qx > -1) & (qx < width))
    feature_points = torch.stack((qy, qx), -1).to(dtype).reshape(-1, 2)  # [G*K*S, 2]
    count = oy.numel()
    positions = torch.stack((oy, ox), -1)[None, None].expand(groups, taps, count, 2).reshape(-1, 2)
    tap_index = torch.arange(taps, device=device)[None, :, None].expand(groups, taps, count).reshape(-1)
    group_index = torch.arange(groups, device=device)[:, None, None].expand(groups, taps, count).reshape(-1)
    return LayerSamples(
        call.name,
        geometry.to_image(feature_points).detach(),
        weights.reshape(-1).detach(),
        feature_points.detach(),
        positions,
        tap_index,
        group_index,
        (kh, kw),
        stride,
        dilation,
        geometry,
    )


def _conv_samples(model, x, node, names, weighting, roi=None, extra_leaves=None):
    """Samples of the ``names`` layers under ``node``, and the gradients of ``extra_leaves()`` (leaves
    created during the forward pass) from the same backward pass."""
    geometries = trace_geometry(model, spatial_size(x))
    with _probes(model, names) as calls:
        scalar = evaluate_node(model, x[None], node, roi).scalar[0]
        extra = extra_leaves() if extra_leaves is not None else []
        leaves = [t for c in calls for t in (c.shift, c.gate, c.out_probe)] + extra
        grads = list(torch.autograd.grad(scalar, leaves, allow_unused=True)) if leaves else []
    result = []
    for index, call in enumerate(calls):
        geometry = _input_geometry(geometries, call, x.shape[-2:])
        samples = _layer_samples(call, grads[3 * index : 3 * index + 3], weighting, geometry)
        if samples is not None:
            result.append(samples)
    return result, grads[3 * len(calls) :]


# --------------------------------------------------------------------------------------------------
# RoI bins


@dataclass
class _BranchCall:
    """One call of a RoI pooling's offset branch (for RoIAlign: of the zero-offset probe pooling).

    ``offset`` ``[K_l, 2, ph, pw]`` normalised offsets (x, y) of the RoIs it pooled (detached), ``mask``
    ``[K_l, 1, ph, pw]`` or None, ``shift`` the additive zero probe on the offsets (a leaf), ``gamma`` and
    ``aligned`` the pooling's offset scale and convention (a bin moves by ``gamma * offset * roi size``).
    """

    offset: Tensor
    mask: Tensor | None
    shift: Tensor
    gamma: float
    aligned: bool


@dataclass
class _BinCapture:
    """What a RoI forward pass leaves for the bins: the pooled features ``[K, C, ph, pw]`` and their additive
    zero probe, and every offset-branch call by branch index (one per FPN level when the levels have
    their own branch, else index 0)."""

    pooled: Tensor | None = None
    out_probe: Tensor | None = None
    branches: dict[int, _BranchCall] = field(default_factory=dict)

    def pooled_hook(self, pooled: Tensor) -> Tensor:
        probe = torch.zeros_like(pooled).requires_grad_(True)
        self.pooled, self.out_probe = pooled, probe
        return pooled + probe

    def leaves(self) -> list[Tensor]:
        """The probes to differentiate: ``out_probe``, then the branches' shifts by branch index."""
        if self.out_probe is None:
            raise RuntimeError("the RoI pooling did not run in the forward pass")
        return [self.out_probe] + [self.branches[i].shift for i in sorted(self.branches)]


def _probed_predict(
    branch, index: int, capture: _BinCapture, pooling, zero_offsets: bool
) -> Callable[[Tensor], tuple]:
    """``branch.predict`` with an additive zero probe on its offsets, recorded as branch ``index``;
    ``pooling`` is the module whose ``gamma`` and ``aligned`` the pooling uses. ``zero_offsets`` replaces
    the offsets by zeros (for a pooling run at gamma 1 in place of 0, where they have no effect)."""
    original = branch.predict

    def predict(plain: Tensor):
        offset, mask = original(plain)
        if zero_offsets:
            offset = torch.zeros_like(offset)
        shift = torch.zeros_like(offset).requires_grad_(True)
        detached_mask = None if mask is None else mask.detach()
        capture.branches[index] = _BranchCall(
            offset.detach(), detached_mask, shift, float(pooling.gamma), pooling.aligned
        )
        return offset + shift, mask

    return predict


def _probed_align(pooler: MultiScaleRoIAlign, capture: _BinCapture) -> Callable[..., Tensor]:
    """A forward for torchvision's ``MultiScaleRoIAlign`` that pools every RoI on its level through
    deformable RoI pooling with zero offsets (exactly RoIAlign: same bins, samples and bilinear rule) and
    ``gamma=1``, so that the offsets are a probe on the bins' locations (branch 0 of ``capture``)."""
    output_size = tuple(_pair(pooler.output_size))

    def forward(x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [v for k, v in x.items() if k in pooler.featmap_names]  # torchvision's order
        if pooler.scales is None or pooler.map_levels is None:
            pooler.scales, pooler.map_levels = _setup_scales(
                features, image_shapes, pooler.canonical_scale, pooler.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        first = features[0]
        if len(features) > 1:
            levels = pooler.map_levels(boxes)
        else:
            levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
        shift = first.new_zeros((rois.shape[0], 2, *output_size)).requires_grad_(True)
        result = first.new_zeros((rois.shape[0], first.shape[1], *output_size))
        for level, (feature, scale) in enumerate(zip(features, pooler.scales, strict=True)):
            index = torch.where(levels == level)[0]
            if index.numel():
                result[index] = deform_roi_pool(
                    feature, rois[index], shift[index], None, output_size, scale, pooler.sampling_ratio, 1.0
                )
        capture.branches[0] = _BranchCall(shift.detach().clone(), None, shift, 1.0, False)
        return result

    return forward


def _roi_bins(model: nn.Module, x: Tensor, node: Node, weighting: str, names) -> list[LayerSamples]:
    """The samples of the ``names`` layers under the RoI node and, last, its bins (one forward and one
    backward pass, with probes on the pooled bins and on the offsets of every offset branch)."""
    pooler = _check_detector(model).roi_heads.box_roi_pool
    if not isinstance(pooler, MultiScaleDeformRoIPool | MultiScaleRoIAlign):
        raise ValueError(
            "RoI bins need roi_heads.box_roi_pool to be a MultiScaleDeformRoIPool or MultiScaleRoIAlign, got "
            f"{type(pooler).__name__}"
        )
    roi = RoIForward(model, node.position)
    capture = _BinCapture()
    roi.pooled_hook = capture.pooled_hook
    with contextlib.ExitStack() as stack:
        if isinstance(pooler, MultiScaleDeformRoIPool):
            pooling = pooler._branch(0)  # its settings pool every level
            ignored = pooling.gamma == 0  # offsets without effect: probe the bins at gamma 1, offsets 0
            if ignored:
                stack.enter_context(_replaced(pooling, "gamma", 1.0))
            for index, branch in enumerate(pooler.pools):
                probed = _probed_predict(branch, index, capture, pooling, ignored)
                stack.enter_context(_replaced(branch, "predict", probed))
        else:
            stack.enter_context(_replaced(pooler, "forward", _probed_align(pooler, capture)))
        conv, extra = _conv_samples(model, x, node, names, weighting, roi, capture.leaves)
    grad_shifts = dict(zip(sorted(capture.branches), extra[1:], strict=True))
    bins = _bins_from_capture(pooler, roi, capture, extra[0], grad_shifts, weighting, x.shape[-2:])
    return [*conv, bins]


def _roi_level(pooler, roi: RoIForward) -> tuple[int, int]:
    """``(level, branch index)`` of the analysed RoI (the first box of the last forward pass): its FPN
    level, and the offset branch that predicted its offsets (that level's with per-level branches)."""
    assert pooler.scales is not None and roi.last_boxes is not None
    level = 0 if len(pooler.scales) == 1 else int(pooler.map_levels(roi.last_boxes)[0])
    per_level = isinstance(pooler, MultiScaleDeformRoIPool) and not pooler.share_offset_branch
    return level, level if per_level else 0


def _bins_from_capture(
    pooler, roi: RoIForward, capture: _BinCapture, grad_out, grad_shifts, weighting: str, image_size
) -> LayerSamples:
    """The :class:`LayerSamples` of the RoI's bins from the probes of one forward/backward pass."""
    ph, pw = _pair(pooler.output_size)
    level, branch_index = _roi_level(pooler, roi)
    call = capture.branches.get(branch_index)
    if call is None or call.offset.shape[0] == 0:
        raise RuntimeError(f"the offset branch {branch_index} of the RoI pooling did not see the RoI")
    assert roi.last_boxes is not None and roi.last_image_sizes is not None and capture.pooled is not None
    box = roi.last_boxes[0][0].detach().double()  # transformed-image coordinates (box convention)
    scale = float(pooler.scales[level])
    half = 0.5 if call.aligned else 0.0
    start_x, start_y = float(box[0]) * scale - half, float(box[1]) * scale - half
    roi_w, roi_h = float(box[2]) * scale - half - start_x, float(box[3]) * scale - half - start_y
    if not call.aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    pooled = capture.pooled[0].detach()  # [C, ph, pw]
    dtype, device = pooled.dtype, pooled.device
    offset = call.offset[0].to(dtype)  # [2, ph, pw] (x, y)
    i = torch.arange(ph, dtype=dtype, device=device)[:, None]
    j = torch.arange(pw, dtype=dtype, device=device)[None, :]
    fy = start_y + call.gamma * roi_h * offset[1] + (i + 0.5) * roi_h / ph
    fx = start_x + call.gamma * roi_w * offset[0] + (j + 0.5) * roi_w / pw
    feature_points = torch.stack((fy, fx), -1).reshape(-1, 2)
    geometry = _level_geometry(scale, half, roi.last_image_sizes[0], image_size)
    grad_out = torch.zeros_like(pooled) if grad_out is None else grad_out[0].detach()
    if weighting == "value":
        weights = grad_out.abs().sum(0)
        if call.mask is not None:
            weights = weights * call.mask[0, 0].to(dtype)
    elif weighting == "contribution":
        weights = (grad_out * pooled).sum(0).abs()
    else:
        g = grad_shifts.get(branch_index)
        g = torch.zeros((2, ph, pw), dtype=dtype, device=device) if g is None else g[0].detach()
        per_image_x = g[0] / (call.gamma * roi_w) / geometry.x.scale  # d node / d (bin x, image px)
        per_image_y = g[1] / (call.gamma * roi_h) / geometry.y.scale
        weights = torch.stack((per_image_y, per_image_x)).norm(dim=0)
    rows, cols = torch.arange(ph, device=device), torch.arange(pw, device=device)
    bins = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)
    zeros = torch.zeros(ph * pw, dtype=torch.long, device=device)
    return LayerSamples(
        "roi_heads.box_roi_pool",
        geometry.to_image(feature_points),
        weights.reshape(-1),
        feature_points,
        bins,
        zeros,
        zeros,
        (ph, pw),
        (1, 1),
        (1, 1),
        geometry,
    )


def _level_geometry(scale: float, half: float, transformed_size, image_size) -> MapGeometry:
    """Geometry of a pooled feature level as RoI pooling sees it: feature coordinate ``f`` is the
    transformed-image box coordinate ``(f + half) / scale``, i.e. the original-image box coordinate
    ``(f + half) / (scale * r)`` (``r`` the transform's resize ratio), i.e. the pixel-centre image
    coordinate 0.5 less."""
    (image_h, image_w), (height, width) = transformed_size, image_size
    ry, rx = image_h / height, image_w / width
    return MapGeometry(
        AxisMap(1 / (scale * ry), half / (scale * ry) - 0.5),
        AxisMap(1 / (scale * rx), half / (scale * rx) - 0.5),
    )


# --------------------------------------------------------------------------------------------------
# Public functions


def sampling_locations_by_layer(
    model: nn.Module,
    image: Tensor,
    layer: str,
    position,
    channel: int | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    weighting: str = "location",
) -> list[LayerSamples]:
    """The samples under a node, layer by layer (see the module docstring).

    Args:
        model, image, layer, position, channel: as :func:`effective_sampling_locations`.
        layers: which sampling layers (see :func:`sampling_layers`); for RoI nodes None means the bins
            only, anything else adds those layers' samples to the bins.
        weighting: ``"location"`` (default), ``"value"`` or ``"contribution"`` (module docstring).

    Returns:
        One :class:`LayerSamples` per layer call with at least one sample under the node, bottom-up
        in forward order (RoI bins last).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    node = make_node(layer, position, channel)
    with analysis_mode(model), gradients_enabled():
        x = prepare_image(image, model)
        node = resolve_node(model, x, node)
        if node.is_roi:
            names = [] if layers is None else sampling_layers(model, layers)
            return _roi_bins(model, x, node, weighting, names)
        return _conv_samples(model, x, node, sampling_layers(model, layers), weighting)[0]


def effective_sampling_locations(
    model: nn.Module,
    image: Tensor,
    layer: str,
    position,
    channel: int | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    weighting: str = "location",
    max_points: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The effective sampling locations of a node: every sample of the sampling layers under it (the
    bins of the RoI pooling for RoI nodes), in image coordinates, with their weights.

    Args:
        model: an ordinary ``[B, C, H, W]`` network or a torchvision detector.
        image: ``[C, H, W]`` as the model takes it.
        layer, position, channel: the node (see :mod:`deformable.analysis`).
        layers: sampling layers (see :func:`sampling_layers`; default: the deformable ones, or the
            regular k>1 convolutions of a network without any).
        weighting: ``"location"`` (default: ``|d node / d p|`` per image pixel), ``"value"`` or
            ``"contribution"`` (module docstring).
        max_points: keep only the ``max_points`` largest weights (None: all).

    Returns:
        ``(points [P, 2], weights [P])``: (y, x) image pixel coordinates and non-negative weights.
    """
    if max_points is not None and (isinstance(max_points, bool) or not isinstance(max_points, int)):
        raise TypeError(f"max_points must be a positive int or None, got {max_points!r}")
    if max_points is not None and max_points < 1:
        raise ValueError(f"max_points must be a positive int or None, got {max_points}")
    per_layer = sampling_locations_by_layer(
        model, image, layer, position, channel, layers=layers, weighting=weighting
    )
    if not per_layer:
        x = prepare_image(image, model)
        return x.new_zeros((0, 2)), x.new_zeros(0)
    points = torch.cat([s.points for s in per_layer])
    weights = torch.cat([s.weights for s in per_layer])
    if max_points is not None and points.shape[0] > max_points:
        keep = weights.topk(max_points).indices
        points, weights = points[keep], weights[keep]
    return points, weights


@dataclass
class DilationMap:
    """DCNv1's effective dilation of one deformable layer at every output position.

    Attributes:
        layer: module name.
        dilation: ``[Ho, Wo]`` mean distance between adjacent sampling locations of the kernel (pairs of
            horizontally and vertically neighbouring taps, averaged over offset groups), in pixels of the
            layer's input map (a regular convolution gives its dilation).
        centers: ``[Ho, Wo, 2]`` (y, x) image coordinates of each output position's window centre.
        input_scale: image pixels per input-map pixel (y, x).
    """

    layer: str
    dilation: Tensor
    centers: Tensor
    input_scale: tuple[float, float]


def _dilation_map(call: _Call, geometry: MapGeometry) -> Tensor:
    kh, kw = call.module.kernel_size
    taps = kh * kw
    offset = call.offset[0]
    groups = offset.shape[0] // (2 * taps)
    out_h, out_w = offset.shape[-2:]
    dilation = _pair(call.module.dilation)
    delta = offset.reshape(groups, kh, kw, 2, out_h, out_w)
    base_y = (torch.arange(kh, device=offset.device) * dilation[0]).to(offset.dtype)[:, None, None, None]
    base_x = (torch.arange(kw, device=offset.device) * dilation[1]).to(offset.dtype)[None, :, None, None]
    qy = base_y + delta[:, :, :, 0]  # [G, kh, kw, Ho, Wo] relative to the window's corner
    qx = base_x + delta[:, :, :, 1]
    distances = []
    if kw > 1:
        distances.append(
            torch.hypot(qy[:, :, 1:] - qy[:, :, :-1], qx[:, :, 1:] - qx[:, :, :-1]).flatten(1, 2)
        )
    if kh > 1:
        distances.append(torch.hypot(qy[:, 1:] - qy[:, :-1], qx[:, 1:] - qx[:, :-1]).flatten(1, 2))
    if not distances:
        return offset.new_zeros((out_h, out_w))
    return torch.cat(distances, 1).mean(dim=(0, 1))


def effective_dilation(
    model: nn.Module, image: Tensor, layers: str | Sequence[str] | None = None
) -> dict[str, DilationMap]:
    """DCNv1's effective dilation of every sampling layer (default: the deformable ones) on ``image``.

    One forward pass without gradients (detectors: transform and backbone only).

    Returns:
        ``{layer name: DilationMap}`` (the last call of a layer run several times).
    """
    names = sampling_layers(model, layers)
    result: dict[str, DilationMap] = {}
    with analysis_mode(model), gradients_enabled(), torch.no_grad():
        x = prepare_image(image, model)
        geometries = trace_geometry(model, spatial_size(x))
        with _probes(model, names) as calls:
            if is_detector(model):
                image_list, _ = model.transform([x])
                model.backbone(image_list.tensors)
            else:
                run_model(model, x[None])
    for call in calls:
        geometry = _input_geometry(geometries, call, x.shape[-2:])
        kh, kw = call.module.kernel_size
        stride, dilation = _pair(call.module.stride), _pair(call.module.dilation)
        out_h, out_w = call.offset.shape[-2:]
        cy = torch.arange(out_h, dtype=x.dtype, device=x.device) * stride[0] - call.padding[0]
        cx = torch.arange(out_w, dtype=x.dtype, device=x.device) * stride[1] - call.padding[1]
        cy = cy + dilation[0] * (kh - 1) / 2
        cx = cx + dilation[1] * (kw - 1) / 2
        grid = torch.stack(torch.meshgrid(cy, cx, indexing="ij"), -1)
        result[call.name] = DilationMap(
            call.name,
            _dilation_map(call, geometry),
            geometry.to_image(grid),
            (geometry.y.scale, geometry.x.scale),
        )
    return result
